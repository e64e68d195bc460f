"""One job on the API server, as the lifecycle follows it: :class:`JobRun`, its settings, its
API calls (each with the verb and resource its 403 message names), its deletion."""

from __future__ import annotations

import datetime as dt
import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.backend import ClusterBackend
from resnet_imagenet.launch.lifecycle.client import (api_errors, duration, log, server_message,
                                                     short_reason)
from resnet_imagenet.launch.runtime import PrefixedOutput

DEFAULT_POLL_INTERVAL = 15.0
DEFAULT_LOG_TAIL = 50
# How long a job may have no replica running (pods unschedulable, never created, images not
# pulled, crash-looping) before the launcher deletes it and fails: --start-timeout; 0 = for ever.
DEFAULT_START_TIMEOUT = 1800.0
# How long "deleting" waits for the job and its pods to be gone.
DEFAULT_DELETE_WAIT = 120.0
# How long the API server may be unreachable (or answer 429/5xx) before the launcher gives up
# following (or creating) the job: --api-outage-timeout; 0 = for ever. A managed control plane's
# upgrade takes minutes; a healthy multi-day run must outlive it.
DEFAULT_API_OUTAGE_TIMEOUT = 1800.0


class Timeout(Exception):
    """The launch's --timeout has passed."""


class JobRun:
    """One job of ``backend``, ``body`` its manifest (with its namespace), from submission (or
    re-attachment) to its end or its deletion.

    :func:`~resnet_imagenet.launch.lifecycle.submit.submit` creates it or re-attaches to it,
    :func:`~resnet_imagenet.launch.lifecycle.wait.wait` follows it, :meth:`delete` removes it.
    """

    def __init__(self, api_client, backend: ClusterBackend, body: dict, *,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, log_tail: int = DEFAULT_LOG_TAIL,
                 output: PrefixedOutput | None = None,
                 request_timeout: tuple[float, float] = (10.0, 60.0),
                 start_timeout: float | None = DEFAULT_START_TIMEOUT,
                 delete_wait: float = DEFAULT_DELETE_WAIT,
                 api_outage_timeout: float | None = DEFAULT_API_OUTAGE_TIMEOUT,
                 max_restarts: int | None = None):
        self.backend = backend
        self.body = body
        self.name = body["metadata"]["name"]
        self.namespace = body["metadata"]["namespace"]
        self.what = f"{backend.kind} {self.namespace}/{self.name}"  # "TFJob team-a/resnet-..."
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = api_client.configuration.host
        self.poll_interval = poll_interval
        self.log_tail = log_tail
        self.output = output or PrefixedOutput()
        self.request_timeout = request_timeout
        self.start_timeout = start_timeout or None  # 0: wait for ever
        self.delete_wait = delete_wait
        self.max_restarts = max_restarts  # None: the job's own policy bounds its restarts
        self.api_outage_timeout = api_outage_timeout or None  # 0: for ever
        self.created: dt.datetime | None = None  # the job's creation: older events are not its
        # Whether a SIGTERM or timeout must delete the job: "no" until a create request is sent
        # (then "maybe", as its outcome is unknown until the server answers) or until the job
        # is known to be ours (created by us, or by an earlier launcher of the same run).
        self.ours = "no"

    def api(self, verb: str, resource: str | None = None):
        """:func:`~resnet_imagenet.launch.lifecycle.client.api_errors` for ``verb`` on
        ``resource`` (default: the job's resource) in the job's namespace."""
        return api_errors(verb, resource or self.backend.resource, self.namespace, self.host,
                          self.backend.rbac_hint)

    def get(self) -> dict | None:
        """The job as the API server has it now, or None when there is none."""
        with self.api("get"):
            try:
                return self.backend.get(self.custom, self.namespace, self.name,
                                        _request_timeout=self.request_timeout)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

    def pause(self, deadline: float | None) -> None:
        """Sleep one poll interval, or until ``deadline`` (monotonic); Timeout once it passed."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise Timeout()
        time.sleep(self.poll_interval if remaining is None else
                   min(self.poll_interval, remaining))

    def pods_left(self) -> bool:
        """Whether any pod of the job is still there (terminating or not)."""
        with self.api("list", "pods"):
            return bool(self.core.list_namespaced_pod(
                self.namespace, label_selector=self.backend.pod_selector(self.name), limit=1,
                _request_timeout=self.request_timeout).items)

    def delete(self, wait: float | None = None) -> bool:
        """Delete the job if it is (or may be) ours (the backend's propagation policy), and wait
        (up to ``wait``, default the delete wait) until neither it nor a pod of it is left. True
        when they are gone (or it was never ours)."""
        wait = self.delete_wait if wait is None else wait
        if self.ours == "no":
            return True
        try:
            with self.api("delete"):
                self.backend.delete(self.custom, self.namespace, self.name,
                                    _request_timeout=self.request_timeout)
            log.info("deleting %s (propagationPolicy=%s)", self.what,
                     "Foreground: its pods go first" if self.backend.propagation_policy ==
                     "Foreground" else f"{self.backend.propagation_policy}: then its pods")
        except ApiException as exc:
            if exc.status == 404:
                return True
            log.error("could not delete %s (%s): delete it with kubectl -n %s delete "
                      "%s %s", self.what, server_message(exc), self.namespace,
                      self.backend.short, self.name)
            return False
        except UserError as exc:
            log.error("could not delete %s: %s", self.what, exc)
            return False
        give_up = time.monotonic() + wait
        while True:
            try:
                job_left = self.get() is not None
                left = job_left or self.pods_left()
            except (UserError, ApiException) as exc:
                log.error("could not check that %s is gone: %s", self.what, server_message(exc))
                return False
            if not left:
                log.info("deleted %s", self.what)
                return True
            if time.monotonic() >= give_up:
                if job_left:
                    log.error("%s is still there %gs after its deletion (pods still terminating, "
                              "or a finalizer holds it): see kubectl -n %s get %s %s -o yaml",
                              self.what, wait, self.namespace, self.backend.short, self.name)
                else:
                    log.error("the pods of %s are still there %gs after its deletion: see "
                              "kubectl -n %s get pods -l %s", self.what, wait, self.namespace,
                              self.backend.pod_selector(self.name))
                return False
            time.sleep(min(self.poll_interval, 1.0, max(give_up - time.monotonic(), 0.01)))


class Outage:
    """Consecutive API calls of a run that failed with a transient error (client.transient):
    a warning when they start, one line a minute while they last, one line when a call succeeds
    again; :meth:`failed` says when the run's --api-outage-timeout has passed."""

    REPORT_EVERY_S = 60.0

    def __init__(self, run: JobRun, doing: str):
        self._run = run
        self._doing = doing  # "to poll TFJob team-a/resnet-..."
        self.began: float | None = None
        self._reports = 0
        self.last = ""  # the last failure, in a few words

    def bound(self) -> str:
        limit = self._run.api_outage_timeout
        return "retrying for ever" if limit is None else f"giving up at {duration(limit)}"

    def failed(self, exc: BaseException) -> bool:
        """Count a failed call; False once the outage has lasted the run's limit."""
        now = time.monotonic()
        self.last = short_reason(exc)
        if self.began is None:
            self.began = now
            log.warning("cannot reach the API server %s (%s); retrying every %gs, %s "
                        "(--api-outage-timeout)", self._doing, self.last,
                        self._run.poll_interval, self.bound())
        elapsed = now - self.began
        limit = self._run.api_outage_timeout
        if limit is not None and elapsed >= limit:
            return False
        if elapsed >= (self._reports + 1) * self.REPORT_EVERY_S:
            self._reports = int(elapsed // self.REPORT_EVERY_S)
            log.warning("still cannot reach the API server after %s (%s); %s",
                        duration(self._reports * self.REPORT_EVERY_S), self.last, self.bound())
        return True

    def over(self) -> float:
        """A call succeeded: say so once if an outage was going on; how long it lasted (0 if
        none)."""
        if self.began is None:
            return 0.0
        lasted = time.monotonic() - self.began
        log.info("reached the API server again after %.0f s", lasted)
        self.began, self._reports = None, 0
        return lasted

    def lasted(self) -> str:
        return duration(0 if self.began is None else time.monotonic() - self.began)
