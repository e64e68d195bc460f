"""Learning-rate schedules: the reference recipe and the large-batch recipe.

Reference (``config.RECIPES["reference"]``, the defaults of
:class:`~resnet_imagenet.config.TrainConfig`): 0.1 for a global batch of 256, multiplied by 0.1
at steps 150k, 300k, 400k and 450k, 500k steps in all. By default the rate scales linearly with
the global batch and the recipe keeps its epochs: at batch 1024, 0.4, boundaries at 37.5k, 75k,
100k and 112.5k steps, 125k steps (``OptimizationSettings.effective``);
``--no-scale-lr-with-batch`` keeps 0.1 and the reference's steps whatever the batch.

Large batch (Goyal et al., "Accurate, Large Minibatch SGD"): the rate scales linearly with the
batch (0.1 per 256 images), rises linearly from 0 over the first ``warmup_epochs`` (5), then
decays by steps or along a cosine to 0 at the last step. Boundaries may be given in epochs, which
need the number of training images to become steps.

The schedule is a function of the global step (the number of updates already applied), so the
update of step ``s`` uses ``lr(s)``: ``lr(149_999) = 0.1`` and ``lr(150_000) = 0.01``.

    schedule = build(config.optimization, steps_per_epoch)
    schedule(step)          # float32 tensor, inside the training step
    schedule.value(step)    # float64, no TensorFlow
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resnet_imagenet.config import REFERENCE, OptimizationSettings
from resnet_imagenet.errors import UserError


@dataclass(frozen=True)
class Schedule:
    """A piecewise learning rate; every boundary and length is in steps."""

    peak: float
    boundaries: tuple[int, ...] = ()
    decay_factor: float = 0.1
    warmup_steps: int = 0
    total_steps: int = 1
    kind: str = "step"  # "step" | "cosine"

    def __call__(self, step):
        """The rate at ``step`` (a Python number or a scalar tensor) as float32."""
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            decayed = 0.5 * self.peak * (1.0 + tf.cos(math.pi * progress))
        else:
            passed = tf.reduce_sum(tf.cast(
                step >= tf.constant(self.boundaries or (float("inf"),), tf.float32), tf.float32))
            decayed = self.peak * tf.pow(self.decay_factor, passed)
        if self.warmup_steps <= 0:
            return decayed
        warm = self.peak * step / float(self.warmup_steps)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def value(self, step: int) -> float:
        """The rate at a Python ``step``, in float64 without TensorFlow (``--print-config``)."""
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
            decayed = 0.5 * self.peak * (1.0 + math.cos(math.pi * progress))
        else:
            decayed = self.peak * self.decay_factor ** sum(step >= b for b in self.boundaries)
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.peak * step / float(self.warmup_steps)
        return decayed

    def describe(self) -> str:
        text = f"{self.kind} schedule, peak lr {self.peak:g}"
        if self.warmup_steps:
            text += f", {self.warmup_steps} warmup steps"
        if self.kind == "step" and self.boundaries:
            text += f", x{self.decay_factor:g} at steps {', '.join(map(str, self.boundaries))}"
        return text + f", {self.total_steps} steps"


def needs_epoch_length(config: OptimizationSettings) -> bool:
    """Whether building the schedule needs the number of steps per epoch."""
    config = config.effective()
    uses_boundaries = config.lr_schedule == "step" and bool(config.lr_boundaries)
    return config.warmup_epochs > 0 or (config.boundaries_unit == "epochs" and uses_boundaries)


def peak_learning_rate(config: OptimizationSettings) -> float:
    if config.scale_lr_with_batch:
        return config.base_learning_rate * config.batch_size / REFERENCE.batch_size
    return config.base_learning_rate


def build(config: OptimizationSettings, steps_per_epoch: float | None = None) -> Schedule:
    """The schedule ``config`` asks for; ``steps_per_epoch`` when epochs are involved."""
    config = config.effective()
    if needs_epoch_length(config) and not steps_per_epoch:
        raise UserError("the learning-rate schedule is given in epochs: the number of "
                        "training images is needed (manifest.json or --num-train-images)")

    def to_steps(value: float, unit: str) -> int:
        return int(round(value * steps_per_epoch)) if unit == "epochs" else int(value)

    boundaries = tuple(to_steps(b, config.boundaries_unit) for b in config.lr_boundaries)
    return Schedule(
        peak=peak_learning_rate(config),
        boundaries=boundaries if config.lr_schedule == "step" else (),
        decay_factor=config.lr_decay_factor,
        warmup_steps=to_steps(config.warmup_epochs, "epochs") if config.warmup_epochs else 0,
        total_steps=config.train_steps,
        kind=config.lr_schedule,
    )


def table(schedule: Schedule) -> list[dict]:
    """``[{"step": s, "learning_rate": lr}, ...]`` at step 0 and wherever the rate changes
    course: the end of warmup, every boundary (step schedule), the last step (cosine)."""
    steps = {0, *schedule.boundaries}
    if schedule.warmup_steps:
        steps.add(schedule.warmup_steps)
    if schedule.kind == "cosine":
        steps.add(schedule.total_steps)
    return [{"step": s, "learning_rate": round(schedule.value(s), 12)} for s in sorted(steps)
            if s <= schedule.total_steps]
