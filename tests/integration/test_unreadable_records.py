"""Training, validation during training and ``evaluate`` on shards with unreadable records:
the run goes on, says what it skipped (log, summaries, TensorBoard), and stops past the bound.

Real training in this process (ResNet-18, 32x32 images, a few steps) on damaged copies of the
demo dataset's shards (tests/support/damage.py).
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from resnet_imagenet import cli
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import loop
from tests.support.damage import flip_bit, truncate
from tests.support.shards import make_shards
from tests.support.training import read_scalars

TINY = dict(resnet_size=18, image_size=32, num_classes=10, batch_size=16, shuffle_buffer=64,
            log_every=1, seed=0, scale_lr_with_batch=False)
TRAIN_DAMAGE = "train-00001-of-00002"  # a bit flipped in record 70 of 80: 10 records lost
VALIDATION_DAMAGE = "validation-00000-of-00001"  # truncated in record 30 of 40: 10 lost


@pytest.fixture(scope="module")
def damaged(demo_raw, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("damaged"))
    make_shards(demo_raw, out, train_shards=2, validation_shards=1)
    where = {TRAIN_DAMAGE: flip_bit(os.path.join(out, TRAIN_DAMAGE), 70),
             VALIDATION_DAMAGE: truncate(os.path.join(out, VALIDATION_DAMAGE), 30)}
    return out, where


def tiny(data_dir: str, model_dir, **changes) -> TrainConfig:
    return TrainConfig().updated(data_dir=data_dir, model_dir=str(model_dir),
                                 **{**TINY, **changes})


def test_training_goes_on_past_unreadable_records_and_says_so(damaged, tmp_path, capfd,
                                                               caplog):
    data_dir, where = damaged
    model_dir = tmp_path / "model"
    # 10 of 160 records per epoch: 6% (the default bound, 0.1%, stops: the next test).
    with caplog.at_level(logging.INFO, logger="resnet_imagenet"):
        summary = loop.train(tiny(data_dir, model_dir, train_steps=12, checkpoint_every=6,
                                  max_bad_records="10%"))
    err = capfd.readouterr().err
    train_shard = os.path.join(data_dir, TRAIN_DAMAGE)
    assert f"tf.data: skipped {train_shard} from byte {where[TRAIN_DAMAGE]} on (10 records)" in err
    # 12 steps of 16 = 192 examples: past the first epoch's 150 readable ones, so the damage
    # was met once or twice (counted with the decode window it was found in).
    assert summary["skipped_records"] in (10, 20)
    assert summary["records_seen"] == 12 * 16 + summary["skipped_records"]
    assert summary["unreadable_shards"] == [
        {"shard": train_shard, "offset": where[TRAIN_DAMAGE],
         "records": summary["unreadable_shards"][0]["records"]}]
    on_disk = json.loads((model_dir / "train_summary.json").read_text())
    assert on_disk["skipped_records"] == summary["skipped_records"]
    scalars = read_scalars(str(model_dir / "logs" / "train"))
    assert scalars["data/skipped_records"][-1] == (12, summary["skipped_records"])
    # In-training validation: over the 30 images before the cut, the 10 after it counted.
    validation = summary["validation"]
    assert (validation["images"], validation["skipped_records"]) == (30, 10)
    assert validation["unreadable_shards"] == [{"shard": os.path.join(data_dir, VALIDATION_DAMAGE),
                                                "offset": where[VALIDATION_DAMAGE],
                                                "records": 10}]
    assert "over 30 images, 10 unreadable record(s) skipped" in caplog.text
    assert "unreadable training record(s) skipped so far, of" in caplog.text
    assert read_scalars(str(model_dir / "logs" / "validation"))["data/skipped_records"] == [
        (12, 10.0)]

    # A resumed run carries the counts on from its checkpoint.
    resumed = loop.train(tiny(data_dir, model_dir, train_steps=14, max_bad_records="10%"))
    assert resumed["start_step"] == 12
    assert resumed["skipped_records"] >= summary["skipped_records"]
    assert resumed["records_seen"] == 14 * 16 + resumed["skipped_records"]

    # `evaluate`: its top-1 says over how many images, and which shard it could not read.
    capfd.readouterr()
    output = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--data-dir", data_dir, "--model-dir", str(model_dir),
                     "--output", str(output)]) == 0
    printed = capfd.readouterr().out
    assert "(over 30 images, 10 unreadable records skipped in 1 shard(s);" in printed
    metrics = json.loads(output.read_text())
    assert (metrics["images"], metrics["skipped_records"]) == (30, 10)
    assert metrics["unreadable_shards"][0]["shard"] == os.path.join(data_dir, VALIDATION_DAMAGE)


def test_past_the_bound_training_stops_in_one_line_naming_the_shard(damaged, tmp_path):
    data_dir, where = damaged
    with pytest.raises(UserError) as info:
        loop.train(tiny(data_dir, tmp_path / "model", train_steps=30))  # the default, 0.1%
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("10 of ")
    assert (f"training records could not be read, more than --max-bad-records 0.1% allows (0), "
            f"in {TRAIN_DAMAGE} from byte {where[TRAIN_DAMAGE]} (10 records): convert those "
            "shards again") in message


def test_the_train_command_exits_2_with_the_one_line(damaged, tmp_path, capfd):
    data_dir, _ = damaged
    code = cli.main(["train", "--data-dir", data_dir, "--model-dir", str(tmp_path / "model"),
                     *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
                       if not isinstance(v, bool)],
                     "--no-scale-lr-with-batch", "--train-steps", "30", "--max-bad-records", "5"])
    assert code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "more than --max-bad-records 5 allows (5)" in lines[0]
    assert "Traceback" not in err
