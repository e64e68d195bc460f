"""Learning-rate schedules at their boundaries: the reference recipe and the large-batch one."""

from __future__ import annotations

import math

import pytest

from resnet_imagenet.config import RECIPES, OptimizationSettings, TrainConfig
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import schedules

IMAGENET_TRAIN = 1_281_167


def lr(schedule, step) -> float:
    return float(schedule(step))


def test_defaults_are_the_reference_recipe():
    config = TrainConfig().effective()
    optimization = config.optimization
    assert (optimization.batch_size, optimization.train_steps, optimization.momentum) == (
        256, 500_000, 0.9)
    assert (optimization.base_learning_rate, optimization.weight_decay) == (0.1, 1e-4)
    assert (config.model.bn_momentum, config.model.bn_epsilon) == (0.997, 1e-5)
    assert config.data.min_crop_area == 0.05
    assert optimization.lr_boundaries == [150_000, 300_000, 400_000, 450_000]
    assert not schedules.needs_epoch_length(optimization)
    reference = RECIPES["reference"]
    assert (reference.batch_size, reference.train_steps, list(reference.lr_boundaries)) == (
        optimization.batch_size, optimization.train_steps, optimization.lr_boundaries)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1), (149_999, 0.1),
    (150_000, 0.01), (299_999, 0.01),
    (300_000, 0.001), (399_999, 0.001),
    (400_000, 1e-4), (449_999, 1e-4),
    (450_000, 1e-5), (499_999, 1e-5),
])
def test_reference_schedule_at_its_boundaries(step, expected):
    schedule = schedules.build(OptimizationSettings())
    assert lr(schedule, step) == pytest.approx(expected, rel=1e-5)
    assert schedule.value(step) == pytest.approx(expected, rel=1e-9)


def test_the_recipe_follows_the_batch_size_in_epochs():
    config = OptimizationSettings(batch_size=1024).effective()
    assert config.train_steps == 125_000
    assert config.lr_boundaries == [37_500, 75_000, 100_000, 112_500]
    schedule = schedules.build(config)
    assert schedule.peak == pytest.approx(0.4)
    assert schedules.table(schedule) == [
        {"step": 0, "learning_rate": 0.4}, {"step": 37_500, "learning_rate": 0.04},
        {"step": 75_000, "learning_rate": 0.004}, {"step": 100_000, "learning_rate": 0.0004},
        {"step": 112_500, "learning_rate": 0.00004}]
    # The same number of images, so the same epochs, as the reference at batch 256.
    assert config.train_steps * 1024 == 500_000 * 256


def test_without_scaling_the_batch_keeps_the_reference_steps_and_rate():
    config = OptimizationSettings(batch_size=1024, scale_lr_with_batch=False).effective()
    assert (config.train_steps, config.lr_boundaries) == (
        500_000, [150_000, 300_000, 400_000, 450_000])
    assert schedules.build(config).peak == pytest.approx(0.1)


def test_explicit_steps_and_boundaries_are_kept():
    config = OptimizationSettings(batch_size=1024, train_steps=1000,
                                  lr_boundaries=[300, 600]).effective()
    assert (config.train_steps, config.lr_boundaries) == (1000, [300, 600])
    assert schedules.build(config).peak == pytest.approx(0.4)


def large_batch(**changes) -> OptimizationSettings:
    values = dict(batch_size=1024, scale_lr_with_batch=True, warmup_epochs=5.0,
                  boundaries_unit="epochs", lr_boundaries=[30, 60, 80], train_steps=112_590,
                  label_smoothing=0.1)
    values.update(changes)
    return TrainConfig().updated(**values).validate().optimization


def test_large_batch_scales_linearly_and_warms_up_over_five_epochs():
    steps_per_epoch = IMAGENET_TRAIN / 1024
    schedule = schedules.build(large_batch(), steps_per_epoch)
    warmup = round(5 * steps_per_epoch)
    assert schedule.peak == pytest.approx(0.4)
    assert schedule.warmup_steps == warmup == 6256
    assert lr(schedule, 0) == 0.0
    assert lr(schedule, warmup // 2) == pytest.approx(0.4 * (warmup // 2) / warmup, rel=1e-5)
    assert lr(schedule, warmup - 1) < 0.4
    assert lr(schedule, warmup) == pytest.approx(0.4)


def test_large_batch_step_boundaries_given_in_epochs():
    steps_per_epoch = IMAGENET_TRAIN / 1024
    schedule = schedules.build(large_batch(), steps_per_epoch)
    boundaries = [round(e * steps_per_epoch) for e in (30, 60, 80)]
    assert list(schedule.boundaries) == boundaries
    for passed, boundary in enumerate(boundaries):
        assert lr(schedule, boundary - 1) == pytest.approx(0.4 * 0.1 ** passed, rel=1e-5)
        assert lr(schedule, boundary) == pytest.approx(0.4 * 0.1 ** (passed + 1), rel=1e-5)


def test_cosine_decays_from_the_peak_to_zero_after_warmup():
    config = large_batch(lr_schedule="cosine", lr_boundaries=[], train_steps=10_000)
    schedule = schedules.build(config, steps_per_epoch=100)
    assert schedule.warmup_steps == 500
    assert lr(schedule, 250) == pytest.approx(0.2)
    assert lr(schedule, 500) == pytest.approx(0.4)
    assert lr(schedule, 500 + 9_500 // 2) == pytest.approx(0.2, rel=1e-4)
    assert lr(schedule, 10_000) == pytest.approx(0.0, abs=1e-7)
    middle = 500 + 9_500 // 4
    assert lr(schedule, middle) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)), rel=1e-4)


def test_step_boundaries_in_steps_ignore_the_epoch_length():
    config = OptimizationSettings(lr_boundaries=[10, 20], batch_size=512,
                                  scale_lr_with_batch=True)
    schedule = schedules.build(config, steps_per_epoch=None)
    rates = (lr(schedule, 9), lr(schedule, 10), lr(schedule, 20))
    assert rates == pytest.approx((0.2, 0.02, 0.002))


def test_epochs_without_an_image_count_are_refused():
    with pytest.raises(UserError, match="number of training images"):
        schedules.build(large_batch(), steps_per_epoch=None)


def test_schedule_accepts_a_tensor_step():
    import tensorflow as tf

    schedule = schedules.build(OptimizationSettings())
    assert float(schedule(tf.constant(150_000, tf.int64))) == pytest.approx(0.01)
