"""Follow a submitted job to its end: :func:`wait` polls it, streams the chief's log, logs its
progress, and meanwhile :class:`Diagnosis` says what stops its replicas from running."""

from __future__ import annotations

import datetime as dt
import time

import urllib3
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.lifecycle.client import (log, one_line, server_message, timestamp,
                                                     transient)
from resnet_imagenet.launch.lifecycle.job import JobRun, Outage
from resnet_imagenet.launch.lifecycle.logs import ChiefLogs
from resnet_imagenet.launch.lifecycle.restarts import Restarts

# Container waiting reasons that mean it will not start by itself.
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError", "RunContainerError")
CRASH_LOG_LINES = 3


class NoStart(Exception):
    """No replica ran within --start-timeout; the message is the last reason seen."""


class LostTrack(Exception):
    """The job can no longer be followed: it is gone, or the API server refuses to show it (a
    403 mid-run: the Role changed). The launch deletes it (if it is still there)."""


class OutOfSight(Exception):
    """The API server has been unreachable (or answered 429/5xx) for --api-outage-timeout: the
    launch fails without deleting the job it cannot see; the message says so, and how to check."""


def wait(run: JobRun, deadline: float | None = None) -> dict:
    """Poll the run's job until it succeeds or fails (returned), streaming the chief's log
    meanwhile.

    Raises :class:`~resnet_imagenet.launch.lifecycle.job.Timeout` at ``deadline`` (monotonic),
    :class:`NoStart` when no replica has run for the run's start timeout, :class:`LostTrack` when
    the job is gone or may not be read, :class:`OutOfSight` when polls have failed with transient
    errors for the run's API outage timeout (reported once a minute meanwhile).
    """
    logs = ChiefLogs(run.core, run.backend, run.namespace, run.name, run.output,
                     run.poll_interval, run.request_timeout).start()
    diagnosis = Diagnosis(run)
    restarts = Restarts(run, run.max_restarts)
    seen: set = set()
    replicas = None
    outage = Outage(run, f"to poll {run.what}")
    started_waiting = last_running = time.monotonic()
    ended = False
    try:
        while True:
            try:
                job = run.get()
            except Exception as exc:  # sorted by transient(): retry or give up
                if isinstance(exc, UserError) and not transient(exc):  # 403, 401
                    raise LostTrack(f"cannot follow {run.what} any more: {exc}") from None
                if not transient(exc):
                    raise
                if not outage.failed(exc):
                    raise OutOfSight(_out_of_sight(run, outage)) from None
                run.pause(deadline)
                continue
            # The start clock stands still while the launcher cannot see the replicas.
            unseen = outage.over()
            started_waiting, last_running = started_waiting + unseen, last_running + unseen
            if job is None:
                raise LostTrack(f"{run.what} was deleted before it finished (by "
                                "someone else, or by its TTL)")
            run.created = run.created or timestamp(job["metadata"].get("creationTimestamp"))
            replicas = _log_progress(run, job, seen, replicas)
            if run.backend.finished(job):
                ended = True
                return job
            if diagnosis.running():
                last_running = time.monotonic()
            restarts.check(diagnosis.pods)
            if run.start_timeout is not None and \
                    time.monotonic() - last_running > run.start_timeout:
                raise NoStart(diagnosis.last_reason or (
                    "no replica pod was created, and no event says why" if
                    last_running == started_waiting else "its replicas stopped running"))
            run.pause(deadline)
    finally:
        # A finished job's chief has its last lines to deliver; on a timeout, a signal or an
        # error the job is deleted next, and every second spent here is a second less of the
        # pods' grace period for their preemption checkpoint.
        if ended:
            logs.finish()
        else:
            logs.stop()


def _out_of_sight(run: JobRun, outage: Outage) -> str:
    backend = run.backend
    return (f"gave up following {run.what}: the API server could not be reached for "
            f"{outage.lasted()} (--api-outage-timeout {run.api_outage_timeout:g}s; last: "
            f"{outage.last}); the {backend.kind} was NOT deleted and may still be running in "
            f"namespace {run.namespace}: check it with kubectl -n {run.namespace} get "
            f"{backend.short} {run.name}, delete it with kubectl -n {run.namespace} delete "
            f"{backend.short} {run.name}")


