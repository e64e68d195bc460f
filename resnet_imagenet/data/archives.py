"""The four official ILSVRC2012 archives as ``convert`` input, read as streams, never extracted.

    RAW/ILSVRC2012_img_train.tar          one tar per class inside: <wnid>.tar -> <wnid>_<n>.JPEG
    RAW/ILSVRC2012_img_val.tar            ILSVRC2012_val_<8 digits>.JPEG
    RAW/ILSVRC2012_bbox_train_v2.tar.gz   <wnid>/<wnid>_<n>.xml (PASCAL VOC)
    RAW/ILSVRC2012_devkit_t12.tar.gz      ILSVRC2012_devkit_t12/data/meta.mat and
                                          .../data/ILSVRC2012_validation_ground_truth.txt

RAW is a local directory or a ``gs://`` prefix. :func:`detect` recognises the archives by their
official names; :func:`load` turns them into the same :class:`~.imagenet.RawDataset` that the
extracted layout of the same files gives (same paths, labels, texts and boxes), so the shards
are byte for byte the same. Each image's :attr:`~.imagenet.RawFile.member` says where its bytes
lie in its archive; the converter's workers read exactly those bytes (one ranged read on GCS).

Labels: 1..1000 in sorted wnid order, as for the extracted layout (not the devkit's
ILSVRC2012_ID order). The validation ground truth gives ILSVRC2012_IDs, one per image in file
number order; ``meta.mat`` maps them to wnids and gives each class its text ("words").

What must be read before shards can be planned is an index: where each image lies. Making it
means reading through each archive's headers: the train archive's 1,000 class tars, the
validation tar and the bounding-box archive are 1,002 units of work, spread over ``--workers``
and ``--num-tasks`` like shards. Each unit is indexed by one task only, over all tasks
(:mod:`~.index_claims`): task I claims and indexes units k with k % T == I, then claims those
nobody has claimed (a task not started yet) and takes over those whose task shows no sign of
life for a timeout; it waits for the rest. The train archive's listing of its class tars and
the devkit are claimed the same way (one task reads them, the others wait). Each unit's index is
kept in ``OUT/_shards/archives/<unit>.json`` with the archive's size and version (GCS generation
or local mtime), so a rerun or a later task reads it instead of the archive. The boxes are kept
one object per class (``boxes/<wnid>.json``; ``boxes.json`` lists the classes and is written
last), so a reader reads the classes it needs, not one 50 MB document. On GCS a class tar is
streamed in 8 MiB ranged reads; locally the reader seeks from header to header.

Bad archives are refused with one line naming the file and what is wrong: a truncated archive,
a member that is not a tar, a devkit without the ground truth, archives of another year.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from resnet_imagenet import storage
from resnet_imagenet.data import imagenet, index_claims
from resnet_imagenet.data.imagenet import RawDataset, RawFile
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

YEAR = "2012"
TRAIN = "ILSVRC2012_img_train.tar"
VALIDATION = "ILSVRC2012_img_val.tar"
BOXES = "ILSVRC2012_bbox_train_v2.tar.gz"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
OFFICIAL = (TRAIN, VALIDATION, BOXES, DEVKIT)
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META = "meta.mat"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
VALIDATION_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_OTHER_YEAR = re.compile(r"ILSVRC(\d{4})", re.IGNORECASE)
_CLASS_TAR = re.compile(r"^(n\d{8})\.tar$")
CACHE_DIR = "archives"  # under OUT/_shards/
CACHE_THREADS = 32
BOXES_DIR = "boxes"  # under CACHE_DIR: one object per class
BOXES_FORMAT = "per-class"  # in the boxes unit's key: a boxes.json of one document is not read
BLOCK = tarfile.BLOCKSIZE

# Reader buffers: each refill is one ranged read on GCS. Hopping between the 1,000 headers of
# the train archive wants small reads; streaming through a class tar wants large ones.
HOP_BUFFER = 64 * 1024
REMOTE_STREAM_BUFFER = 8 * 1024 * 1024
LOCAL_HOP_BUFFER = 16 * 1024


class BadArchive(UserError):
    """An archive that cannot be read as the official one: the message names it and the fix."""


@dataclass(frozen=True)
class Unit:
    """One piece of indexing work: a class tar inside the train archive, or a whole archive."""

    name: str  # cache file stem: "train-<wnid>", "validation", "boxes"
    raw_dir: str
    archive: str
    start: int  # where the unit's bytes start in the archive
    length: int
    key: str  # archive identity: name, size, version
    cache_dir: str

    @property
    def uri(self) -> str:
        return storage.join(self.raw_dir, self.archive)

    @property
    def cache_uri(self) -> str:
        return storage.join(self.cache_dir, self.name + ".json")

    @property
    def where(self) -> str:
        if self.name.startswith("train-"):
            return f"{self.uri} member {self.name[len('train-'):]}.tar"
        return self.uri


# --------------------------------------------------------------------------------- detection


def detect(raw_dir: str) -> bool:
    """True when ``raw_dir`` holds the official archives (all four, or a one-line error).

    False when it holds none of them: then it is the extracted layout. Archives of another
    ILSVRC year alone (and no extracted layout) are refused by name.
    """
    names = set(storage.listdir(raw_dir))
    present = [n for n in OFFICIAL if n in names]
    if present:
        missing = [n for n in OFFICIAL if n not in names]
        if missing:
            raise UserError(f"{raw_dir} holds {', '.join(present)} but not {', '.join(missing)}: "
                            "put all four ILSVRC2012 archives there, under their official names")
        return True
    if imagenet.TRAIN_DIR not in names:
        for name in sorted(names):
            match = _OTHER_YEAR.match(name)
            if match and match.group(1) != YEAR:
                raise UserError(f"{storage.join(raw_dir, name)} is an archive of ILSVRC"
                                f"{match.group(1)}, not ILSVRC{YEAR}: convert reads "
                                f"{', '.join(OFFICIAL)}")
    return False


# ---------------------------------------------------------------------------- reading tars


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def list_tar(reader, length: int, where: str) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file of the tar ``reader`` holds.

    Offsets are positions in ``reader``. The archive must be whole: every member inside
    ``length`` bytes and the end-of-archive marker (a zero block) after the last one, so a
    download cut short, even at a member boundary, is caught here.
    """
    try:
        tar = tarfile.open(fileobj=reader, mode="r:")
    except tarfile.ReadError as exc:
        raise BadArchive(f"{where} is not a tar archive ({exc})") from None
    members = []
    end = 0
    try:
        for info in tar:
            if info.offset_data + info.size > length:
                raise BadArchive(f"{where} is truncated: {info.name} needs "
                                 f"{info.offset_data + info.size:,} bytes, the archive has "
                                 f"{length:,} (download it again)")
            end = info.offset_data + _round_up(info.size)
            if info.isreg():
                members.append((info.name, info.offset_data, info.size))
    except (tarfile.ReadError, EOFError) as exc:
        raise BadArchive(f"{where} is corrupt after byte {end:,} ({exc}): download it "
                         "again") from None
    reader.seek(end)
    block = reader.read(BLOCK)
    if len(block) < BLOCK:
        raise BadArchive(f"{where} is truncated: it ends at byte {length:,} without tar's "
                         "end-of-archive marker (download it again)")
    if block.strip(b"\0"):
        raise BadArchive(f"{where} is corrupt: no valid tar header at byte {end:,} "
                         "(download it again)")
    return members


