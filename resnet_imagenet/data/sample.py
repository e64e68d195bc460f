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

With ``--archives`` the same files come as the four official ILSVRC2012 archives instead:
``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class), ``ILSVRC2012_img_val.tar``,
``ILSVRC2012_bbox_train_v2.tar.gz`` and ``ILSVRC2012_devkit_t12.tar.gz`` (a small devkit whose
``meta.mat`` and validation ground truth have the real structure), which ``convert`` reads
without extracting them.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import os
import shutil
import tarfile
import uuid

import numpy as np

from resnet_imagenet import preflight, storage
from resnet_imagenet.errors import UserError
from resnet_imagenet.storage import TMP_MARKER

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VALIDATION_FRACTION = 0.2
ARCHIVE_MTIME = 1341100800  # 2012-07-01: archive members get a fixed time (same seed, same bytes)


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


def _demo_files(seed: int, per_class: int | None) -> dict[str, bytes]:
    """Every file of the extracted layout, by path under RAW (the same seed, the same bytes)."""
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

    files: dict[str, bytes] = {}
    counters = {c: 0 for c in range(10)}
    for label, idx in train:
        counters[label] += 1
        synset = wnid(label)
        name = f"{synset}_{counters[label]}"
        jpeg, width, height, box = render(images[idx], rng)
        files[f"train/{synset}/{name}.JPEG"] = jpeg
        files[f"bounding_boxes/{synset}/{name}.xml"] = bbox_xml(
            name, synset, width, height, box).encode()
    labels = []
    for n, (label, idx) in enumerate(validation, start=1):
        jpeg, _, _, _ = render(images[idx], rng)
        files[f"validation/ILSVRC2012_val_{n:08d}.JPEG"] = jpeg
        labels.append(wnid(label))
    files["validation_labels.txt"] = ("\n".join(labels) + "\n").encode()
    files["metadata.txt"] = "".join(
        f"{wnid(c)}\tdigit {DIGIT_NAMES[c]}\n" for c in range(10)).encode()
    files["synsets.txt"] = "".join(f"{wnid(c)}\n" for c in range(10)).encode()
    return files


