"""Top-1/top-5 of a checkpoint over the whole validation split, once or as training goes on.

    resnet-imagenet evaluate --data-dir TFRECORDS --model-dir MODEL [--checkpoint PATH]
                             [--output metrics.json] [--batch-size N]
    resnet-imagenet evaluate --data-dir TFRECORDS --model-dir MODEL --watch
                             [--poll-interval S] [--timeout S]

The model is rebuilt from MODEL/config.json (depth, classes, image size) and the checkpoint
(default: the latest in MODEL/checkpoints) restored into it. Every validation image is counted
exactly once -- the last batch is simply smaller -- with the eval preprocessing of training.
The result goes to ``--output`` as JSON::

    {"top1": f, "top5": f, "images": n, "checkpoint": "...", "step": n,
     "per_class": [{"label": k, "synset": "...", "text": "...", "images": n,
                    "top1": f, "top5": f}, ...]}

and as ``validation/top1`` and ``validation/top5`` TensorBoard scalars at the checkpoint's
step in MODEL/logs/validation (next to the ones the trainer writes).

``--watch`` is continuous evaluation, what a TFJob ``Evaluator`` replica runs: it evaluates the
newest checkpoint whenever one appears, so TensorBoard shows validation accuracy during
training without the workers pausing for it, and exits once the checkpoint of the final step
(``train_steps`` of config.json) is done. Checkpoints written while an evaluation runs are
skipped in favour of the newest one. With no new checkpoint for ``--timeout`` seconds it gives
up with an error (training died or stalled).

Evaluation always runs in float32, whatever precision training used: the numbers are then those
of the exported SavedModel (also float32), on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import time
from typing import Iterator

from resnet_imagenet import config as config_lib
from resnet_imagenet import storage
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.data import tfrecord
from resnet_imagenet.errors import UserError
from resnet_imagenet.training.checkpoints import checkpoint_dir, object_variable_shapes
from resnet_imagenet.training.summaries import VALIDATION, log_dir

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 128
DEFAULT_POLL_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 7200.0
TOP_K = 5
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
_CHECKPOINT_NUMBER_RE = re.compile(r"-(\d+)$")


# --- the trained model, rebuilt for inference ------------------------------------------------


@contextlib.contextmanager
def float32_policy():
    """Build Keras layers in float32 even if this process trained under mixed precision.

    Checkpoint variables are float32 under every policy, so a float32 model restores any of them;
    a float16 graph would not run on many CPUs and would not match evaluation's numbers.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def describe(config: config_lib.TrainConfig) -> str:
    return f"ResNet-{config.model.resnet_size} with {config.model.num_classes} classes"


def build_model(config: config_lib.TrainConfig):
    """The network that ``config`` describes, float32, ``channels_last``, uint8 input."""
    from resnet_imagenet.model.resnet import build_resnet

    with float32_policy():
        settings = config.model
        return build_resnet(settings.resnet_size, settings.num_classes, settings.image_size,
                            settings.zero_init_residual, bn_momentum=settings.bn_momentum,
                            bn_epsilon=settings.bn_epsilon)


def resolve_checkpoint(model_dir: str, checkpoint: str | None = None) -> str:
    """The checkpoint prefix to load: ``checkpoint`` (a prefix or a directory) or the latest.

    Raises a one-line :class:`UserError` when there is none.
    """
    import tensorflow as tf

    if not checkpoint:
        directory = checkpoint_dir(model_dir)
        latest = tf.train.latest_checkpoint(directory)
        if latest is None:
            raise UserError(f"no checkpoint in {directory}: train the model first, or pass "
                            "--checkpoint MODEL/checkpoints/ckpt-STEP")
        return latest
    path = storage.normalize(checkpoint)
    if storage.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise UserError(f"--checkpoint {checkpoint} is a directory without a checkpoint: "
                            "pass a checkpoint prefix such as MODEL/checkpoints/ckpt-5000")
        return latest
    if not storage.exists(path + ".index"):
        raise UserError(f"--checkpoint {checkpoint} not found (no {path}.index): pass a "
                        "checkpoint prefix such as MODEL/checkpoints/ckpt-5000")
    return path


def _conv_count(depth: int) -> int:
    """Convolutions of a ResNet: the stem, each block's, and one projection per stage whose
    first block changes shape (all four for bottlenecks, stages 2-4 for basic blocks)."""
    from resnet_imagenet.model.resnet import BLOCKS

    kind, stages = BLOCKS[depth]
    per_block, projections = (2, 3) if kind == "basic" else (3, 4)
    return 1 + per_block * sum(stages) + projections


