"""The local backend: N real processes with the TFJob's TF_CONFIG, and nothing left running.

Process management is tested with a small stand-in worker (below) so that crashes, signals and
hangs can be staged exactly; the last test runs the real `resnet-imagenet train` with 2 workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_imagenet.launch import local
from resnet_imagenet.training import strategy

# A stand-in worker: installs a SIGTERM handler, starts a child of its own (which must not
# outlive the launch either), records both pids, prints its TF_CONFIG, waits until PEERS
# processes (itself included) have recorded theirs, then acts out MODE:
#   ok          exit 0
#   crash       worker 1 exits 3; the others wait
#   hang        wait forever
WORKER = r"""
import json, os, signal, subprocess, sys, time
out, mode, peers = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = os.environ.get("TF_CONFIG")
task = json.loads(config)["task"] if config else {"type": "worker", "index": 0}
name = f"{task['type']}-{task['index']}"

def on_sigterm(signum, frame):
    open(os.path.join(out, name + ".sigterm"), "w").close()
    sys.exit(143)

signal.signal(signal.SIGTERM, on_sigterm)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(out, name + ".pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(os.path.join(out, name + ".pids.tmp"), os.path.join(out, name + ".pids"))
print("TF_CONFIG", config, flush=True)
while len([f for f in os.listdir(out) if f.endswith(".pids")]) < peers:
    time.sleep(0.01)
if mode == "ok":
    child.kill()
    sys.exit(0)
if mode == "crash" and name == "worker-1":
    print("Traceback: boom", flush=True)
    sys.exit(3)
while True:
    time.sleep(1)
"""


def worker(tmp_path: Path, mode: str, peers: int = 0) -> list[str]:
    """The stand-in's command line; with ``peers``, every one of them has its SIGTERM handler in
    place before anything happens."""
    return [sys.executable, "-c", WORKER, str(tmp_path), mode, str(peers)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that ignores it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def recorded_pids(tmp_path: Path) -> list[int]:
    return [int(pid) for f in tmp_path.glob("*.pids") for pid in f.read_text().split()]


def wait_for_files(tmp_path: Path, pattern: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"{pattern}: {count} files expected"
        time.sleep(0.05)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Orphaned grandchildren are reaped by init a moment after their group is killed."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"


def test_tf_config_has_the_shape_training_operator_injects():
    # As training-operator v1.9 sets it in pod 1 of TFJob "job" in namespace "ns":
    operator = ('{"cluster":{"worker":["job-worker-0.ns.svc:2222","job-worker-1.ns.svc:2222"]},'
                '"task":{"type":"worker","index":1},"environment":"cloud"}')
    assert local.tf_config(["job-worker-0.ns.svc:2222", "job-worker-1.ns.svc:2222"],
                           "worker", 1) == operator

    # With an Evaluator replica, the operator names it in every replica's cluster (a Go map:
    # keys sorted), the workers' too (test_tfjob_control_plane.py reads it off the pods).
    operator = ('{"cluster":{"evaluator":["job-evaluator-0.ns.svc:2222"],"worker":'
                '["job-worker-0.ns.svc:2222","job-worker-1.ns.svc:2222"]},'
                '"task":{"type":"worker","index":0},"environment":"cloud"}')
    assert local.tf_config(["job-worker-0.ns.svc:2222", "job-worker-1.ns.svc:2222"],
                           "worker", 0, "job-evaluator-0.ns.svc:2222") == operator
    cluster = strategy.cluster_from_env({"TF_CONFIG": operator})  # the workers ignore it
    assert (cluster.num_workers, cluster.worker_id, cluster.is_chief) == (2, 0, True)

    replicas = local.plan(2, ["train"], evaluator_command=["evaluate"])
    configs = [json.loads(r.env["TF_CONFIG"]) for r in replicas]
    workers = configs[0]["cluster"]["worker"]
    (evaluator,) = configs[0]["cluster"]["evaluator"]
    assert len(set(workers + [evaluator])) == 3
    assert all(w.startswith("127.0.0.1:") for w in workers + [evaluator])
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0},
                                            {"type": "worker", "index": 1},
                                            {"type": "evaluator", "index": 0}]
    assert all(c == {**configs[0], "task": c["task"]} for c in configs)  # one cluster
    # Like the operator, a lone worker gets no TF_CONFIG (even an inherited one is removed).
    (single,) = local.plan(1, ["train"])
    assert single.env["TF_CONFIG"] is None and "TF_CONFIG" not in single.environ()


def test_gpus_are_divided_between_workers():
    replicas = local.plan(2, ["train"], evaluator_command=["evaluate"], gpus_per_worker=2)
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in replicas] == ["0,1", "2,3", ""]
    # Each worker is told how many it was given, and stops if it sees fewer (test_train_cli.py).
    assert [r.env.get(strategy.GPUS_ENV) for r in replicas] == ["2", "2", None]
    assert all(strategy.GPUS_ENV not in r.environ() for r in local.plan(2, ["train"]))


def test_workers_run_with_their_tf_config_and_prefixed_output(tmp_path):
    output = io.StringIO()
    assert local.launch_local([], workers=2, command=worker(tmp_path, "ok"), output=output) == 0
    lines = output.getvalue().splitlines()
    for index in (0, 1):
        (line,) = [x for x in lines if x.startswith(f"[worker-{index}] TF_CONFIG ")]
        config = json.loads(line.split(" ", 2)[2])
        assert config["task"] == {"type": "worker", "index": index}


def test_a_crashing_worker_fails_the_launch_and_leaves_no_process(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output = io.StringIO()
    status = local.launch_local([], workers=3, command=worker(tmp_path, "crash", peers=3),
                                output=output)
    assert status == 1
    assert "worker-1 exited with code 3; stopping the other processes" in caplog.text
    assert "[worker-1] Traceback: boom" in output.getvalue()
    assert sorted(p.name for p in tmp_path.glob("*.sigterm")) == [
        "worker-0.sigterm", "worker-2.sigterm"]  # told to stop, not killed outright
    wait_gone(recorded_pids(tmp_path))


def test_timeout_stops_every_process(tmp_path):
    status = local.launch_local([], workers=2, command=worker(tmp_path, "hang"), timeout=1.5)
    assert status == 124
    wait_gone(recorded_pids(tmp_path))


def test_an_evaluator_that_outlives_the_workers_is_stopped_after_its_grace(tmp_path):
    replicas = local.plan(2, worker(tmp_path, "ok", peers=3),
                          evaluator_command=worker(tmp_path, "hang"))
    assert local.run_replicas(replicas, evaluator_grace=0.5) == 0
    assert [p.name for p in tmp_path.glob("*.sigterm")] == ["evaluator-0.sigterm"]
    wait_gone(recorded_pids(tmp_path))


def run_launcher(tmp_path: Path, mode: str) -> subprocess.Popen:
    """The launcher in its own process, so that it can be signalled as KFP would."""
    code = ("import sys; from resnet_imagenet.launch.local import launch_local; "
            f"sys.exit(launch_local([], workers=2, command={worker(tmp_path, mode)!r}))")
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_launcher_stops_every_process(tmp_path):
    launcher = run_launcher(tmp_path, "hang")
    try:
        wait_for_files(tmp_path, "*.pids", 2)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 143, stderr
    assert "SIGTERM received; stopping every process" in stderr
    assert len(list(tmp_path.glob("*.sigterm"))) == 2
    wait_gone(recorded_pids(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_launcher_killed_outright(tmp_path):
    launcher = run_launcher(tmp_path, "hang")
    try:
        wait_for_files(tmp_path, "*.pids", 2)
        launcher.kill()  # SIGKILL: no clean-up code runs
        launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    workers = [int(f.read_text().split()[0]) for f in tmp_path.glob("*.pids")]
    wait_gone(workers)


@pytest.mark.slow
def test_two_real_workers_train_and_exit_0(demo_raw, tmp_path):
    from resnet_imagenet import cli

    data, model = tmp_path / "tfrecords", tmp_path / "model"
    assert cli.main(["convert", "--raw-dir", demo_raw, "--output-dir", str(data),
                     "--train-shards", "2", "--validation-shards", "2"]) == 0
    output = io.StringIO()
    status = local.launch_local(
        ["--data-dir", str(data), "--model-dir", str(model), "--resnet-size", "18",
         "--image-size", "32", "--batch-size", "8", "--train-steps", "4",
         "--checkpoint-every", "2"],
        workers=2, timeout=600, output=output)
    assert status == 0, output.getvalue()[-3000:]
    text = output.getvalue()
    assert "[worker-0] " in text and "[worker-1] " in text

    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(model / "checkpoints"))
    assert latest is not None, os.listdir(model)


@pytest.mark.parametrize("backend", ["local", "tfjob", "trainjob"])
def test_a_bad_train_flag_is_one_line_and_exit_2_before_anything_starts(backend, tmp_path,
                                                                        capfd):
    """Every worker used to print the usage and exit 1 (local), or every pod to fail (cluster)."""
    from resnet_imagenet import cli

    assert cli.main(["launch", "--backend", backend, "--workers", "2", "--kubeconfig",
                     str(tmp_path / "nowhere"), "--", "--data-dir", str(tmp_path),
                     "--model-dir", str(tmp_path / "m"), "--batch-sise", "64"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: the train flags after '--': unrecognized arguments: --batch-sise 64")
