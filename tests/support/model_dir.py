"""A small trained model directory laid out exactly as ``resnet-imagenet train`` writes it.

Until the real trainer is wired into the fixtures, evaluation/export/predict tests get their
model from :func:`make_model_dir`: a ResNet trained for a few steps with a plain loop on the test
shards (so its predictions differ between images), then saved per the model-directory contract:

    MODEL/config.json     resolved TrainConfig
    MODEL/labels.json     label map copied from the data directory
    MODEL/checkpoints/    CheckpointManager, ``ckpt-<step>``, over
                          Checkpoint(model, optimizer, step=int64 Variable, epoch=int64 Variable)

The fixtures build this once per test session (``_once`` also covers a fixture imported into
several test modules, which pytest would otherwise run once per module).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from resnet_imagenet import config as config_lib
from resnet_imagenet import storage
from resnet_imagenet.data import labels, tfrecord
from resnet_imagenet.training.checkpoints import checkpoint_dir

TEST_STEPS = 30


# Built once per test session, whichever module asks first (see the module docstring).
_CACHE: dict[tuple, object] = {}


def _once(key: tuple, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    raw_dir: str
    data_dir: str
    model_dir: str
    checkpoint: str
    step: int


def _train_dataset(data_dir: str, image_size: int, batch_size: int, seed: int):
    import tensorflow as tf

    from resnet_imagenet.data import preprocessing

    def parse(serialized):
        example = tfrecord.parse_example(serialized)
        # Eval preprocessing on purpose: a deterministic transform lets a few steps fit the
        # demo digits, so that predictions are non-trivial; the trainer's own augmentation is
        # tested with the trainer.
        return preprocessing.preprocess_eval(example["image"], image_size), example["label"] - 1

    files = storage.glob(tfrecord.shard_pattern(data_dir, "train"))
    return (tf.data.TFRecordDataset(files).map(parse).cache()
            .shuffle(1024, seed=seed).repeat().batch(batch_size))


def _save_checkpoint(model_dir: str, model, step: int, optimizer=None) -> str:
    """Save ``ckpt-<step>`` with the contract's objects, through the trainer's own writer."""
    import tensorflow as tf

    from resnet_imagenet.training.checkpoints import CheckpointWriter

    objects = {"model": model, "step": tf.Variable(step, dtype=tf.int64),
               "epoch": tf.Variable(0, dtype=tf.int64)}
    if optimizer is not None:
        objects["optimizer"] = optimizer
    writer = CheckpointWriter(tf.train.Checkpoint(**objects), model_dir, is_chief=True, keep=5)
    return writer.save(step)


def make_model_dir(model_dir: str, data_dir: str, depth: int = 18, image_size: int = 32,
                   num_classes: int = 10, steps: int = TEST_STEPS, batch_size: int = 32,
                   seed: int = 0) -> str:
    """Train ``steps`` steps on ``data_dir``'s train shards; returns the checkpoint path."""
    import keras
    import tensorflow as tf

    from resnet_imagenet.model.resnet import build_resnet

    keras.utils.set_random_seed(seed)
    # A short run: a batch-norm moving average that forgets its initial values within it.
    model = build_resnet(depth, num_classes, image_size, bn_momentum=0.9)
    optimizer = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Only the classifier learns; the forward pass in training mode also moves the batch-norm
    # statistics. On CPU the input gradients of the 512-channel 3x3 convolutions cost about a
    # second per step even at 32 px, and a few steps of the classifier over random features are
    # enough for predictions that differ between images.
    trained = model.get_layer("logits").trainable_variables

    @tf.function
    def train_step(images, targets):
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, model(images, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, trained), trained))
        return loss

    for images, targets in _train_dataset(data_dir, image_size, batch_size, seed).take(steps):
        train_step(images, targets)

    config = config_lib.TrainConfig().updated(
        data_dir=data_dir, model_dir=model_dir, image_size=image_size, num_classes=num_classes,
        resnet_size=depth, batch_size=batch_size, train_steps=steps, lr_boundaries=[],
        bn_momentum=0.9,
    )
    config_lib.save(config, model_dir)
    labels.copy_to_model(data_dir, model_dir)
    return _save_checkpoint(model_dir, model, steps, optimizer)


