"""Replica failures of a TFJob, counted by the launcher, which stops a crash loop.

Under ``restartPolicy: ExitCode`` (and ``OnFailure``) training-operator deletes a failed pod and
creates it again, so no container's ``restartCount`` -- what ``runPolicy.backoffLimit`` counts
-- ever grows (kubeflow/trainer#2045): a worker OOM-killed on every attempt would be recreated
until ``--timeout``, and ``--start-timeout`` cannot see it (its pods reach Running). The
operator's own record counts instead: one Warning event ``TFJobRestarting`` on the job per
restart (aggregated: its ``count``), with the ``Pod: NS.POD exited with code N`` events naming
the pod; a failed pod the launcher sees before it is replaced gives the reason (OOMKilled).
Past ``--max-restarts`` the launch stops the job, its last line naming the pod, the exit code
and the reason.

A TrainJob needs none of this: its runtime's JobSet ``failurePolicy.maxRestarts`` bounds it.
"""

from __future__ import annotations

import datetime as dt
import re

import urllib3
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.lifecycle.client import log, server_message
from resnet_imagenet.launch.lifecycle.job import JobRun
from resnet_imagenet.launch.lifecycle.logs import container_status, terminated

DEFAULT_MAX_RESTARTS = 5
EXITED_RE = re.compile(r"Pod: [^.]+\.(\S+) exited with code (-?\d+)")
SIGNALS = {137: "SIGKILL: the kernel's OOM killer, or a kill after the grace period",
           143: "SIGTERM", 134: "SIGABRT", 139: "SIGSEGV"}


class TooManyRestarts(Exception):
    """The job's replicas failed more often than ``--max-restarts``; the message says which."""


class Restarts:
    """Counts a run's replica restarts at every poll (:meth:`check`); TooManyRestarts past the
    limit. ``limit`` None: the backend keeps its own (``backend.restart_reason`` None)."""

    def __init__(self, run: JobRun, limit: int | None):
        self._run = run
        self._reason = getattr(run.backend, "restart_reason", None)
        self.limit = limit if self._reason else None
        self.count = 0
        self._failed: dict[str, tuple[str, str, int, str]] = {}  # pod uid -> what we saw
        self._events_readable = True

    def check(self, pods: list) -> None:
        if self.limit is None:
            return
        for pod in pods:
            self._saw(pod)
        count, exited = self._from_events()
        if count > self.count:
            self.count = count
            log.warning("%s: %d replica restart%s (of at most %d, --max-restarts)%s",
                        self._run.what, count, "s" if count != 1 else "", self.limit,
                        f"; the last: {self._describe(exited)}" if exited else "")
        if self.count > self.limit:
            raise TooManyRestarts(
                f"{self._run.what} stopped after {self.count} replica restarts (more than "
                f"--max-restarts {self.limit}): {self._describe(exited)}; fix what makes it "
                "fail (an OOM kill: raise --memory or lower the batch per GPU), or raise "
                "--max-restarts")

    def _saw(self, pod) -> None:
        ended = terminated(container_status(pod, self._run.backend.containers))
        if ended is not None and ended.exit_code:
            self._failed[pod.metadata.uid] = (
                self._run.backend.replica_name(pod), pod.metadata.name, ended.exit_code,
                ended.reason or "")

    def _describe(self, exited: tuple[str, int] | None) -> str:
        """``worker-1 (pod NAME) exited with code 137 (OOMKilled)`` for the last failure."""
        seen = list(self._failed.values())
        if exited is not None:
            pod, code = exited
            match = [s for s in seen if s[1] == pod and s[2] == code]
            replica, reason = (match[-1][0], match[-1][3]) if match else (
                pod[len(self._run.name) + 1:] if pod.startswith(self._run.name + "-") else pod,
                "")
        elif seen:
            replica, pod, code, reason = seen[-1]
        else:
            return "no failed pod was seen"
        why = reason or SIGNALS.get(code, "Error")
        return f"{replica} (pod {pod}) exited with code {code} ({why})"

    def _from_events(self) -> tuple[int, tuple[str, int] | None]:
        """The restarts the operator recorded on the job, and the last non-zero exit it named."""
        run = self._run
        if not self._events_readable:
            return self.count, None
        try:
            with run.api("list", "events"):
                events = run.core.list_namespaced_event(
                    run.namespace, field_selector=f"involvedObject.name={run.name}",
                    _request_timeout=run.request_timeout).items
        except UserError as exc:  # an older Role without events: the pods are all there is
            self._events_readable = False
            log.warning("cannot read events, so the launcher cannot count restarts of %s: %s",
                        run.what, exc)
            return self.count, None
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.debug("listing the events of %s: %s", run.what, server_message(exc))
            return self.count, None

        def when(event):
            return (event.last_timestamp or event.event_time or event.metadata.creation_timestamp
                    or dt.datetime.min.replace(tzinfo=dt.timezone.utc))

        count, exited = 0, None
        for event in sorted(events, key=lambda e: (when(e), e.metadata.name)):
            if run.created is not None and when(event) < run.created:
                continue  # an earlier job of the same name
            if event.reason == self._reason:
                count += event.count or 1
            match = EXITED_RE.search(event.message or "")
            if match and int(match.group(2)) != 0:
                exited = (match.group(1), int(match.group(2)))
        return count, exited
