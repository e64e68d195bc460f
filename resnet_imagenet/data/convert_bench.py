"""``resnet-imagenet bench convert``: this converter against the reference algorithm.

    figures = bench(raw_dir=None, workers=1, limit=None, rounds=3)

Also :func:`write_synthetic_raw`, a raw layout of ImageNet-sized JPEGs for benchmarks.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from resnet_imagenet import storage
from resnet_imagenet.data import imagenet
from resnet_imagenet.data.convert_plan import Shard, spread
from resnet_imagenet.data.convert_worker import (REMOTE_READ_THREADS, ShardContext, ShardResult,
                                                 boxes, load_input, read_ahead, worker_pool,
                                                 write_shard)
from resnet_imagenet.data.tfrecord import ImageRecord
from resnet_imagenet.errors import UserError

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
        for raw, data, xml in read_ahead(ctx, shard.files):
            try:
                height, width, _ = tf.io.decode_jpeg(data, channels=3).shape
            except tf.errors.InvalidArgumentError as exc:
                skipped.append({"file": raw.rel, "reason": exc.message})
                continue
            writer.write(encode_example(ImageRecord(
                encoded=data, height=height, width=width, label=raw.label, synset=raw.synset,
                text=ctx.texts.get(raw.synset, ""), filename=raw.filename,
                boxes=boxes(raw, xml))))
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
        sizes = [len(data) for _, data, _ in read_ahead(ctx, tuple(files))]  # a warm cache
        figures = {"images": len(files), "workers": workers,
                   "mean_file_kb": sum(sizes) / max(len(sizes), 1) / 1e3}
        figures.update(_fresh_runs(raw_dir, scratch, workers, len(everything)))
        rates: dict[str, list[float]] = {"baseline": [], "converter": []}
        with worker_pool(workers) as run:
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
        figures["fresh_run_s"] = _timed_convert(raw_dir, storage.join(scratch, "fresh-out"), workers,
                                                2 * workers)
        figures["fresh_run_images"] = images
    return figures
