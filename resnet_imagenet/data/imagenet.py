"""The raw ILSVRC2012 layout: classes, labels, human-readable names, bounding boxes.

What ``convert`` reads (the extracted ILSVRC2012 archives; ``sample-data`` writes the same)::

    RAW/train/<wnid>/<wnid>_<n>.JPEG
    RAW/validation/ILSVRC2012_val_<8 digits>.JPEG
    RAW/validation_labels.txt      one wnid per line, line i = i-th validation file in sorted order
    RAW/bounding_boxes/<wnid>/<wnid>_<n>.xml     PASCAL VOC XML (ILSVRC2012_bbox_train_v2)
    RAW/synsets.txt                optional: the wnids in label order (default: sorted train dirs)
    RAW/metadata.txt               optional: wnid TAB human-readable text

Labels are 1..N in ``synsets.txt`` order (0 stays unused, as in the Inception schema).
:func:`load` lists everything once and checks the layout, raising a one-line
:class:`~resnet_imagenet.errors.UserError` for each way it can be wrong, so that a bad input is
refused before anything is written. It reads directory listings and the small text files
only; images and XML files are read by the converter's workers.

Every file in a class or validation directory is listed, whatever its extension, so a stray
non-image ends up in the converter's ``skipped`` list instead of vanishing silently; only
hidden names (``.*``: editor and upload leftovers) are ignored.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from resnet_imagenet import storage
from resnet_imagenet.errors import UserError

TRAIN_DIR = "train"
VALIDATION_DIR = "validation"
VALIDATION_LABELS = "validation_labels.txt"
BOXES_DIR = "bounding_boxes"
SYNSETS = "synsets.txt"
METADATA = "metadata.txt"

# Listing 1,000 class directories one by one takes minutes on GCS; in parallel, seconds.
LIST_THREADS = 32

Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in [0, 1]


@dataclass(frozen=True)
class RawFile:
    """One image to convert. ``rel`` is its path under RAW, with "/" separators.

    Read from the official archives (:mod:`resnet_imagenet.data.archives`), ``rel`` is the path
    the image would have in the extracted layout, ``member`` says where its bytes are
    (archive file name under RAW, offset, size) and ``boxes`` holds its boxes, already read
    from the bounding-box archive.
    """

    rel: str
    label: int
    synset: str
    boxes_rel: str | None = None  # its bounding-box XML under RAW, if there is one
    member: tuple[str, int, int] | None = None
    boxes: tuple[Box, ...] | None = None

    @property
    def filename(self) -> str:
        return posixpath.basename(self.rel)


@dataclass(frozen=True)
class RawDataset:
    """The listing of a raw layout: ``synsets[k - 1]`` is the wnid of label k."""

    raw_dir: str
    synsets: tuple[str, ...]
    texts: dict[str, str]
    train: tuple[RawFile, ...]
    validation: tuple[RawFile, ...]

    def uri(self, rel: str) -> str:
        return storage.join(self.raw_dir, *rel.split("/"))

    def text(self, synset: str) -> str:
        return self.texts.get(synset, "")


def _visible(names: list[str]) -> list[str]:
    return [name for name in names if not name.startswith(".")]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_metadata(text: str, where: str = METADATA) -> dict[str, str]:
    """``wnid<TAB>text`` lines (ImageNet's ``LOC_synset_mapping``/``synset_words`` style)."""
    texts = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, sep, name = line.partition("\t")
        if not sep:
            wnid, sep, name = line.partition(" ")  # synset_words.txt separates with a space
        if not sep or not wnid.strip():
            raise UserError(f"{where} line {number}: expected 'wnid<TAB>text', got {line!r}")
        texts[wnid.strip()] = name.strip()
    return texts


def parse_boxes(xml: bytes | str, where: str = "bounding-box XML") -> list[Box]:
    """Every ``<object><bndbox>`` of a PASCAL VOC annotation, normalised by its ``<size>``.

    Coordinates are divided by the XML's own width and height (which is what the boxes were
    drawn on), clipped to [0, 1], and boxes with ``xmin >= xmax`` or ``ymin >= ymax`` dropped,
    as in Inception's ``process_bounding_boxes.py``. Raises ValueError naming ``where`` for a
    file that is not such an annotation.
    """
    try:
        root = ElementTree.fromstring(xml)
        width = float(root.findtext("size/width"))
        height = float(root.findtext("size/height"))
    except (ElementTree.ParseError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a PASCAL VOC annotation with a <size> ({exc})") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{where}: <size> is {width:g}x{height:g}")
    boxes = []
    for bndbox in root.iter("bndbox"):
        try:
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(k))
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad <bndbox> ({exc})") from None
        xmin, xmax = (min(max(v / width, 0.0), 1.0) for v in (xmin, xmax))
        ymin, ymax = (min(max(v / height, 0.0), 1.0) for v in (ymin, ymax))
        if xmin < xmax and ymin < ymax:
            boxes.append((xmin, ymin, xmax, ymax))
    return boxes


def _parallel_listdir(uris: list[str]) -> list[list[str]]:
    if len(uris) <= 1:
        return [storage.listdir(u) for u in uris]
    with ThreadPoolExecutor(min(LIST_THREADS, len(uris))) as pool:
        return list(pool.map(storage.listdir, uris))


