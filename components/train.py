"""Training: the launcher creates the TFJob (or local workers) and waits for it."""

from typing import Dict, List

from kfp.dsl import Model, Output

from components import step


@step
def train(
    data_uri: str,
    model_uri: str,
    backend: str,
    workers: int,
    gpus_per_worker: int,
    evaluator: bool,
    trainer_image: str,
    namespace: str,
    gpu_node_selector: Dict[str, str],
    gpu_tolerations: List[str],
    service_account: str,
    timeout_seconds: int,
    run_id: str,
    resnet_size: int,
    num_classes: int,
    image_size: int,
    batch_size: int,
    train_steps: int,
    checkpoint_every: int,
    train_args: List[str],
    model: Output[Model],
):
    """Run ``resnet-imagenet launch`` until training ends; the Model artifact points at MODEL."""
    from resnet_imagenet import artifacts, pipeline_params

    pipeline_params.run(pipeline_params.launch_argv(
        backend=backend, workers=workers, gpus_per_worker=gpus_per_worker, evaluator=evaluator,
        trainer_image=trainer_image, namespace=namespace, run_id=run_id,
        timeout_seconds=timeout_seconds, gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations, service_account=service_account,
        train=pipeline_params.train_argv(
            data_uri=data_uri, model_uri=model_uri, resnet_size=resnet_size,
            num_classes=num_classes, image_size=image_size, batch_size=batch_size,
            train_steps=train_steps, checkpoint_every=checkpoint_every, extra=train_args,
        ),
    ))
    model.metadata.update(artifacts.model(model_uri, model.path))
