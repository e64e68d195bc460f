"""The label map: TFRecord label k (1..N) <-> synset id <-> human-readable text.

``convert`` writes ``DATA/labels.txt`` (line k = synset of label k) and puts each synset's text
in ``DATA/manifest.json`` under ``class_text``. Training copies the map into
``MODEL/labels.json``, so evaluation, export and predict need only the model directory. Shards
made by the original Inception script come without either file, but each of their records
carries ``image/class/synset`` and ``image/class/text``: the map is then rebuilt from the
records (:func:`from_records`: the validation split, read until every class has turned up).
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


def from_records(data_dir: str, num_classes: int | None = None) -> list[dict] | None:
    """The label map as the records of ``data_dir`` tell it (label, synset, text of each).

    Reads the validation shards (the smaller split; the train shards without them) with the
    image bytes left unparsed, and stops once ``num_classes`` labels have been seen. Labels no
    record shows get empty names. None when no record names a synset.
    """
    import tensorflow as tf

    from resnet_imagenet.data import tfrecord

    files = []
    for split in ("validation", "train"):
        files = storage.glob(tfrecord.shard_pattern(data_dir, split))
        if files:
            break
    if not files:
        return None
    spec = {
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/synset": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    records = tf.data.TFRecordDataset(files).batch(256).map(
        lambda serialized: tf.io.parse_example(serialized, spec))
    names: dict[int, tuple[str, str]] = {}
    for batch in records:
        for label, synset, text in zip(batch["image/class/label"].numpy(),
                                       batch["image/class/synset"].numpy(),
                                       batch["image/class/text"].numpy()):
            if synset and int(label) not in names:
                names[int(label)] = (synset.decode(), text.decode())
        if num_classes and len(names) >= num_classes:
            break
    if not names:
        return None
    count = max(num_classes or 0, max(names))
    log.info("label map rebuilt from the records under %s: %d of %d classes named", data_dir,
             len(names), count)
    return [{"label": k, "synset": names.get(k, ("", ""))[0], "text": names.get(k, ("", ""))[1]}
            for k in range(1, count + 1)]


def save(label_map: list[dict], model_dir: str) -> None:
    storage.write_text(storage.join(model_dir, LABELS_JSON), json.dumps(label_map, indent=1) + "\n")


def load(model_dir: str) -> list[dict] | None:
    """The label map saved with a model, or None when the training data had none."""
    path = storage.join(model_dir, LABELS_JSON)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def copy_to_model(data_dir: str, model_dir: str,
                  num_classes: int | None = None) -> list[dict] | None:
    """Save the data directory's label map with the model; returns it (None if unknown).

    Without ``labels.txt`` (shards of the original Inception script) the map is rebuilt from
    the records' synsets and texts.
    """
    label_map = from_data_dir(data_dir)
    if label_map is None:
        label_map = from_records(data_dir, num_classes)
    if label_map is None:
        log.info("no %s in %s and no synsets in its records: predictions will carry labels "
                 "without synsets", LABELS_TXT, data_dir)
        return None
    save(label_map, model_dir)
    return label_map