def _read_synsets(raw_dir: str, class_dirs: list[str]) -> list[str]:
    path = storage.join(raw_dir, SYNSETS)
    if not storage.exists(path):
        if not class_dirs:
            raise UserError(f"{storage.join(raw_dir, TRAIN_DIR)} holds no class directories: "
                            f"expected {TRAIN_DIR}/<wnid>/<images>")
        return class_dirs
    synsets = _lines(storage.read_text(path))
    if not synsets:
        raise UserError(f"{path} is empty: list one wnid per line, or delete it to use the "
                        f"sorted {TRAIN_DIR}/ directories")
    seen = set()
    for wnid in synsets:
        if wnid in seen:
            raise UserError(f"{path} lists {wnid} twice: each class must appear once")
        seen.add(wnid)
    present = set(class_dirs)
    for wnid in synsets:
        if wnid not in present:
            raise UserError(f"{path} lists {wnid} but {storage.join(raw_dir, TRAIN_DIR, wnid)} "
                            "does not exist: add its images or remove it from the list")
    for wnid in class_dirs:
        if wnid not in seen:
            raise UserError(f"{storage.join(raw_dir, TRAIN_DIR, wnid)} is not listed in {path}: "
                            "add it there or remove the directory")
    return synsets


def _require_dir(raw_dir: str, name: str, what: str) -> str:
    path = storage.join(raw_dir, name)
    if not storage.isdir(path):
        raise UserError(f"{path} not found: the raw layout needs {what} "
                        "(see 'resnet-imagenet convert --help')")
    return path


def check_top_level(raw_dir: str) -> tuple[str, str, str, list[str]]:
    """The checks of the extracted layout that take a few requests, not a listing of every
    class (the pipeline's first step makes them too, as its refusals are never retried):
    ``(train dir, validation dir, validation labels path, synsets)``."""
    raw_dir = storage.normalize(raw_dir)
    if not storage.isdir(raw_dir):
        raise UserError(f"--raw-dir {raw_dir} is not a directory: point it at the four "
                        "ILSVRC2012 archives or their extracted layout (or make one with "
                        "'resnet-imagenet sample-data')")
    train_dir = _require_dir(raw_dir, TRAIN_DIR, f"{TRAIN_DIR}/<wnid>/<images>")
    validation_dir = _require_dir(raw_dir, VALIDATION_DIR, f"{VALIDATION_DIR}/<images>")
    labels_path = storage.join(raw_dir, VALIDATION_LABELS)
    if not storage.exists(labels_path):
        raise UserError(f"{labels_path} not found: it gives the wnid of each validation image, "
                        "one per line in sorted file order")
    return train_dir, validation_dir, labels_path, _read_synsets(
        raw_dir, _visible(storage.listdir(train_dir)))


def load(raw_dir: str) -> RawDataset:
    """List and check the raw layout under ``raw_dir`` (local or gs://)."""
    raw_dir = storage.normalize(raw_dir)
    train_dir, validation_dir, labels_path, synsets = check_top_level(raw_dir)
    label_of = {wnid: k for k, wnid in enumerate(synsets, start=1)}

    listings = _parallel_listdir([storage.join(train_dir, w) for w in synsets]
                                 + [storage.join(raw_dir, BOXES_DIR, w) for w in synsets])
    image_lists, box_lists = listings[:len(synsets)], listings[len(synsets):]
    train = []
    for wnid, names, box_names in zip(synsets, image_lists, box_lists):
        names = _visible(names)
        if not names:
            path = storage.join(train_dir, wnid)
            if not storage.isdir(path):
                hint = (" (extract the per-class archives of ILSVRC2012_img_train.tar)"
                        if wnid.endswith(".tar") else "")
                raise UserError(f"{path} is not a directory: {TRAIN_DIR}/ must hold one "
                                f"directory per class{hint}")
            raise UserError(f"{path} is empty: every class needs training images "
                            "(add them, or remove the class)")
        boxes = {posixpath.splitext(b)[0]: b for b in box_names if b.endswith(".xml")}
        for name in names:
            box = boxes.get(posixpath.splitext(name)[0])
            train.append(RawFile(
                rel=f"{TRAIN_DIR}/{wnid}/{name}", label=label_of[wnid], synset=wnid,
                boxes_rel=f"{BOXES_DIR}/{wnid}/{box}" if box else None,
            ))

    validation_names = _visible(storage.listdir(validation_dir))
    if not validation_names:
        raise UserError(f"{validation_dir} holds no images")
    labels = _lines(storage.read_text(labels_path))
    if len(labels) != len(validation_names):
        raise UserError(
            f"{labels_path} has {len(labels)} labels but {validation_dir} holds "
            f"{len(validation_names)} files: it needs one wnid per validation file, in sorted order"
        )
    validation = []
    for number, (name, wnid) in enumerate(zip(validation_names, labels), start=1):
        if wnid not in label_of:
            raise UserError(f"{labels_path} line {number}: {wnid} (for {name}) is not one of the "
                            f"{len(synsets)} classes: fix the line, or add {TRAIN_DIR}/{wnid}")
        validation.append(RawFile(rel=f"{VALIDATION_DIR}/{name}", label=label_of[wnid],
                                  synset=wnid))

    metadata_path = storage.join(raw_dir, METADATA)
    texts = (parse_metadata(storage.read_text(metadata_path), metadata_path)
             if storage.exists(metadata_path) else {})
    return RawDataset(
        raw_dir=raw_dir,
        synsets=tuple(synsets),
        texts={w: texts[w] for w in synsets if w in texts},
        train=tuple(train),
        validation=tuple(validation),
    )
