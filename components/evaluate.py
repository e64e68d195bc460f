"""Evaluation of the final checkpoint over the whole validation split."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components import step


@step
def evaluate(
    data_uri: str,
    model: Input[Model],
    evaluation_metrics: Output[Metrics],
    evaluation_details: Output[Artifact],
):
    """Top-1/top-5 (shown by the KFP UI) and the full metrics JSON with the per-class table.

    Idempotent (KFP retries it): it reads the checkpoint and writes only its own outputs.
    """
    from pipelines import artifacts
    from resnet_imagenet import evaluation

    result = evaluation.evaluate(data_uri, model.metadata["uri"], output=evaluation_details.path)
    for name, value in artifacts.metrics(result).items():
        evaluation_metrics.log_metric(name, value)
