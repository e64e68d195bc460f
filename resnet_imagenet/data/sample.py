"""Build the demo dataset: real images in the raw ILSVRC2012 layout, made offline.

The source is scikit-learn's bundled handwritten digits (1,797 greyscale 8x8 images, 10 classes).
Each digit is upscaled, tinted and padded into an RGB JPEG of its own size, under a made-up but
well-formed synset id (n00000000 = "digit zero" ... n00000009 = "digit nine"). Every training
image gets a PASCAL VOC bounding-box XML with the tight box around the ink, exactly as
ILSVRC2012_bbox_train_v2 does; validation images get ILSVRC2012_val_<8 digits>.JPEG names and one
line each in validation_labels.txt. About 80/20 train/validation, stratified per class.
The same seed gives the same bytes.

    RAW/train/<wnid>/<wnid>_<n>.JPEG
    RAW/validation/ILSVRC2012_val_<8 digits>.JPEG
    RAW/validation_labels.txt
    RAW/bounding_boxes/<wnid>/<wnid>_<n>.xml
    RAW/synsets.txt
    RAW/metadata.txt
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import uuid

import numpy as np

from resnet_imagenet import storage
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VALIDATION_FRACTION = 0.2


def wnid(label: int) -> str:
    return f"n{label:08d}"


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "sample-data needs scikit-learn (it ships the digits): pip install 'resnet-imagenet[demo]'"
        ) from None
    digits = load_digits()
    return digits.images, digits.target


def render(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, int, int, tuple[int, int, int, int]]:
    """One 8x8 digit (values 0..16) as an RGB JPEG; returns (bytes, width, height, ink box).

    The box is (xmin, ymin, xmax, ymax) in pixels, VOC style (inclusive pixel coordinates).
    """
    from PIL import Image

    scale = int(rng.integers(6, 11))  # 48..80 px digits
    size = 8 * scale
    ink = (digit / 16.0).astype(np.float32)
    big = np.kron(ink, np.ones((scale, scale), dtype=np.float32))
    pad = [int(rng.integers(0, scale + 1)) for _ in range(4)]  # left, top, right, bottom
    height, width = size + pad[1] + pad[3], size + pad[0] + pad[2]
    background = rng.integers(180, 256, size=3).astype(np.float32)
    foreground = rng.integers(0, 90, size=3).astype(np.float32)
    alpha = np.zeros((height, width), dtype=np.float32)
    alpha[pad[1]:pad[1] + size, pad[0]:pad[0] + size] = big
    pixels = background * (1 - alpha[..., None]) + foreground * alpha[..., None]
    pixels += rng.normal(0, 4, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    rows = np.nonzero(digit.max(axis=1) > 0)[0]
    cols = np.nonzero(digit.max(axis=0) > 0)[0]
    box = (
        pad[0] + int(cols[0]) * scale,
        pad[1] + int(rows[0]) * scale,
        pad[0] + (int(cols[-1]) + 1) * scale - 1,
        pad[1] + (int(rows[-1]) + 1) * scale - 1,
    )
    return buf.getvalue(), width, height, box


def bbox_xml(name: str, synset: str, width: int, height: int, box: tuple[int, int, int, int]) -> str:
    """A PASCAL VOC annotation shaped like those of ILSVRC2012_bbox_train_v2."""
    xmin, ymin, xmax, ymax = box
    return (
        "<annotation>\n"
        f"\t<folder>{synset}</folder>\n"
        f"\t<filename>{name}</filename>\n"
        "\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
        "\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n"
        "\t<object>\n"
        f"\t\t<name>{synset}</name>\n"
        "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
        f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n\t\t</bndbox>\n"
        "\t</object>\n"
        "</annotation>\n"
    )


def build(output_dir: str, seed: int = 0, overwrite: bool = False,
          per_class: int | None = None) -> dict:
    """Write the demo dataset to ``output_dir`` (local or gs://); returns counts.

    ``per_class`` limits the images per class (tests); None takes all 1,797.
    A local output is built in a temporary sibling directory and renamed into place, so the
    directory is either the complete dataset or untouched.
    """
    output_dir = storage.normalize(output_dir)
    if not storage.is_empty_dir(output_dir) or (
        storage.exists(output_dir) and not storage.isdir(output_dir)
    ):
        if not overwrite:
            raise UserError(
                f"--output-dir {output_dir} is not empty: choose an empty directory or pass --overwrite"
            )
    images, targets = _load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    by_class: dict[int, list[int]] = {c: [] for c in range(10)}
    for idx in order:
        by_class[int(targets[idx])].append(int(idx))
    train, validation = [], []
    for label, indices in by_class.items():
        if per_class is not None:
            indices = indices[:per_class]
        n_val = max(1, int(round(len(indices) * VALIDATION_FRACTION)))
        validation += [(label, i) for i in indices[:n_val]]
        train += [(label, i) for i in indices[n_val:]]
    val_order = rng.permutation(len(validation))
    validation = [validation[i] for i in val_order]

    remote = storage.is_remote(output_dir)
    target = output_dir
    if not remote:
        parent = os.path.dirname(os.path.abspath(output_dir))
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, f"{storage.TMP_MARKER}{uuid.uuid4().hex[:8]}-sample")
    elif overwrite:
        storage.rmtree(output_dir)

    def put(rel: str, data: bytes) -> None:
        path = storage.join(target, *rel.split("/"))
        if remote:
            storage.write_bytes(path, data)
        else:  # local staging directory: plain writes, the final rename makes it atomic
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    try:
        counters = {c: 0 for c in range(10)}
        for label, idx in train:
            counters[label] += 1
            synset = wnid(label)
            name = f"{synset}_{counters[label]}"
            jpeg, width, height, box = render(images[idx], rng)
            put(f"train/{synset}/{name}.JPEG", jpeg)
            put(f"bounding_boxes/{synset}/{name}.xml",
                bbox_xml(name, synset, width, height, box).encode())
        labels = []
        for n, (label, idx) in enumerate(validation, start=1):
            jpeg, _, _, _ = render(images[idx], rng)
            put(f"validation/ILSVRC2012_val_{n:08d}.JPEG", jpeg)
            labels.append(wnid(label))
        put("validation_labels.txt", ("\n".join(labels) + "\n").encode())
        put("metadata.txt", "".join(
            f"{wnid(c)}\tdigit {DIGIT_NAMES[c]}\n" for c in range(10)).encode())
        put("synsets.txt", "".join(f"{wnid(c)}\n" for c in range(10)).encode())
        if not remote:
            if os.path.exists(output_dir):
                shutil.rmtree(output_dir) if os.path.isdir(output_dir) else os.remove(output_dir)
            os.rename(target, output_dir)
    except BaseException:
        if not remote:
            shutil.rmtree(target, ignore_errors=True)
        raise
    counts = {"train": len(train), "validation": len(validation), "classes": 10}
    log.info("demo dataset in %s: %d train, %d validation images, %d classes",
             output_dir, counts["train"], counts["validation"], counts["classes"])
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, metavar="RAW",
                        help="where to write the raw layout (local path or gs://)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="at most N images per class (default: all 1,797 images)")


def run(args: argparse.Namespace) -> int:
    if args.per_class is not None and args.per_class < 2:
        raise UserError("--per-class must be at least 2 (one train and one validation image)")
    counts = build(args.output_dir, seed=args.seed, overwrite=args.overwrite,
                   per_class=args.per_class)
    print(f"wrote {counts['train']} train and {counts['validation']} validation images "
          f"({counts['classes']} classes) to {args.output_dir}")
    return 0
