"""The TFJob launcher against a Kubernetes API mock on loopback, for what the real control plane
(tests/integration/test_tfjob_control_plane.py) cannot be made to do: fail chosen requests
(an API-server outage, a 403 on pods/log alone), cut log streams at a chosen moment, and record
that bad input sent no request at all.

The test plays the training operator and the kubelet (conditions, pods, container exits, log
lines) with :class:`tests.support.kube.FakeKubernetes`; the launcher sees only HTTP.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from resnet_imagenet import cli
from resnet_imagenet.launch import lifecycle, tfjob
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
        future = pool.submit(lifecycle.launch, tfjob.BACKEND, opts,
                             api_client=kube.api_client(), poll_interval=POLL, output=output,
                             **kwargs)
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


def launcher_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("resnet_imagenet")]


def test_polling_rides_out_a_short_api_server_outage(kube, caplog):
    """Three polls answered 503: one warning when it starts, one line when it is over."""
    caplog.set_level(logging.INFO)
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        kube.outage("GET", "tfjobs", requests=3)
        wait_until(lambda: "reached the API server again after" in caplog.text)
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0
    lines = launcher_lines(caplog)
    warned = [line for line in lines if "cannot reach the API server" in line]
    assert warned == [
        "cannot reach the API server to poll TFJob team-a/resnet-test (503: the server is "
        "currently unable to handle the request); retrying every 0.05s, giving up at 30 min "
        "(--api-outage-timeout)"], lines
    assert sum("reached the API server again after" in line for line in lines) == 1
    assert kube.requests_to("DELETE") == []


def test_a_403_mid_run_is_one_line_naming_the_job_the_namespace_and_the_role(kube, caplog):
    """The Role loses 'get' on TFJobs while the job runs: no retries, no traceback; the last
    line names the job, its namespace and the manifest that grants the right (exit 1, after
    deleting the job, which the launcher may still do)."""
    caplog.set_level(logging.INFO)
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        wait_until(lambda: "replicas:" in caplog.text)
        kube.deny("get", "tfjobs")
        assert result.result(timeout=10) == 1
    last = launcher_lines(caplog)[-1]
    assert "\n" not in last
    assert last.startswith("cannot follow TFJob team-a/resnet-test any more: permission denied: "
                           "the launcher's identity may not get tfjobs"), last
    assert "in namespace 'team-a'" in last and tfjob.RBAC_MANIFEST in last, last
    assert not any(r.exc_info for r in caplog.records)
    assert len(kube.requests_to("DELETE")) == 1
    assert not any("cannot reach the API server" in line for line in launcher_lines(caplog))


def test_a_create_answered_503_is_looked_up_then_tried_again(kube, caplog):
    """A 503 may follow a write that persisted: the launcher looks the job up (not there) and
    creates it again; one job in the end."""
    caplog.set_level(logging.INFO)
    kube.outage("POST", "tfjobs", requests=2)
    with launching(kube, options()) as (result, _):
        kube.wait_for_tfjob(NS)
        start_job(kube, "resnet-test")
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0
    assert len(kube.requests_to("POST")) == 3
    gets = [r for r in kube.requests_to("GET") if r.path.endswith("/tfjobs/resnet-test")]
    assert len(gets) >= 2  # one look-up after each failed create
    lines = launcher_lines(caplog)
    assert sum("cannot reach the API server to create TFJob team-a/resnet-test" in line
               for line in lines) == 1, lines
    assert any(line.startswith("created TFJob team-a/resnet-test") for line in lines)


def test_a_create_given_up_after_the_outage_bound_deletes_what_it_may_have_made(kube, caplog):
    """Every create answered 503 for longer than --api-outage-timeout: exit 1; a 503 may have
    persisted the job, so the launcher deletes it (here: nothing there) and says so."""
    caplog.set_level(logging.INFO)
    kube.outage("POST", "tfjobs", requests=10_000)
    with launching(kube, options(), api_outage_timeout=0.5) as (result, _):
        assert result.result(timeout=10) == 1
    lines = launcher_lines(caplog)
    assert lines[-2].startswith("could not create TFJob team-a/resnet-test: the API server could "
                                "not be reached for "), lines
    assert "(--api-outage-timeout 0.5s; last: 503: the server is currently unable" in lines[-2]
    assert lines[-1] == ("a try may have created TFJob team-a/resnet-test: checked, nothing of "
                         "it is left")
    assert len(kube.requests_to("DELETE")) == 1
    assert kube.tfjob(NS, "resnet-test") is None


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


def test_a_kubeconfig_that_is_not_there_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nonexistent"
    assert cli.main(["launch", "--kubeconfig", str(missing), "--", *TRAIN]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --kubeconfig {missing} is not a file: pass the path of a kubeconfig (kubectl "
        "config view --raw shows yours), or leave the flag out to use $KUBECONFIG or "
        "~/.kube/config"]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{missing}:{tmp_path / 'also-missing'}")
    assert cli.main(["launch", "--", *TRAIN]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: KUBECONFIG={missing}:{tmp_path / 'also-missing'} names no existing file: "
        "point it at a kubeconfig, pass --kubeconfig, or unset it to use ~/.kube/config"]
    # In a pod the service account is used and a stale KUBECONFIG is not read at all: here,
    # without the pod's token file, the in-cluster configuration is what fails.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert cli.main(["launch", "--", *TRAIN]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no usable Kubernetes configuration (")
    assert "KUBECONFIG=" not in line


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers 0: at least 1 worker is needed"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1: must be 0 or more"),
    (["--name", "ResNet_50"], "--name 'ResNet_50' must be lower-case letters"),
    (["--name", "r" * 54, "--workers", "16"], "is too long: the operator names a Service"),
    (["--image", "trainer:latest"], "--image 'trainer:latest' uses ':latest'"),
    (["--memory", "lots"], "--memory 'lots' is not a Kubernetes quantity"),
    (["--toleration", "gpu:Sometimes"], "--toleration 'gpu:Sometimes'"),
    (["--start-timeout", "-1"], "--start-timeout -1: must be 0 (wait for ever) or more"),
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


def test_the_start_clock_stands_still_while_the_api_server_is_away(kube, caplog):
    """--start-timeout 1 s and the polls failing for longer, before any replica ran: the time
    the launcher could not see the job does not count, so the job is not given up on at the
    first poll that succeeds, and it runs once its pods start."""
    caplog.set_level(logging.INFO)
    kube.outage("GET", "tfjobs", requests=40)  # 40 polls 0.05 s apart: ~2 s
    with launching(kube, options(), start_timeout=1.0) as (result, _):
        wait_until(lambda: "reached the API server again after" in caplog.text)
        start_job(kube, "resnet-test")
        kube.set_condition(NS, "resnet-test", "Succeeded")
        assert result.result(timeout=10) == 0
    assert kube.requests_to("DELETE") == []
