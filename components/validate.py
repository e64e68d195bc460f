"""First step: refuse bad pipeline parameters and unreachable gs:// URIs (pre-flight) before any
data is converted or GPU requested."""

from typing import List

from components import step


@step
def validate_parameters(
    train_backend: str,
    train_workers: int,
    train_gpus_per_worker: int,
    train_batch_size: int,
    train_steps: int,
    model_resnet_depth: int,
    model_num_classes: int,
    model_image_size: int,
    tfrecord_tasks: int,
    tfrecord_shards_train: int,
    tfrecord_shards_validation: int,
    train_timeout_seconds: int,
    train_timeout_max_seconds: int,
    train_start_timeout_seconds: int,
    train_gpu_tolerations: List[dict],
    step_tolerations: List[dict],
    train_extra_args: List[str],
    data_raw_uri: str,
    data_tfrecord_uri: str,
    data_model_uri: str,
    data_export_uri: str,
) -> List[int]:
    """Check the run's parameters; return the conversion task indices for the ParallelFor."""
    from pipelines import params as pipeline_params
    from resnet_imagenet import preflight

    pipeline_params.validate(
        train_backend=train_backend, train_workers=train_workers,
        train_gpus_per_worker=train_gpus_per_worker, train_batch_size=train_batch_size,
        train_steps=train_steps, model_resnet_depth=model_resnet_depth,
        model_num_classes=model_num_classes, model_image_size=model_image_size,
        tfrecord_tasks=tfrecord_tasks, tfrecord_shards_train=tfrecord_shards_train,
        tfrecord_shards_validation=tfrecord_shards_validation,
        train_timeout_seconds=train_timeout_seconds,
        train_timeout_max_seconds=train_timeout_max_seconds,
        train_start_timeout_seconds=train_start_timeout_seconds,
        uris={"data_raw_uri": data_raw_uri, "data_tfrecord_uri": data_tfrecord_uri,
              "data_model_uri": data_model_uri, "data_export_uri": data_export_uri},
        tolerations={"train_gpu_tolerations": train_gpu_tolerations,
                     "step_tolerations": step_tolerations},
        train_extra_args=train_extra_args,
    )
    for line in preflight.check_pipeline(
            raw=("data_raw_uri", data_raw_uri), tfrecord=("data_tfrecord_uri", data_tfrecord_uri),
            outputs={"data_model_uri": data_model_uri, "data_export_uri": data_export_uri}):
        print(f"pre-flight: {line}")
    return pipeline_params.task_indices(tfrecord_tasks)
