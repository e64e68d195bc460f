"""``resnet-imagenet predict``: classify image files with an exported SavedModel.

    resnet-imagenet predict --model SAVED IMAGE [IMAGE ...] [--json] [--top-k 5]

``SAVED`` is the export directory (its highest version is used) or one version folder; images
are local paths or ``gs://`` URIs, JPEG, PNG, GIF or BMP, colour or greyscale, any size. They go
through the ``serving_default`` signature as encoded bytes -- the path a TF Serving client takes
-- in batches of ``--batch-size``. Per image it prints the top-k classes with synset, human text
and probability; with ``--json`` one JSON object per line::

    {"file": "...", "top": [{"label": k, "synset": "...", "text": "...", "probability": p}, ...]}
    {"file": "...", "error": "..."}

(``synset`` and ``text`` are left out when the model was trained without a label map). A file
that cannot be read or decoded gets an error line naming it, the others are still classified,
and the exit status is 1.

:func:`bench_predict` (``resnet-imagenet bench predict --model SAVED``) measures latency at
batch 1, JPEG decoding and preprocessing included, and throughput at batch 32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from resnet_imagenet import evaluation, export, storage
from resnet_imagenet.errors import UserError

DEFAULT_BATCH_SIZE = 32


class _Model:
    """The serving signature of a loaded SavedModel and its label map."""

    def __init__(self, model):
        loaded = export.load(model) if isinstance(model, str) else model
        if export.SERVING_SIGNATURE not in loaded.signatures or not hasattr(loaded, "synsets"):
            raise UserError(f"the SavedModel at {model} was not written by 'resnet-imagenet "
                            "export' (no serving_default signature with a label map)")
        self.loaded = loaded  # keeps the variables alive while the signature is used
        self.serve = loaded.signatures[export.SERVING_SIGNATURE]
        self.synsets = [s.decode() for s in loaded.synsets.numpy()]
        self.texts = [t.decode() for t in loaded.texts.numpy()]
        self.num_classes = len(self.synsets) - 1
        self.labelled = any(self.synsets)

    def probabilities(self, encoded: list[bytes]):
        import tensorflow as tf

        return self.serve(**{export.BYTES_INPUT: tf.constant(encoded)})["probabilities"].numpy()

    def top(self, probabilities, k: int) -> list[dict]:
        import numpy as np

        rows = []
        for index in np.argsort(-probabilities, kind="stable")[:k]:
            label = int(index) + 1
            row = {"label": label}
            if self.labelled:
                row.update(synset=self.synsets[label], text=self.texts[label])
            row["probability"] = round(float(probabilities[index]), 6)
            rows.append(row)
        return rows


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ValueError(f"{uri} not found") from None
    except (OSError, UserError) as exc:
        raise ValueError(f"cannot read {uri}: {evaluation.error_line(exc)}") from None
    except Exception as exc:
        from google.api_core.exceptions import GoogleAPIError

        if not isinstance(exc, GoogleAPIError):  # gs:// refused it (403, ...): this file's error
            raise
        raise ValueError(f"cannot read {uri}: {evaluation.error_line(exc)}") from None


def predict(model, files: list[str], top_k: int = 5,
            batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
    """One result per file, in order: ``{"file", "top": [...]}`` or ``{"file", "error"}``.

    ``model`` is a loaded SavedModel or its path. A batch that fails to decode is retried one
    image at a time, so one bad file costs only its own result.
    """
    import tensorflow as tf

    served = _Model(model)
    if not 1 <= top_k <= served.num_classes:
        raise UserError(f"--top-k {top_k}: use 1 to {served.num_classes} (the model's classes)")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    results: list[dict] = [{"file": f} for f in files]
    for start in range(0, len(files), batch_size):
        batch: list[tuple[int, bytes]] = []
        for index in range(start, min(start + batch_size, len(files))):
            try:
                batch.append((index, _read(files[index])))
            except ValueError as exc:
                results[index]["error"] = str(exc)
        if not batch:
            continue
        try:
            probabilities = served.probabilities([data for _, data in batch])
        except tf.errors.InvalidArgumentError:
            probabilities = None
        for position, (index, data) in enumerate(batch):
            if probabilities is not None:
                results[index]["top"] = served.top(probabilities[position], top_k)
                continue
            try:
                results[index]["top"] = served.top(served.probabilities([data])[0], top_k)
            except tf.errors.InvalidArgumentError as exc:
                results[index]["error"] = (f"{files[index]} is not a readable image: "
                                           f"{evaluation.error_line(exc)}")
    return results


def _print_text(result: dict) -> None:
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr, flush=True)
        return
    print(result["file"])
    for rank, row in enumerate(result["top"], start=1):
        names = f"  {row['synset']}  {row['text']}" if "synset" in row else ""
        print(f"  {rank}. {row['probability']:.4f}  label {row['label']}{names}")
    sys.stdout.flush()


# --- bench predict ---------------------------------------------------------------------------


def _synthetic_jpeg(width: int = 500, height: int = 375) -> bytes:
    """A photo-like JPEG of ImageNet's most common size: smooth colour fields plus grain."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    coarse = tf.constant(rng.uniform(0, 255, (1, 12, 16, 3)), tf.float32)
    image = tf.image.resize(coarse, [height, width], method="bicubic")[0]
    image += rng.normal(0, 6, (height, width, 3))
    return tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                             quality=90).numpy()


