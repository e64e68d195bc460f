"""Two real worker processes (``python -m resnet_imagenet train``) with TF_CONFIG on 127.0.0.1.

One scenario, in three launches of the same two commands, as a TFJob would see it:

1. a worker is killed (SIGKILL) mid-run: the other one stops within seconds with the retryable
   exit status 143 (its collectives fail); both are restarted ...
2. ... and resume from the last periodic checkpoint; now a worker gets SIGTERM (a preempted
   pod): both save a checkpoint at the same step and exit 143 ...
3. ... and, restarted, resume from exactly that step and finish with identical weights, equal
   to those in the chief's final checkpoint. The chief's TensorBoard log has every step once.

MultiWorkerMirroredStrategy on CPU, RING all-reduce over gRPC; thread pools kept small so two
workers share CI's two cores. TF_CONFIG names an evaluator too, as training-operator's does for a
TFJob with an Evaluator replica.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from resnet_imagenet.launch import local
from resnet_imagenet.model.resnet import build_resnet
from resnet_imagenet.training import checkpoints, loop, stopping
from tests.support.shards import make_shards
from tests.support.training import read_scalars

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_TIMEOUT_S = 240


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """Two workers running the same train command, each logging to its own file."""

    def __init__(self, workdir, data_dir: str, model_dir: str, train_steps: int, launch: str):
        ports = free_ports(3)
        addresses = [f"127.0.0.1:{p}" for p in ports[:2]]
        # The shape training-operator gives a TFJob with an Evaluator replica: the evaluator in
        # every replica's cluster (nothing listens there: the workers must leave it out).
        evaluator = f"127.0.0.1:{ports[2]}"
        self.logs = [os.path.join(workdir, f"{launch}-worker{i}.log") for i in range(2)]
        self.scratch = os.path.join(workdir, f"{launch}-tmp")
        os.makedirs(self.scratch, exist_ok=True)
        command = [
            sys.executable, "-m", "resnet_imagenet", "train",
            "--data-dir", data_dir, "--model-dir", model_dir,
            "--resnet-size", "18", "--image-size", "32", "--num-classes", "10",
            "--batch-size", "8", "--train-steps", str(train_steps),
            "--checkpoint-every", "2", "--log-every", "1", "--shuffle-buffer", "32",
            "--base-learning-rate", "0.02",
        ]
        self.procs = []
        for index in range(2):
            env = dict(os.environ)
            env.update({
                "TF_CONFIG": local.tf_config(addresses, "worker", index, evaluator),
                "TF_NUM_INTRAOP_THREADS": "1",
                "TF_NUM_INTEROP_THREADS": "2",
                "OMP_NUM_THREADS": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1",
                "TMPDIR": self.scratch,  # where the non-chief writes its throw-away checkpoints
            })
            with open(self.logs[index], "wb") as log_file:
                self.procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                                   stderr=subprocess.STDOUT))

    def log(self, index: int) -> str:
        with open(self.logs[index], errors="replace") as f:
            return f.read()

    def wait_for(self, index: int, pattern: str, timeout: float = LAUNCH_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log(index))
            if match:
                return match
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"worker {index} never logged {pattern!r}:\n" + self.tails())

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the workers did not finish in time:\n" + self.tails())

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def tails(self) -> str:
        return "\n".join(f"--- worker {i}\n" + self.log(i)[-3000:] for i in range(2))


def fingerprint_line(text: str) -> tuple[str, int]:
    match = re.search(r"weights sha256 ([0-9a-f]{64}) \(worker \d, step (\d+)\)", text)
    assert match, text[-3000:]
    return match.group(1), int(match.group(2))


@pytest.fixture(scope="module")
def data_dir(demo_raw, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tfrecords"))
    make_shards(demo_raw, out, train_shards=4, validation_shards=1)
    return out


def test_killed_then_preempted_workers_resume_without_losing_steps(data_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    ckpt_dir = checkpoints.checkpoint_dir(model_dir)

    # 1. SIGKILL worker 1 once the checkpoint of step 2 exists: worker 0 notices, exits 143.
    first = Cluster(tmp_path, data_dir, model_dir, train_steps=1000, launch="killed")
    first.wait_for(0, r"checkpoint \S+ckpt-2 ")
    first.wait_for(1, r"step 3/1000")
    first.procs[1].send_signal(signal.SIGKILL)
    assert first.wait() == [stopping.RETRYABLE_EXIT_CODE, -signal.SIGKILL], first.tails()
    assert "lost contact with the other workers" in first.log(0)
    last_periodic = int(tf.train.latest_checkpoint(ckpt_dir).rsplit("-", 1)[1])
    assert last_periodic >= 2 and last_periodic % 2 == 0

    # 2. Restart both: they resume from that checkpoint. SIGTERM worker 1 after a step: both
    #    save at the same step boundary and exit 143.
    second = Cluster(tmp_path, data_dir, model_dir, train_steps=1000, launch="preempted")
    for index in range(2):
        second.wait_for(index, rf"resumed from \S+ckpt-{last_periodic}: step {last_periodic}")
    second.wait_for(1, rf"step {last_periodic + 1}/1000")
    second.procs[1].send_signal(signal.SIGTERM)
    assert second.wait() == [stopping.RETRYABLE_EXIT_CODE] * 2, second.tails()
    stops = [re.search(r"stopped by SIGTERM at step (\d+) after saving (\S+);", second.log(i))
             for i in range(2)]
    assert all(stops), second.tails()
    preempted_at = int(stops[0].group(1))
    assert int(stops[1].group(1)) == preempted_at > last_periodic
    assert stops[0].group(2) == stops[1].group(2) == os.path.join(ckpt_dir,
                                                                  f"ckpt-{preempted_at}")
    assert tf.train.latest_checkpoint(ckpt_dir) == stops[0].group(2)

    # 3. Restart both to two steps further: they go on from exactly the preempted step.
    final_step = preempted_at + 2
    third = Cluster(tmp_path, data_dir, model_dir, train_steps=final_step, launch="resumed")
    assert third.wait() == [0, 0], third.tails()
    prints = [fingerprint_line(third.log(i)) for i in range(2)]
    assert prints[0] == prints[1] and prints[0][1] == final_step

    with open(os.path.join(model_dir, loop.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert (summary["start_step"], summary["step"]) == (preempted_at, final_step)
    assert summary["resumed_from"] == stops[0].group(2)
    assert (summary["num_workers"], summary["num_replicas"]) == (2, 2)
    assert summary["weights_sha256"] == prints[0][0]
    model = build_resnet(18, 10, 32)
    tf.train.Checkpoint(model=model).restore(summary["checkpoint"]).expect_partial()
    assert checkpoints.weights_fingerprint(model) == prints[0][0]

    # Every step from 1 to the end is in the chief's log; the ones after the SIGKILLed
    # run's last checkpoint twice (redone), none missing.
    steps = sorted({s for s, _ in read_scalars(os.path.join(model_dir, "logs", "train"))[
        "loss/total"]})
    assert steps == list(range(1, final_step + 1))
    # The non-chief's throw-away checkpoints are gone.
    assert os.listdir(third.scratch) == []
