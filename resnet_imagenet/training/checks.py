"""What training refuses before it starts, and the settings it resolves from the hardware.

Each check raises :class:`~resnet_imagenet.errors.UserError` with a one-line reason that
names the fix; none writes anything.
"""

from __future__ import annotations

import logging

from resnet_imagenet import config as config_lib
from resnet_imagenet import storage
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.data import pipeline
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import checkpoints
from resnet_imagenet.training.strategy import GPUS_ENV

log = logging.getLogger(__name__)


def check_gpus(given: str | None, visible: int, allow_cpu: bool) -> None:
    """A worker its launcher gave GPUs (``given``: :data:`strategy.GPUS_ENV`) must see them all:
    a TensorFlow without CUDA, or a node without its driver, would otherwise train on the CPU,
    many times slower, without a word. ``--allow-cpu`` makes it a warning."""
    if not given:
        return
    try:
        wanted = int(given)
    except ValueError:
        raise UserError(f"{GPUS_ENV}={given!r}: must be a whole number of GPUs") from None
    if visible >= wanted:
        return
    problem = (f"this worker was given {wanted} GPU{'s' if wanted != 1 else ''} "
               f"(--gpus-per-worker, {GPUS_ENV}) but TensorFlow sees "
               f"{visible or 'none'}")
    if allow_cpu:
        log.warning("%s; training on %s (--allow-cpu)", problem,
                    f"{visible} GPU{'s' if visible != 1 else ''}" if visible else "the CPU")
        return
    raise UserError(f"{problem}: install TensorFlow with CUDA (pip install 'tensorflow[and-cuda]'"
                    ", or the trainer image) and check the driver with nvidia-smi, or pass "
                    "--allow-cpu to train on what is visible")


def resolve_precision(setting: str, gpus: list) -> str:
    """The Keras dtype policy for ``--mixed-precision``: auto = on with GPUs, off on CPU.

    With GPUs, auto picks bfloat16 when every GPU supports it well (compute capability 8.0,
    Ampere, and newer: no loss scaling needed), float16 with loss scaling otherwise.
    """
    if setting == "off" or (setting == "auto" and not gpus):
        return "float32"
    if setting == "auto":
        import tensorflow as tf

        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability",
                                                                           (0, 0)) for g in gpus]
        setting = "bfloat16" if all(c >= (8, 0) for c in capabilities) else "float16"
    return f"mixed_{setting}"


def resolve_jit(setting: str, gpus: list) -> bool:
    """``--jit-compile``: auto = on with GPUs."""
    return setting == "on" or (setting == "auto" and bool(gpus))


def check_model_dir(config: TrainConfig) -> None:
    """Refuse a model directory that holds another model (before anything is written).

    Its ``config.json`` binds it only once a checkpoint exists: a run refused before its first
    checkpoint (a bad label, say) leaves a ``config.json`` that the corrected rerun replaces.
    """
    path = storage.join(config.runtime.model_dir, "config.json")
    if not storage.exists(path):
        return
    saved = storage.join(checkpoints.checkpoint_dir(config.runtime.model_dir),
                         f"{checkpoints.CHECKPOINT_NAME}-*.index")
    if not storage.glob(saved):
        log.info("%s has no checkpoint yet: its config.json is replaced", path)
        return
    previous = config_lib.load(config.runtime.model_dir)
    for name in ("resnet_size", "num_classes"):
        before, now = getattr(previous.model, name), getattr(config.model, name)
        if before != now:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"--model-dir {config.runtime.model_dir} holds a model trained with {flag} "
                f"{before}, not {now}: use a new --model-dir or the same setting"
            )


def check_classes(config: TrainConfig) -> None:
    """Refuse data with more classes than the model has outputs; warn about fewer."""
    label_map = labels_lib.from_data_dir(config.data.data_dir)
    if label_map is None:
        return
    if len(label_map) > config.model.num_classes:
        raise UserError(
            f"{config.data.data_dir} has {len(label_map)} classes but --num-classes is "
            f"{config.model.num_classes}: pass --num-classes {len(label_map)}"
        )
    if len(label_map) < config.model.num_classes:
        log.warning("%s has %d classes; the model has %d outputs (--num-classes)",
                    config.data.data_dir, len(label_map), config.model.num_classes)


def check_batch(batch_size: int, replicas: int) -> None:
    """Refuse a global batch that the replicas cannot share evenly."""
    if batch_size % replicas:
        raise UserError(
            f"--batch-size {batch_size} (global) does not divide by the {replicas} replicas: "
            f"use a multiple of {replicas}"
        )


def bad_label_error(exc) -> UserError | None:
    """The one-line error for the pipeline's bad-label stop, or None for any other error."""
    match = pipeline.BAD_LABEL_RE.search(getattr(exc, "message", "") or str(exc))
    if not match:
        return None
    label, classes, path = int(match.group(1)), int(match.group(2)), match.group(3)
    return UserError(
        f"training shard {path} holds a record with label {label}, outside 1..{classes}: "
        "labels are 1..N (0 is unused); pass --num-classes N for data with N classes, or "
        "convert the data again")
