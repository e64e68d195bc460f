"""The HTML report the KFP UI shows: loss/accuracy curves and the per-class table."""

from kfp.dsl import HTML, Artifact, Input, Model, Output

from components import step


@step
def training_report(model: Input[Model], evaluation_details: Input[Artifact],
                    report: Output[HTML]):
    """Curves from MODEL/logs (TensorBoard event files) and the evaluation's metrics."""
    from resnet_imagenet import report as training_report_lib

    training_report_lib.write(model.metadata["uri"], evaluation_details.path, report.path)
