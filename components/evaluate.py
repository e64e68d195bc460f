"""Evaluation of the final checkpoint over the whole validation split."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components import step


@step
def evaluate(
    data_uri: str,
    model: Input[Model],
    metrics: Output[Metrics],
    metrics_json: Output[Artifact],
):
    """Top-1/top-5 (shown by the KFP UI) and the full metrics JSON with the per-class table."""
    from resnet_imagenet import artifacts, evaluation

    result = evaluation.evaluate(data_uri, model.metadata["uri"], output=metrics_json.path)
    for name, value in artifacts.metrics(result).items():
        metrics.log_metric(name, value)