def _device() -> str:
    import os

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU ({details.get('device_name', gpus[0].name)})"
    return f"CPU ({len(os.sched_getaffinity(0))} cores)"


def bench_predict(model, batch_size: int = 32, runs: int = 50, warmup: int = 3,
                  images: list[str] | None = None) -> dict:
    """Latency at batch 1 and throughput at ``batch_size`` of ``serving_default``; prints both.

    Each call sends encoded JPEG bytes, so decoding and preprocessing are included, as a
    client of TF Serving would see them (without the network). ``images`` are JPEG/PNG files
    to use (default: one synthetic 500x375 JPEG). Results are fetched to the host in each
    timed call, so asynchronous GPU execution cannot hide work.
    """
    import numpy as np
    import tensorflow as tf

    if batch_size < 1 or runs < 1 or warmup < 0:
        raise UserError("--runs and the batch size must be at least 1, warmup at least 0")
    served = _Model(model)
    encoded = [_read(uri) for uri in images] if images else [_synthetic_jpeg()]
    one = tf.constant(encoded[:1])
    batch = tf.constant([encoded[i % len(encoded)] for i in range(batch_size)])

    def call(inputs) -> float:
        start = time.perf_counter()
        served.serve(**{export.BYTES_INPUT: inputs})["classes"].numpy()
        return time.perf_counter() - start

    for _ in range(warmup):
        call(one)
        call(batch)
    latencies = np.array([call(one) for _ in range(runs)]) * 1000.0
    batch_calls = max(3, runs // 5)
    elapsed = sum(call(batch) for _ in range(batch_calls))
    result = {
        "device": _device(),
        "latency_ms_median": round(float(np.median(latencies)), 2),
        "latency_ms_p90": round(float(np.percentile(latencies, 90)), 2),
        "latency_calls": runs,
        "batch_size": batch_size,
        "images_per_second": round(batch_size * batch_calls / elapsed, 1),
        "throughput_calls": batch_calls,
    }
    print(f"device          {result['device']}")
    print(f"latency         median {result['latency_ms_median']:.2f} ms, p90 "
          f"{result['latency_ms_p90']:.2f} ms  (batch 1, JPEG decode + preprocessing "
          f"included, {runs} calls)")
    print(f"throughput      {result['images_per_second']:.1f} images/s  (batch {batch_size}, "
          f"{batch_calls} calls)")
    return result


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="SAVED",
                        help="export directory of 'resnet-imagenet export' (its highest version) "
                             "or one version folder; local or gs://")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="JPEG/PNG/GIF/BMP files, local or gs://")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image and line")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per call of the model (default {DEFAULT_BATCH_SIZE})")


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet import preflight

    preflight.check_command(reads={"--model": args.model})
    results = predict(args.model, args.images, args.top_k, args.batch_size)
    for result in results:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            _print_text(result)
    return 1 if any("error" in r for r in results) else 0
