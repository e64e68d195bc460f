"""The launcher's view of its job's logs: :class:`ChiefLogs` streams the chief's log into the
launcher's output; :func:`report_failure` logs why the job failed and the last lines of each
replica that exited non-zero."""

from __future__ import annotations

import math
import threading
import time

import urllib3
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.backend import ClusterBackend
from resnet_imagenet.launch.lifecycle.client import log, server_message
from resnet_imagenet.launch.lifecycle.job import JobRun
from resnet_imagenet.launch.runtime import PrefixedOutput


def terminated(container_status) -> object | None:
    """The terminated state of a container status (current, else the last one), if any."""
    if container_status is None:
        return None
    for state in (container_status.state, container_status.last_state):
        if state is not None and state.terminated is not None:
            return state.terminated
    return None


def container_status(pod, containers: tuple[str, ...]):
    """The status of the pod's first container named in ``containers``, or None."""
    statuses = {s.name: s for s in (pod.status.container_statuses or [])} if pod.status else {}
    return next((statuses[name] for name in containers if name in statuses), None)


def _log_line(raw: bytes) -> tuple[str, str]:
    """Split a ``timestamps=true`` log line into (timestamp, text)."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    stamp, _, text = line.partition(" ")
    return stamp, text


def _stamp_key(stamp: str) -> tuple[str, int]:
    """An ordering key for kubelet's RFC 3339 UTC timestamps, whose nanoseconds drop trailing
    zeros (``...:05.1Z`` is later than ``...:05.09Z``, which plain string order gets wrong)."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return seconds, int(fraction.ljust(9, "0")[:9]) if fraction.isdigit() else 0


