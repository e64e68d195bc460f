"""``resnet-imagenet evaluate``: metrics against a direct computation, --watch, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from resnet_imagenet import cli, evaluation
from resnet_imagenet import config as config_lib
from resnet_imagenet.errors import UserError
from resnet_imagenet.report import read_scalars
from tests.support.model_dir import (  # noqa: F401  (trained_model is a fixture)
    add_checkpoint,
    checkpoint_logits,
    copy_model_dir,
    near_ties,
    resnet34_checkpoint,
    trained_model,
)


def _set_train_steps(model_dir: str, steps: int) -> None:
    config = config_lib.load(model_dir)
    config_lib.save(config.updated(train_steps=steps), model_dir)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_metrics_match_a_direct_computation_over_the_raw_images(trained_model, tmp_path):
    model_dir = copy_model_dir(trained_model, tmp_path / "model")
    output = tmp_path / "out" / "metrics.json"

    # 40 images in batches of 16: the last batch holds 8.
    metrics = evaluation.evaluate(trained_model.data_dir, model_dir, batch_size=16,
                                  output=str(output))

    logits, labels = checkpoint_logits(trained_model)
    assert len(set(logits.argmax(axis=1))) > 1, "the test model predicts a single class"
    top1_hits = logits.argmax(axis=1) + 1 == labels
    top5_hits = (np.argsort(-logits, axis=1)[:, :5] + 1 == labels[:, None]).any(axis=1)
    # Another batch composition may flip a top-k decision only where logits (nearly) tie.
    slack1, slack5 = near_ties(logits, 1), near_ties(logits, 5)
    n = len(labels)
    assert metrics["images"] == n == 40
    assert abs(metrics["top1"] * n - top1_hits.sum()) <= slack1.sum()
    assert abs(metrics["top5"] * n - top5_hits.sum()) <= slack5.sum()
    assert metrics["step"] == trained_model.step
    assert metrics["checkpoint"] == os.path.join(model_dir, "checkpoints", "ckpt-30")

    rows = {row["label"]: row for row in metrics["per_class"]}
    assert sorted(rows) == sorted(set(labels.tolist()))
    for label, row in rows.items():
        mine = labels == label
        assert row["images"] == mine.sum()
        assert abs(row["top1"] * row["images"] - top1_hits[mine].sum()) <= slack1[mine].sum()
        assert abs(row["top5"] * row["images"] - top5_hits[mine].sum()) <= slack5[mine].sum()
    assert rows[1]["synset"] == "n00000000" and rows[1]["text"] == "digit zero"

    assert json.loads(output.read_text()) == metrics
    scalars = read_scalars(os.path.join(model_dir, "logs", "validation"))
    assert scalars["validation/top1"] == [(30, pytest.approx(metrics["top1"]))]
    assert scalars["validation/top5"] == [(30, pytest.approx(metrics["top5"]))]


def test_watch_evaluates_each_new_checkpoint_until_the_final_step(trained_model, tmp_path):
    model_dir = copy_model_dir(trained_model, tmp_path / "model")
    _set_train_steps(model_dir, 60)
    output = tmp_path / "metrics.json"
    results = evaluation.watch(trained_model.data_dir, model_dir, batch_size=64,
                               output=str(output), poll_interval=0.05, timeout=60)

    first = next(results)
    assert first["step"] == 30
    assert json.loads(output.read_text())["step"] == 30
    add_checkpoint(model_dir, 60)  # the trainer goes on to its final step
    final = next(results)
    assert final["step"] == 60 and final["checkpoint"].endswith("ckpt-60")
    assert final["top1"] == pytest.approx(first["top1"])  # same weights, saved again
    with pytest.raises(StopIteration):
        next(results)
    assert json.loads(output.read_text())["step"] == 60
    scalars = read_scalars(os.path.join(model_dir, "logs", "validation"))
    assert [step for step, _ in scalars["validation/top1"]] == [30, 60]


def test_watch_gives_up_when_no_new_checkpoint_comes(trained_model, tmp_path, capsys):
    model_dir = copy_model_dir(trained_model, tmp_path / "model")
    _set_train_steps(model_dir, 60)

    status = cli.main(["evaluate", "--data-dir", trained_model.data_dir, "--model-dir", model_dir,
                       "--watch", "--poll-interval", "0.05", "--timeout", "0.5"])

    captured = capsys.readouterr()
    assert status == 2
    assert "step 30: top-1" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "no new checkpoint" in errors[0] and "last evaluated step 30" in errors[0]


def test_a_checkpoint_of_another_depth_is_refused_in_one_line(trained_model, resnet34_checkpoint,
                                                              capsys):
    other = resnet34_checkpoint
    status = cli.main(["evaluate", "--data-dir", trained_model.data_dir,
                       "--model-dir", trained_model.model_dir, "--checkpoint", other])

    assert status == 2
    (line,) = _error_lines(capsys)
    assert other in line
    assert "holds ResNet-34 with 10 classes" in line and "ResNet-18 with 10 classes" in line


def test_a_missing_checkpoint_is_refused_in_one_line(trained_model, tmp_path, capsys):
    missing = os.path.join(trained_model.model_dir, "checkpoints", "ckpt-999")
    status = cli.main(["evaluate", "--data-dir", trained_model.data_dir,
                       "--model-dir", trained_model.model_dir, "--checkpoint", missing])
    assert status == 2
    (line,) = _error_lines(capsys)
    assert missing in line and "not found" in line

    empty = tmp_path / "untrained"
    empty.mkdir()
    config_lib.save(config_lib.load(trained_model.model_dir), str(empty))
    with pytest.raises(UserError, match="no checkpoint in .*untrained"):
        evaluation.evaluate(trained_model.data_dir, str(empty))


def test_an_incomplete_validation_split_is_refused(trained_model, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(trained_model.data_dir, data_dir)
    os.remove(data_dir / "validation-00001-of-00003")
    with pytest.raises(UserError, match="complete set of validation shards"):
        evaluation.evaluate(str(data_dir), trained_model.model_dir)
    with pytest.raises(UserError, match="complete set of validation shards"):
        evaluation.evaluate(str(tmp_path / "nothing-here"), trained_model.model_dir)