def _describe_shapes(shapes: list[tuple]) -> str:
    """What a checkpoint holds, in words, from its model variables' shapes alone."""
    from resnet_imagenet.model.resnet import BLOCKS

    if not shapes:
        return "no model"
    convs = sum(1 for s in shapes if len(s) == 4)
    classifiers = [s for s in shapes if len(s) == 2]
    depths = [d for d in BLOCKS if _conv_count(d) == convs]
    network = f"ResNet-{depths[0]}" if depths else f"a network with {convs} convolutions"
    if len(classifiers) == 1:
        return f"{network} with {classifiers[0][1]} classes"
    return network


@dataclasses.dataclass
class Restored:
    checkpoint: str
    step: int


def restore(model, config: config_lib.TrainConfig, path: str) -> Restored:
    """Load the weights of checkpoint ``path`` into ``model`` (built from ``config``).

    The checkpoint's model variables are compared, by shape, with the model's before anything
    is loaded, so a checkpoint of another depth or class count is refused with one line that
    says what it holds -- instead of a failure halfway through the restore. Optimizer state is
    not needed for inference and is left unread.
    """
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {error_line(exc)}") from None
    damaged = (tf.errors.OpError, IndexError)  # the index reads, a data file does not
    try:
        stored = object_variable_shapes(reader)
    except damaged as exc:
        raise _damaged(path, exc) from None
    expected = sorted(tuple(v.shape) for v in model.variables)
    if stored != expected:
        raise UserError(
            f"checkpoint {path} holds {_describe_shapes(stored)}, but config.json describes "
            f"{describe(config)}: pass a checkpoint of this model directory")
    try:
        status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
        status.assert_existing_objects_matched()
    except damaged as exc:
        raise _damaged(path, exc) from None
    if reader.has_tensor(STEP_KEY):
        step = int(reader.get_tensor(STEP_KEY))
    else:  # a checkpoint of another writer: CheckpointManager numbers it by step
        match = _CHECKPOINT_NUMBER_RE.search(path)
        step = int(match.group(1)) if match else 0
    return Restored(checkpoint=path, step=step)


def _damaged(path: str, exc: BaseException) -> UserError:
    return UserError(f"checkpoint {path} is damaged ({error_line(exc)}): pass --checkpoint with "
                     "an earlier one of its directory")


_TF_ERROR_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "File ", "[[")


def error_line(exc: BaseException) -> str:
    """The line of an error (TensorFlow's included) that says what went wrong, not where."""
    text = getattr(exc, "message", None) or str(exc)
    for line in (raw.strip() for raw in text.splitlines()):
        if line and not line.startswith(_TF_ERROR_NOISE):
            return line[:300]
    return type(exc).__name__


# --- the validation split --------------------------------------------------------------------


def validation_files(data_dir: str) -> list[str]:
    """The validation shards, refused unless they are one complete ``-of-N`` set.

    A missing shard would silently leave images out of the metrics.
    """
    pattern = tfrecord.shard_pattern(data_dir, "validation")
    files = storage.glob(pattern)
    parsed = [tfrecord.parse_shard_name(storage.basename(f)) for f in files]
    counts = {p[2] for p in parsed if p}
    if not files or len(counts) != 1 or len(files) != next(iter(counts)):
        found = ", ".join(sorted({f"-of-{c:05d}" for c in counts})) or "none"
        raise UserError(
            f"{data_dir} does not hold one complete set of validation shards ({len(files)} "
            f"files, sets {found}): point --data-dir at the output of 'resnet-imagenet convert'")
    return files


def _expected_images(data_dir: str) -> int | None:
    manifest = storage.join(data_dir, labels_lib.MANIFEST)
    if not storage.exists(manifest):
        return None
    try:
        return int(json.loads(storage.read_text(manifest))["validation"]["images"])
    except (KeyError, TypeError, ValueError):
        return None


# --- evaluation ------------------------------------------------------------------------------