def _tar(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    """A tar (or .tar.gz) of ``members`` with fixed metadata: the same members, the same bytes."""
    buf = io.BytesIO()
    target = gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) if compress else buf
    with tarfile.open(fileobj=target, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
            info.uname = info.gname = "imagenet"
            tar.addfile(info, io.BytesIO(data))
    if compress:
        target.close()
    return buf.getvalue()


def meta_mat(classes: list[tuple[int, str, str]], seed: int = 0) -> bytes:
    """A ``meta.mat`` shaped like the devkit's: a ``synsets`` struct array over a hierarchy.

    ``classes`` are ``(ILSVRC2012_ID, wnid, words)`` leaves; one parent node ("digit", its
    children the leaves) follows them, as the devkit's 860 inner nodes follow its 1,000 leaves.
    Fields and their MATLAB types are the devkit's.
    """
    import scipy.io

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images")
    rows = [(float(number), synset, words, f"a handwritten {words}", 0.0,
             np.zeros((1, 0)), 0.0, 0.0) for number, synset, words in classes]
    parent = len(classes) + 1
    rows.append((float(parent), wnid(99999999), "digit", "a numeral written by hand",
                 float(len(classes)), np.array([[float(n) for n, _, _ in classes]]), 1.0, 0.0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets}, format="5")
    data = bytearray(buf.getvalue())
    # The 116-byte text header carries the creation time: fix it, so the bytes are reproducible.
    data[:116] = b"MATLAB 5.0 MAT-file, written by resnet-imagenet sample-data".ljust(116)
    return bytes(data)


def to_archives(files: dict[str, bytes], seed: int = 0) -> dict[str, bytes]:
    """The four official ILSVRC2012 archives holding the extracted layout ``files``.

    ``files`` maps paths under RAW to bytes (``train/``, ``validation/``, ``bounding_boxes/``,
    ``validation_labels.txt``, ``metadata.txt``, optionally ``synsets.txt``).

    The devkit numbers the classes in an order of its own (ILSVRC2012_ID, shuffled with
    ``seed``), as the real one does, so a reader that confused IDs with labels would fail.
    """
    from resnet_imagenet.data import archives

    synsets = (files["synsets.txt"].decode().split() if "synsets.txt" in files else
               sorted({n.split("/")[1] for n in files if n.startswith("train/")}))
    texts = dict(line.split("\t", 1) for line in files["metadata.txt"].decode().splitlines())
    rng = np.random.default_rng(seed + 1)
    numbers = {w: int(n) + 1 for w, n in zip(synsets, rng.permutation(len(synsets)))}
    val_names = sorted(n for n in files if n.startswith("validation/"))
    labels = files["validation_labels.txt"].decode().split()
    truth = "".join(f"{numbers[w]}\n" for w in labels).encode()
    devkit = archives.DEVKIT_DIR
    class_tars = [(f"{w}.tar", _tar([(n.split("/")[-1], files[n]) for n in sorted(files)
                                     if n.startswith(f"train/{w}/")])) for w in synsets]
    return {
        archives.TRAIN: _tar(class_tars),
        archives.VALIDATION: _tar([(n.split("/")[-1], files[n]) for n in val_names]),
        archives.BOXES: _tar([(n[len("bounding_boxes/"):], files[n]) for n in sorted(files)
                              if n.startswith("bounding_boxes/")], compress=True),
        archives.DEVKIT: _tar([
            (f"{devkit}/COPYING", b"Demo devkit made by resnet-imagenet sample-data.\n"),
            (f"{devkit}/data/{archives.META}", meta_mat(
                sorted((numbers[w], w, texts[w]) for w in synsets))),
            (f"{devkit}/data/{archives.GROUND_TRUTH}", truth),
        ], compress=True),
    }


def build(output_dir: str, seed: int = 0, overwrite: bool = False,
          per_class: int | None = None, as_archives: bool = False) -> dict:
    """Write the demo dataset to ``output_dir`` (local or gs://); returns counts.

    ``per_class`` limits the images per class (tests); None takes all 1,797. ``as_archives``
    writes the four official ILSVRC2012 archives holding the same files instead of the
    extracted layout. A local output is built in a temporary sibling directory and renamed
    into place, so the directory is either the complete dataset or untouched.
    """
    output_dir = preflight.check_output_dir(output_dir, "--output-dir")
    if not storage.is_empty_dir(output_dir):
        if not overwrite:
            raise UserError(
                f"--output-dir {output_dir} is not empty: choose an empty directory or pass --overwrite"
            )
    files = _demo_files(seed, per_class)
    counts = {"train": sum(n.startswith("train/") for n in files),
              "validation": sum(n.startswith("validation/") for n in files), "classes": 10}
    if as_archives:
        files = to_archives(files, seed)

    remote = storage.is_remote(output_dir)
    target = output_dir
    if not remote:
        parent = os.path.dirname(os.path.abspath(output_dir))
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-sample")
    elif overwrite:
        storage.rmtree(output_dir)

    try:
        for rel, data in files.items():
            path = storage.join(target, *rel.split("/"))
            if remote:
                storage.write_bytes(path, data)
            else:  # local staging directory: plain writes, the final rename makes it atomic
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        if not remote:
            if os.path.exists(output_dir):
                shutil.rmtree(output_dir) if os.path.isdir(output_dir) else os.remove(output_dir)
            os.rename(target, output_dir)
    except BaseException:
        if not remote:
            shutil.rmtree(target, ignore_errors=True)
        raise
    log.info("demo dataset in %s: %d train, %d validation images, %d classes%s",
             output_dir, counts["train"], counts["validation"], counts["classes"],
             " (as the four ILSVRC2012 archives)" if as_archives else "")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, metavar="RAW",
                        help="where to write the raw layout (local path or gs://)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="at most N images per class (default: all 1,797 images)")
    parser.add_argument("--archives", action="store_true",
                        help="write the four official ILSVRC2012 archives (train, val, bbox, "
                        "devkit with meta.mat) holding the same images, instead of the "
                        "extracted layout")


def run(args: argparse.Namespace) -> int:
    if args.per_class is not None and args.per_class < 2:
        raise UserError("--per-class must be at least 2 (one train and one validation image)")
    counts = build(args.output_dir, seed=args.seed, overwrite=args.overwrite,
                   per_class=args.per_class, as_archives=args.archives)
    print(f"wrote {counts['train']} train and {counts['validation']} validation images "
          f"({counts['classes']} classes) to {args.output_dir}"
          + (" as the four ILSVRC2012 archives" if args.archives else ""))
    return 0
