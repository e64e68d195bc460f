"""The training loop in this process, on one CPU: what it writes, resume, the loss, bad input.

Everything runs for real on the demo dataset's shards (ResNet-18, 32x32 images, a few steps).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from resnet_imagenet import config as config_lib
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.data import tfrecord
from resnet_imagenet.errors import UserError
from resnet_imagenet.model.resnet import build_resnet, weight_decay_variables
from resnet_imagenet.training import checkpoints, checks, loop, stopping
from tests.support.shards import make_shards
from tests.support.training import read_scalars

TINY = dict(resnet_size=18, image_size=32, num_classes=10, batch_size=16, shuffle_buffer=64,
            log_every=1, seed=0, scale_lr_with_batch=False)


@pytest.fixture(scope="module")
def data_dir(demo_raw, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tfrecords"))
    make_shards(demo_raw, out, train_shards=2, validation_shards=1)
    return out


@pytest.fixture(scope="module")
def two_digits(data_dir, tmp_path_factory) -> str:
    """Zeros and ones only (labels 1 and 2 of the demo shards), two train shards.

    Learning the label prior alone takes the loss to ln 2 = 0.69 at best; a loss well below
    that shows the network learned from the pixels, within a few dozen steps on one CPU.
    """
    out = str(tmp_path_factory.mktemp("two-digits"))
    for split, shards in (("train", 2), ("validation", 1)):
        kept = [raw.numpy() for raw in tf.data.TFRecordDataset(
            sorted(glob.glob(os.path.join(data_dir, f"{split}-*"))))
            if int(tfrecord.parse_example(raw)["label"]) in (1, 2)]
        for index in range(shards):
            path = os.path.join(out, tfrecord.shard_name(split, index, shards))
            with tf.io.TFRecordWriter(path) as writer:
                for raw in kept[index::shards]:
                    writer.write(raw)
    return out


def tiny(data_dir: str, model_dir, **changes) -> TrainConfig:
    return TrainConfig().updated(data_dir=data_dir, model_dir=str(model_dir),
                                 **{**TINY, **changes})


def checkpoint_value(path: str, name: str) -> int:
    return int(tf.train.load_checkpoint(path).get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))


def test_training_reduces_the_loss_and_fills_the_model_directory(two_digits, tmp_path):
    model_dir = tmp_path / "model"
    config = tiny(two_digits, model_dir, train_steps=30, checkpoint_every=20,
                  base_learning_rate=0.005, min_crop_area=0.35, random_flip=False)
    summary = loop.train(config)

    assert summary["step"] == 30 and summary["resumed_from"] is None
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.json", "labels.json", "logs",
                                             "train_summary.json"]
    assert config_lib.load(str(model_dir)) == config.updated(
        data_dir=two_digits, model_dir=str(model_dir)).effective()
    # No labels.txt (as with the original Inception script's shards): the label map comes from
    # the records' synsets and texts; labels no record shows stay unnamed.
    label_map = labels_lib.load(str(model_dir))
    assert label_map[:3] == [{"label": 1, "synset": "n00000000", "text": "digit zero"},
                             {"label": 2, "synset": "n00000001", "text": "digit one"},
                             {"label": 3, "synset": "", "text": ""}]
    assert len(label_map) == 10
    assert json.loads((model_dir / "train_summary.json").read_text()) == summary
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-30")
    assert os.path.exists(model_dir / "checkpoints" / "ckpt-20.index")

    train = read_scalars(str(model_dir / "logs" / "train"))
    assert set(train) == {"loss/total", "loss/cross_entropy", "loss/l2", "learning_rate",
                          "train/top1", "perf/images_per_second", "data/skipped_records"}
    assert {value for _, value in train["data/skipped_records"]} == {0.0}
    assert [step for step, _ in train["loss/total"]] == list(range(1, 31))
    assert all(value == pytest.approx(0.005) for _, value in train["learning_rate"])
    cross_entropy = [value for _, value in train["loss/cross_entropy"]]
    assert cross_entropy[0] > 2.0  # ~ln 10: ten outputs, untrained
    # Batches of 16 are noisy: the median of the last half, well under ln 2.
    assert np.median(cross_entropy[15:]) < 0.45, cross_entropy
    validation = read_scalars(str(model_dir / "logs" / "validation"))
    assert [step for step, _ in validation["validation/top1"]] == [30]
    assert summary["validation"]["images"] == 8
    assert 0.0 <= summary["validation"]["top1"] <= summary["validation"]["top5"] <= 1.0


def test_resume_restores_step_epoch_and_optimizer_state(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    # 32 images per "epoch" = 2 steps, so the epoch counter moves.
    first = loop.train(tiny(data_dir, model_dir, train_steps=3, checkpoint_every=2,
                            num_train_images=32, eval_every=2))
    ckpt3 = str(model_dir / "checkpoints" / "ckpt-3")
    assert first["checkpoint"] == ckpt3
    assert checkpoint_value(ckpt3, "step") == 3 and checkpoint_value(ckpt3, "epoch") == 1
    assert [s for s, _ in read_scalars(str(model_dir / "logs" / "validation"))[
        "validation/top1"]] == [2, 3]

    second = loop.train(tiny(data_dir, model_dir, train_steps=5, checkpoint_every=2,
                             num_train_images=32))
    assert second["resumed_from"] == ckpt3
    assert (second["start_step"], second["step"], second["epoch"]) == (3, 5, 2)
    ckpt5 = str(model_dir / "checkpoints" / "ckpt-5")
    assert checkpoint_value(ckpt5, "step") == 5
    # The optimizer's own counter went on from 3: its state was restored, not rebuilt.
    assert checkpoint_value(ckpt5, "optimizer/_iterations") == 5
    steps = [s for s, _ in read_scalars(str(model_dir / "logs" / "train"))["loss/total"]]
    assert sorted(steps) == [1, 2, 3, 4, 5]  # no step lost or repeated


@pytest.fixture(scope="module")
def one_step(data_dir, tmp_path_factory) -> tuple[str, dict]:
    """A model directory after one step at learning rate 0 (the weights are the initial ones)."""
    model_dir = str(tmp_path_factory.mktemp("one-step") / "model")
    return model_dir, loop.train(tiny(data_dir, model_dir, train_steps=1, batch_size=8,
                                      base_learning_rate=0.0, weight_decay=3e-3))


def test_the_seed_seeds_the_initial_weights(data_dir, tmp_path):
    """The trainer's model as built, before any step: the same --seed, the same weights;
    another seed, others."""
    def initial_weights(seed: int) -> list[np.ndarray]:
        trainer = loop._Trainer(tiny(data_dir, tmp_path / f"model-{seed}", seed=seed))
        trainer._build()
        return [v.numpy() for v in trainer.model.trainable_variables]

    first, again, other = initial_weights(0), initial_weights(0), initial_weights(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True)
                   if a.std() > 0)


def test_l2_is_weight_decay_on_kernels_only(one_step):
    _, summary = one_step
    model = build_resnet(18, 10, 32)
    tf.train.Checkpoint(model=model).restore(summary["checkpoint"]).expect_partial()
    kernels = sum(float(tf.nn.l2_loss(v.value)) for v in weight_decay_variables(model))
    assert summary["l2"] == pytest.approx(3e-3 * kernels, rel=1e-5)
    assert summary["loss"] == pytest.approx(summary["cross_entropy"] + summary["l2"], rel=1e-5)
    assert summary["weights_sha256"] == checkpoints.weights_fingerprint(model)


def test_the_label_map_is_copied_to_the_model(one_step):
    model_dir, _ = one_step
    assert labels_lib.load(model_dir)[0] == {"label": 1, "synset": "n00000000",
                                             "text": "digit zero"}


def test_mixed_float16_with_loss_scaling(data_dir, tmp_path):
    summary = loop.train(tiny(data_dir, tmp_path / "model", train_steps=2, batch_size=8,
                              mixed_precision="float16", label_smoothing=0.1))
    assert (summary["precision"], summary["jit_compile"]) == ("mixed_float16", False)
    assert np.isfinite(summary["loss"])
    # The float32 policy is back for whoever builds a model next in this process.
    assert build_resnet(18, 10, 32).get_layer("stem_conv").compute_dtype == "float32"


@pytest.mark.slow
def test_xla_compiled_steps(data_dir, tmp_path):
    summary = loop.train(tiny(data_dir, tmp_path / "model", train_steps=2, batch_size=8,
                              jit_compile="on"))
    assert summary["jit_compile"] is True and np.isfinite(summary["loss"])


def test_a_diverging_loss_stops_training_naming_the_step(data_dir, tmp_path):
    with pytest.raises(stopping.TrainingDiverged, match=r"the loss is (nan|inf) at step \d+"):
        loop.train(tiny(data_dir, tmp_path / "model", train_steps=20, batch_size=8,
                        base_learning_rate=1e30))


def test_training_through_a_tf_data_service(data_dir, tmp_path, tf_data_service):
    summary = loop.train(tiny(data_dir, tmp_path / "model", train_steps=2, batch_size=8,
                              data_service=tf_data_service))
    assert summary["step"] == 2 and np.isfinite(summary["loss"])


# --- bad input: refused before anything is written ------------------------------------------


def two_workers(monkeypatch, index: int = 0, count: int = 2) -> None:
    workers = [f"127.0.0.1:{port}" for port in range(1, count + 1)]  # never contacted
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))


def refused(config: TrainConfig, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        loop.train(config)
    message = str(info.value)
    assert "\n" not in message
    assert not os.path.exists(config.runtime.model_dir), "nothing may be written"
    return message


def test_batch_not_divisible_by_replicas(data_dir, tmp_path, monkeypatch):
    two_workers(monkeypatch)
    refused(tiny(data_dir, tmp_path / "model", batch_size=7),
            r"--batch-size 7 \(global\) does not divide by the 2 replicas")


def test_fewer_shards_than_workers(data_dir, tmp_path, monkeypatch):
    two_workers(monkeypatch, index=2, count=3)
    refused(tiny(data_dir, tmp_path / "model", batch_size=9),
            "2 shard\\(s\\) for 3 input pipelines")


@pytest.mark.parametrize("tf_config, match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "job\\(s\\) ps"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}',
     "index 5 is out of range"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "evaluator", "index": 0}}',
     "makes this process the evaluator .*evaluate --watch"),
    ('{"cluster": {"evaluator": ["e:1", "f:2"], "worker": ["a:1"]}, '
     '"task": {"type": "worker", "index": 0}}', "2 evaluators; at most one"),
])
def test_unreadable_tf_config(data_dir, tmp_path, monkeypatch, tf_config, match):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    refused(tiny(data_dir, tmp_path / "model"), match)


def test_no_shards(tmp_path):
    refused(tiny(str(tmp_path / "empty"), tmp_path / "model"), "no TFRecord shards match")


def test_more_classes_in_the_data_than_outputs(data_dir, tmp_path):
    refused(tiny(data_dir, tmp_path / "model", num_classes=5), "pass --num-classes 10")


def test_checkpoint_of_another_depth(one_step, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(one_step[0], model_dir)
    data_dir = config_lib.load(str(model_dir)).data.data_dir
    with pytest.raises(UserError, match="--resnet-size 18, not 34"):
        loop.train(tiny(data_dir, model_dir, resnet_size=34, train_steps=2, batch_size=8))
    # Without config.json (copied checkpoints, say) the checkpoint itself is checked.
    os.remove(model_dir / "config.json")
    with pytest.raises(UserError, match="does not fit ResNet-34 with 10 classes") as info:
        loop.train(tiny(data_dir, model_dir, resnet_size=34, train_steps=2, batch_size=8))
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


def test_a_truncated_checkpoint_is_named_as_damaged(one_step, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(one_step[0], model_dir)
    data = model_dir / "checkpoints" / "ckpt-1.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    data_dir = config_lib.load(str(model_dir)).data.data_dir
    with pytest.raises(UserError) as info:
        loop.train(tiny(data_dir, model_dir, train_steps=2, batch_size=8))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {model_dir / 'checkpoints' / 'ckpt-1'} is damaged (")
    assert message.endswith("): delete its files to resume from the checkpoint before it")


# --- exact resume, bad labels, float32 validation --------------------------------------------


def test_a_resumed_run_continues_the_input_where_the_interrupted_one_stopped(data_dir, tmp_path):
    """Stopped after step k and resumed, training consumes the examples an uninterrupted run
    with the same seed consumes -- across the end of an epoch (160 images, 10 steps)."""
    # Positions count the records of the stream, each shard's end marker too (two shards: two
    # per epoch, bad_records.shard_records), so an example's index is its own or up to 2 more.
    whole = loop.train(tiny(data_dir, tmp_path / "whole", train_steps=12))
    epoch, index = whole["input_position"]  # 12 x 16 = 192 examples: epoch 1, example 31
    assert epoch == 1 and 31 <= index <= 33
    tiny_first = tiny(data_dir, tmp_path / "resumed", train_steps=9, checkpoint_every=9)
    first = loop.train(tiny_first)
    epoch, index = first["input_position"]
    assert epoch == 0 and 143 <= index <= 145
    second = loop.train(tiny_first.updated(train_steps=12))
    assert second["start_step"] == 9 and second["input_position"] == whole["input_position"]
    # What the resumed run read next is what the uninterrupted one read after step 9.
    from resnet_imagenet.data import pipeline

    pattern = tfrecord.shard_pattern(data_dir, "train")

    def labels(ds, batches):
        return [batch[1].numpy().tolist() for batch in ds.take(batches)]

    stream = dict(shuffle_buffer=64, seed=0, with_positions=True)
    uninterrupted = labels(pipeline.train_dataset(pattern, 16, 32, **stream), 12)[9:]
    resumed = labels(pipeline.train_dataset(pattern, 16, 32, start_epoch=0, skip=index + 1,
                                            **stream), 3)
    assert resumed == uninterrupted


def test_a_training_label_outside_the_classes_stops_with_one_line(data_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for index, path in enumerate(sorted(glob.glob(os.path.join(data_dir, "train-*")))):
        with tf.io.TFRecordWriter(str(bad_dir / os.path.basename(path))) as writer:
            for number, raw in enumerate(tf.data.TFRecordDataset(path)):
                example = tf.train.Example.FromString(raw.numpy())
                if index == 1 and number == 3:
                    example.features.feature["image/class/label"].int64_list.value[:] = [0]
                writer.write(example.SerializeToString())
    with pytest.raises(UserError) as info:
        loop.train(tiny(str(bad_dir), tmp_path / "model", train_steps=40, batch_size=8))
    message = str(info.value)
    assert "\n" not in message
    assert f"{bad_dir / 'train-00001-of-00002'} holds a record with label 0, outside 1..10" \
        in message
    # The refused run wrote config.json but no checkpoint: a rerun with other settings (the
    # right --num-classes, say) is not refused as "holds a model trained with ...".
    model_dir = tmp_path / "model"
    assert (model_dir / "config.json").exists() and not glob.glob(str(model_dir / "checkpoints/*"))
    checks.check_model_dir(tiny(str(bad_dir), model_dir, num_classes=11, resnet_size=34))


def test_validation_during_training_runs_the_float32_model(data_dir, tmp_path):
    """Under mixed precision the trainer validates a float32 copy: its numbers are those of
    `resnet-imagenet evaluate` (float32) on the same checkpoint."""
    from resnet_imagenet import evaluation

    model_dir = str(tmp_path / "model")
    summary = loop.train(tiny(data_dir, model_dir, train_steps=2, batch_size=8,
                              mixed_precision="bfloat16", base_learning_rate=0.3))
    assert summary["precision"] == "mixed_bfloat16"
    assert summary["validation"]["precision"] == "float32"
    evaluated = evaluation.evaluate(data_dir, model_dir)
    assert (summary["validation"]["top1"], summary["validation"]["top5"]) == (
        evaluated["top1"], evaluated["top5"])
