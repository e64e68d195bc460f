"""Why a job cannot start, said while it waits; the launcher's own deadlines; "deleted" meaning
gone. On the real control plane (tests/support/cluster.py); the unschedulable and the
deleted-means-gone cases for both backends (TFJob, TrainJob)."""

from __future__ import annotations

import logging
import time

import pytest

from kubernetes import client

from resnet_imagenet.launch import cli as launch_cli
from resnet_imagenet.launch import tfjob
from tests.support.backends import (TFJOB, apply_overlay, can_i, custom, finish, gone, launching,
                                    running_pods, wait_until)


def launcher_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("resnet_imagenet")]


def test_an_unschedulable_job_says_why_once_then_gives_up_and_deletes_it(
        control_plane, kube_namespace, backend, caplog):
    caplog.set_level(logging.INFO)
    opts = backend.options(kube_namespace, workers=2, gpus_per_worker=1,
                           accelerator="nvidia-tesla-v100")
    with launching(backend, control_plane.admin(), opts, start_timeout=4) as (result, _):
        status = result.result(timeout=90)
    assert status == 1
    what = f"{backend.cluster.kind} {kube_namespace}/resnet-test"
    lines = launcher_lines(caplog)
    why = [r.getMessage() for r in caplog.records
           if r.levelno == logging.WARNING and "cannot be scheduled" in r.getMessage()]
    # The scheduler retries and the launcher polls ~40 times, but each reason is said once (a
    # pod's line again only when the scheduler's message changes).
    pods = {line.split(": ", 2)[1] for line in why}
    assert len(pods) == 2 and all(p.startswith("pod resnet-test-") for p in pods), why
    assert len(why) == len(set(why)) <= 4, why
    assert all(line.startswith(f"{what}: pod ") and
               "didn't match Pod's node affinity/selector" in line for line in why), why
    assert lines[-1].startswith(
        f"{what} did not start within --start-timeout 4s, deleted: pod resnet-test-"), lines[-1]
    assert "didn't match Pod's node affinity/selector" in lines[-1]
    assert backend.get(control_plane.admin(), kube_namespace, "resnet-test") is None
    wait_until(lambda: gone(control_plane, backend, kube_namespace, "resnet-test"),
               what="its pods gone too")  # TrainJob: the JobSet's pods may follow a moment later


def test_a_missing_service_account_is_reported_from_the_operators_events(
        control_plane, kube_namespace, caplog):
    caplog.set_level(logging.INFO)
    opts = TFJOB.options(kube_namespace, service_account="ghost")
    with launching(TFJOB, control_plane.admin(), opts, start_timeout=4) as (result, _):
        assert result.result(timeout=90) == 1
    lines = launcher_lines(caplog)
    why = [r.getMessage() for r in caplog.records
           if r.levelno == logging.WARNING and "FailedCreatePod" in r.getMessage()]
    assert why, lines
    assert len(set(why)) == len(why)  # each reason once
    assert 'serviceaccount "ghost" not found' in why[0]
    assert why[0].startswith(f"TFJob {kube_namespace}/resnet-test: its pods cannot be created: "
                             "FailedCreatePod: ")
    assert 'serviceaccount "ghost" not found' in lines[-1]
    assert TFJOB.get(control_plane.admin(), kube_namespace, "resnet-test") is None


def test_start_timeout_0_waits_for_ever_and_a_running_replica_ends_the_start_wait(
        control_plane, kube_namespace, caplog):
    """start_timeout bounds only the time with no replica running: pods that run (kwok) keep
    the job alive past it, and 0 switches it off."""
    caplog.set_level(logging.INFO)
    began = time.monotonic()
    with launching(TFJOB, control_plane.admin(), TFJOB.options(kube_namespace),
                   start_timeout=8) as (result, _):
        pods = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 2, timeout=30.0)
        time.sleep(max(0.0, began + 9 - time.monotonic()))  # past it, with replicas running
        assert not result.done(), result.result()
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=60) == 0
    args = launch_cli_args(["--start-timeout", "0"])
    assert args.start_timeout == 0
    assert launch_cli_args([]).start_timeout == 1800


