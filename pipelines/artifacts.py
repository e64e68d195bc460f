"""What the pipeline's KFP artifacts hold: the URI of the real data, plus a few small files.

A KFP artifact carries the URI in its metadata (``uri``), the figures worth seeing in the KFP UI,
and small files (the dataset inventory, the training config and summary) at its own local
``path`` (docs/pipeline.md says why the data itself never goes through KFP). Each function takes
the artifact's local ``path`` (written here) and returns the metadata for the component to
attach; the components stay one-liners. No TensorFlow.
"""

from __future__ import annotations

import json
import os

from resnet_imagenet import storage
from resnet_imagenet.data import inventory
from resnet_imagenet.errors import UserError

MODEL_FILES = ("config.json", "train_summary.json", "labels.json")


def _write_json(path: str, data: dict) -> None:
    storage.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def dataset(data_dir: str, path: str) -> dict:
    """A TFRecord dataset: its inventory as JSON at ``path``; refuses one that is not complete."""
    info = inventory.inspect(data_dir)
    if not info["ready"]:
        raise UserError(f"the TFRecords at {data_dir} are not a complete dataset: {info['reason']}")
    _write_json(path, info)
    metadata = {"uri": info["uri"], "source": info["source"]}
    for split in ("train", "validation"):
        metadata[f"{split}_shards"] = info[split]["shards"]
        if info[split]["images"] is not None:
            metadata[f"{split}_images"] = info[split]["images"]
    if info["classes"] is not None:
        metadata["classes"] = info["classes"]
    return metadata


def model(model_dir: str, path: str) -> dict:
    """A trained model directory: its config, training summary and label map copied to ``path``."""
    model_dir = storage.normalize(model_dir)
    os.makedirs(path, exist_ok=True)
    metadata: dict = {"uri": model_dir}
    for name in MODEL_FILES:
        source = storage.join(model_dir, name)
        if storage.exists(source):
            storage.copy(source, os.path.join(path, name))
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{model_dir} holds no config.json: training did not write a model there")
    with open(config_path) as f:
        config = json.load(f)
    for key in ("resnet_size", "image_size", "num_classes", "batch_size", "train_steps"):
        metadata[key] = config[key]
    summary_path = os.path.join(path, "train_summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        metadata.update({f"final_{k}": v for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return metadata


def saved_model(export_path: str, path: str) -> dict:
    """An exported SavedModel version directory: a pointer file at ``path``."""
    metadata = {"uri": storage.normalize(export_path)}
    _write_json(path, metadata)
    return metadata


def metrics(result: dict) -> dict[str, float]:
    """The scalar figures of an evaluation result, for a KFP ``Metrics`` artifact."""
    return {key: float(result[key]) for key in ("top1", "top5", "images", "skipped_records")
            if key in result}


# The final training figures worth comparing between runs in the KFP UI: name -> the key of
# train_summary.json (written by the chief at the end of training).
TRAINING_METRICS = {
    "final_loss": "loss",
    "final_cross_entropy": "cross_entropy",
    "final_train_top1": "train_top1",
    "images_per_second": "images_per_second",
    "steps": "step",
    "epochs": "epoch",
    "elapsed_hours": "elapsed_seconds",
    "skipped_records": "skipped_records",  # unreadable training records (--max-bad-records)
}


def training_metrics(path: str) -> dict[str, float]:
    """The final training figures for a KFP ``Metrics`` artifact, from the train_summary.json
    that :func:`model` copied to the Model artifact's ``path``."""
    summary_path = os.path.join(path, "train_summary.json")
    if not os.path.exists(summary_path):
        raise UserError(f"{path} holds no train_summary.json: training did not finish")
    with open(summary_path) as f:
        summary = json.load(f)
    figures = {}
    for name, key in TRAINING_METRICS.items():
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[name] = round(value / 3600, 3) if key == "elapsed_seconds" else float(value)
    return figures
