"""What the pipeline's steps decide and record: is a dataset complete, what the KFP artifacts
carry, and the HTML report drawn from real TensorBoard event files."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import pytest

from pipelines import artifacts
from resnet_imagenet import report
from resnet_imagenet.data import inventory
from resnet_imagenet.errors import UserError


def touch(directory, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")


def shards(split: str, count: int, indices=None) -> list[str]:
    indices = range(count) if indices is None else indices
    return [f"{split}-{i:05d}-of-{count:05d}" for i in indices]


def write_manifest(directory, train=(4, 80), validation=(2, 20)) -> None:
    (directory / "manifest.json").write_text(json.dumps({
        "train": {"shards": train[0], "images": train[1]},
        "validation": {"shards": validation[0], "images": validation[1]},
        "classes": 10, "skipped": [], "schema": "inception"}))


def test_converted_dataset_with_manifest_is_ready(tmp_path):
    touch(tmp_path, *shards("train", 4), *shards("validation", 2), ".tmp-0123-train-00000-of-00004")
    write_manifest(tmp_path)
    info = inventory.inspect(str(tmp_path))
    assert info["ready"] and info["source"] == "manifest"
    assert info["train"] == {"shards": 4, "images": 80}
    assert info["validation"] == {"shards": 2, "images": 20}
    assert info["classes"] == 10


def test_manifest_with_a_missing_shard_is_not_ready(tmp_path):
    touch(tmp_path, *shards("train", 4, [0, 1, 3]), *shards("validation", 2))
    write_manifest(tmp_path)
    info = inventory.inspect(str(tmp_path))
    assert not info["ready"]
    assert info["reason"] == "manifest.json lists 4 train shards, 3 of them are present"


def test_inception_shards_without_manifest_are_ready(tmp_path):
    touch(tmp_path, *shards("train", 1024), *shards("validation", 128))
    info = inventory.inspect(str(tmp_path))
    assert info["ready"] and info["source"] == "shard names"
    assert info["train"] == {"shards": 1024, "images": None}
    assert info["validation"]["shards"] == 128


@pytest.mark.parametrize("names, reason", [
    ([], "no dataset at"),
    (shards("train", 4) + shards("validation", 2, [0]), "validation shards: 1 of 2 present"),
    (shards("train", 4) + shards("train", 8) + shards("validation", 2),
     "train shards: expected one complete set, found -of-00004, -of-00008"),
    (shards("train", 4), "validation shards: expected one complete set, found none"),
])
def test_incomplete_or_mixed_shards_are_not_ready(tmp_path, names, reason):
    data = tmp_path / "data"
    touch(data, *names)
    info = inventory.inspect(str(data))
    assert not info["ready"]
    assert reason in info["reason"]


def test_conversion_in_progress_is_not_taken_for_inception_shards(tmp_path):
    touch(tmp_path, *shards("train", 4), *shards("validation", 2))
    touch(tmp_path / "_shards", "train-00000-of-00004.json")
    info = inventory.inspect(str(tmp_path))
    assert not info["ready"] and "not been finalized" in info["reason"]


def test_dataset_artifact_records_the_inventory(tmp_path):
    data = tmp_path / "data"
    touch(data, *shards("train", 4), *shards("validation", 2))
    write_manifest(data)
    path = str(tmp_path / "artifact")
    metadata = artifacts.dataset(str(data), path)
    assert metadata == {"uri": str(data), "source": "manifest", "train_shards": 4,
                        "train_images": 80, "validation_shards": 2, "validation_images": 20,
                        "classes": 10}
    assert json.loads(open(path).read())["ready"] is True
    with pytest.raises(UserError, match="not a complete dataset: no dataset at"):
        artifacts.dataset(str(tmp_path / "empty"), str(tmp_path / "other"))


def test_model_artifact_copies_the_small_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"resnet_size": 18, "image_size": 32, "num_classes": 10, "batch_size": 64,
         "train_steps": 100, "seed": 0}))
    (model / "train_summary.json").write_text(json.dumps(
        {"step": 100, "loss": 0.25, "images_per_second": 500.0, "strategy": "multi-worker"}))
    path = tmp_path / "artifact"
    metadata = artifacts.model(str(model), str(path))
    assert metadata == {"uri": str(model), "resnet_size": 18, "image_size": 32,
                        "num_classes": 10, "batch_size": 64, "train_steps": 100,
                        "final_step": 100, "final_loss": 0.25,
                        "final_images_per_second": 500.0}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "train_summary.json"]
    with pytest.raises(UserError, match="holds no config.json"):
        artifacts.model(str(tmp_path / "nothing"), str(tmp_path / "a2"))


def test_training_metrics_are_the_final_figures_of_the_summary(tmp_path):
    """The train step's Metrics artifact: last loss, images/s, steps, ... (KFP UI compares
    runs by these); non-numbers of train_summary.json stay out."""
    path = tmp_path / "artifact"
    path.mkdir()
    (path / "train_summary.json").write_text(json.dumps({
        "step": 500000, "start_step": 0, "epoch": 99, "loss": 1.25, "cross_entropy": 0.98,
        "l2": 0.27, "train_top1": 0.75, "images_per_second": 2810.5,
        "elapsed_seconds": 45000.0, "precision": "mixed_float16", "jit_compile": False,
        "checkpoint": "gs://b/m/checkpoints/ckpt-500000", "validation": None,
        "skipped_records": 120, "records_seen": 128_000_120, "unreadable_shards": []}))
    assert artifacts.training_metrics(str(path)) == {
        "final_loss": 1.25, "final_cross_entropy": 0.98, "final_train_top1": 0.75,
        "images_per_second": 2810.5, "steps": 500000.0, "epochs": 99.0, "elapsed_hours": 12.5,
        "skipped_records": 120.0}
    assert artifacts.metrics({"top1": 0.5, "images": 30, "skipped_records": 10,
                              "unreadable_shards": []}) == {
        "top1": 0.5, "images": 30.0, "skipped_records": 10.0}
    with pytest.raises(UserError, match="holds no train_summary.json: training did not finish"):
        artifacts.training_metrics(str(tmp_path / "nothing"))


# Every artifact helper, in a fresh interpreter, on the small local files a step writes.
WITHOUT_TENSORFLOW = """
import json, os, sys
from pipelines import artifacts
root = sys.argv[1]
model = os.path.join(root, "model")
os.makedirs(model)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"resnet_size": 18, "image_size": 32, "num_classes": 10, "batch_size": 64,
               "train_steps": 1}, f)