class Evaluator:
    """Evaluates checkpoints of one model directory; the model and input are built once.

    ``--watch`` restores each new checkpoint into the same model, so only the first evaluation
    pays for building and tracing.
    """

    def __init__(self, data_dir: str, model_dir: str, batch_size: int = DEFAULT_BATCH_SIZE):
        import tensorflow as tf

        from resnet_imagenet.data import bad_records, pipeline

        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        self.data_dir = storage.normalize(data_dir)
        self.model_dir = storage.normalize(model_dir)
        self.config = config_lib.load(self.model_dir)
        # A model trained from shards without labels.txt before its trainer rebuilt the map
        # from the records has no labels.json: rebuild it here (the records carry the names).
        self.label_map = (labels_lib.load(self.model_dir)
                          or labels_lib.from_data_dir(self.data_dir)
                          or labels_lib.from_records(self.data_dir, self.config.model.num_classes))
        files = validation_files(self.data_dir)
        self.expected_images = _expected_images(self.data_dir)
        self.registry = bad_records.Registry()  # what each pass could not read
        self.dataset = pipeline.eval_dataset(
            tfrecord.shard_pattern(self.data_dir, "validation"), batch_size,
            self.config.model.image_size, registry=self.registry)
        log.info("validation: %d shards under %s, batches of %d", len(files), self.data_dir,
                 batch_size)
        self.model = build_model(self.config)
        self.top_k = min(TOP_K, self.config.model.num_classes)
        size = self.config.model.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def top_classes(images):
            return tf.math.top_k(self.model(images, training=False), k=self.top_k).indices

        self._top_classes = top_classes
        self._writer = None  # created on the first result: a failed run leaves no event file

    def evaluate(self, checkpoint: str | None = None, output: str | None = None) -> dict:
        """Metrics of one checkpoint (default: the latest); also written to ``output`` and
        to the validation summaries."""
        import numpy as np

        restored = restore(self.model, self.config,
                           resolve_checkpoint(self.model_dir, checkpoint))
        log.info("evaluating %s (step %d)", restored.checkpoint, restored.step)
        n = self.config.model.num_classes
        images = np.zeros(n, np.int64)
        top1 = np.zeros(n, np.int64)
        topk = np.zeros(n, np.int64)
        start = time.monotonic()
        self.registry.clear()
        for batch, labels in self.dataset:
            labels = labels.numpy()
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise UserError(
                    f"validation labels under {self.data_dir} go up to {labels.max() + 1}, "
                    f"but the model has {n} classes: evaluate with the data it was trained on")
            top = self._top_classes(batch).numpy()
            hits = top == labels[:, None]
            images += np.bincount(labels, minlength=n)
            top1 += np.bincount(labels, weights=hits[:, 0], minlength=n).astype(np.int64)
            topk += np.bincount(labels, weights=hits.any(axis=1), minlength=n).astype(np.int64)
        total = int(images.sum())
        skipped, unreadable = self.registry.records, self.registry.shards()
        if total == 0:
            raise UserError(f"no validation image could be read under {self.data_dir}"
                            + (f" ({skipped} unreadable records skipped in "
                               f"{self.registry.describe()}): convert the validation split "
                               "again" if skipped else ""))
        if skipped:
            log.warning("%d unreadable validation record(s) skipped, in %s: top-1 and top-5 "
                        "are over the %d images read", skipped, self.registry.describe(), total)
        elif self.expected_images is not None and total != self.expected_images:
            log.warning("evaluated %d images, but manifest.json lists %d validation images",
                        total, self.expected_images)
        metrics = {
            "top1": float(top1.sum() / total),
            "top5": float(topk.sum() / total),
            "images": total,
            "skipped_records": skipped,
            "unreadable_shards": unreadable,
            "checkpoint": restored.checkpoint,
            "step": restored.step,
            "model": describe(self.config),
            "per_class": self._per_class(images, top1, topk),
        }
        log.info("step %d: top-1 %.4f, top-5 %.4f over %d images in %.1f s", restored.step,
                 metrics["top1"], metrics["top5"], total, time.monotonic() - start)
        self._write_summaries(restored.step, metrics)
        if output:
            storage.write_text(output, json.dumps(metrics, indent=2) + "\n")
        return metrics

    def _write_summaries(self, step: int, metrics: dict) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(log_dir(self.model_dir, VALIDATION))
        with self._writer.as_default(step=step):
            tf.summary.scalar("validation/top1", metrics["top1"])
            tf.summary.scalar("validation/top5", metrics["top5"])
            tf.summary.scalar("data/skipped_records", metrics["skipped_records"])
        self._writer.flush()

    def _per_class(self, images, top1, topk) -> list[dict]:
        """One row per class with validation images (an accuracy needs at least one)."""
        names = {row["label"]: row for row in self.label_map or []}
        rows = []
        for index in map(int, images.nonzero()[0]):
            label = index + 1
            known = names.get(label, {})
            rows.append({
                "label": label,
                "synset": known.get("synset", ""),
                "text": known.get("text", ""),
                "images": int(images[index]),
                "top1": float(top1[index] / images[index]),
                "top5": float(topk[index] / images[index]),
            })
        return rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def evaluate(data_dir: str, model_dir: str, checkpoint: str | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, output: str | None = None) -> dict:
    """Evaluate one checkpoint (default: the latest of ``model_dir``); returns the metrics."""
    evaluator = Evaluator(data_dir, model_dir, batch_size)
    try:
        return evaluator.evaluate(checkpoint, output)
    finally:
        evaluator.close()


