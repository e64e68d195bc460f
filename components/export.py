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
    """Write EXPORT/1/; returns its URI.

    KFP retries this step: a version already exported from the same checkpoint (by an attempt
    that failed after publishing it) is kept, and any other existing version is refused unless
    ``overwrite``, which replaces it cleanly.
    """
    from pipelines import artifacts
    from resnet_imagenet import export

    path = export.export(model.metadata["uri"], export_uri, overwrite=overwrite, reuse=True)
    saved_model.metadata.update(artifacts.saved_model(path, saved_model.path))
    return saved_model.metadata["uri"]