def launch_cli_args(flags: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    launch_cli.add_arguments(parser)
    return parser.parse_args([*flags, "--", "--data-dir", "gs://b/d", "--model-dir", "gs://b/m"])


class _CheckOnDeleted(logging.Handler):
    """Asks the API server, at the moment the launcher logs "deleted", whether the job or any
    of its pods exists."""

    def __init__(self, plane, backend, namespace: str, name: str):
        super().__init__()
        self.plane, self.backend, self.namespace, self.name = plane, backend, namespace, name
        self.existed_when_deleted_was_logged: list[bool] = []

    def emit(self, record):
        if record.getMessage().startswith(f"deleted {self.backend.cluster.kind} "):
            self.existed_when_deleted_was_logged.append(not gone(
                self.plane, self.backend, self.namespace, self.name))


def test_deleted_is_logged_once_the_job_is_gone(control_plane, kube_namespace, backend, caplog):
    """TFJob: Foreground, the job goes after its pods. TrainJob: Background (Trainer v2.3 would
    recreate the JobSet of a TrainJob waiting for its dependents), and the launcher waits for
    the pods itself."""
    caplog.set_level(logging.INFO)
    what = f"{backend.cluster.kind} {kube_namespace}/resnet-test"
    check = _CheckOnDeleted(control_plane, backend, kube_namespace, "resnet-test")
    logging.getLogger("resnet_imagenet").addHandler(check)
    try:
        with launching(backend, control_plane.admin(), backend.options(kube_namespace),
                   timeout=4) as (result, _):
            running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
            assert result.result(timeout=60) == 124
    finally:
        logging.getLogger("resnet_imagenet").removeHandler(check)
    assert check.existed_when_deleted_was_logged == [False]
    lines = launcher_lines(caplog)
    policy = {"tfjob": "Foreground: its pods go first",
              "trainjob": "Background: then its pods"}[backend.name]
    assert lines.index(f"deleting {what} (propagationPolicy={policy})") < \
        lines.index(f"deleted {what}")


def test_a_tfjob_that_outlives_the_delete_wait_is_reported_and_the_status_kept(
        control_plane, kube_namespace, caplog):
    caplog.set_level(logging.INFO)
    with launching(TFJOB, control_plane.admin(), TFJOB.options(kube_namespace), timeout=3,
                   delete_wait=2) as (result, _):
        wait_until(lambda: TFJOB.get(control_plane.admin(), kube_namespace, "resnet-test"),
                   timeout=30.0)
        # Something else holds the TFJob (a finalizer nobody removes).
        custom(control_plane).patch_namespaced_custom_object(
            tfjob.GROUP, tfjob.VERSION, kube_namespace, tfjob.PLURAL, "resnet-test",
            {"metadata": {"finalizers": ["example.com/hold"]}})
        assert result.result(timeout=60) == 124
    lines = launcher_lines(caplog)
    assert lines[-1].startswith(f"TFJob {kube_namespace}/resnet-test is still there 2s after "
                                "its deletion")
    assert not any(line.startswith("deleted TFJob") for line in lines)
    custom(control_plane).patch_namespaced_custom_object(
        tfjob.GROUP, tfjob.VERSION, kube_namespace, tfjob.PLURAL, "resnet-test",
        {"metadata": {"finalizers": None}})


def test_the_role_reads_events_and_nothing_wider(control_plane, kube_namespace):
    apply_overlay(control_plane, "gke-gpu", kube_namespace)
    for verb in ("get", "list"):
        for resource in ("events", "events.events.k8s.io"):
            assert can_i(control_plane, kube_namespace, verb, resource,
                         "-n", kube_namespace) == "yes"
    # The launcher polls: no watch, of events or anything else.
    for resource in ("events", "pods", "tfjobs.kubeflow.org"):
        assert can_i(control_plane, kube_namespace, "watch", resource,
                     "-n", kube_namespace) == "no", resource
    for args in (["create", "events", "-n", kube_namespace],
                 ["delete", "events.events.k8s.io", "-n", kube_namespace],
                 ["list", "events", "-n", "default"]):
        assert can_i(control_plane, kube_namespace, *args) == "no", args
    rules = client.RbacAuthorizationV1Api(control_plane.admin()).read_namespaced_role(
        "resnet-imagenet-launcher", kube_namespace).rules
    assert not any("*" in (r.verbs + r.resources + r.api_groups) for r in rules)


def test_a_worker_failing_again_and_again_is_stopped_after_max_restarts(
        control_plane, kube_namespace, caplog):
    """training-operator recreates a pod that exits 137 under restartPolicy ExitCode, and no
    restartCount grows (kubeflow/trainer#2045): the launcher counts the operator's restarts
    and stops the job past --max-restarts, its last line naming the pod, code and reason."""
    caplog.set_level(logging.INFO)
    seen: set = set()
    with launching(TFJOB, control_plane.admin(), TFJOB.options(kube_namespace),
                   max_restarts=2) as (result, _):
        for attempt in range(3):  # the first run and two restarts: a third restart stops it
            def worker_1():
                pods = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 2)
                return [p for p in pods if p.metadata.name.endswith("-worker-1")
                        and p.metadata.uid not in seen] or None
            (pod,) = wait_until(worker_1, timeout=60.0, what=f"worker 1, attempt {attempt + 1}")
            seen.add(pod.metadata.uid)
            finish(control_plane, kube_namespace, [pod], exit_code=137, reason="OOMKilled")
        assert result.result(timeout=90) == 1
    lines = launcher_lines(caplog)
    last = lines[-1]
    assert last.startswith(f"TFJob {kube_namespace}/resnet-test stopped after 3 replica restarts "
                           "(more than --max-restarts 2): worker-1 (pod resnet-test-worker-1) "
                           "exited with code 137 ("), last
    # The reason when a poll saw the failed pod before the operator replaced it (it deletes it
    # at once), else what exit 137 means.
    assert ("(OOMKilled)" in last) or ("(SIGKILL: the kernel's OOM killer" in last), last
    assert f"deleted TFJob {kube_namespace}/resnet-test" in lines
    wait_until(lambda: gone(control_plane, TFJOB, kube_namespace, "resnet-test"),
               what="the job and its pods gone")


def test_max_restarts_below_zero_or_with_trainjob_is_refused_in_one_line(capsys):
    from resnet_imagenet import cli

    train = ["--", "--data-dir", "gs://b/d", "--model-dir", "gs://b/m"]
    assert cli.main(["launch", "--max-restarts", "-1", *train]) == 2
    assert capsys.readouterr().err == (
        "error: --max-restarts -1: must be 0 (no restart) or more\n")
    assert cli.main(["launch", "--backend", "trainjob", "--max-restarts", "3", *train]) == 2
    assert "TrainingRuntime's failurePolicy.maxRestarts decides" in capsys.readouterr().err
