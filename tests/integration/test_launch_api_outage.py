"""The API server going away under a running launch, and a create whose answer is lost, on the
real control plane (tests/support/cluster.py).

An outage is the real thing: kube-apiserver stopped (SIGTERM) and started again with the same
arguments (:meth:`ControlPlane.apiserver_stopped`); etcd keeps the state; the controllers, the
operators and kwok are restarted after it (see there why). The launcher polls every 0.1 s, so
an outage of ~10 s (6 s held, plus the stop and the start) is well over the 20 failed polls
(~2 s) after which it used to give up and delete the job.

A lost answer is :class:`tests.support.api_proxy.ApiProxy` between the launcher and the API
server: it forwards the create, lets the server persist the job, and cuts the connection instead
of passing on the 201.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from resnet_imagenet import cli
from resnet_imagenet.launch import options
from tests.support.api_proxy import ApiProxy
from tests.support.backends import TFJOB, custom, finish, launching, running_pods, wait_until

POLL = 0.1
OUTAGE_S = 6.0  # the old limit, 20 failed polls 0.1 s apart, fired after ~2 s
TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model"]


def launcher_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("resnet_imagenet")]


def jobs_in(plane, backend, namespace: str) -> list[dict]:
    cluster = backend.cluster
    return custom(plane).list_namespaced_custom_object(
        cluster.group, cluster.version, namespace, cluster.plural)["items"]


def test_a_running_job_outlives_an_api_server_restart_and_its_log_stream_resumes(
        control_plane, kube_namespace, backend, caplog):
    """While the API server is down the launcher warns once and keeps polling; when it is back
    one line says so, the job is there (never deleted), the chief's log goes on (each line
    once), and finishing the pods ends the launch with 0."""
    caplog.set_level(logging.INFO)
    what = f"{backend.cluster.kind} {kube_namespace}/resnet-test"
    # Its own client: the test's admin client is not the launcher's connection pool.
    launcher_client = control_plane.api_client(control_plane.kubeconfig)
    opts = backend.options(kube_namespace)
    with launching(backend, launcher_client, opts, poll_interval=POLL, timeout=150) as (
            result, output):
        pods = running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
        chief = pods[0].metadata.name
        control_plane.pod_log(kube_namespace, chief, ["before the outage"],
                              container=backend.container)
        wait_until(lambda: "before the outage" in output.getvalue(), 30, "the chief's log")
        with control_plane.apiserver_stopped():
            wait_until(lambda: "cannot reach the API server to poll" in caplog.text, 10,
                       "the outage warning")
            time.sleep(OUTAGE_S)
            assert not result.done(), result.result()
        wait_until(lambda: "reached the API server again after" in caplog.text, 30,
                   "the launcher's recovery")
        assert backend.get(control_plane.admin(), kube_namespace, "resnet-test") is not None
        control_plane.pod_log(kube_namespace, chief, ["after the outage"],
                              container=backend.container)
        wait_until(lambda: "after the outage" in output.getvalue(), 90,
                   "the chief's log after the outage")
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=60) == 0
    lines = launcher_lines(caplog)
    warned = [line for line in lines if "cannot reach the API server" in line]
    assert len(warned) == 1, warned  # no line a poll: one when it starts (then one a minute)
    assert warned[0].startswith(f"cannot reach the API server to poll {what} (")
    assert warned[0].endswith("retrying every 0.1s, giving up at 30 min (--api-outage-timeout)")
    recovered = [line for line in lines if line.startswith("reached the API server again")]
    assert len(recovered) == 1, lines
    # Polls failed for longer than the old limit of 20 failed polls (~2 s at 0.1 s) by far.
    times = {r.getMessage(): r.created for r in caplog.records}
    assert times[recovered[0]] - times[warned[0]] > OUTAGE_S
    assert not any(line.startswith("deleting") for line in lines), lines
    assert lines[-1] == f"{what} succeeded"
    # Each line of the chief once, across the cut stream.
    assert output.getvalue().splitlines() == [f"[{backend.chief}] before the outage",
                                              f"[{backend.chief}] after the outage"]


def test_at_the_outage_bound_the_step_fails_without_deleting_the_job(
        control_plane, kube_namespace, caplog):
    """Through the CLI, with --api-outage-timeout 3 and the API server down for longer: exit 1,
    the last line names the job and says it was not deleted and how to check; once the server
    is back the job is there, running."""
    caplog.set_level(logging.INFO)
    argv = ["launch", "--kubeconfig", str(control_plane.kubeconfig), "--namespace",
            kube_namespace, "--name", "resnet-test", "--workers", "2", "--cpu", "1",
            "--memory", "1Gi", "--poll-interval", str(POLL), "--api-outage-timeout", "3",
            "--timeout", "120", "--", *TRAIN]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(cli.main, argv)
        pods = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 2)
        with control_plane.apiserver_stopped():
            status = future.result(timeout=30)
    assert status == 1
    last = launcher_lines(caplog)[-1]
    assert last.startswith(f"gave up following TFJob {kube_namespace}/resnet-test: the API "
                           "server could not be reached for 3 s (--api-outage-timeout 3s; "
                           "last: "), last
    assert last.endswith(
        f"the TFJob was NOT deleted and may still be running in namespace {kube_namespace}: "
        f"check it with kubectl -n {kube_namespace} get tfjob resnet-test, delete it with "
        f"kubectl -n {kube_namespace} delete tfjob resnet-test"), last
    assert not any(line.startswith("deleting") for line in launcher_lines(caplog))
    job = TFJOB.get(control_plane.admin(), kube_namespace, "resnet-test")
    assert job is not None and not job["metadata"].get("deletionTimestamp")
    assert {p.metadata.uid for p in running_pods(
        control_plane, TFJOB, kube_namespace, "resnet-test", 2)} == {p.metadata.uid for p in pods}
    custom(control_plane).delete_namespaced_custom_object(
        TFJOB.cluster.group, TFJOB.cluster.version, kube_namespace, TFJOB.cluster.plural,
        "resnet-test")


def test_a_create_whose_answer_is_lost_adopts_the_job_the_server_made(
        control_plane, kube_namespace, backend, caplog):
    """The server persisted the job, the 201 never arrived: the launcher looks it up, finds its
    spec hash and run id, adopts it (one line) and follows it to its end; one job, one create."""
    caplog.set_level(logging.INFO)
    opts = backend.options(kube_namespace, run_id="run-lost-answer")
    plural = backend.cluster.plural
    with ApiProxy(control_plane) as proxy:
        proxy.lose_answer("POST", f"/{plural}")
        with launching(backend, proxy.api_client(), opts, poll_interval=POLL) as (result, _):
            pods = running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
            finish(control_plane, kube_namespace, pods)
            assert result.result(timeout=60) == 0
    assert [(method, status) for method, _, status in proxy.lost] == [("POST", 201)]
    assert [m for m, path in proxy.requests if m == "POST" and plural in path] == ["POST"]
    (job,) = jobs_in(control_plane, backend, kube_namespace)
    annotations = job["metadata"]["annotations"]
    assert annotations[options.RUN_ID_ANNOTATION] == "run-lost-answer"
    assert annotations[options.SPEC_HASH_ANNOTATION] == \
        backend.build(opts)["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION]
    lines = launcher_lines(caplog)
    what = f"{backend.cluster.kind} {kube_namespace}/resnet-test"
    adopted = [line for line in lines if line.startswith("adopted")]
    assert len(adopted) == 1 and adopted[0].startswith(
        f"adopted {what}: the create whose answer was lost had made it (created "), lines
    assert not any(line.startswith(("created", "deleting")) for line in lines), lines


def test_a_lost_create_answer_then_already_exists_on_the_retry_adopts_the_job(
        control_plane, kube_namespace, caplog):
    """The look-up after the lost answer comes before the create is done (404, then the job is
    there), so the create is sent again: the 409 AlreadyExists it gets is the same case, the job
    is adopted."""
    caplog.set_level(logging.INFO)
    opts = TFJOB.options(kube_namespace, run_id="run-409")
    with ApiProxy(control_plane) as proxy:
        proxy.lose_answer("POST", "/tfjobs")
        proxy.fail("GET", "/tfjobs/resnet-test", 404)
        with launching(TFJOB, proxy.api_client(), opts, poll_interval=POLL) as (result, _):
            pods = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 2)
            finish(control_plane, kube_namespace, pods)
            assert result.result(timeout=60) == 0
    assert [m for m, path in proxy.requests if m == "POST" and "/tfjobs" in path] == ["POST"] * 2
    assert len(jobs_in(control_plane, TFJOB, kube_namespace)) == 1
    lines = launcher_lines(caplog)
    assert sum(line.startswith(f"adopted TFJob {kube_namespace}/resnet-test: ")
               for line in lines) == 1, lines
