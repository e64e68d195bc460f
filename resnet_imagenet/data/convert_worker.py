"""Writing shards: one shard per call, in a pool of worker processes.

    with worker_pool(workers) as run:
        dataset = load_input(raw_dir, out_dir, run)        # archives are indexed in the pool
        for result in run(write_shard, ctx, shards): ...   # ShardResult per shard, any order

:func:`write_shard` writes the shard under a temporary name (renamed when complete), then its
record in OUT/_shards/ (see :mod:`resnet_imagenet.data.convert_state`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from resnet_imagenet import storage
from resnet_imagenet.data import archives, image_check, imagenet
from resnet_imagenet.data.convert_plan import Shard
from resnet_imagenet.data.convert_state import STATE_DIR, state_uri, write_json
from resnet_imagenet.data.imagenet import RawDataset, RawFile
from resnet_imagenet.data.records import RecordWriter, example_parts
from resnet_imagenet.data.tfrecord import ImageRecord

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 10.0
REMOTE_READ_THREADS = 16  # GCS reads take tens of ms each: keep that many in flight per worker


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


def read_ahead(ctx: ShardContext, files: tuple[RawFile, ...]):
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


def boxes(raw: RawFile, xml: bytes | None) -> list:
    """The bounding boxes of ``raw``: from the box archive's index, or parsed from ``xml``."""
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
        for raw, data, xml in read_ahead(ctx, shard.files):
            try:
                jpeg, info = image_check.prepare_jpeg(data, decode=ctx.validate == "decode")
            except image_check.BadImage as exc:
                skipped.append({"file": raw.rel, "reason": str(exc)})
                continue
            grey = info.mode == "L"
            writer.write(*example_parts(ImageRecord(
                encoded=jpeg, height=info.height, width=info.width, label=raw.label,
                synset=raw.synset, text=ctx.texts.get(raw.synset, ""), filename=raw.filename,
                boxes=boxes(raw, xml), channels=1 if grey else 3,
                colorspace="Grayscale" if grey else "RGB",
            )))
    write_json(state_uri(ctx.out_dir, shard.name + ".json"),
               {"shard": shard.name, "fingerprint": ctx.fingerprint, "images": writer.records,
                "skipped": skipped})
    return ShardResult(shard.name, writer.records, tuple(skipped))


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
def worker_pool(workers: int):
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
    :func:`worker_pool`; inline when None), this task's share of the units first; the
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
