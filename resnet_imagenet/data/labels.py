"""The label map: TFRecord label k (1..N) <-> synset id <-> human-readable text.

``convert`` writes ``DATA/labels.txt`` (line k = synset of label k) and puts each synset's text
in ``DATA/manifest.json`` under ``class_text``. Training copies the map into
``MODEL/labels.json``, so evaluation, export and predict need only the model directory. Shards
made by the original Inception script come without either file: then the map is unknown and the
outputs carry labels only.
"""

from __future__ import annotations

import json
import logging

from resnet_imagenet import storage

log = logging.getLogger(__name__)

LABELS_TXT = "labels.txt"
MANIFEST = "manifest.json"
LABELS_JSON = "labels.json"


def from_data_dir(data_dir: str) -> list[dict] | None:
    """``[{"label": 1, "synset": "n01440764", "text": "tench, ..."}, ...]`` or None if unknown."""
    path = storage.join(data_dir, LABELS_TXT)
    if not storage.exists(path):
        return None
    synsets = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    texts: dict = {}
    manifest = storage.join(data_dir, MANIFEST)
    if storage.exists(manifest):
        texts = json.loads(storage.read_text(manifest)).get("class_text", {}) or {}
    return [{"label": k, "synset": s, "text": texts.get(s, "")}
            for k, s in enumerate(synsets, start=1)]


def save(label_map: list[dict], model_dir: str) -> None:
    storage.write_text(storage.join(model_dir, LABELS_JSON), json.dumps(label_map, indent=1) + "\n")


def load(model_dir: str) -> list[dict] | None:
    """The label map saved with a model, or None when the training data had none."""
    path = storage.join(model_dir, LABELS_JSON)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def copy_to_model(data_dir: str, model_dir: str) -> list[dict] | None:
    """Save the data directory's label map with the model; returns it (None if unknown)."""
    label_map = from_data_dir(data_dir)
    if label_map is None:
        log.info("no %s in %s: predictions will carry labels without synsets", LABELS_TXT, data_dir)
        return None
    save(label_map, model_dir)
    return label_map