def _stream_members(uri: str, where: str) -> Iterable[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file of a .tar.gz, read as one stream."""
    buffer = REMOTE_STREAM_BUFFER if storage.is_remote(uri) else 1024 * 1024
    try:
        with storage.open_range(uri, buffer_size=buffer) as reader, \
                tarfile.open(fileobj=reader, mode="r|gz") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()
    except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BadArchive(f"{where} is truncated or not a .tar.gz ({exc}): download it "
                         "again") from None


def _other_year(names: Iterable[str]) -> str | None:
    for name in names:
        for year in _OTHER_YEAR.findall(name):
            if year != YEAR:
                return year
    return None


# ---------------------------------------------------------------------------------- devkit


@dataclass(frozen=True)
class Devkit:
    classes: dict[str, str]  # wnid -> words, the leaf synsets (ILSVRC2012_ID 1..1000)
    wnid_of_id: dict[int, str]
    ground_truth: tuple[int, ...]  # ILSVRC2012_ID of validation image n at [n - 1]


def parse_meta(data: bytes, where: str) -> tuple[dict[str, str], dict[int, str]]:
    """The classes of ``meta.mat``: ``({wnid: words}, {ILSVRC2012_ID: wnid})``.

    ``synsets`` is a struct array over the whole hierarchy; the classes are its leaves
    (``num_children`` 0), numbered by ``ILSVRC2012_ID``.
    """
    import numpy as np
    import scipy.io

    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        fields = synsets.dtype.names or ()
    except Exception as exc:  # scipy raises several types for a file that is not a MAT file
        raise BadArchive(f"{where} cannot be read as a MATLAB file ({exc}): download the "
                         "devkit again") from None
    needed = ("ILSVRC2012_ID", "WNID", "words", "num_children")
    missing = [f for f in needed if f not in fields]
    if missing:
        raise BadArchive(f"{where} has no 'synsets' struct with {', '.join(missing)}: not the "
                         f"ILSVRC{YEAR} devkit's meta.mat")
    classes, wnid_of_id = {}, {}
    for record in np.atleast_1d(synsets):
        if int(record["num_children"]) != 0:
            continue
        wnid, number = str(record["WNID"]), int(record["ILSVRC2012_ID"])
        classes[wnid] = str(record["words"])
        wnid_of_id[number] = wnid
    if not classes:
        raise BadArchive(f"{where} lists no classes (synsets without children)")
    return classes, wnid_of_id


def read_devkit(raw_dir: str) -> Devkit:
    uri = storage.join(raw_dir, DEVKIT)
    files = dict(_stream_members(uri, uri))
    year = _other_year(files)
    if year:
        raise BadArchive(f"{uri} is the devkit of ILSVRC{year} (e.g. {sorted(files)[0]}), not "
                         f"ILSVRC{YEAR}: download {DEVKIT}")
    meta = next((n for n in files if posixpath.basename(n) == META), None)
    truth = next((n for n in files if posixpath.basename(n) == GROUND_TRUTH), None)
    for name, what in ((truth, GROUND_TRUTH), (meta, META)):
        if name is None:
            raise BadArchive(f"{uri} has no {DEVKIT_DIR}/data/{what}: it is not the complete "
                             f"ILSVRC{YEAR} devkit (download {DEVKIT} again)")
    classes, wnid_of_id = parse_meta(files[meta], f"{uri}: {meta}")
    ground_truth = []
    for number, line in enumerate(files[truth].decode("ascii", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = int(line)
        except ValueError:
            value = -1
        if value not in wnid_of_id:
            raise BadArchive(f"{uri}: {truth} line {number}: {line.strip()!r} is not an "
                             f"ILSVRC2012_ID of {meta} (1..{len(wnid_of_id)})")
        ground_truth.append(value)
    return Devkit(classes, wnid_of_id, tuple(ground_truth))


# ------------------------------------------------------------------------ units and indexes


def _key(raw_dir: str, archive: str) -> str:
    size, version = storage.version(storage.join(raw_dir, archive))
    return f"{archive}:{size}:{version}"


def _read_cache(unit: Unit) -> dict | None:
    try:
        found = json.loads(storage.read_text(unit.cache_uri))
    except (FileNotFoundError, ValueError):
        return None
    return found if found.get("key") == unit.key else None


def _shared(unit: Unit, make: Callable[[], dict], claims: index_claims.Claims | None) -> dict:
    """The cached index of a unit every task needs before it can go on (the train archive's
    listing, the devkit): one task makes it (``make`` writes it), the others wait for it."""
    cached = _read_cache(unit)
    if cached is not None or claims is None:
        return cached if cached is not None else make()
    return index_claims.share([unit.name], [unit.name], lambda names: [(unit.name, make())],
                              lambda name: _read_cache(unit), claims,
                              what=f"{unit.where} ({unit.name})")[unit.name]


def _train_classes(raw_dir: str, key: str, cache_dir: str,
                   claims: index_claims.Claims | None = None) -> list[tuple[str, int, int]]:
    """The class tars of the train archive: ``(wnid, data offset, size)`` (cached)."""
    unit = Unit("train", raw_dir, TRAIN, 0, 0, key, cache_dir)

    def make() -> dict:
        uri = unit.uri
        length = int(key.split(":")[1])
        buffer = HOP_BUFFER if storage.is_remote(uri) else LOCAL_HOP_BUFFER
        with storage.open_range(uri, 0, length, buffer_size=buffer) as reader:
            members = list_tar(reader, length, uri)
        classes = []
        for name, offset, size in members:
            match = _CLASS_TAR.match(posixpath.basename(name))
            if not match:
                year = _other_year([name])
                raise BadArchive(
                    f"{uri} holds {name}, not a class archive <wnid>.tar"
                    + (f": this is ILSVRC{year} data" if year else
                       f": use the official {TRAIN} (one tar per class)"))
            classes.append((match.group(1), offset, size))
        index = {"key": key, "members": classes}
        storage.write_text(unit.cache_uri, json.dumps(index) + "\n")
        return index

    return [tuple(m) for m in _shared(unit, make, claims)["members"]]


def index_unit(unit: Unit) -> dict:
    """Read one unit's headers (or XML files) and write its index; returns the index.

    ``{"unit", "key", "files": [[name, offset, size], ...]}`` for a class tar or the validation
    tar (offsets in the archive file); ``{"unit", "key", "classes": [wnid, ...]}`` for the
    bounding boxes, whose ``{xml name: boxes or null}`` (null: a file that is not a usable
    annotation) go to one object per class first (:func:`box_class_uri`).
    """
    if unit.name == "boxes":
        boxes = _index_boxes(unit)
        with ThreadPoolExecutor(CACHE_THREADS) as pool:
            list(pool.map(lambda wnid: storage.write_text(box_class_uri(unit, wnid), json.dumps(
                {"key": unit.key, "wnid": wnid, "boxes": boxes[wnid]}) + "\n"), sorted(boxes)))
        index = {"unit": unit.name, "key": unit.key, "classes": sorted(boxes)}
    else:
        remote = storage.is_remote(unit.uri)
        buffer = REMOTE_STREAM_BUFFER if remote else LOCAL_HOP_BUFFER
        with storage.open_range(unit.uri, unit.start, unit.length, buffer_size=buffer) as reader:
            members = list_tar(reader, unit.length, unit.where)
        files = []
        for name, offset, size in members:
            if name.startswith("./"):
                name = name[2:]
            if "/" in name:
                raise BadArchive(f"{unit.where} holds {name}: expected image files only, "
                                 "without directories")
            files.append((name, unit.start + offset, size))
        index = {"unit": unit.name, "key": unit.key, "files": files}
    storage.write_text(unit.cache_uri, json.dumps(index) + "\n")
    return index


def box_class_uri(unit: Unit, wnid: str) -> str:
    return storage.join(unit.cache_dir, BOXES_DIR, wnid + ".json")


def read_boxes(unit: Unit, wnids: Iterable[str], again: bool = True
               ) -> dict[str, dict[str, list | None]]:
    """The boxes of the classes ``wnids`` (those the boxes unit's index lists), one object per
    class read in parallel; the unit is indexed again if one is missing or of another key."""
    wnids = sorted(wnids)

    def read(wnid: str) -> dict | None:
        try:
            found = json.loads(storage.read_text(box_class_uri(unit, wnid)))
        except (FileNotFoundError, ValueError):
            return None
        return found["boxes"] if found.get("key") == unit.key else None

    with ThreadPoolExecutor(CACHE_THREADS) as pool:
        found = dict(zip(wnids, pool.map(read, wnids)))
    lost = [w for w, b in found.items() if b is None]
    if lost and not again:
        raise BadArchive(f"{unit.cache_dir}: the boxes of {lost[0]} cannot be read back after "
                         f"indexing {unit.uri}: was it replaced meanwhile? Run again")
    if lost:
        log.warning("%s: the boxes of %d classes (%s...) are missing or of another archive "
                    "version; indexing %s again", unit.cache_dir, len(lost), lost[0], unit.uri)
        index_unit(unit)
        return read_boxes(unit, wnids, again=False)
    return found


def _index_boxes(unit: Unit) -> dict[str, dict[str, list | None]]:
    boxes: dict[str, dict[str, list | None]] = {}
    for name, data in _stream_members(unit.uri, unit.uri):
        parts = name.split("/")
        if len(parts) < 2 or not parts[-1].endswith(".xml"):
            continue
        wnid, xml = parts[-2], parts[-1]
        rel = f"{imagenet.BOXES_DIR}/{wnid}/{xml}"
        try:
            found = [list(b) for b in imagenet.parse_boxes(data, rel)]
        except ValueError as exc:
            log.warning("%s in %s; its image is converted without boxes", exc, unit.archive)
            found = None
        boxes.setdefault(wnid, {})[xml] = found
    return boxes


RunUnits = Callable[[list[Unit]], Iterable[dict]]


def _inline(units: list[Unit]) -> Iterable[dict]:
    return map(index_unit, units)


def build_index(units: list[Unit], run: RunUnits = _inline, num_tasks: int = 1,
                task_index: int = 0, claims: index_claims.Claims | None = None
                ) -> dict[str, dict]:
    """Every unit's index: from the cache, made by this task, or made by other tasks.

    Each unit is indexed once over all tasks (:func:`.index_claims.share`): this task claims
    its share (units k with k % num_tasks == task_index) and makes it with ``run`` (the
    converter's worker pool), then the units nobody has claimed and those whose claim went
    stale; it waits for those other live tasks hold. Indexes are deterministic, so a unit made
    twice (a task thought dead that comes back) is the same bytes.
    """
    def read_all(wanted: list[Unit]) -> dict[str, dict]:
        with ThreadPoolExecutor(CACHE_THREADS) as pool:
            found = pool.map(_read_cache, wanted)
            return {u.name: f for u, f in zip(wanted, found) if f is not None}

    done = read_all(units)
    missing = [u.name for u in units if u.name not in done]
    if not missing:
        return done
    by_name = {u.name: u for u in units}
    own = [u.name for k, u in enumerate(units) if k % num_tasks == task_index
           and u.name not in done]

    def index(names: list[str]) -> Iterable[tuple[str, dict]]:
        return ((found["unit"], found) for found in run([by_name[n] for n in names]))

    with contextlib.ExitStack() as stack:
        if claims is None:
            claims = stack.enter_context(index_claims.Claims(units[0].cache_dir, task_index))
        done.update(index_claims.share(missing, own, index, lambda n: _read_cache(by_name[n]),
                                       claims, num_tasks, total=len(units)))
    return done


# ------------------------------------------------------------------------------ the dataset


def units_of(raw_dir: str, cache_dir: str, claims: index_claims.Claims | None = None
             ) -> tuple[list[Unit], dict[str, str]]:
    """The indexing units (the long ones first) and every archive's key."""
    keys = {name: _key(raw_dir, name) for name in (TRAIN, VALIDATION, BOXES)}
    units = [
        Unit("validation", raw_dir, VALIDATION, 0, int(keys[VALIDATION].split(":")[1]),
             keys[VALIDATION], cache_dir),
        Unit("boxes", raw_dir, BOXES, 0, int(keys[BOXES].split(":")[1]),
             f"{keys[BOXES]}:{BOXES_FORMAT}", cache_dir),
    ]
    for wnid, offset, size in _train_classes(raw_dir, keys[TRAIN], cache_dir, claims):
        units.append(Unit(f"train-{wnid}", raw_dir, TRAIN, offset, size, keys[TRAIN], cache_dir))
    return units, keys


def _devkit(raw_dir: str, cache_dir: str, claims: index_claims.Claims | None = None) -> Devkit:
    """:func:`read_devkit`, kept in the cache: a rerun needs neither the archive nor scipy."""
    unit = Unit("devkit", raw_dir, DEVKIT, 0, 0, _key(raw_dir, DEVKIT), cache_dir)

    def make() -> dict:
        devkit = read_devkit(raw_dir)
        index = {"unit": unit.name, "key": unit.key, "classes": devkit.classes,
                 "wnid_of_id": devkit.wnid_of_id, "ground_truth": devkit.ground_truth}
        storage.write_text(unit.cache_uri, json.dumps(index) + "\n")
        return json.loads(json.dumps(index))  # what a reader of the cache gets

    cached = _shared(unit, make, claims)
    return Devkit(cached["classes"], {int(k): v for k, v in cached["wnid_of_id"].items()},
                  tuple(cached["ground_truth"]))


def load(raw_dir: str, cache_dir: str, run: RunUnits = _inline, num_tasks: int = 1,
         task_index: int = 0) -> RawDataset:
    """The dataset the archives in ``raw_dir`` hold, as the extracted layout would give it."""
    raw_dir = storage.normalize(raw_dir)
    with index_claims.Claims(cache_dir, task_index) as claims:
        devkit = _devkit(raw_dir, cache_dir, claims)
        units, _ = units_of(raw_dir, cache_dir, claims)
        _check_classes(raw_dir, devkit, units)
        indexes = build_index(units, run, num_tasks, task_index, claims)
    synsets = sorted(u.name[len("train-"):] for u in units if u.name.startswith("train-"))
    label_of = {wnid: k for k, wnid in enumerate(synsets, start=1)}
    box_unit = next(u for u in units if u.name == "boxes")
    listed = set(indexes["boxes"]["classes"])
    boxes = read_boxes(box_unit, [w for w in synsets if w in listed])
    return _dataset(raw_dir, devkit, synsets, label_of, indexes, boxes)


def _check_classes(raw_dir: str, devkit: Devkit, units: list[Unit]) -> None:
    synsets = sorted(u.name[len("train-"):] for u in units if u.name.startswith("train-"))
    unknown = [w for w in synsets if w not in devkit.classes]
    if unknown:
        raise BadArchive(f"{storage.join(raw_dir, TRAIN)} holds {unknown[0]}.tar, a class that "
                         f"{DEVKIT}'s {META} does not list: archives of another year?")
    absent = [w for w in sorted(devkit.classes) if w not in set(synsets)]
    if absent:
        raise BadArchive(f"{storage.join(raw_dir, TRAIN)} holds {len(synsets)} class archives but "
                         f"{META} lists {len(devkit.classes)} classes ({absent[0]}.tar is "
                         "missing): download it again")


def _dataset(raw_dir: str, devkit: Devkit, synsets: list[str], label_of: dict[str, int],
             indexes: dict[str, dict], boxes: dict[str, dict]) -> RawDataset:
    train = []
    for wnid in synsets:
        files = {n: (o, s) for n, o, s in indexes[f"train-{wnid}"]["files"]
                 if not posixpath.basename(n).startswith(".")}
        if not files:
            raise BadArchive(f"{TRAIN} member {wnid}.tar holds no images")
        class_boxes = boxes.get(wnid, {})
        xml_of = {posixpath.splitext(x)[0]: x for x in class_boxes}
        for name in sorted(files):
            offset, size = files[name]
            xml = xml_of.get(posixpath.splitext(name)[0])
            found = class_boxes.get(xml) if xml else None
            train.append(RawFile(
                rel=f"{imagenet.TRAIN_DIR}/{wnid}/{name}", label=label_of[wnid], synset=wnid,
                boxes_rel=f"{imagenet.BOXES_DIR}/{wnid}/{xml}" if xml else None,
                member=(TRAIN, offset, size),
                boxes=tuple(tuple(b) for b in found) if found else (),
            ))

    members = sorted(indexes["validation"]["files"])
    if not members:
        raise BadArchive(f"{storage.join(raw_dir, VALIDATION)} holds no images")
    if len(members) != len(devkit.ground_truth):
        raise BadArchive(f"{storage.join(raw_dir, VALIDATION)} holds {len(members):,} images but "
                         f"{GROUND_TRUTH} has {len(devkit.ground_truth):,} labels: download "
                         "both again")
    validation = []
    for name, offset, size in members:
        match = VALIDATION_NAME.match(name)
        if not match:
            year = _other_year([name])
            raise BadArchive(f"{storage.join(raw_dir, VALIDATION)} holds {name}: "
                             + (f"an image of ILSVRC{year}, not ILSVRC{YEAR}" if year else
                                "not an ILSVRC2012_val_<8 digits>.JPEG image"))
        number = int(match.group(1))
        if not 1 <= number <= len(devkit.ground_truth):
            raise BadArchive(f"{storage.join(raw_dir, VALIDATION)} holds {name}, but "
                             f"{GROUND_TRUTH} has only {len(devkit.ground_truth):,} labels")
        wnid = devkit.wnid_of_id[devkit.ground_truth[number - 1]]
        if wnid not in label_of:
            raise BadArchive(f"{GROUND_TRUTH} line {number}: {wnid} is not one of the classes "
                             f"of {TRAIN}")
        validation.append(RawFile(rel=f"{imagenet.VALIDATION_DIR}/{name}", label=label_of[wnid],
                                  synset=wnid, member=(VALIDATION, offset, size)))
    return RawDataset(raw_dir=raw_dir, synsets=tuple(synsets),
                      texts={w: devkit.classes[w] for w in synsets},
                      train=tuple(train), validation=tuple(validation))


def validation_samples(raw_dir: str, count: int, out_dir: str) -> list[tuple[str, str]]:
    """Copy the first ``count`` validation images (by number) out of the validation archive
    into the local directory ``out_dir``; returns ``[(path, true wnid), ...]`` (run-local's
    predictions). Reads the archive's first members only."""
    devkit = read_devkit(raw_dir)
    os.makedirs(out_dir, exist_ok=True)
    found = []
    with storage.open_range(storage.join(raw_dir, VALIDATION), buffer_size=1024 * 1024) as reader, \
            tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            match = VALIDATION_NAME.match(posixpath.basename(info.name))
            if not info.isreg() or not match:
                continue
            path = os.path.join(out_dir, match.group(0))
            with open(path, "wb") as f:
                f.write(tar.extractfile(info).read())
            found.append((path, devkit.wnid_of_id[devkit.ground_truth[int(match.group(1)) - 1]]))
            if len(found) == count:
                break
    return found
