"""Evaluate, export and predict with every URI on gs:// (the fake-gcs-server emulator)."""

from __future__ import annotations

import json
import re

import pytest

from resnet_imagenet import cli, evaluation, export, storage
from resnet_imagenet.errors import UserError
from resnet_imagenet.report import read_scalars
from tests.support.model_dir import (  # noqa: F401  (fixtures)
    checkpoint_logits,
    exported_model,
    near_ties,
    raw_validation,
    trained_model,
)

pytestmark = pytest.mark.gcs


def _upload_model(trained, bucket: str) -> str:
    model_dir = storage.join(bucket, "runs", "model")
    storage.copy_tree(trained.model_dir, model_dir)
    return model_dir


def test_evaluate_from_gcs(trained_model, gcs_bucket, capsys):
    data_dir = storage.join(gcs_bucket, "tfrecords")
    storage.copy_tree(trained_model.data_dir, data_dir)
    model_dir = _upload_model(trained_model, gcs_bucket)
    output = storage.join(gcs_bucket, "metrics", "metrics.json")

    status = cli.main(["evaluate", "--data-dir", data_dir, "--model-dir", model_dir,
                       "--output", output, "--batch-size", "16"])

    assert status == 0, capsys.readouterr().err
    metrics = json.loads(storage.read_text(output))
    logits, labels = checkpoint_logits(trained_model)
    hits = logits.argmax(axis=1) + 1 == labels
    assert metrics["images"] == len(labels)
    assert abs(metrics["top1"] * len(labels) - hits.sum()) <= near_ties(logits, 1).sum()
    assert metrics["checkpoint"] == f"{model_dir}/checkpoints/ckpt-30"
    scalars = read_scalars(storage.join(model_dir, "logs", "validation"))
    assert scalars["validation/top1"] == [(30, pytest.approx(metrics["top1"]))]

    missing = f"{model_dir}/checkpoints/ckpt-999"
    with pytest.raises(UserError, match=re.escape(f"--checkpoint {missing} not found")):
        evaluation.evaluate(data_dir, model_dir, checkpoint=missing)


def test_export_and_predict_on_gcs(trained_model, exported_model, gcs_bucket, tmp_path, capsys):
    model_dir = _upload_model(trained_model, gcs_bucket)
    export_dir = storage.join(gcs_bucket, "serving", "resnet")
    storage.copy_tree(exported_model, f"{export_dir}/1")  # an earlier export
    before = storage.read_bytes(f"{export_dir}/1/saved_model.pb")

    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        export.export(model_dir, export_dir)
    assert storage.read_bytes(f"{export_dir}/1/saved_model.pb") == before

    saved = export.export(model_dir, export_dir, overwrite=True)

    assert saved == f"{export_dir}/1"
    assert storage.listdir(export_dir) == ["1"]  # the staging prefix is gone
    assert storage.exists(f"{saved}/assets.extra/README.md")
    assert model_dir in storage.read_text(f"{saved}/assets.extra/README.md")

    # Predict from gs:// with images on gs://: a validation JPEG, a PNG, a greyscale JPEG and a
    # file that is not an image.
    from PIL import Image

    jpeg = raw_validation(trained_model.raw_dir)[0][0]
    with Image.open(jpeg) as image:
        image.save(tmp_path / "digit.png")
        image.convert("L").save(tmp_path / "grey.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    sources = [jpeg] + [str(tmp_path / n) for n in ("digit.png", "grey.jpg", "notes.txt")]
    remote = [storage.join(gcs_bucket, "images", f"{i}-{storage.basename(path)}")
              for i, path in enumerate(sources)]
    for source, uri in zip(sources, remote):
        storage.copy(source, uri)

    status = cli.main(["predict", "--model", export_dir, "--json", *remote])

    assert status == 1
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in results] == remote
    *images, text = results
    logits, _ = checkpoint_logits(trained_model)
    assert images[0]["top"][0]["label"] == logits[0].argmax() + 1 or near_ties(logits, 1)[0]
    for result in images:
        assert len(result["top"]) == 5
        for row in result["top"]:
            assert row["synset"] == f"n{row['label'] - 1:08d}" and row["text"].startswith("digit ")
    assert remote[3] in text["error"] and "not a readable image" in text["error"]
