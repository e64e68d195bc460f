"""What every replica does together: float16 loss-scale skips, batch-norm statistics.

MirroredStrategy over two logical CPU devices, in a subprocess (the devices must be set up
before TensorFlow starts; see tests/support/replicas.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def updates() -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.support.replicas", "updates"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def finite(nested) -> bool:
    if isinstance(nested, list):
        return all(finite(x) for x in nested)
    return math.isfinite(nested)


@pytest.mark.parametrize("replica", [0, 1])
def test_an_overflow_on_any_replica_skips_the_step_on_every_replica(updates, replica):
    run = updates["loss_scale"][replica]
    overflow = run["after_overflow"]
    # Every replica skipped: the weights are those before the step, the optimizer did not count
    # an update, and every replica halved its loss scale.
    assert overflow["weights"] == run["before"]
    assert overflow["iterations"] == [0, 0]
    assert overflow["scale"] == [512.0, 512.0]
    # The next, finite step is applied everywhere, to the same finite weights.
    finite_step = run["after_finite"]
    assert finite(finite_step["weights"])
    assert finite_step["weights"] != run["before"]
    for variable in finite_step["weights"]:
        assert variable[0] == variable[1]  # the replicas agree
    assert finite_step["iterations"] == [1, 1]
    assert finite_step["scale"] == [512.0, 512.0]


def test_batch_norm_statistics_become_their_mean_over_replicas(updates):
    before, after = updates["bn_average"]["before"], updates["bn_average"]["after"]
    for name in ("mean", "variance"):
        first, second = before[name]
        assert first != second  # each replica saw other data
        expected = [(a + b) / 2 for a, b in zip(first, second)]
        for replica in after[name]:
            assert replica == pytest.approx(expected, rel=1e-6)
