"""Two replicas in one process: MirroredStrategy over two logical CPU devices.

Logical devices must be configured before TensorFlow initialises its devices, so the tests run
this module in a subprocess (``python -m tests.support.replicas SCENARIO ARGS``); it prints
one JSON object on its last line.

    updates         float16 loss scaling with an overflow on replica 0, then on replica 1, at the
                    first step and none at the second, through ``steps.apply_gradients``; and
                    ``steps.make_batch_norm_average`` on statistics that differ per replica
    train DATA DIR  ``loop.train`` (mixed float16, 2 steps) with MirroredStrategy over the two
                    devices; records each replica's batch-norm statistics at every save
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]


def two_replicas() -> tf.distribute.MirroredStrategy:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    return tf.distribute.MirroredStrategy(DEVICES)


def local(strategy, variable) -> list:
    """Each replica's copy of a (Keras) variable, as lists."""
    value = getattr(variable, "value", variable)
    return [np.asarray(v.numpy()).tolist() for v in strategy.experimental_local_results(value)]


def loss_scale(strategy, overflow_replica: int) -> dict:
    import keras

    from resnet_imagenet.training import steps

    keras.mixed_precision.set_global_policy("mixed_float16")
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9), initial_scale=1024.0)
        optimizer.build(model.trainable_variables)
    variables = model.trainable_variables

    def replica_step(x, overflow):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(model(x), tf.float32)))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        # An overflow in this replica's backward pass: inf (and NaN where a gradient is 0).
        factor = tf.where(tf.logical_and(overflow, tf.equal(replica, overflow_replica)),
                          float("inf"), 1.0)
        grads = [g * factor for g in grads]
        steps.apply_gradients(optimizer, grads, variables, loss_scaling=True)

    @tf.function
    def step(x, overflow):
        strategy.run(replica_step, args=(x, overflow))

    x = tf.ones([4, 3])
    before = [local(strategy, v) for v in variables]
    step(x, tf.constant(True))
    after_overflow = {
        "weights": [local(strategy, v) for v in variables],
        "scale": local(strategy, optimizer.dynamic_scale),
        "iterations": local(strategy, optimizer.iterations),
    }
    step(x, tf.constant(False))
    after_finite = {
        "weights": [local(strategy, v) for v in variables],
        "scale": local(strategy, optimizer.dynamic_scale),
        "iterations": local(strategy, optimizer.iterations),
    }
    return {"before": before, "after_overflow": after_overflow, "after_finite": after_finite}


def bn_average(strategy) -> dict:
    import keras

    from resnet_imagenet.training import steps

    keras.mixed_precision.set_global_policy("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)),
                                  keras.layers.BatchNormalization(momentum=0.5, name="bn")])

    def replica_step(x):
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32)
        model(x * (1.0 + replica) + 10.0 * replica, training=True)  # other data per replica

    @tf.function
    def step(x):
        strategy.run(replica_step, args=(x,))

    step(tf.constant([[0.0, 1.0], [2.0, 5.0]]))
    bn = model.get_layer("bn")
    before = {"mean": local(strategy, bn.moving_mean),
              "variance": local(strategy, bn.moving_variance)}
    steps.make_batch_norm_average(strategy, model)()
    after = {"mean": local(strategy, bn.moving_mean),
             "variance": local(strategy, bn.moving_variance)}
    return {"before": before, "after": after}


def train(data_dir: str, model_dir: str) -> dict:
    from resnet_imagenet.config import TrainConfig
    from resnet_imagenet.training import checkpoints, loop
    from resnet_imagenet.training import strategy as strategy_lib

    strategy = two_replicas()
    strategy_lib.make_strategy = lambda cluster: strategy  # what several local GPUs would give
    saves = []
    save = checkpoints.CheckpointWriter.save

    def recording_save(writer, step):
        layer = writer._checkpoint.model.get_layer("stem_bn")
        saves.append({"step": step, "moving_mean": local(strategy, layer.moving_mean),
                      "moving_variance": local(strategy, layer.moving_variance)})
        return save(writer, step)

    checkpoints.CheckpointWriter.save = recording_save
    summary = loop.train(TrainConfig().updated(
        data_dir=data_dir, model_dir=model_dir, resnet_size=18, image_size=32, num_classes=10,
        batch_size=16, train_steps=2, checkpoint_every=1, shuffle_buffer=64, seed=0,
        mixed_precision="float16", bn_momentum=0.5, base_learning_rate=0.01))
    from resnet_imagenet.model.resnet import build_resnet

    restored = build_resnet(18, 10, 32)
    tf.train.Checkpoint(model=restored).restore(summary["checkpoint"]).expect_partial()
    return {"summary": summary, "saves": saves, "checkpoint_moving_mean":
            restored.get_layer("stem_bn").moving_mean.numpy().tolist()}


if __name__ == "__main__":
    scenario, args = sys.argv[1], sys.argv[2:]
    if scenario == "updates":
        strategy = two_replicas()
        result = {"loss_scale": [loss_scale(strategy, 0), loss_scale(strategy, 1)],
                  "bn_average": bn_average(strategy)}
    else:
        result = train(*args)
    print(json.dumps(result))