def _log_progress(run: JobRun, job: dict, seen: set, replicas):
    """Log each condition that became True, and the replica counts when they change; the
    counts now."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        key = (cond.get("type"), cond.get("status"), cond.get("lastTransitionTime"),
               cond.get("reason"))
        if key not in seen and cond.get("status") == "True":
            seen.add(key)
            log.info("%s: %s (%s) %s", run.what, cond.get("type"), cond.get("reason", ""),
                     cond.get("message", ""))
    now = run.backend.progress(status)
    if now and now != replicas:
        log.info("%s replicas: %s", run.what, now)
    return now


class Diagnosis:
    """What stops the replicas of a run's job, said once per change: pods Pending with the
    scheduler's reason, containers that cannot start (image pulls, bad config), crash loops with
    their last log lines, and Warning events on the job and its pods (the operator's
    ``FailedCreatePod``: a missing ServiceAccount, a quota, a webhook)."""

    def __init__(self, run: JobRun):
        self._run = run
        # What stops the replicas, as last said per pod or event source ("once per change").
        self._said: dict[tuple, str] = {}
        self.last_reason = ""
        self._events_readable = True
        self.pods: list = []  # as the last look found them

    def running(self) -> bool:
        """Whether a replica runs (or ran); meanwhile, say what stops the others."""
        run = self._run
        try:
            with run.api("list", "pods"):
                pods = run.core.list_namespaced_pod(
                    run.namespace, label_selector=run.backend.pod_selector(run.name),
                    _request_timeout=run.request_timeout).items
        except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
            log.debug("listing the pods of %s: %s", run.what, server_message(exc))
            return False
        self.pods = pods
        running = False
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            phase = pod.status.phase if pod.status else None
            if phase in ("Running", "Succeeded", "Failed") and not self._pod_stuck(pod):
                running = True
            elif phase == "Pending":
                self._pod_pending(pod)
        self._warning_events({p.metadata.name for p in pods})
        return running

    def _say(self, key: tuple, reason: str) -> None:
        """Log why replicas do not start, once per change of ``reason`` for ``key``."""
        self.last_reason = reason
        if self._said.get(key) != reason:
            self._said[key] = reason
            log.warning("%s: %s", self._run.what, reason)

    def _pod_stuck(self, pod) -> bool:
        """Say so and return True when a container of ``pod`` waits in a state it will not leave
        by itself (an image it cannot pull, a crash loop)."""
        stuck = False
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting is None:
                continue
            where = f"pod {pod.metadata.name}"
            if waiting.reason == "CrashLoopBackOff":
                self._say((pod.metadata.name, status.name), f"{where} is crash-looping "
                          f"({status.restart_count} restarts){self._crash_log(pod, status.name)}")
                stuck = True
            elif waiting.reason in STUCK_REASONS:
                self._say((pod.metadata.name, status.name),
                          f"{where} cannot start container {status.name}: {waiting.reason}: "
                          f"{one_line(waiting.message or '')}".rstrip(": "))
                stuck = True
        return stuck

    def _crash_log(self, pod, container: str) -> str:
        run = self._run
        try:
            with run.api("get", "pods/log"):
                text = run.core.read_namespaced_pod_log(
                    pod.metadata.name, run.namespace, container=container, previous=True,
                    tail_lines=CRASH_LOG_LINES, _request_timeout=run.request_timeout)
        except (UserError, ApiException, urllib3.exceptions.HTTPError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"; its last log lines: {' | '.join(lines)}" if lines else ""

    def _pod_pending(self, pod) -> None:
        if self._pod_stuck(pod):
            return
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.message:
                self._say((pod.metadata.name, "scheduling"),
                          f"pod {pod.metadata.name} cannot be scheduled: "
                          f"{one_line(cond.message)}")

    def _warning_events(self, pods: set[str]) -> None:
        """Warning events about the job, its pods and what it creates (named after it)."""
        if not self._events_readable:
            return
        run = self._run
        try:
            with run.api("list", "events"):
                events = run.core.list_namespaced_event(
                    run.namespace, field_selector="type=Warning",
                    _request_timeout=run.request_timeout).items
        except UserError as exc:  # an older Role, without events: say so once, go on without
            self._events_readable = False
            log.warning("cannot read events, so the launcher cannot tell why pods are not "
                        "created: %s", exc)
            return
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.debug("listing events: %s", server_message(exc))
            return

        def when(event):
            return (event.last_timestamp or event.event_time or event.metadata.creation_timestamp
                    or dt.datetime.min.replace(tzinfo=dt.timezone.utc))

        for event in sorted(events, key=lambda e: (when(e), e.metadata.name)):
            if run.created is not None and when(event) < run.created:
                continue  # about an earlier job of the same name
            involved = event.involved_object
            name = involved.name or ""
            if not (name == run.name or name in pods or name.startswith(run.name + "-")):
                continue
            if event.reason in ("FailedScheduling", "Unschedulable"):
                # The pod's PodScheduled condition says it (the scheduler's retries and the
                # operator's copy of it on the job would only repeat it).
                continue
            if involved.kind == run.backend.kind and event.reason in ("FailedCreatePod",
                                                                      "FailedCreate"):
                message = f"its pods cannot be created: {event.reason}: "
            else:
                message = f"{involved.kind} {name}: {event.reason}: "
            # Keyed by the message too: one reason may come with several (one per pod).
            self._say((involved.kind, name, event.reason, event.message),
                      message + one_line(event.message or ""))
