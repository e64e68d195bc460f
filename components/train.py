"""Training: the launcher creates the TFJob/TrainJob (or local workers) and waits for it."""

from typing import Dict, List

from kfp.dsl import Metrics, Model, Output

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
    gpu_tolerations: List[dict],
    service_account: str,
    gcs_secret: str,
    timeout_seconds: int,
    start_timeout_seconds: int,
    run_id: str,
    resnet_size: int,
    num_classes: int,
    image_size: int,
    batch_size: int,
    train_steps: int,
    checkpoint_every: int,
    train_args: List[str],
    model: Output[Model],
    training_metrics: Output[Metrics],
):
    """Run ``resnet-imagenet launch`` until training ends; the Model artifact points at MODEL,
    the Metrics artifact holds the final training figures (loss, images/s, steps)."""
    from pipelines import artifacts
    from pipelines import params as pipeline_params

    pipeline_params.run(pipeline_params.launch_argv(
        backend=backend, workers=workers, gpus_per_worker=gpus_per_worker, evaluator=evaluator,
        trainer_image=trainer_image, namespace=namespace, run_id=run_id,
        timeout_seconds=timeout_seconds, start_timeout_seconds=start_timeout_seconds,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations, service_account=service_account, gcs_secret=gcs_secret,
        train=pipeline_params.train_argv(
            data_uri=data_uri, model_uri=model_uri, resnet_size=resnet_size,
            num_classes=num_classes, image_size=image_size, batch_size=batch_size,
            train_steps=train_steps, checkpoint_every=checkpoint_every, extra=train_args,
        ),
    ))
    model.metadata.update(artifacts.model(model_uri, model.path))
    for name, value in artifacts.training_metrics(model.path).items():
        training_metrics.log_metric(name, value)