with open(os.path.join(model, "train_summary.json"), "w") as f:
    json.dump({"step": 1, "loss": 2.0}, f)
artifacts.model(model, os.path.join(root, "model-artifact"))
artifacts.training_metrics(os.path.join(root, "model-artifact"))
artifacts.saved_model("gs://bucket/export/1", os.path.join(root, "saved-model-artifact"))
artifacts.metrics({"top1": 0.5, "top5": 0.9, "images": 10})
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""


def test_the_artifact_helpers_run_without_tensorflow(tmp_path):
    """They write small local JSON files: a step's pod must not pay for importing TensorFlow."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert json.loads((tmp_path / "saved-model-artifact").read_text()) == {
        "uri": "gs://bucket/export/1"}


def write_scalars(logdir: str, tag: str, values: list[tuple[int, float]]) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for step, value in values:
            tf.summary.scalar(tag, value, step=step)
    writer.close()


def decode_images(page: str):
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_draws_curves_from_event_files(tmp_path):
    model = tmp_path / "model"
    train_logs, val_logs = str(model / "logs" / "train"), str(model / "logs" / "validation")
    write_scalars(train_logs, "loss/total", [(s, 2.0 / (1 + s / 10)) for s in range(0, 101, 10)])
    write_scalars(train_logs, "train/top1", [(s, s / 120) for s in range(0, 101, 10)])
    # A resumed run writes step 100 again: the last value counts.
    write_scalars(train_logs, "train/top1", [(100, 0.9)])
    write_scalars(val_logs, "validation/top1", [(50, 0.5), (100, 0.85)])
    write_scalars(val_logs, "validation/top5", [(50, 0.9), (100, 0.99)])

    scalars = report.read_scalars(train_logs)
    assert scalars["train/top1"][-1] == (100, pytest.approx(0.9))
    assert len(scalars["loss/total"]) == 11

    (model / "train_summary.json").write_text(json.dumps(
        {"step": 100, "skipped_records": 7, "records_seen": 6407}))
    metrics = {"top1": 0.85, "top5": 0.99, "images": 20, "skipped_records": 3, "step": 100,
               "checkpoint": "ckpt-100",
               "per_class": [{"label": 1, "synset": "n00000000", "text": "digit <zero>",
                              "top1": 1.0, "images": 2},
                             {"label": 2, "synset": "n00000001", "text": "digit one",
                              "top1": 0.5, "images": 2}]}
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(metrics))
    output = tmp_path / "out" / "report.html"
    report.write(str(model), str(metrics_path), str(output))
    page = output.read_text()

    pictures = decode_images(page)
    assert [p.size for p in pictures] == [(640, 360), (640, 360)]  # loss and accuracy
    assert all(p.format == "PNG" for p in pictures)
    assert 'alt="Loss"' in page and 'alt="Accuracy"' in page and 'alt="Learning rate"' not in page
    assert "<td>top1</td><td>0.8500</td>" in page
    # unreadable records: the evaluation's, then the training run's
    assert "<td>skipped_records</td><td>3</td>" in page
    assert "<td>training skipped records</td><td>7</td>" in page
    assert "<td>training records seen</td><td>6407</td>" in page
    # per-class table, worst class first, text escaped
    assert page.index("n00000001") < page.index("n00000000")
    assert "digit &lt;zero&gt;" in page


def test_chart_draws_each_series_in_its_colour(tmp_path):
    from PIL import Image

    png = report.line_chart({"a": [(0, 0.0), (10, 1.0)], "b": [(0, 1.0), (10, 0.0)]},
                            "Two lines", "value")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert report.COLORS[0] in colours and report.COLORS[1] in colours


def test_report_without_event_files_says_so(tmp_path):
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps({"top1": 0.1, "top5": 0.5, "images": 10}))
    output = tmp_path / "report.html"
    report.write(str(tmp_path / "model"), str(metrics_path), str(output))
    page = output.read_text()
    assert "No TensorBoard scalars under" in page and decode_images(page) == []
