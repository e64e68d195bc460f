"""Is the TFRecord dataset already there? If so, the pipeline uses it instead of converting."""

from kfp.dsl import Dataset, Output

from components import step


@step
def dataset_ready(tfrecord_uri: str) -> bool:
    """True when ``tfrecord_uri`` holds complete train and validation shard sets."""
    from resnet_imagenet.data import inventory

    info = inventory.inspect(tfrecord_uri)
    print(f"{tfrecord_uri}: {info['reason']}")
    return info["ready"]


@step
def use_existing_dataset(tfrecord_uri: str, dataset: Output[Dataset]) -> str:
    """Record the existing dataset as this run's Dataset artifact; returns its URI."""
    from pipelines import artifacts

    dataset.metadata.update(artifacts.dataset(tfrecord_uri, dataset.path))
    return dataset.metadata["uri"]
