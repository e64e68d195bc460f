"""Export of the evaluated checkpoint as a versioned SavedModel (TF Serving layout)."""

from kfp.dsl import Input, Model, Output

from components import step


@step
def export_saved_model(
    model: Input[Model],
    export_uri: str,
    overwrite: bool,
    saved_model: Output[Model],
) -> str:
    """Write EXPORT/1/; returns its URI."""
    from resnet_imagenet import artifacts, export

    path = export.export(model.metadata["uri"], export_uri, overwrite=overwrite)
    saved_model.metadata.update(artifacts.saved_model(path, saved_model.path))
    return saved_model.metadata["uri"]
