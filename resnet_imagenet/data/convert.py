"""Convert ILSVRC2012 into sharded TFRecords in the Inception Example schema.

    resnet-imagenet convert --raw-dir RAW --output-dir OUT [--train-shards 1024]
        [--validation-shards 128] [--workers N] [--num-tasks T --task-index I] [--seed S]

RAW holds either the four official archives, as downloaded (ILSVRC2012_img_train.tar,
ILSVRC2012_img_val.tar, ILSVRC2012_bbox_train_v2.tar.gz, ILSVRC2012_devkit_t12.tar.gz: read as
streams, never extracted; see resnet_imagenet.data.archives), or their extracted layout
(resnet_imagenet.data.imagenet: train/<wnid>/*.JPEG, validation/*.JPEG, validation_labels.txt,
bounding_boxes/<wnid>/*.xml, optional synsets.txt and metadata.txt). Both give the same bytes.
RAW and OUT may be local or gs://. OUT receives train-%05d-of-%05d, validation-%05d-of-%05d,
labels.txt (line k = wnid of label k) and manifest.json (counts and every skipped file).

No TensorFlow: files are read and written through resnet_imagenet.storage (the standard library
locally, google-cloud-storage on gs://), so the command and its workers start in a fraction of
a second (--validate decode is the exception: it decodes with TensorFlow on purpose).

What it checks: every image is recognised from its header (JPEG start and end markers, frame
header with size and colour mode) instead of being decoded; truncated, empty and non-image
files are left out and listed under "skipped" in manifest.json (paths relative to RAW), and the
run still exits 0. PNGs named .JPEG and CMYK JPEGs are re-encoded as RGB JPEG; grey JPEGs are
kept. --validate decode also decodes every image with TensorFlow.

How it is fast: no decoding; the Example and the TFRecord framing are written by hand around
the JPEG bytes; each of --workers processes writes whole shards.

How it is distributed: the shard plan is a pure function of the sorted input listing, the seed
and the shard counts, so --num-tasks T tasks agree on it without talking; task I writes the
shards k with k % T == I. The task that finds every shard complete (or a later --finalize)
writes labels.txt and manifest.json.

How it resumes: a shard is written under a temporary name and renamed when complete (on GCS it
is uploaded under its own name: an object appears only once its upload completes), then a
small record of it (OUT/_shards/<shard>.json: image count, skipped files, configuration
fingerprint) is written; a rerun skips shards that have one. OUT/_shards/config.json names the
configuration; shards of another configuration are refused, or rebuilt with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from resnet_imagenet import storage
from resnet_imagenet.data import archives, image_check, imagenet
from resnet_imagenet.data.imagenet import RawDataset, RawFile
from resnet_imagenet.data.records import RecordWriter, example_parts
from resnet_imagenet.data.tfrecord import DEFAULT_SHARDS, ImageRecord, parse_shard_name, shard_name
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

# Bump when the bytes written for the same input change, so old outputs count as foreign.
FORMAT_VERSION = 1
STATE_DIR = "_shards"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
VALIDATE_MODES = ("header", "decode")
MAX_SHARDS = 99999  # the %05d of the shard names
REMOTE_READ_THREADS = 16  # GCS reads take tens of ms each: keep that many in flight per worker
STATE_THREADS = 32  # parallel reads of the per-shard records (over a thousand on GCS)
PROGRESS_LOG_SECONDS = 10.0


# ----------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    files: tuple[RawFile, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


@dataclass(frozen=True)
class Plan:
    """Every shard of both splits (train first) and the configuration they are made from."""

    shards: tuple[Shard, ...]
    config: dict

    @property
    def fingerprint(self) -> str:
        return self.config["fingerprint"]

    def owned(self, num_tasks: int, task_index: int) -> list[Shard]:
        return [s for k, s in enumerate(self.shards) if k % num_tasks == task_index]


def spread(files: tuple[RawFile, ...] | list[RawFile], split: str, count: int,
           seed: int) -> list[Shard]:
    """Shuffle ``files`` with ``seed`` and cut them into ``count`` shards of near-equal size.

    The order is that of SHA-256(seed, path): it mixes the classes over the shards like the
    Inception script's seeded shuffle, depends on nothing but the paths (not on the listing
    order, the Python version or the platform), and is the same in every task.
    """
    def key(raw: RawFile) -> bytes:
        return hashlib.sha256(f"{seed}\0{raw.rel}".encode()).digest()

    ordered = sorted(files, key=key)
    bounds = [len(ordered) * i // count for i in range(count + 1)]
    return [Shard(split, i, count, tuple(ordered[bounds[i]:bounds[i + 1]])) for i in range(count)]


def _input_digest(dataset: RawDataset) -> str:
    """What of the input decides the output: classes, texts, the listing, the box files.

    File contents are not read (that would cost a pass over the data); a file replaced under
    the same name is not noticed, which is what --overwrite is for.
    """
    digest = hashlib.sha256(json.dumps(
        {"synsets": dataset.synsets, "texts": dataset.texts}, sort_keys=True).encode())
    for raw in dataset.train + dataset.validation:
        digest.update(f"{raw.rel}\t{raw.label}\t{raw.boxes_rel or ''}\n".encode())
    return digest.hexdigest()


def make_plan(dataset: RawDataset, train_shards: int, validation_shards: int, seed: int,
              validate: str = "header") -> Plan:
    config = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "train_shards": train_shards,
        "validation_shards": validation_shards,
        "validate": validate,
        "input": _input_digest(dataset),
        "synsets": list(dataset.synsets),
        "class_text": dict(dataset.texts),
    }
    config["fingerprint"] = hashlib.sha256(
        json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    shards = (spread(dataset.train, "train", train_shards, seed)
              + spread(dataset.validation, "validation", validation_shards, seed))
    return Plan(tuple(shards), config)


def _planned_names(config: dict) -> list[str]:
    return ([shard_name("train", i, config["train_shards"]) for i in range(config["train_shards"])]
            + [shard_name("validation", i, config["validation_shards"])
               for i in range(config["validation_shards"])])


# ------------------------------------------------------------------------ writing one shard


@dataclass(frozen=True)
class ShardContext:
    """What a worker needs besides the shard itself (sent once per worker process)."""

    raw_dir: str
    out_dir: str
    fingerprint: str
    texts: dict
    validate: str = "header"
    read_threads: int = 1


@dataclass(frozen=True)
class ShardResult:
    name: str
    images: int
    skipped: tuple[dict, ...]


def _state_uri(out_dir: str, name: str) -> str:
    return storage.join(out_dir, STATE_DIR, name)


def _read_ahead(ctx: ShardContext, files: tuple[RawFile, ...]):
    """Yield (file, image bytes, box XML bytes or None) in order, ``read_threads`` reads ahead.

    Local reads are quick and done inline; on GCS each read waits tens of milliseconds, so a
    small thread pool keeps several in flight (the HTTP client releases the GIL while it waits).
    """
    def read(raw: RawFile):
        if raw.member is not None:  # in one of the official archives: its bytes only
            archive, offset, size = raw.member
            return raw, storage.read_range(storage.join(ctx.raw_dir, archive), offset, size), None
        data = storage.read_bytes(storage.join(ctx.raw_dir, *raw.rel.split("/")))
        xml = (storage.read_bytes(storage.join(ctx.raw_dir, *raw.boxes_rel.split("/")))
               if raw.boxes_rel else None)
        return raw, data, xml

    if ctx.read_threads <= 1:
        yield from map(read, files)
        return
    with ThreadPoolExecutor(ctx.read_threads) as pool:
        pending: deque = deque()
        for raw in files:
            pending.append(pool.submit(read, raw))
            if len(pending) >= 2 * ctx.read_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _boxes(raw: RawFile, xml: bytes | None) -> list:
    if raw.boxes is not None:  # read from the bounding-box archive while indexing
        return list(raw.boxes)
    if xml is None:
        return []
    try:
        return imagenet.parse_boxes(xml, raw.boxes_rel)
    except ValueError as exc:  # a bad annotation costs the boxes, not the image
        log.warning("%s; converting %s without boxes", exc, raw.rel)
        return []


def write_shard(ctx: ShardContext, shard: Shard) -> ShardResult:
    """Write one shard (atomically), then its record in OUT/_shards/."""
    skipped = []
    with storage.atomic_write(storage.join(ctx.out_dir, shard.name), "wb") as f:
        writer = RecordWriter(f)
        for raw, data, xml in _read_ahead(ctx, shard.files):
            try:
                jpeg, info = image_check.prepare_jpeg(data, decode=ctx.validate == "decode")
            except image_check.BadImage as exc:
                skipped.append({"file": raw.rel, "reason": str(exc)})
                continue
            grey = info.mode == "L"
            writer.write(*example_parts(ImageRecord(
                encoded=jpeg, height=info.height, width=info.width, label=raw.label,
                synset=raw.synset, text=ctx.texts.get(raw.synset, ""), filename=raw.filename,
                boxes=_boxes(raw, xml), channels=1 if grey else 3,
                colorspace="Grayscale" if grey else "RGB",
            )))
    record = {"shard": shard.name, "fingerprint": ctx.fingerprint, "images": writer.records,
              "skipped": skipped}
    storage.write_text(_state_uri(ctx.out_dir, shard.name + ".json"),
                  json.dumps(record, indent=1, sort_keys=True) + "\n")
    return ShardResult(shard.name, writer.records, tuple(skipped))


# ------------------------------------------------------------------------- worker processes

def _init_worker(log_level: int) -> None:
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                        datefmt="%H:%M:%S")


def _in_worker(task, ctx: ShardContext, item):
    if ctx.validate == "decode":  # the one mode that loads TensorFlow (to decode every image)
        _one_thread_tensorflow()
    return task(ctx, item)


@functools.lru_cache(maxsize=None)
def _one_thread_tensorflow() -> None:
    import tensorflow as tf  # one process per core: no TF pools on top

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


@contextlib.contextmanager
def _worker_pool(workers: int):
    """Yield ``run(task, ctx, items)`` -> iterator of ``task(ctx, item)`` results, in any order.

    One worker runs inline; more use a process pool with the spawn start method: the parent
    may hold GCS connections and threads, which a forked child must not share. The pool starts
    on the first call with more than one item, with at most that many processes, and serves
    the later calls too (archives: the indexing, then the shards). Each process writes whole
    shards.
    """
    pool = None

    def run(task, ctx: ShardContext, items):
        nonlocal pool
        items = list(items)
        if pool is None and (workers <= 1 or len(items) <= 1):
            return (task(ctx, item) for item in items)
        if pool is None:
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(items)), initializer=_init_worker,
                initargs=(logging.getLogger().level,))
        return pool.imap_unordered(functools.partial(_in_worker, task, ctx), items, chunksize=1)

    try:
        yield run
    finally:
        if pool is not None:
            pool.terminate()  # also on errors and Ctrl-C: unfinished shards stay temporary
            pool.join()


def _index_unit(ctx: ShardContext, unit: archives.Unit) -> dict:
    return archives.index_unit(unit)


def load_input(raw_dir: str, out_dir: str, run=None, num_tasks: int = 1,
               task_index: int = 0) -> RawDataset:
    """The listing of RAW: the official archives when it holds them, else the extracted layout.

    Archives are indexed first (see :mod:`resnet_imagenet.data.archives`) with ``run`` (from
    :func:`_worker_pool`; inline when None), this task's share of the units first; the
    indexes go to OUT/_shards/archives/.
    """
    raw_dir = storage.normalize(raw_dir)
    if not archives.detect(raw_dir):
        return imagenet.load(raw_dir)
    log.info("%s holds the ILSVRC2012 archives: reading them without extracting", raw_dir)
    ctx = ShardContext(raw_dir, out_dir, "", {})

    def run_units(units: list) -> list[dict]:
        results = (_index_unit(ctx, unit) for unit in units) if run is None else \
            run(_index_unit, ctx, units)
        indexes, last = [], time.monotonic()
        for index in results:
            indexes.append(index)
            if time.monotonic() - last >= PROGRESS_LOG_SECONDS:
                last = time.monotonic()
                log.info("indexed %d/%d archive units", len(indexes), len(units))
        return indexes

    return archives.load(raw_dir, storage.join(out_dir, STATE_DIR, archives.CACHE_DIR), run_units,
                         num_tasks, task_index)


# ------------------------------------------------------------------------- progress output


class _Progress:
    """A tqdm bar with images/s on a terminal; a log line every few seconds otherwise."""

    def __init__(self, images: int, shards: int):
        self.images, self.shards = images, shards
        self.done_images = self.done_shards = 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=images, unit="img", unit_scale=True, dynamic_ncols=True,
                            desc="convert")

    def update(self, result: ShardResult) -> None:
        self.done_shards += 1
        done = result.images + len(result.skipped)
        self.done_images += done
        if self.bar is not None:
            self.bar.update(done)
            return
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_SECONDS or self.done_shards == self.shards:
            self.last_log = now
            rate = self.done_images / max(now - self.start, 1e-9)
            log.info("%d/%d shards, %d/%d images, %.0f images/s", self.done_shards, self.shards,
                     self.done_images, self.images, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------- output directory state


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # cut short by a crash on a filesystem without atomic rename: not complete


def _read_records(out_dir: str, names: list[str]) -> dict[str, dict]:
    """The per-shard records that exist for ``names`` (read in parallel: many on GCS)."""
    present = set(storage.listdir(storage.join(out_dir, STATE_DIR)))
    wanted = [n for n in names if n + ".json" in present]
    with ThreadPoolExecutor(STATE_THREADS) as pool:
        found = pool.map(lambda n: _read_json(_state_uri(out_dir, n + ".json")), wanted)
        return {n: r for n, r in zip(wanted, found) if r is not None}


def _differences(old: dict, new: dict) -> str:
    parts = [f"{key} {old.get(key)} -> {new[key]}"
             for key in ("seed", "train_shards", "validation_shards", "validate", "version")
             if old.get(key) != new[key]]
    if old.get("input") != new["input"]:
        parts.append("another input listing")
    return ", ".join(parts) or "another configuration"


def _conflict(plan: Plan, names: set[str], config: dict | None) -> str | None:
    """Why OUT holds shards this run must not mix with, or None."""
    shards = sorted(n for n in names if parse_shard_name(n))
    planned = set(_planned_names(plan.config))
    foreign = [n for n in shards if n not in planned]
    if config is not None and config.get("fingerprint") != plan.fingerprint:
        return f"shards of a different configuration ({_differences(config, plan.config)})"
    if config is None and shards:
        return f"shards this converter did not record (e.g. {shards[0]})"
    if foreign:
        return f"shards of another shard count (e.g. {foreign[0]})"
    return None


def _temp_target(name: str) -> str | None:
    """The final name of a temporary file from storage.temp_name (``.tmp-<hex>-<name>``)."""
    if not storage.is_temp(name):
        return None
    parts = name.split("-", 2)
    return parts[2] if len(parts) == 3 else None


def _remove_temps(out_dir: str, shard_names: set[str]) -> None:
    """Delete leftovers of killed writers of these shards (and of their records)."""
    for directory, suffix in ((out_dir, ""), (storage.join(out_dir, STATE_DIR), ".json")):
        for name in storage.listdir(directory):
            target = _temp_target(name)
            if target is not None and target.endswith(suffix) and \
                    target[:len(target) - len(suffix)] in shard_names:
                storage.remove(storage.join(directory, name))


def _remove_stale(out_dir: str, plan: Plan, names: set[str]) -> None:
    """--overwrite: delete what belongs to no shard of this plan, and the old summary files.

    Shards whose names this plan also uses are left to their owning task, which rewrites them
    (their records carry the old fingerprint, so they do not count as complete). Deleting only
    names no task of this plan writes keeps concurrent tasks from deleting each other's work.
    """
    planned = set(_planned_names(plan.config))
    for name in sorted(names):
        if (parse_shard_name(name) and name not in planned) or name in (MANIFEST_FILE, LABELS_FILE):
            storage.remove(storage.join(out_dir, name))
    state_dir = storage.join(out_dir, STATE_DIR)
    for name in storage.listdir(state_dir):
        stem = name[:-len(".json")] if name.endswith(".json") else None
        if stem is not None and parse_shard_name(stem) and stem not in planned:
            storage.remove(storage.join(state_dir, name))


# ------------------------------------------------------------------------------- finalizing


class Incomplete(Exception):
    """Some shards of OUT's configuration have no complete record yet (other tasks' work)."""

    def __init__(self, missing: list[str], total: int):
        super().__init__(f"{len(missing)} of {total} shards are not complete yet "
                         f"(e.g. {missing[0]})")
        self.missing = missing


def finalize(out_dir: str) -> dict:
    """Write labels.txt and manifest.json once every shard of OUT's configuration is complete.

    Needs only OUT (the configuration is in OUT/_shards/config.json). Raises
    :class:`Incomplete` while shards are missing. Deterministic: rerunning writes the same
    bytes, so several tasks may finalize.
    """
    out_dir = storage.normalize(out_dir)
    config = _read_json(_state_uri(out_dir, CONFIG_FILE))
    if config is None:
        raise UserError(f"{out_dir} holds no conversion to finalize "
                        f"({STATE_DIR}/{CONFIG_FILE} is missing): run convert first")
    names = _planned_names(config)
    # Listings first: while other tasks are still at work this costs two requests, not one
    # read per shard record.
    present = set(storage.listdir(out_dir))
    present_records = set(storage.listdir(storage.join(out_dir, STATE_DIR)))
    missing = [n for n in names if n not in present or n + ".json" not in present_records]
    if not missing:
        records = _read_records(out_dir, names)
        missing = [n for n in names
                   if records.get(n, {}).get("fingerprint") != config["fingerprint"]]
    if missing:
        raise Incomplete(missing, len(names))
    _remove_temps(out_dir, set(names))
    manifest = {"schema": "inception", "classes": len(config["synsets"]),
                "class_text": config["class_text"], "seed": config["seed"],
                "fingerprint": config["fingerprint"]}
    for split in ("train", "validation"):
        split_names = [n for n in names if n.startswith(split + "-")]
        manifest[split] = {"shards": len(split_names),
                           "images": sum(records[n]["images"] for n in split_names)}
    manifest["skipped"] = sorted((s for n in names for s in records[n]["skipped"]),
                                 key=lambda s: s["file"])
    storage.write_text(storage.join(out_dir, LABELS_FILE), "".join(
        f"{wnid}\n" for wnid in config["synsets"]))
    # The manifest goes last: its presence means the whole output is there.
    storage.write_text(storage.join(out_dir, MANIFEST_FILE),
                  json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


# ----------------------------------------------------------------------------- the command


def _check_arguments(train_shards: int, validation_shards: int, workers: int, num_tasks: int,
                     task_index: int, validate: str, read_threads: int | None) -> None:
    for flag, value in (("--train-shards", train_shards),
                        ("--validation-shards", validation_shards)):
        if not 1 <= value <= MAX_SHARDS:
            raise UserError(f"{flag} {value} is out of range: use 1..{MAX_SHARDS}")
    for flag, value in (("--workers", workers), ("--read-threads", read_threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: use at least 1")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise UserError(f"--task-index {task_index} --num-tasks {num_tasks}: the index must be "
                        "in 0..num-tasks-1")
    if validate not in VALIDATE_MODES:
        raise UserError(f"--validate {validate}: use one of {', '.join(VALIDATE_MODES)}")


def default_workers() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU limit (a pod's).

    A pod sees every CPU of its node; without the cap a 4-CPU pod on a 64-core node would start
    64 worker processes.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # "max 100000" or "<quota> <period>"
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def convert(raw_dir: str, output_dir: str, *, train_shards: int = DEFAULT_SHARDS["train"],
            validation_shards: int = DEFAULT_SHARDS["validation"], workers: int | None = None,
            num_tasks: int = 1, task_index: int = 0, seed: int = 0, validate: str = "header",
            overwrite: bool = False, read_threads: int | None = None) -> dict:
    """Convert this task's shards; finalize when every shard is complete.

    Returns ``{"written": [shard names], "reused": [...], "images": n, "skipped": [...],
    "manifest": the manifest or None while other tasks' shards are missing}``.
    Every check of the input and of OUT runs before anything is written.
    """
    workers = default_workers() if workers is None else workers
    _check_arguments(train_shards, validation_shards, workers, num_tasks, task_index, validate,
                     read_threads)
    out_dir = storage.normalize(output_dir)
    if storage.exists(out_dir) and not storage.isdir(out_dir):
        raise UserError(f"--output-dir {out_dir} is a file: choose a directory")
    with _worker_pool(workers) as run:
        return _convert(raw_dir, out_dir, run, workers, train_shards, validation_shards,
                        num_tasks, task_index, seed, validate, overwrite, read_threads)


def _convert(raw_dir: str, out_dir: str, run, workers: int, train_shards: int,
             validation_shards: int, num_tasks: int, task_index: int, seed: int, validate: str,
             overwrite: bool, read_threads: int | None) -> dict:
    dataset = load_input(raw_dir, out_dir, run, num_tasks, task_index)
    plan = make_plan(dataset, train_shards, validation_shards, seed, validate)
    for split, files, count in (("train", dataset.train, train_shards),
                                ("validation", dataset.validation, validation_shards)):
        if count > len(files):
            log.warning("%d %s shards for %d images: some shards will be empty",
                        count, split, len(files))

    names = set(storage.listdir(out_dir))
    state_config = _read_json(_state_uri(out_dir, CONFIG_FILE))
    conflict = _conflict(plan, names, state_config)
    if conflict and not overwrite:
        raise UserError(f"{out_dir} holds {conflict}: pass --overwrite to rebuild them, or "
                        "choose another --output-dir")
    # Nothing has been written up to here.
    if conflict:
        log.warning("%s holds %s: rebuilding (--overwrite)", out_dir, conflict)
        _remove_stale(out_dir, plan, names)
    if state_config != plan.config:
        storage.write_text(_state_uri(out_dir, CONFIG_FILE),
                      json.dumps(plan.config, indent=1, sort_keys=True) + "\n")

    owned = plan.owned(num_tasks, task_index)
    _remove_temps(out_dir, {s.name for s in owned})
    records = _read_records(out_dir, [s.name for s in owned])
    done = {s.name for s in owned if s.name in names
            and records.get(s.name, {}).get("fingerprint") == plan.fingerprint}
    todo = [s for s in owned if s.name not in done]
    log.info("task %d/%d: %d shards to write, %d already complete (%d images, workers: %d)",
             task_index, num_tasks, len(todo), len(done), sum(len(s.files) for s in todo),
             min(workers, max(len(todo), 1)))

    if read_threads is None:
        read_threads = REMOTE_READ_THREADS if storage.is_remote(dataset.raw_dir) else 1
    ctx = ShardContext(dataset.raw_dir, out_dir, plan.fingerprint, dataset.texts, validate,
                       read_threads)
    results: list[ShardResult] = []
    progress = _Progress(sum(len(s.files) for s in todo), len(todo))
    try:
        for result in run(write_shard, ctx, todo):
            results.append(result)
            progress.update(result)
    finally:
        progress.close()
    skipped = sorted((s for r in results for s in r.skipped), key=lambda s: s["file"])
    for item in skipped:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    try:
        manifest = finalize(out_dir)
    except Incomplete as exc:
        log.info("manifest not written yet: %s; it is written by the task that completes the "
                 "last shard, or by 'convert --finalize'", exc)
        manifest = None
    return {"written": sorted(r.name for r in results), "reused": sorted(done),
            "images": sum(r.images for r in results), "skipped": skipped, "manifest": manifest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw-dir", metavar="RAW",
                        help="the four ILSVRC2012 archives, or their extracted layout (a "
                        "directory or gs:// prefix); not needed with --finalize")
    parser.add_argument("--output-dir", required=True, metavar="OUT",
                        help="where the shards, labels.txt and manifest.json go (local or gs://)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_SHARDS["train"], metavar="N",
                        help="number of train shards (default %(default)s)")
    parser.add_argument("--validation-shards", type=int, default=DEFAULT_SHARDS["validation"],
                        metavar="N", help="number of validation shards (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes on this machine, each writing whole shards "
                        "(default: the CPUs this process may use)")
    parser.add_argument("--num-tasks", type=int, default=1, metavar="T",
                        help="split the shards over T independent tasks (e.g. pods)")
    parser.add_argument("--task-index", type=int, default=0, metavar="I",
                        help="which of the T tasks this is: it writes shards k with k %% T == I")
    parser.add_argument("--seed", type=int, default=0,
                        help="spreads classes over shards; same input and seed, same bytes")
    parser.add_argument("--validate", choices=VALIDATE_MODES, default="header",
                        help="header: check every image from its header (default); decode: "
                        "also decode every image, for data of unknown quality (~10x slower)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild when OUT holds shards of another configuration")
    parser.add_argument("--finalize", action="store_true",
                        help="only write labels.txt and manifest.json once all tasks are done")
    parser.add_argument("--read-threads", type=int, default=None, metavar="N",
                        help="reads in flight per worker (default 1 locally, "
                        f"{REMOTE_READ_THREADS} when RAW is on gs://)")


def run(args: argparse.Namespace) -> int:
    if args.finalize:
        try:
            manifest = finalize(args.output_dir)
        except Incomplete as exc:
            raise UserError(f"cannot finalize {args.output_dir}: {exc}; run the tasks that "
                            "own them first") from None
        _print_summary(args.output_dir, manifest)
        return 0
    if not args.raw_dir:
        raise UserError("--raw-dir is required (only --finalize works without it)")
    result = convert(
        args.raw_dir, args.output_dir, train_shards=args.train_shards,
        validation_shards=args.validation_shards, workers=args.workers,
        num_tasks=args.num_tasks, task_index=args.task_index, seed=args.seed,
        validate=args.validate, overwrite=args.overwrite, read_threads=args.read_threads,
    )
    if result["manifest"] is None:
        print(f"task {args.task_index} of {args.num_tasks}: wrote {len(result['written'])} "
              f"shards ({result['images']} images, {len(result['skipped'])} skipped); "
              f"{MANIFEST_FILE} follows when every task is done (or run with --finalize)")
    else:
        _print_summary(args.output_dir, result["manifest"])
    return 0


def _print_summary(out_dir: str, manifest: dict) -> None:
    train, validation = manifest["train"], manifest["validation"]
    print(f"{out_dir}: {train['images']} train images in {train['shards']} shards, "
          f"{validation['images']} validation images in {validation['shards']} shards, "
          f"{manifest['classes']} classes; skipped {len(manifest['skipped'])} files"
          + (f" (reasons in {MANIFEST_FILE})" if manifest["skipped"] else ""))


# ----------------------------------------------------------------------------- benchmark

BENCH_SIZES = ((500, 375), (375, 500), (500, 333))  # ILSVRC2012's typical shapes
BENCH_IMAGES = 400


def write_synthetic_raw(raw_dir: str, images: int = BENCH_IMAGES, classes: int = 4,
                        seed: int = 0) -> None:
    """A raw layout of ImageNet-sized photo-like JPEGs (gradients, shapes, sensor noise).

    Decode cost depends on pixel count and entropy, so the images have ILSVRC2012's typical
    sizes and JPEG file sizes (~60-110 kB at quality 90); every train image has a box XML.
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from resnet_imagenet.data.sample import bbox_xml

    rng = np.random.default_rng(seed)
    labels = []
    for n in range(images):
        width, height = BENCH_SIZES[n % len(BENCH_SIZES)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        colours = rng.uniform(0, 255, size=(3, 3))
        pixels = (colours[0] * (x / width)[..., None] + colours[1] * (y / height)[..., None]
                  + colours[2] * 0.5) / 2
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            box = (x0, y0, x0 + int(rng.integers(30, width - x0)),
                   y0 + int(rng.integers(30, height - y0)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        noisy = np.asarray(image, np.float32) + rng.normal(0, 10, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(
            buf, format="JPEG", quality=90)
        wnid = f"n{n % classes:08d}"
        if n % 10 == 9:  # 10% validation
            labels.append(wnid)
            name = f"ILSVRC2012_val_{len(labels):08d}.JPEG"
            storage.write_bytes(storage.join(raw_dir, imagenet.VALIDATION_DIR, name),
                           buf.getvalue())
        else:
            name = f"{wnid}_{n}"
            storage.write_bytes(storage.join(raw_dir, imagenet.TRAIN_DIR, wnid, name + ".JPEG"),
                           buf.getvalue())
            storage.write_text(storage.join(raw_dir, imagenet.BOXES_DIR, wnid, name + ".xml"),
                          bbox_xml(name, wnid, width, height, box))
    storage.write_text(storage.join(raw_dir, imagenet.VALIDATION_LABELS), "\n".join(labels) + "\n")


def baseline_shard(ctx: ShardContext, shard: Shard) -> ShardResult:
    """The reference algorithm (Inception's build_imagenet_data.py), for the benchmark.

    Every image is fully decoded with TensorFlow to learn its size, the Example is built with
    the protobuf library and written with ``tf.io.TFRecordWriter``; boxes are read as here.
    """
    import tensorflow as tf

    from resnet_imagenet.data.tfrecord import encode_example

    images, skipped = 0, []
    with storage.atomic_path(storage.join(ctx.out_dir, shard.name)) as tmp, \
            tf.io.TFRecordWriter(tmp) as writer:
        for raw, data, xml in _read_ahead(ctx, shard.files):
            try:
                height, width, _ = tf.io.decode_jpeg(data, channels=3).shape
            except tf.errors.InvalidArgumentError as exc:
                skipped.append({"file": raw.rel, "reason": exc.message})
                continue
            writer.write(encode_example(ImageRecord(
                encoded=data, height=height, width=width, label=raw.label, synset=raw.synset,
                text=ctx.texts.get(raw.synset, ""), filename=raw.filename,
                boxes=_boxes(raw, xml))))
            images += 1
    return ShardResult(shard.name, images, tuple(skipped))


def _warm_up(ctx: ShardContext, shard: Shard) -> ShardResult:
    """Before the clock starts: make a worker import TensorFlow (the reference algorithm needs
    it; the converter does not) and touch the output."""
    import tensorflow  # noqa: F401

    storage.exists(ctx.out_dir)
    time.sleep(0.2)  # long enough that every worker of the pool takes one
    return ShardResult(shard.name, 0, ())


def bench(raw_dir: str | None = None, workers: int = 1, limit: int | None = None,
          rounds: int = 3) -> dict:
    """Images/s of this converter and of the reference algorithm on the same input.

    ``raw_dir`` None generates ``limit`` (default 400) ImageNet-sized JPEGs in a temporary
    directory; otherwise ``limit`` caps the number of images taken from ``raw_dir``.
    Both run in the same ``workers`` processes (started and warmed up before timing) over the
    same shards, after one read of every file so both find a warm page cache, ``rounds`` times
    in turn. Rates are medians over rounds, the ratio the median of the rounds' ratios. Prints
    and returns the figures; "per core" divides by the number of workers (run with no more
    workers than free cores).
    """
    if workers < 1:
        raise UserError(f"--workers {workers}: use at least 1")
    scratch = tempfile.mkdtemp(prefix="convert-bench-")
    try:
        if raw_dir is None:
            raw_dir = storage.join(scratch, "raw")
            write_synthetic_raw(raw_dir, limit or BENCH_IMAGES)
        raw_dir = storage.normalize(raw_dir)
        dataset = load_input(raw_dir, storage.join(scratch, "index"))
        everything = dataset.train + dataset.validation
        files = everything[:limit]
        # Few, large shards as in real runs (1,250 images each), where per-shard costs vanish.
        shards = spread(files, "train", max(1, min(len(files), 2 * workers)), seed=0)
        ctx = ShardContext(dataset.raw_dir, storage.join(scratch, "out"), "bench",
                           dataset.texts, "header",
                           REMOTE_READ_THREADS if storage.is_remote(dataset.raw_dir) else 1)
        sizes = [len(data) for _, data, _ in _read_ahead(ctx, tuple(files))]  # a warm cache
        figures = {"images": len(files), "workers": workers,
                   "mean_file_kb": sum(sizes) / max(len(sizes), 1) / 1e3}
        figures.update(_fresh_runs(raw_dir, scratch, workers, len(everything)))
        rates: dict[str, list[float]] = {"baseline": [], "converter": []}
        with _worker_pool(workers) as run:
            list(run(_warm_up, ctx, shards[:workers]))
            for _ in range(rounds):
                for label, task in (("baseline", baseline_shard), ("converter", write_shard)):
                    storage.rmtree(ctx.out_dir)  # replacing old files costs more than writing new
                    start = time.perf_counter()
                    done = sum(r.images + len(r.skipped) for r in run(task, ctx, shards))
                    rates[label].append(done / (time.perf_counter() - start))
        for label, values in rates.items():
            figures[f"{label}_images_per_s"] = statistics.median(values)
            figures[f"{label}_images_per_s_per_core"] = statistics.median(values) / workers
        # Each round's two runs are back to back: their ratio is what other load disturbs least.
        figures["ratio"] = statistics.median(
            c / b for b, c in zip(rates["baseline"], rates["converter"]))
    finally:
        storage.rmtree(scratch)
    print(f"convert benchmark: {figures['images']} images (mean {figures['mean_file_kb']:.0f} kB), "
          f"{workers} worker(s)")
    for label, what in (("baseline", "reference algorithm (full TF decode)"),
                        ("converter", "this converter (header check)")):
        print(f"  {what:<38} {figures[label + '_images_per_s']:9.0f} images/s  "
              f"{figures[label + '_images_per_s_per_core']:9.0f} per core")
    print(f"  ratio {figures['ratio']:.1f}x")
    print(f"  cold start: a fresh 'convert --workers {workers}' of {COLD_IMAGES} small images "
          f"{figures['cold_start_s']:9.2f} s wall")
    if "fresh_run_s" in figures:
        print(f"  a fresh 'convert --workers {workers}' of all {figures['fresh_run_images']} "
              f"images {figures['fresh_run_s']:9.2f} s wall")
    return figures


COLD_IMAGES = 10
FRESH_RUN_MAX_IMAGES = 20000


def _timed_convert(raw_dir: str, out_dir: str, workers: int, train_shards: int) -> float:
    """Wall seconds of ``resnet-imagenet convert`` in a new interpreter, as a user runs it."""
    import subprocess

    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "resnet_imagenet", "convert", "--raw-dir", raw_dir,
         "--output-dir", out_dir, "--workers", str(workers), "--train-shards",
         str(train_shards), "--validation-shards", "1"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"convert failed in the benchmark: {result.stderr.strip()}")
    return seconds


def _fresh_runs(raw_dir: str, scratch: str, workers: int, images: int) -> dict:
    """Cold start (a fresh command converting a handful of images with every worker busy) and,
    for inputs up to FRESH_RUN_MAX_IMAGES, a fresh run over the whole of RAW."""
    tiny = storage.join(scratch, "tiny")
    write_synthetic_raw(tiny, COLD_IMAGES, classes=1)
    figures = {"cold_start_s": _timed_convert(tiny, storage.join(scratch, "tiny-out"), workers,
                                              min(workers, COLD_IMAGES - 1))}
    if images <= FRESH_RUN_MAX_IMAGES:
        figures["fresh_run_s"] = _timed_convert(raw_dir, storage.join(scratch, "fresh-out"),
                                                workers, 2 * workers)
        figures["fresh_run_images"] = images
    return figures
