"""Test support: Inception-schema shards from a raw-layout directory, without the converter.

Training tests need TFRecords that look exactly like ``resnet-imagenet convert``'s output
(shards, ``labels.txt``, ``manifest.json``) but must not depend on the converter's own code paths.
This writer is deliberately plain: one pass, ``tf.io.TFRecordWriter``, records spread round-robin
over the shards after a seeded shuffle. Labels are 1..N in sorted synset order, boxes come from
the VOC XML normalised by the XML's ``<size>``; height/width come from the image header (PIL).
"""

from __future__ import annotations

import io
import json
import os
import random
import xml.etree.ElementTree as ET

from resnet_imagenet.data import tfrecord


def _boxes(xml_path: str) -> list[tuple[float, float, float, float]]:
    """(xmin, ymin, xmax, ymax) in [0, 1] for every object of one VOC annotation."""
    if not os.path.exists(xml_path):
        return []
    root = ET.parse(xml_path).getroot()
    width = float(root.findtext("size/width"))
    height = float(root.findtext("size/height"))
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        clipped = (min(max(xmin / width, 0.0), 1.0), min(max(ymin / height, 0.0), 1.0),
                   min(max(xmax / width, 0.0), 1.0), min(max(ymax / height, 0.0), 1.0))
        if clipped[0] < clipped[2] and clipped[1] < clipped[3]:
            boxes.append(clipped)
    return boxes


def _record(path: str, label: int, synset: str, text: str, boxes) -> bytes:
    from PIL import Image

    with open(path, "rb") as f:
        encoded = f.read()
    with Image.open(io.BytesIO(encoded)) as image:
        width, height = image.size
    return tfrecord.encode_example(tfrecord.ImageRecord(
        encoded=encoded, height=height, width=width, label=label, synset=synset, text=text,
        filename=os.path.basename(path), boxes=boxes,
    ))


def _write_split(records: list[bytes], out_dir: str, split: str, num_shards: int,
                 seed: int) -> None:
    import tensorflow as tf

    records = list(records)
    random.Random(seed).shuffle(records)
    for index in range(num_shards):
        path = os.path.join(out_dir, tfrecord.shard_name(split, index, num_shards))
        with tf.io.TFRecordWriter(path) as writer:
            for record in records[index::num_shards]:
                writer.write(record)


def make_shards(raw_dir: str, out_dir: str, train_shards: int = 2, validation_shards: int = 1,
                seed: int = 0, manifest: bool = True) -> dict:
    """Convert the local raw layout ``raw_dir`` into shards under ``out_dir``; returns counts.

    ``manifest=False`` leaves ``manifest.json`` out, as with shards made by the original
    Inception script (the trainer then has to count the records itself).
    """
    synsets = sorted(os.listdir(os.path.join(raw_dir, "train")))
    label_of = {s: k for k, s in enumerate(synsets, start=1)}
    texts: dict[str, str] = {}
    metadata = os.path.join(raw_dir, "metadata.txt")
    if os.path.exists(metadata):
        with open(metadata) as f:
            texts = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)

    train = []
    for synset in synsets:
        directory = os.path.join(raw_dir, "train", synset)
        for name in sorted(os.listdir(directory)):
            stem = os.path.splitext(name)[0]
            xml = os.path.join(raw_dir, "bounding_boxes", synset, stem + ".xml")
            train.append(_record(os.path.join(directory, name), label_of[synset], synset,
                                 texts.get(synset, ""), _boxes(xml)))
    with open(os.path.join(raw_dir, "validation_labels.txt")) as f:
        val_synsets = [line.strip() for line in f if line.strip()]
    val_files = sorted(os.listdir(os.path.join(raw_dir, "validation")))
    validation = [
        _record(os.path.join(raw_dir, "validation", name), label_of[synset], synset,
                texts.get(synset, ""), [])
        for name, synset in zip(val_files, val_synsets)
    ]

    os.makedirs(out_dir, exist_ok=True)
    _write_split(train, out_dir, "train", train_shards, seed)
    _write_split(validation, out_dir, "validation", validation_shards, seed + 1)
    with open(os.path.join(out_dir, "labels.txt"), "w") as f:
        f.write("".join(f"{s}\n" for s in synsets))
    counts = {
        "train": {"shards": train_shards, "images": len(train)},
        "validation": {"shards": validation_shards, "images": len(validation)},
        "classes": len(synsets),
        "class_text": {s: texts.get(s, "") for s in synsets},
        "skipped": [],
        "schema": "inception",
    }
    if manifest:
        # As the converter's: each split's records per shard too (round-robin above).
        written = {**counts}
        for split, records, shards in (("train", train, train_shards),
                                       ("validation", validation, validation_shards)):
            written[split] = {**counts[split], "shard_images": [
                len(records[index::shards]) for index in range(shards)]}
        with open(os.path.join(out_dir, "manifest.json"), "w") as f:
            json.dump(written, f, indent=1)
    return counts
