"""The training loop with two replicas in one process (MirroredStrategy over two logical CPU
devices, what a machine with two GPUs gets), mixed float16: what the checkpoints hold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.support.shards import make_shards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def two_replica_run(demo_raw, tmp_path_factory) -> dict:
    data_dir = str(tmp_path_factory.mktemp("tfrecords"))
    make_shards(demo_raw, data_dir, train_shards=2, validation_shards=1)
    model_dir = str(tmp_path_factory.mktemp("run") / "model")
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.replicas", "train", data_dir, model_dir],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_checkpoints_hold_the_mean_batch_norm_statistics_of_all_replicas(two_replica_run):
    run = two_replica_run
    assert run["summary"]["num_replicas"] == 2
    assert [save["step"] for save in run["saves"]] == [1, 2]
    for save in run["saves"]:
        # At every save each replica holds the same statistics (their mean), and that is what
        # the checkpoint gets -- not replica 0's own estimate.
        for name in ("moving_mean", "moving_variance"):
            first, second = save[name]
            assert first == second, (save["step"], name)
    assert run["checkpoint_moving_mean"] == pytest.approx(run["saves"][-1]["moving_mean"][0])


def test_mixed_float16_on_two_replicas_trains(two_replica_run):
    summary = two_replica_run["summary"]
    assert summary["precision"] == "mixed_float16" and summary["step"] == 2
    assert math.isfinite(summary["loss"])
    # Two steps of 16 images from one input pipeline shared by both replicas.
    assert summary["input_position"] == [0, 31]
