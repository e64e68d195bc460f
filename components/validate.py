"""First step: refuse bad pipeline parameters and unreachable gs:// URIs (pre-flight) before any
data is converted or GPU requested."""

from typing import List

from components import step


@step
def validate_parameters(
    backend: str,
    workers: int,
    gpus_per_worker: int,
    batch_size: int,
    train_steps: int,
    resnet_size: int,
    num_classes: int,
    image_size: int,
    num_tasks: int,
    train_shards: int,
    validation_shards: int,
    timeout_seconds: int,
    raw_uri: str,
    tfrecord_uri: str,
    model_uri: str,
    export_uri: str,
) -> List[int]:
    """Check the run's parameters; return the conversion task indices for the ParallelFor."""
    from resnet_imagenet import pipeline_params, preflight

    pipeline_params.validate(
        backend=backend, workers=workers, gpus_per_worker=gpus_per_worker,
        batch_size=batch_size, train_steps=train_steps, resnet_size=resnet_size,
        num_classes=num_classes, image_size=image_size, num_tasks=num_tasks,
        train_shards=train_shards, validation_shards=validation_shards,
        timeout_seconds=timeout_seconds,
        uris={"raw_uri": raw_uri, "tfrecord_uri": tfrecord_uri, "model_uri": model_uri,
              "export_uri": export_uri},
    )
    for line in preflight.check_pipeline(
            raw=("raw_uri", raw_uri), tfrecord=("tfrecord_uri", tfrecord_uri),
            outputs={"model_uri": model_uri, "export_uri": export_uri}):
        print(f"pre-flight: {line}")
    return pipeline_params.task_indices(num_tasks)
