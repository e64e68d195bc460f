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

Every image is checked from its header, not decoded; truncated, empty and non-image files are
left out and listed under "skipped" in manifest.json (paths relative to RAW), and the run still
exits 0. PNGs named .JPEG and CMYK JPEGs are re-encoded as RGB JPEG; grey JPEGs are kept.
--validate decode also decodes every image with TensorFlow (the one mode that imports it).

--num-tasks T tasks (e.g. pods) split the shards without talking: task I writes the shards k
with k % T == I, and the task that finds every shard complete (or a later --finalize) writes
labels.txt and manifest.json. A rerun keeps complete shards and writes the rest; shards of
another configuration are refused, or rebuilt with --overwrite. docs/conversion.md says why it
works this way.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from resnet_imagenet import preflight, storage
from resnet_imagenet.data.convert_plan import make_plan
from resnet_imagenet.data.convert_state import (CONFIG_FILE, MANIFEST_FILE, Incomplete, conflict,
                                                finalize, read_json, read_records, remove_stale,
                                                remove_temps, state_uri, write_json)
from resnet_imagenet.data.convert_worker import (PROGRESS_LOG_SECONDS, REMOTE_READ_THREADS,
                                                 ShardContext, ShardResult, load_input,
                                                 worker_pool, write_shard)
from resnet_imagenet.data.tfrecord import DEFAULT_SHARDS
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

VALIDATE_MODES = ("header", "decode")
MAX_SHARDS = 99999  # the %05d of the shard names


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
    out_dir = preflight.check_output_dir(output_dir, "--output-dir")
    with worker_pool(workers) as run:
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
    state_config = read_json(state_uri(out_dir, CONFIG_FILE))
    conflicting = conflict(plan, names, state_config)
    if conflicting and not overwrite:
        raise UserError(f"{out_dir} holds {conflicting}: pass --overwrite to rebuild them, or "
                        "choose another --output-dir")
    # Nothing has been written up to here.
    if conflicting:
        log.warning("%s holds %s: rebuilding (--overwrite)", out_dir, conflicting)
        remove_stale(out_dir, plan, names)
    if state_config != plan.config:
        write_json(state_uri(out_dir, CONFIG_FILE), plan.config)

    owned = plan.owned(num_tasks, task_index)
    remove_temps(out_dir, {s.name for s in owned})
    records = read_records(out_dir, [s.name for s in owned])
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