class ChiefLogs:
    """Streams the training container's log of the chief's pod into the launcher's output, each
    line once, across cut connections and restarts.

    A stream that ends is reopened with ``sinceSeconds`` reaching a little before the last line
    received (clock skew and latency), and lines not newer than the last one printed are skipped
    by their kubelet timestamps. The runtime stamps every line of one write alike (a traceback),
    so among lines of equal timestamp as many are skipped as were printed. A pod that the
    operator recreates (restartPolicy ExitCode; a Job's replacement pod, under another name) or a
    container that the kubelet restarts (OnFailure) is followed the same way; a container that
    has terminated is not asked again.
    """

    RESUME_MARGIN_S = 10
    DRAIN_S = 10.0  # for the stream of a terminated container to deliver its last lines

    def __init__(self, core, backend: ClusterBackend, namespace: str, job: str,
                 output: PrefixedOutput, poll_interval: float,
                 request_timeout: tuple[float, float]):
        self._core = core
        self._backend = backend
        self._namespace = namespace
        self._job = job
        self._pod = self._container = ""  # the chief's pod and container, once found
        self._prefix = backend.chief_prefix
        self._output = output
        self._poll_interval = poll_interval
        self._request_timeout = request_timeout
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._last_stamp: tuple[str, int] | None = None
        self._printed_at_last_stamp = 0
        self._last_received: float | None = None
        self._response = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{job}", daemon=True)

    def start(self) -> "ChiefLogs":
        self._thread.start()
        return self

    def finish(self) -> None:
        """Stop: at once if the chief still runs (its pod is being cleaned up), else once its
        terminated container's stream has delivered the last lines."""
        self._finishing.set()
        try:
            instance = self._instance()
        except Exception:  # only decides how long to wait
            instance = None
        if instance is None or instance[1]:
            self._thread.join(self.DRAIN_S)
        self.stop()

    def stop(self) -> None:
        """Stop now, without a request and without waiting for the stream."""
        self._stop.set()
        response = self._response
        if response is not None and hasattr(response, "shutdown"):  # urllib3 >= 2.3
            response.shutdown()  # unblocks the thread's read

    def _instance(self):
        """``(pod UID, container ID)`` and whether that container has terminated; None while
        there is no container to read (no pod yet, or still being created)."""
        try:
            pod = self._backend.chief_pod(self._core, self._namespace, self._job,
                                          self._request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if pod is None:
            return None
        status = container_status(pod, self._backend.containers)
        if status is None or status.state is None or not status.container_id or (
                status.state.running is None and status.state.terminated is None):
            return None
        self._pod, self._container = pod.metadata.name, status.name
        return (pod.metadata.uid, status.container_id), status.state.terminated is not None

    def _run(self) -> None:
        finished: set = set()
        while not self._stop.is_set():
            try:
                instance = self._instance()
                if instance is None or instance[0] in finished:
                    if self._finishing.is_set():
                        return
                    self._stop.wait(self._poll_interval)
                    continue
                self._stream()
                key, was_terminated = instance
                if was_terminated:  # the stream of a finished container is complete
                    finished.add(key)
            except ApiException as exc:
                if exc.status == 403:
                    log.warning("cannot stream the chief's log: %s; grant 'get' on pods and "
                                "pods/log (%s)", server_message(exc), self._backend.rbac_manifest)
                    return
                log.debug("log stream of %s: %s", self._pod or self._job, server_message(exc))
                self._stop.wait(self._poll_interval)
            except urllib3.exceptions.HTTPError as exc:  # cut or timed out: resume
                log.debug("log stream of %s: %s", self._pod or self._job, exc)
                self._stop.wait(self._poll_interval)

    def _stream(self) -> None:
        since = {}
        if self._last_received is not None:
            elapsed = time.monotonic() - self._last_received
            since["since_seconds"] = math.ceil(elapsed) + self.RESUME_MARGIN_S
        response = self._response = self._core.read_namespaced_pod_log(
            self._pod, self._namespace, container=self._container, follow=True,
            timestamps=True,
            _preload_content=False, _request_timeout=self._request_timeout, **since)
        seen_at_last_stamp = 0
        try:
            for raw in response:
                if self._stop.is_set():
                    return
                stamp, text = _log_line(raw)
                key = _stamp_key(stamp)
                if self._last_stamp is not None and key <= self._last_stamp:
                    if key < self._last_stamp:
                        continue
                    seen_at_last_stamp += 1
                    if seen_at_last_stamp <= self._printed_at_last_stamp:
                        continue
                    self._printed_at_last_stamp += 1
                else:
                    self._last_stamp, self._printed_at_last_stamp = key, 1
                    seen_at_last_stamp = 1
                self._last_received = time.monotonic()
                self._output.write(self._prefix, text)
        finally:
            self._response = None
            response.release_conn()


def report_failure(run: JobRun, job: dict) -> None:
    """Log why the job failed and the last lines of each replica that exited non-zero; the
    last line says which pod failed and why (what a KFP step's log shows at its end)."""
    cond = run.backend.failure(job) or {}
    reason = " ".join(filter(None, (cond.get("reason", ""), cond.get("message", ""))))
    log.error("%s failed: %s", run.what, reason)
    failed = []
    try:
        with run.api("list", "pods"):
            pods = run.core.list_namespaced_pod(
                run.namespace, label_selector=run.backend.pod_selector(run.name),
                _request_timeout=run.request_timeout).items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            status = container_status(pod, run.backend.containers)
            ended = terminated(status)
            if ended is None or not ended.exit_code:
                continue
            replica = run.backend.replica_name(pod)
            failed.append(f"{replica} (pod {pod.metadata.name}) exited with code "
                          f"{ended.exit_code} ({ended.reason or 'Error'})")
            log.error("%s; its last %d log lines:", failed[-1], run.log_tail)
            # Restarted since it failed: the failed run is the previous container's.
            previous = status.state is None or status.state.terminated is None
            try:
                with run.api("get", "pods/log"):
                    text = run.core.read_namespaced_pod_log(
                        pod.metadata.name, run.namespace, container=status.name,
                        tail_lines=run.log_tail, previous=previous,
                        _request_timeout=run.request_timeout)
            except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
                log.error("could not read the log of pod %s: %s", pod.metadata.name,
                          server_message(exc))
                continue
            for line in text.splitlines():
                run.output.write(replica, line)
        if not failed:
            log.error("no failed pod of %s is left to read logs from (its clean-up policy "
                      "or TTL removed them); see kubectl -n %s describe %s %s", run.what,
                      run.namespace, run.backend.short, run.name)
    except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
        log.error("could not list the failed replicas: %s", server_message(exc))
    log.error("%s failed: %s", run.what, "; ".join(failed) or reason or "no reason given")
