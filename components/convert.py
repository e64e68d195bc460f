"""Conversion of the raw images to TFRecord shards: one task of N, then the finalize step."""

from kfp.dsl import Dataset, Output

from components import step


@step
def convert_shards(
    raw_uri: str,
    tfrecord_uri: str,
    train_shards: int,
    validation_shards: int,
    num_tasks: int,
    task_index: int,
    workers: int,
    seed: int,
):
    """Write this task's share of the shards (resumable: complete shards are kept)."""
    from pipelines import params as pipeline_params

    pipeline_params.run(pipeline_params.convert_argv(
        raw_uri=raw_uri, tfrecord_uri=tfrecord_uri, train_shards=train_shards,
        validation_shards=validation_shards, num_tasks=num_tasks, task_index=task_index,
        workers=workers, seed=seed,
    ))


@step
def finalize_dataset(tfrecord_uri: str, dataset: Output[Dataset]) -> str:
    """Check every task's shards, write manifest.json; returns the dataset URI."""
    from pipelines import artifacts
    from pipelines import params as pipeline_params

    pipeline_params.run(pipeline_params.finalize_argv(tfrecord_uri))
    dataset.metadata.update(artifacts.dataset(tfrecord_uri, dataset.path))
    return dataset.metadata["uri"]