def watch(data_dir: str, model_dir: str, batch_size: int = DEFAULT_BATCH_SIZE,
          output: str | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL_S,
          timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[dict]:
    """Evaluate each new checkpoint until the one of the final step; yields each result.

    Waits for config.json too (an Evaluator replica may start before the chief has written
    it). ``timeout`` bounds each wait for something new; ``output`` holds the latest result.
    """
    import tensorflow as tf

    validation_files(data_dir)  # a wrong --data-dir fails now, not at the first checkpoint
    model_dir = storage.normalize(model_dir)
    config_path = storage.join(model_dir, "config.json")
    deadline = time.monotonic() + timeout
    evaluator: Evaluator | None = None
    last, last_step = None, None
    try:
        while True:
            latest = (tf.train.latest_checkpoint(checkpoint_dir(model_dir))
                      if storage.exists(config_path) else None)
            if latest is not None and latest != last:
                evaluator = evaluator or Evaluator(data_dir, model_dir, batch_size)
                last = latest
                try:
                    metrics = evaluator.evaluate(latest, output)
                except (UserError, tf.errors.NotFoundError):
                    if storage.exists(latest + ".index"):
                        raise
                    # The trainer's CheckpointManager deleted it (max_to_keep) before it was
                    # read: the next look finds a newer one.
                    log.info("%s was deleted before it could be evaluated", latest)
                    continue
                last_step = metrics["step"]
                yield metrics
                final_step = evaluator.config.optimization.train_steps
                if last_step >= final_step:
                    log.info("evaluated the final step %d: done", final_step)
                    return
                deadline = time.monotonic() + timeout
                log.info("waiting for the next checkpoint (final step %d)", final_step)
            elif time.monotonic() >= deadline:
                done = "none evaluated" if last_step is None else f"last evaluated step {last_step}"
                raise UserError(
                    f"no new checkpoint in {checkpoint_dir(model_dir)} for {timeout:g} s "
                    f"({done}): training is not running or stalled; raise --timeout to wait longer")
            else:
                time.sleep(poll_interval)
    finally:
        if evaluator is not None:
            evaluator.close()


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, metavar="TFRECORDS",
                        help="directory of the validation-*-of-* shards (local or gs://)")
    parser.add_argument("--model-dir", required=True, metavar="MODEL",
                        help="model directory written by 'resnet-imagenet train' (local or gs://)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint prefix, e.g. MODEL/checkpoints/ckpt-5000 "
                             "(default: the latest)")
    parser.add_argument("--output", metavar="JSON",
                        help="write the metrics, per-class table included, to this file "
                             "(local or gs://; with --watch: the latest evaluation)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per batch (default {DEFAULT_BATCH_SIZE}); the last batch "
                             "holds the remainder, no image is dropped or repeated")
    parser.add_argument("--watch", action="store_true",
                        help="continuous evaluation: evaluate every new checkpoint until the "
                             "final step of config.json (a TFJob Evaluator replica)")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S,
                        metavar="S", help="with --watch: seconds between looks for a new "
                                          f"checkpoint (default {DEFAULT_POLL_INTERVAL_S:.0f})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="with --watch: give up after this many seconds without a new "
                             f"checkpoint (default {DEFAULT_TIMEOUT_S:.0f})")


def _print_summary(metrics: dict) -> None:
    skipped = metrics.get("skipped_records")
    unreadable = (f", {skipped} unreadable records skipped in "
                  f"{len(metrics['unreadable_shards'])} shard(s)" if skipped else "")
    print(f"step {metrics['step']}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
          f"(over {metrics['images']} images{unreadable}; {metrics['checkpoint']})", flush=True)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet import preflight

    preflight.check_command(reads={"--data-dir": args.data_dir, "--model-dir": args.model_dir})
    if args.watch:
        if args.checkpoint:
            raise UserError("--watch evaluates each new checkpoint: leave out --checkpoint")
        if args.poll_interval <= 0 or args.timeout <= 0:
            raise UserError("--poll-interval and --timeout must be positive")
        for metrics in watch(args.data_dir, args.model_dir, args.batch_size, args.output,
                             args.poll_interval, args.timeout):
            _print_summary(metrics)
        return 0
    _print_summary(evaluate(args.data_dir, args.model_dir, args.checkpoint, args.batch_size,
                            args.output))
    return 0
