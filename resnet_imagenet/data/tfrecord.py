"""The Inception ImageNet Example schema: one encoder, one parser, the shard names.

Shards written by the original Inception ``build_imagenet_data.py`` are valid input as they are,
and ours are byte-compatible with its feature keys and types:

    image/encoded              bytes    the JPEG
    image/format               bytes    b"JPEG"
    image/height, image/width  int64
    image/colorspace           bytes    b"RGB" (b"Grayscale" for a one-channel JPEG, see below)
    image/channels             int64    3 (1 for grey)
    image/class/label          int64    1..N in synset order; 0 is unused
    image/class/synset         bytes    e.g. b"n01440764"
    image/class/text           bytes    e.g. b"tench, Tinca tinca"
    image/object/bbox/xmin ... ymax     float lists, normalised to [0, 1]
    image/object/bbox/label    int64 list (the image's label, once per box)
    image/filename             bytes    base name of the raw file

A grey JPEG is kept as it is (the readers decode with ``channels=3``); Inception re-encoded those
as RGB, so readers must not rely on ``image/channels``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

SPLITS = ("train", "validation")
SHARD_FORMAT = "{split}-{index:05d}-of-{count:05d}"
SHARD_RE = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")
DEFAULT_SHARDS = {"train": 1024, "validation": 128}


def shard_name(split: str, index: int, count: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return SHARD_FORMAT.format(split=split, index=index, count=count)


def shard_pattern(data_dir: str, split: str) -> str:
    """Glob pattern of one split's shards under ``data_dir`` (local or gs://)."""
    from resnet_imagenet import storage

    return storage.join(data_dir, f"{split}-*-of-*")


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """``("train", 3, 1024)`` for ``train-00003-of-01024``; None for anything else."""
    match = SHARD_RE.match(name)
    if not match:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


@dataclass
class ImageRecord:
    """Everything one Example holds; boxes are (xmin, ymin, xmax, ymax) in [0, 1]."""

    encoded: bytes
    height: int
    width: int
    label: int
    synset: str
    text: str = ""
    filename: str = ""
    boxes: Sequence[tuple[float, float, float, float]] = field(default_factory=list)
    channels: int = 3
    colorspace: str = "RGB"
    image_format: str = "JPEG"


def encode_example(rec: ImageRecord) -> bytes:
    """Serialize one image as an Inception ``tf.train.Example``."""
    import tensorflow as tf

    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    def i(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def f(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    boxes = list(rec.boxes)
    feature = {
        "image/height": i([rec.height]),
        "image/width": i([rec.width]),
        "image/colorspace": b([rec.colorspace.encode()]),
        "image/channels": i([rec.channels]),
        "image/class/label": i([rec.label]),
        "image/class/synset": b([rec.synset.encode()]),
        "image/class/text": b([rec.text.encode()]),
        "image/object/bbox/xmin": f([bx[0] for bx in boxes]),
        "image/object/bbox/xmax": f([bx[2] for bx in boxes]),
        "image/object/bbox/ymin": f([bx[1] for bx in boxes]),
        "image/object/bbox/ymax": f([bx[3] for bx in boxes]),
        "image/object/bbox/label": i([rec.label] * len(boxes)),
        "image/format": b([rec.image_format.encode()]),
        "image/filename": b([rec.filename.encode()]),
        "image/encoded": b([rec.encoded]),
    }
    # deterministic: the feature map is otherwise serialized in a per-process order.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True
    )


def feature_spec() -> dict:
    """The parsing spec; every key is optional except the image and its label."""
    import tensorflow as tf

    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/synset": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
        "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }
    for key in ("xmin", "ymin", "xmax", "ymax"):
        spec[f"image/object/bbox/{key}"] = tf.io.VarLenFeature(tf.float32)
    return spec


def parse_example(serialized):
    """Parse one serialized Example (a scalar string tensor) into a dict of tensors.

    Returns ``{"image": jpeg bytes, "label": int32 1..N, "bbox": float32 [1, n, 4] as
    (ymin, xmin, ymax, xmax) -- the layout ``tf.image.sample_distorted_bounding_box`` wants --,
    "synset", "text", "filename", "height", "width"}``.
    """
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, feature_spec())
    coords = [
        tf.sparse.to_dense(parsed[f"image/object/bbox/{k}"])
        for k in ("ymin", "xmin", "ymax", "xmax")
    ]
    bbox = tf.expand_dims(tf.stack(coords, axis=-1), 0)
    return {
        "image": parsed["image/encoded"],
        "label": tf.cast(parsed["image/class/label"], tf.int32),
        "bbox": bbox,
        "synset": parsed["image/class/synset"],
        "text": parsed["image/class/text"],
        "filename": parsed["image/filename"],
        "height": tf.cast(parsed["image/height"], tf.int32),
        "width": tf.cast(parsed["image/width"], tf.int32),
    }


def read_records(path: str) -> list[dict]:
    """Every Example of one TFRecord file as plain Python values (tests and tools, not training)."""
    import tensorflow as tf

    out = []
    for raw in tf.data.TFRecordDataset(path):
        example = tf.train.Example.FromString(raw.numpy())
        feats = example.features.feature

        def one(key, kind):
            values = getattr(feats[key], kind).value
            return values[0] if values else None

        boxes = list(
            zip(*(feats[f"image/object/bbox/{k}"].float_list.value
                  for k in ("xmin", "ymin", "xmax", "ymax")))
        )
        out.append({
            "encoded": one("image/encoded", "bytes_list"),
            "label": one("image/class/label", "int64_list"),
            "synset": (one("image/class/synset", "bytes_list") or b"").decode(),
            "text": (one("image/class/text", "bytes_list") or b"").decode(),
            "filename": (one("image/filename", "bytes_list") or b"").decode(),
            "height": one("image/height", "int64_list"),
            "width": one("image/width", "int64_list"),
            "channels": one("image/channels", "int64_list"),
            "colorspace": (one("image/colorspace", "bytes_list") or b"").decode(),
            "format": (one("image/format", "bytes_list") or b"").decode(),
            "boxes": boxes,
        })
    return out