def add_checkpoint(model_dir: str, step: int) -> str:
    """Save the latest checkpoint's weights again as ``ckpt-<step>`` (a training run going on)."""
    import tensorflow as tf

    from resnet_imagenet.model.resnet import build_resnet

    config = config_lib.load(model_dir)
    model = build_resnet(config.model.resnet_size, config.model.num_classes,
                         config.model.image_size)
    latest = tf.train.latest_checkpoint(checkpoint_dir(model_dir))
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return _save_checkpoint(model_dir, model, step)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, demo_raw) -> TrainedModel:
    """Shards of the demo data and a ResNet-18 (32 px) trained on them; do not modify it."""
    from tests.support.shards import make_shards

    def build() -> TrainedModel:
        base = tmp_path_factory.mktemp("trained")
        data_dir = str(base / "data")
        # 40 validation images in 3 shards: uneven shards, and no batch size used here divides 40.
        make_shards(demo_raw, data_dir, train_shards=2, validation_shards=3)
        model_dir = str(base / "model")
        checkpoint = make_model_dir(model_dir, data_dir)
        return TrainedModel(demo_raw, data_dir, model_dir, checkpoint, TEST_STEPS)

    return _once(("trained", str(tmp_path_factory.getbasetemp())), build)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, trained_model) -> str:
    """``SAVED/1`` exported from :func:`trained_model`; do not modify it."""
    from resnet_imagenet import export

    def build() -> str:
        saved = tmp_path_factory.mktemp("exported") / "saved"
        return export.export(trained_model.model_dir, str(saved))

    return _once(("exported", str(tmp_path_factory.getbasetemp())), build)


@pytest.fixture(scope="session")
def resnet34_checkpoint(tmp_path_factory) -> str:
    """A checkpoint of another depth (an untrained ResNet-34, same classes and image size)."""
    import tensorflow as tf

    from resnet_imagenet.model.resnet import build_resnet

    def build() -> str:
        prefix = str(tmp_path_factory.mktemp("resnet34") / "ckpt-7")
        return tf.train.Checkpoint(model=build_resnet(34, 10, 32)).write(prefix)

    return _once(("resnet34", str(tmp_path_factory.getbasetemp())), build)


def raw_validation(raw_dir: str) -> list[tuple[str, int]]:
    """``[(path, label 1..N)]`` of the raw validation images, in file-name order."""
    with open(os.path.join(raw_dir, "synsets.txt")) as f:
        synsets = sorted(line.strip() for line in f if line.strip())
    label_of = {s: k for k, s in enumerate(synsets, start=1)}
    folder = os.path.join(raw_dir, "validation")
    with open(os.path.join(raw_dir, "validation_labels.txt")) as f:
        truth = [line.strip() for line in f if line.strip()]
    names = sorted(os.listdir(folder))
    assert len(names) == len(truth)
    return [(os.path.join(folder, n), label_of[s]) for n, s in zip(names, truth)]


def checkpoint_logits(trained: TrainedModel):
    """Logits of the checkpoint on each raw validation image (eval preprocessing, one by one),
    computed without the code under test; returns (logits [n, classes], labels 1..N [n])."""
    import numpy as np
    import tensorflow as tf

    from resnet_imagenet.data.preprocessing import preprocess_eval
    from resnet_imagenet.model.resnet import build_resnet

    def compute():
        config = config_lib.load(trained.model_dir)
        model = build_resnet(config.model.resnet_size, config.model.num_classes,
                             config.model.image_size)
        tf.train.Checkpoint(model=model).restore(trained.checkpoint).expect_partial()
        files = raw_validation(trained.raw_dir)
        images = tf.stack([preprocess_eval(tf.io.read_file(path), config.model.image_size)
                           for path, _ in files])
        return model(images, training=False).numpy(), np.array([label for _, label in files])

    logits, labels = _once(("logits", trained.checkpoint), compute)
    return logits.copy(), labels.copy()


def near_ties(logits, k: int, tolerance: float = 1e-4):
    """Per image: True when the k-th and (k+1)-th largest logits are too close for another
    batch composition to be sure of the same top-k (floating-point summation order)."""
    import numpy as np

    ordered = -np.sort(-logits, axis=1)
    if k >= logits.shape[1]:
        return np.zeros(len(logits), bool)
    return (ordered[:, k - 1] - ordered[:, k]) < tolerance


def copy_model_dir(trained: TrainedModel, dest: str) -> str:
    """A private copy of the trained model directory, for tests that write into it."""
    import shutil

    shutil.copytree(trained.model_dir, dest)
    return os.fspath(dest)
