"""The TFJob launcher against a Kubernetes API server on loopback, through the real client.

The test plays the training operator and the kubelet (conditions, pods, container exits, log
lines) with :class:`tests.support.kube.FakeKubernetes`; the launcher sees only HTTP.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from resnet_imagenet import cli
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import cluster, schema, tfjob
from resnet_imagenet.launch.local import free_ports
from tests.support.kube import kube  # noqa: F401  (the fixture)

NS = "team-a"
TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model",
         "--resnet-size", "50"]
POLL = 0.05


def options(**overrides) -> tfjob.TFJobOptions:
    values = {"name": "resnet-test", "namespace": NS, "train_args": TRAIN, "workers": 2}
    values.update(overrides)
    return tfjob.TFJobOptions(**values)


@contextlib.contextmanager
def launching(kube, opts, **kwargs):
    """Run the launcher in a thread (as the operator, the test keeps the main one)."""
    output = io.StringIO()
    kwargs.setdefault("timeout", 30)  # a failing test ends instead of waiting forever
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(cluster.launch_tfjob, opts, api_client=kube.api_client(),
                             poll_interval=POLL, output=output, **kwargs)
        yield future, output


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def start_job(kube, name: str, workers: int = 2) -> list[str]:
    """What the operator does first: pods for every worker, then the Running condition."""
    kube.set_condition(NS, name, "Created")
    pods = [kube.start_pod(NS, name, i) for i in range(workers)]
    kube.set_condition(NS, name, "Running")
    return pods


def test_succeeded_tfjob_exits_0_and_streams_the_chief_log(kube, caplog):
    caplog.set_level(logging.INFO)
    with launching(kube, options()) as (result, output):
        job = kube.wait_for_tfjob(NS)
        chief, other = start_job(kube, job["metadata"]["name"])
        kube.log(NS, chief, "step 100 loss 6.91", "step 200 loss 6.80")
        kube.log(NS, other, "only the chief's log is streamed")
        wait_until(lambda: "step 200" in output.getvalue())
        kube.log(NS, chief, "saved checkpoint ckpt-300")
        kube.terminate(NS, chief, 0)
        kube.terminate(NS, other, 0)
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0

    (created,) = kube.requests_to("POST")
    assert schema.schema_errors(created.body) == []
    assert schema.webhook_errors(created.body) == []
    assert output.getvalue().splitlines() == [
        "[worker-0] step 100 loss 6.91", "[worker-0] step 200 loss 6.80",
        "[worker-0] saved checkpoint ckpt-300",
    ]
    assert "TFJob team-a/resnet-test succeeded" in caplog.text
    assert kube.requests_to("DELETE") == []  # a finished TFJob is left to its TTL


def test_failed_tfjob_exits_nonzero_with_the_failed_replicas_last_lines(kube, caplog):
    with launching(kube, options(), log_tail=5) as (result, output):
        kube.wait_for_tfjob(NS)
        chief, other = start_job(kube, "resnet-test")
        kube.log(NS, other, *[f"step {i}" for i in range(10)])
        kube.log(NS, other, "ValueError: no shards match gs://bucket/tfrecords/train-*")
        kube.terminate(NS, other, 1)
        kube.set_condition(
            NS, "resnet-test", "Failed", "TFJobFailed",
            "TFJob team-a/resnet-test has failed because 1 Worker replica(s) failed.")
        assert result.result(timeout=10) == 1

    lines = output.getvalue().splitlines()
    assert lines == ["[worker-1] step 6", "[worker-1] step 7", "[worker-1] step 8",
                     "[worker-1] step 9",
                     "[worker-1] ValueError: no shards match gs://bucket/tfrecords/train-*"]
    assert "1 Worker replica(s) failed" in caplog.text
    assert "worker-1 (pod resnet-test-worker-1) exited with code 1" in caplog.text


def test_timeout_deletes_the_tfjob_and_its_pods(kube, caplog):
    with launching(kube, options(), timeout=0.5) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        assert result.result(timeout=10) == 124

    assert kube.tfjob(NS, "resnet-test") is None
    assert kube.api_client().call_api(  # the pods went with it (garbage collection)
        f"/api/v1/namespaces/{NS}/pods", "GET", response_type="object",
        _return_http_data_only=True)["items"] == []
    (delete,) = kube.requests_to("DELETE")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert "did not finish within --timeout 0.5s; deleting it" in caplog.text


def test_sigterm_deletes_the_tfjob_before_the_launcher_exits(kube, tmp_path):
    """The CLI in its own process, as in a KFP pod: downward-API env, kubeconfig, SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(POD_NAME="train-launcher-abc", POD_UID="1234-uid", POD_NAMESPACE=NS)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "resnet_imagenet", "launch", "--kubeconfig",
         kube.write_kubeconfig(tmp_path / "kubeconfig", NS), "--run-id", "run-42/task-7",
         "--workers", "2", "--timeout", "120", "--poll-interval", str(POLL), "--", *TRAIN],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        job = kube.wait_for_tfjob(NS, timeout=60)
        name = job["metadata"]["name"]
        start_job(kube, name)
        wait_until(lambda: len(kube.requests_to("GET", f"tfjobs/{name}")) >= 2)  # waiting now
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 143, stderr
    assert kube.tfjob(NS, name) is None
    assert f"SIGTERM received; deleting TFJob {NS}/{name}" in stderr
    assert name == tfjob.job_name("run-42/task-7")
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "train-launcher-abc", "uid": "1234-uid"}]
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 120
    assert job["metadata"]["annotations"][tfjob.RUN_ID_ANNOTATION] == "run-42/task-7"


def test_a_restarted_launcher_reattaches_to_its_tfjob(kube, monkeypatch):
    name = tfjob.job_name("run-7")
    earlier = tfjob.build_tfjob(options(name=name, run_id="run-7"))
    earlier["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": "launcher-1", "uid": "uid-1"}]
    kube.put_tfjob(earlier)
    start_job(kube, name)
    monkeypatch.setenv("POD_NAME", "launcher-2")
    monkeypatch.setenv("POD_UID", "uid-2")
    monkeypatch.setenv("POD_NAMESPACE", NS)

    with launching(kube, options(name=name, run_id="run-7")) as (result, _):
        wait_until(lambda: kube.requests_to("PATCH"))
        kube.set_condition(NS, name, "Succeeded")
        assert result.result(timeout=10) == 0

    assert len(kube.requests_to("POST")) == 1  # answered 409: the one TFJob is the earlier one
    owners = kube.tfjob(NS, name)["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == ["uid-1", "uid-2"]


def test_a_tfjob_of_the_same_name_with_another_spec_is_refused_and_left_alone(kube):
    kube.put_tfjob(tfjob.build_tfjob(options(workers=4)))
    with pytest.raises(UserError, match="already exists with a different spec"):
        cluster.launch_tfjob(options(workers=2), api_client=kube.api_client(), poll_interval=POLL)
    assert kube.tfjob(NS, "resnet-test")["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 4
    assert kube.requests_to("DELETE") == []


def test_polling_rides_out_a_short_api_server_outage(kube, caplog):
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        kube.outage("GET", "tfjobs", requests=3)
        wait_until(lambda: caplog.text.count("polling TFJob team-a/resnet-test failed") == 3)
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0


def test_a_tfjob_deleted_by_someone_else_fails_the_launch(kube, caplog):
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        kube.api_client().call_api(
            f"/apis/kubeflow.org/v1/namespaces/{NS}/tfjobs/resnet-test", "DELETE")
        assert result.result(timeout=10) == 1
    assert "TFJob team-a/resnet-test was deleted before it finished" in caplog.text


def test_chief_log_lines_print_once_across_cut_streams_and_a_recreated_pod(kube):
    with launching(kube, options(workers=1)) as (result, output):
        kube.wait_for_tfjob(NS)
        (chief,) = start_job(kube, "resnet-test", workers=1)
        kube.log(NS, chief, "a", "b")
        wait_until(lambda: "[worker-0] b" in output.getvalue())
        kube.cut_log_streams()  # the launcher resumes with sinceSeconds; a and b come again
        kube.log(NS, chief, "c")
        wait_until(lambda: "[worker-0] c" in output.getvalue())
        kube.terminate(NS, chief, 137, "OOMKilled")  # ExitCode policy: the operator recreates it
        chief = kube.start_pod(NS, "resnet-test", 0)
        kube.log(NS, chief, "d (resumed from checkpoint)")
        kube.terminate(NS, chief, 0)
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0
    assert output.getvalue().splitlines() == [
        "[worker-0] a", "[worker-0] b", "[worker-0] c", "[worker-0] d (resumed from checkpoint)"]
    since = [r.query.get("sinceSeconds") for r in kube.requests if r.path.endswith("/log")]
    assert since[0] is None and since[1] is not None  # a resume asks only for the recent past


def test_no_permission_for_pod_logs_still_follows_the_job(kube, caplog):
    kube.deny("get", "pods/log")
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        chief, _ = start_job(kube, "resnet-test")
        kube.log(NS, chief, "step 1")
        wait_until(lambda: "cannot stream the chief's log" in caplog.text)
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0
    assert tfjob.RBAC_MANIFEST in caplog.text


def run_cli(kube, tmp_path, capsys, *args: str) -> tuple[int, list[str]]:
    status = cli.main(["launch", "--kubeconfig", kube.write_kubeconfig(tmp_path / "kc", NS),
                       "--poll-interval", str(POLL), "--timeout", "30", *args])
    return status, capsys.readouterr().err.strip().splitlines()


def test_forbidden_create_says_which_permission_is_missing(kube, tmp_path, capsys):
    kube.deny("create", "tfjobs")
    status, err = run_cli(kube, tmp_path, capsys, "--", *TRAIN)
    assert status == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: permission denied: the launcher's identity may not create "
                             f"tfjobs.kubeflow.org in namespace '{NS}'")
    assert tfjob.RBAC_MANIFEST in err[0]
    assert kube.requests_to("DELETE") == []  # nothing was created, nothing to clean


def test_unreachable_api_server_is_one_line(tmp_path, capsys):
    (port,) = free_ports(1)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: gone\n"
        f"clusters: [{{name: gone, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: gone, user: {token: x}}]\n"
        "contexts: [{name: gone, context: {cluster: gone, user: gone}}]\n")
    status = cli.main(["launch", "--kubeconfig", str(kubeconfig), "--", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"error: cannot reach the Kubernetes API server at http://127.0.0.1:{port}: "
                   "[Errno 111] Connection refused; check KUBECONFIG/--kubeconfig (or the pod's "
                   "network) and that the cluster is up"]


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers 0: at least 1 worker is needed"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1: must be 0 or more"),
    (["--name", "ResNet_50"], "--name 'ResNet_50' must be lower-case letters"),
    (["--name", "r" * 54, "--workers", "16"], "is too long: the operator names a Service"),
    (["--image", "trainer:latest"], "--image 'trainer:latest' uses ':latest'"),
    (["--memory", "lots"], "--memory 'lots' is not a Kubernetes quantity"),
    (["--toleration", "gpu:Sometimes"], "--toleration 'gpu:Sometimes'"),
])
def test_bad_input_is_refused_before_any_request(kube, tmp_path, capsys, flags, message):
    status, err = run_cli(kube, tmp_path, capsys, *flags, "--", *TRAIN)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert kube.requests == []


def test_local_data_dir_without_a_shared_volume_is_refused(kube, tmp_path, capsys):
    status, err = run_cli(kube, tmp_path, capsys, "--", "--data-dir", "/data/imagenet",
                          "--model-dir", "gs://bucket/model")
    assert status == 2 and "--data-dir /data/imagenet is a local path" in err[0]
    assert kube.requests == []
