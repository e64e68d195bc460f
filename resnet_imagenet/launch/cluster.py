"""One lifecycle for every cluster backend: submit (or re-attach), follow, stream, clean up.

Each backend (:mod:`resnet_imagenet.launch.tfjob`, :mod:`resnet_imagenet.launch.trainjob`) only
builds its manifest, a plain dict, without I/O. Everything that talks to the API server is here,
the same for both, described to the lifecycle by a :class:`JobKind`:

* **Exit status follows the job.** The launcher waits for the job's terminal condition and exits
  non-zero when it failed, printing the last log lines of the replicas that exited non-zero.
* **Nothing left running after a timeout or a cancelled run.** On ``--timeout`` and on SIGTERM
  (how KFP cancels a run) the launcher deletes the job, ``propagationPolicy: Foreground`` so its
  pods go first, before it exits; an ``ownerReference`` to the launcher's pod lets Kubernetes'
  garbage collector delete the job if the launcher is killed outright (SIGKILL, node loss).
* **Why it does not start.** While no replica runs, the launcher says what stops them, once per
  change: pods Pending with the scheduler's reason, Warning events of the operator (pods it
  cannot create: a missing ServiceAccount, a quota), images not pulled, crash loops with their
  last log lines. After ``--start-timeout`` with no replica running it deletes the job and fails
  with the last reason.
* **The deadline is the launcher's.** ``--timeout`` is enforced here; the operator's
  ``activeDeadlineSeconds`` is set as well, but training-operator v1.9 checks it only when
  another event wakes the job up. "Deleted" is logged once the job is gone, not when the delete
  was accepted (Foreground: its pods go first); a job still there after a bound is reported.
* **Logs.** The chief's log (worker/node 0) streams into the launcher's own log as
  ``[worker-0] ...``, across container restarts and recreated pods, each line once.
* **Recovery when the launcher pod restarted.** The job's name is derived from the KFP run
  (``--run-id``), so a restarted launcher finds its job and re-attaches instead of creating a
  second one; an annotation holds a hash of the spec, and a job of that name with another spec is
  refused rather than adopted.
* **One-line errors.** 403 names the verb and resource the identity lacks and the manifest that
  grants it; 409 is a re-attach (or a refusal, see above); 404 while following means someone
  else deleted the job; an unreachable server says where it looked.

The launcher polls the job (a GET every ``poll_interval`` seconds) rather than watching it: a
multi-day wait then survives API-server restarts, expired watches (410 Gone) and proxies that cut
long-lived connections, at the cost of one small request per interval. Logs stream continuously.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterator

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import tfjob, trainjob
from resnet_imagenet.launch.runtime import (FAILED, TIMED_OUT, PrefixedOutput, Terminated,
                                            check_counts, terminate_on_signals)

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 15.0
DEFAULT_LOG_TAIL = 50
# How long a job may have no replica running (pods unschedulable, never created, images not
# pulled, crash-looping) before the launcher deletes it and fails: --start-timeout; 0 = for ever.
DEFAULT_START_TIMEOUT = 1800.0
# How long "deleting" waits for the job to be gone (Foreground: its pods terminate first); after
# a signal less, to exit within the pod's grace period (30 s by default) before a SIGKILL.
DEFAULT_DELETE_WAIT = 120.0
SIGNAL_DELETE_WAIT = 20.0
# Container waiting reasons that mean it will not start by itself.
_STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                  "CreateContainerConfigError", "CreateContainerError", "RunContainerError")
CRASH_LOG_LINES = 3
# Consecutive failed polls (API server unreachable or 5xx) before the launcher gives up.
MAX_POLL_FAILURES = 20
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
SPEC_HASH_ANNOTATION = tfjob.SPEC_HASH_ANNOTATION


@dataclass(frozen=True)
class JobKind:
    """What the lifecycle needs to know of one backend's custom resource and of its pods."""

    group: str
    version: str
    plural: str
    kind: str
    containers: tuple[str, ...]  # the training containers, whose logs are streamed and quoted
    succeeded: str  # the condition types that end the job
    failed: str
    rbac_manifest: str  # the file with the Role that grants the launcher's rights
    rbac_hint: str  # how a 403 message says to apply it
    installer: str  # what provides the CRD and its controller, with the version targeted
    pod_selector: Callable[[str], str]  # job name -> label selector of all its pods
    # (core API, namespace, job name, request timeout) -> the chief's pod, or None
    chief_pod: Callable[..., object]
    replica_name: Callable[[object], str]  # a pod -> "worker-1"
    progress: Callable[[dict], object]  # a job's status -> what changes when replicas do
    chief_prefix: str = "worker-0"

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"

    @property
    def short(self) -> str:
        """What kubectl calls it: ``kubectl get tfjob NAME``."""
        return self.kind.lower()



class ApiUnreachable(UserError):
    """The API server could not be reached (refused, DNS, TLS, timeout).

    ``request_sent`` is False when no connection was ever made, so the request cannot have had
    an effect; after a cut or a read timeout it may have.
    """

    def __init__(self, message: str, request_sent: bool):
        super().__init__(message)
        self.request_sent = request_sent


def connect(kubeconfig: str | None = None, context: str | None = None):
    """An ``ApiClient`` and the default namespace: kubeconfig when named, else in a pod its
    service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            with open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
                namespace = f.read().strip()
        else:
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                active = next(c for c in contexts if c["name"] == context)
            namespace = active.get("context", {}).get("namespace", "")
    except (config.ConfigException, OSError, StopIteration) as exc:
        raise UserError(
            f"no usable Kubernetes configuration ({str(exc).strip() or type(exc).__name__}): "
            "set KUBECONFIG or pass --kubeconfig, or run the launcher in a pod"
        ) from None
    return client.ApiClient(configuration), namespace or "default"


def _server_message(exc: Exception) -> str:
    """One line for an error: an API error's Status message (the client's own ``str`` dumps
    headers and body over many lines), else the error's text."""
    if not hasattr(exc, "body"):
        return str(exc)
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _timestamp(value: str | None) -> dt.datetime | None:
    """An RFC 3339 timestamp of the API (``2026-01-02T03:04:05Z``) as an aware datetime."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _webhook_denial(exc: ApiException) -> bool:
    """A 403 from an admission webhook (it refuses the object), not from RBAC."""
    return exc.status == 403 and "admission webhook" in _server_message(exc)


def _connection_reason(reason: Exception) -> str:
    """The last, telling part of urllib3's nested messages ("[Errno 111] Connection refused")."""
    return str(reason).split(": ")[-1].strip() or type(reason).__name__


@contextlib.contextmanager
def api_errors(verb: str, resource: str, namespace: str, host: str,
               rbac: str = tfjob.RBAC_HINT) -> Iterator[None]:
    """Turn refusals and unreachable servers into one-line UserErrors that say what to fix."""
    try:
        yield
    except ApiException as exc:
        if exc.status == 403 and not _webhook_denial(exc):
            raise UserError(
                f"permission denied: the launcher's identity may not {verb} {resource} in "
                f"namespace '{namespace}' (API server: {_server_message(exc)}); grant it with "
                f"{rbac} or run the launcher with a "
                "service account bound to that Role"
            ) from None
        if exc.status == 401:
            raise UserError(
                f"the Kubernetes API server at {host} did not accept the launcher's credentials "
                "(401 Unauthorized): refresh the kubeconfig's token or check the service account"
            ) from None
        raise
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ApiUnreachable(
            f"cannot reach the Kubernetes API server at {host}: {_connection_reason(reason)}; "
            "check KUBECONFIG/--kubeconfig (or the pod's network) and that the cluster is up",
            request_sent=not isinstance(reason, urllib3.exceptions.ConnectTimeoutError),
        ) from None


def _transient(exc: BaseException) -> bool:
    """Worth another poll: the server is unreachable for now, overloaded, or restarting."""
    status = getattr(exc, "status", None) or 0
    return isinstance(exc, ApiUnreachable) or status == 429 or status >= 500


def launcher_pod_owner(namespace: str) -> dict | None:
    """An ownerReference to the pod this launcher runs in (downward API env), or None.

    ``POD_NAME``/``POD_UID`` (or KFP v2's ``KFP_POD_NAME``/``KFP_POD_UID``) name it. The owner must
    live in the job's namespace, as Kubernetes does not allow owners across namespaces.
    ``blockOwnerDeletion`` stays unset: setting it needs the right to update the pod's finalizers.
    """
    name = os.environ.get("POD_NAME") or os.environ.get("KFP_POD_NAME")
    uid = os.environ.get("POD_UID") or os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    pod_namespace = os.environ.get("POD_NAMESPACE")
    if pod_namespace is None and os.path.exists(SERVICE_ACCOUNT_NAMESPACE_FILE):
        with open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
            pod_namespace = f.read().strip()
    if pod_namespace and pod_namespace != namespace:
        log.warning("the launcher pod is in namespace %s and the job in %s: no ownerReference, "
                    "so only the launcher itself can clean the job up", pod_namespace, namespace)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


class _Timeout(Exception):
    """The launch's --timeout has passed."""


class _NoStart(Exception):
    """No replica ran within --start-timeout; the message is the last reason seen."""


class _LostTrack(Exception):
    """The job can no longer be followed: it is gone, or the API server has been away too
    long."""


def _condition(job: dict, ctype: str) -> dict | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def _terminated(container_status) -> object | None:
    """The terminated state of a container status (current, else the last one), if any."""
    if container_status is None:
        return None
    for state in (container_status.state, container_status.last_state):
        if state is not None and state.terminated is not None:
            return state.terminated
    return None


def _container_status(pod, containers: tuple[str, ...]):
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
    """Streams the training container's log of the chief's pod into the launcher's output, each line
    once, across cut connections and restarts.

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

    def __init__(self, core, kind: JobKind, namespace: str, job: str, output: PrefixedOutput,
                 poll_interval: float, request_timeout: tuple[float, float]):
        self._core = core
        self._kind = kind
        self._namespace = namespace
        self._job = job
        self._pod = self._container = ""  # the chief's pod and container, once found
        self._prefix = kind.chief_prefix
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
        self._stop.set()
        response = self._response
        if response is not None and hasattr(response, "shutdown"):  # urllib3 >= 2.3
            response.shutdown()  # unblocks the thread's read

    def _instance(self):
        """``(pod UID, container ID)`` and whether that container has terminated; None while
        there is no container to read (no pod yet, or still being created)."""
        try:
            pod = self._kind.chief_pod(self._core, self._namespace, self._job,
                                       self._request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if pod is None:
            return None
        status = _container_status(pod, self._kind.containers)
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
                                "pods/log (%s)", _server_message(exc), self._kind.rbac_manifest)
                    return
                log.debug("log stream of %s: %s", self._pod or self._job, _server_message(exc))
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


class JobRun:
    """One job of ``kind``, from submission (or re-attachment) to its end or its deletion."""

    def __init__(self, api_client, kind: JobKind, body: dict, *,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, log_tail: int = DEFAULT_LOG_TAIL,
                 output: PrefixedOutput | None = None,
                 request_timeout: tuple[float, float] = (10.0, 60.0),
                 start_timeout: float | None = DEFAULT_START_TIMEOUT,
                 delete_wait: float = DEFAULT_DELETE_WAIT):

        self.kind = kind
        self.body = body
        self.name = body["metadata"]["name"]
        self.namespace = body["metadata"]["namespace"]
        self.ref = f"{self.namespace}/{self.name}"
        self.what = f"{kind.kind} {self.ref}"  # "TFJob team-a/resnet-train-..."
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._host = api_client.configuration.host
        self._poll_interval = poll_interval
        self._log_tail = log_tail
        self._output = output or PrefixedOutput()
        self._timeout = request_timeout
        self._start_timeout = start_timeout or None  # 0: wait for ever
        self._delete_wait = delete_wait
        # What stops the replicas, as last said per pod or event source ("once per change").
        self._said: dict[tuple, str] = {}
        self.last_reason = ""
        self._events_readable = True
        self._created: dt.datetime | None = None  # the job's creation: older events are not its
        # Whether a SIGTERM or timeout must delete the job: "no" until a create request is sent
        # (then "maybe", as its outcome is unknown until the server answers) or until the job
        # is known to be ours (created by us, or by an earlier launcher of the same run).
        self._ours = "no"

    # -- API calls, each with the verb and resource its 403 message names --

    def _api(self, verb: str, resource: str | None = None):
        return api_errors(verb, resource or self.kind.resource, self.namespace, self._host,
                          self.kind.rbac_hint)

    def _coordinates(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def _get(self) -> dict | None:

        with self._api("get"):
            try:
                return self._custom.get_namespaced_custom_object(
                    *self._coordinates(), self.name, _request_timeout=self._timeout)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

    def _pause(self, deadline: float | None) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise _Timeout()
        time.sleep(self._poll_interval if remaining is None else
                   min(self._poll_interval, remaining))

    def submit(self, deadline: float | None = None) -> dict:
        """Create the job; if the run's job exists already, re-attach to it."""
        waiting_for_deletion = False
        while True:
            self._ours = "maybe"
            try:
                with self._api("create"):
                    try:
                        # Strict: a field the cluster's CRD does not know (an older operator or
                        # Trainer) is refused, not silently dropped.
                        created = self._custom.create_namespaced_custom_object(
                            *self._coordinates(), self.body, field_validation="Strict",
                            _request_timeout=self._timeout)
                    except ApiException as exc:
                        self._ours = "no"  # the server answered: nothing was created
                        if exc.status in (400, 404, 422) or _webhook_denial(exc):
                            raise self._refused(exc) from None
                        if exc.status != 409:
                            raise
                        created = None
            except ApiUnreachable as exc:
                self._ours = "maybe" if exc.request_sent else "no"
                raise
            if created is not None:
                self._ours = "yes"
                log.info("created %s; follow it with: kubectl -n %s get %s %s", self.what,
                         self.namespace, self.kind.short, self.name)
                return created
            existing = self._get()
            if existing is None:
                continue  # deleted in between: create it again
            if existing["metadata"].get("deletionTimestamp"):
                if not waiting_for_deletion:
                    log.info("%s is being deleted; waiting to create it anew", self.what)
                    waiting_for_deletion = True
                self._pause(deadline)
                continue
            return self._attach(existing)

    def _refused(self, exc: ApiException) -> UserError:
        """One line for a create the API server refused: no such resource (the CRD is not
        installed, or the namespace does not exist), or an invalid object (an older CRD, a
        webhook or a CEL rule)."""
        message = _server_message(exc)
        if exc.status == 404:
            return UserError(
                f"cannot create {self.what}: {message}; check that the cluster has "
                f"{self.kind.resource} from {self.kind.installer} (kubectl api-resources | grep "
                f"-e tfjobs -e trainjobs) and that namespace '{self.namespace}' exists")
        hint = ""
        if "unknown field" in message:
            hint = (f"; this launcher writes {self.kind.kind}s for {self.kind.installer}, the "
                    "cluster's CRD is older: upgrade it, or use the other --backend")
        elif "trainingRuntime must be created" in message:
            hint = (f"; install the runtimes in namespace '{self.namespace}' (the overlay with "
                    "../../components/trainer-v2, kubectl apply -k)")
        return UserError(f"the API server refused {self.what}: {' '.join(message.split())}"
                         f"{hint}")

    def _attach(self, existing: dict) -> dict:
        ours = self.body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        theirs = (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if theirs != ours:
            raise UserError(
                f"a {self.what} already exists with a different spec (spec hash {theirs} "
                f"here, {ours} wanted): delete it (kubectl -n {self.namespace} delete "
                f"{self.kind.short} {self.name}) or launch under another --name/--run-id"
            )
        self._ours = "yes"
        log.info("re-attached to the existing %s of this run (created %s)", self.what,
                 existing["metadata"].get("creationTimestamp", "earlier"))
        owners = existing["metadata"].get("ownerReferences") or []
        mine = self.body["metadata"].get("ownerReferences") or []
        missing = [ref for ref in mine if ref["uid"] not in {o.get("uid") for o in owners}]
        if missing:
            # Adding, not replacing: the garbage collector deletes the job only once every
            # owner is gone, so the earlier launcher pod's reference does no harm.
            with self._api("patch"):
                existing = self._custom.patch_namespaced_custom_object(
                    *self._coordinates(), self.name,
                    {"metadata": {"ownerReferences": owners + missing}},
                    _request_timeout=self._timeout)
        return existing

    def finished(self, job: dict) -> bool:
        return bool(_condition(job, self.kind.succeeded) or _condition(job, self.kind.failed))

    def succeeded(self, job: dict) -> bool:
        return _condition(job, self.kind.succeeded) is not None

    def wait(self, deadline: float | None = None) -> dict:
        """Poll until the job succeeds or fails (returned), streaming the chief's log meanwhile.

        Raises ``_Timeout`` at the deadline, ``_LostTrack`` when it cannot follow the job.
        """
        logs = ChiefLogs(self._core, self.kind, self.namespace, self.name, self._output,
                         self._poll_interval, self._timeout).start()
        seen: set = set()
        replicas = None
        failures = 0
        started_waiting = last_running = time.monotonic()
        try:
            while True:
                try:
                    job = self._get()
                    failures = 0
                except Exception as exc:  # sorted by _transient: retry or give up
                    if not _transient(exc):
                        raise
                    if failures >= MAX_POLL_FAILURES:
                        raise _LostTrack(f"lost track of {self.what}: {failures + 1} polls "
                                         f"in a row failed, the last with "
                                         f"{_server_message(exc)}") from None
                    failures += 1
                    log.warning("polling %s failed (%s); retrying", self.what,
                                _server_message(exc))
                    self._pause(deadline)
                    continue
                if job is None:
                    raise _LostTrack(f"{self.what} was deleted before it finished (by "
                                     "someone else, or by its TTL)")
                self._created = self._created or _timestamp(
                    job["metadata"].get("creationTimestamp"))
                replicas = self._log_progress(job, seen, replicas)
                if self.finished(job):
                    return job
                if self._diagnose():
                    last_running = time.monotonic()
                if self._start_timeout is not None and \
                        time.monotonic() - last_running > self._start_timeout:
                    raise _NoStart(self.last_reason or (
                        "no replica pod was created, and no event says why" if
                        last_running == started_waiting else "its replicas stopped running"))
                self._pause(deadline)
        finally:
            logs.finish()

    def _say(self, key: tuple, reason: str) -> None:
        """Log why replicas do not start, once per change of ``reason`` for ``key``."""
        self.last_reason = reason
        if self._said.get(key) != reason:
            self._said[key] = reason
            log.warning("%s: %s", self.what, reason)

    def _diagnose(self) -> bool:
        """Whether a replica runs (or ran); meanwhile, say what stops the others: pods Pending
        with the scheduler's reason, containers that cannot start (image pulls, bad config),
        crash loops with their last log lines, and Warning events on the job and its pods (the
        operator's ``FailedCreatePod``: a missing ServiceAccount, a quota, a webhook)."""
        try:
            with self._api("list", "pods"):
                pods = self._core.list_namespaced_pod(
                    self.namespace, label_selector=self.kind.pod_selector(self.name),
                    _request_timeout=self._timeout).items
        except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
            log.debug("listing the pods of %s: %s", self.what, _server_message(exc))
            return False
        running = False
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            phase = pod.status.phase if pod.status else None
            if phase in ("Running", "Succeeded", "Failed") and not self._pod_stuck(pod):
                running = True
            elif phase == "Pending":
                self._pod_pending(pod)
        self._warning_events({p.metadata.name for p in pods})
        return running

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
            elif waiting.reason in _STUCK_REASONS:
                self._say((pod.metadata.name, status.name),
                          f"{where} cannot start container {status.name}: {waiting.reason}: "
                          f"{_one_line(waiting.message or '')}".rstrip(": "))
                stuck = True
        return stuck

    def _crash_log(self, pod, container: str) -> str:
        try:
            with self._api("get", "pods/log"):
                text = self._core.read_namespaced_pod_log(
                    pod.metadata.name, self.namespace, container=container, previous=True,
                    tail_lines=CRASH_LOG_LINES, _request_timeout=self._timeout)
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
                          f"{_one_line(cond.message)}")

    def _warning_events(self, pods: set[str]) -> None:
        """Warning events about the job, its pods and what it creates (named after it)."""
        if not self._events_readable:
            return
        try:
            with self._api("list", "events"):
                events = self._core.list_namespaced_event(
                    self.namespace, field_selector="type=Warning",
                    _request_timeout=self._timeout).items
        except UserError as exc:  # an older Role, without events: say so once, go on without
            self._events_readable = False
            log.warning("cannot read events, so the launcher cannot tell why pods are not "
                        "created: %s", exc)
            return
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.debug("listing events: %s", _server_message(exc))
            return
        def when(event):
            return (event.last_timestamp or event.event_time or event.metadata.creation_timestamp
                    or dt.datetime.min.replace(tzinfo=dt.timezone.utc))

        for event in sorted(events, key=lambda e: (when(e), e.metadata.name)):
            if self._created is not None and when(event) < self._created:
                continue  # about an earlier job of the same name
            involved = event.involved_object
            name = involved.name or ""
            if not (name == self.name or name in pods or name.startswith(self.name + "-")):
                continue
            if event.reason in ("FailedScheduling", "Unschedulable"):
                # The pod's PodScheduled condition says it (the scheduler's retries and the
                # operator's copy of it on the job would only repeat it).
                continue
            if involved.kind == self.kind.kind and event.reason in ("FailedCreatePod",
                                                                    "FailedCreate"):
                message = f"its pods cannot be created: {event.reason}: "
            else:
                message = f"{involved.kind} {name}: {event.reason}: "
            # Keyed by the message too: one reason may come with several (one per pod).
            self._say((involved.kind, name, event.reason, event.message),
                      message + _one_line(event.message or ""))

    def _log_progress(self, job: dict, seen: set, replicas):
        status = job.get("status") or {}
        for cond in status.get("conditions") or []:
            key = (cond.get("type"), cond.get("status"), cond.get("lastTransitionTime"),
                   cond.get("reason"))
            if key not in seen and cond.get("status") == "True":
                seen.add(key)
                log.info("%s: %s (%s) %s", self.what, cond.get("type"), cond.get("reason", ""),
                         cond.get("message", ""))
        now = self.kind.progress(status)
        if now and now != replicas:
            log.info("%s replicas: %s", self.what, now)
        return now

    def report_failure(self, job: dict) -> None:
        """Log why the job failed and the last lines of each replica that exited non-zero; the
        last line says which pod failed and why (what a KFP step's log shows at its end)."""
        cond = _condition(job, self.kind.failed) or {}
        reason = " ".join(filter(None, (cond.get("reason", ""), cond.get("message", ""))))
        log.error("%s failed: %s", self.what, reason)
        failed = []
        try:
            with self._api("list", "pods"):
                pods = self._core.list_namespaced_pod(
                    self.namespace, label_selector=self.kind.pod_selector(self.name),
                    _request_timeout=self._timeout).items
            for pod in sorted(pods, key=lambda p: p.metadata.name):
                status = _container_status(pod, self.kind.containers)
                terminated = _terminated(status)
                if terminated is None or not terminated.exit_code:
                    continue
                replica = self.kind.replica_name(pod)
                failed.append(f"{replica} (pod {pod.metadata.name}) exited with code "
                              f"{terminated.exit_code} ({terminated.reason or 'Error'})")
                log.error("%s; its last %d log lines:", failed[-1], self._log_tail)
                # Restarted since it failed: the failed run is the previous container's.
                previous = status.state is None or status.state.terminated is None
                try:
                    with self._api("get", "pods/log"):
                        text = self._core.read_namespaced_pod_log(
                            pod.metadata.name, self.namespace, container=status.name,
                            tail_lines=self._log_tail, previous=previous,
                            _request_timeout=self._timeout)
                except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
                    log.error("could not read the log of pod %s: %s", pod.metadata.name,
                              _server_message(exc))
                    continue
                for line in text.splitlines():
                    self._output.write(replica, line)
            if not failed:
                log.error("no failed pod of %s is left to read logs from (its clean-up policy "
                          "or TTL removed them); see kubectl -n %s describe %s %s", self.what,
                          self.namespace, self.kind.short, self.name)
        except (UserError, ApiException, urllib3.exceptions.HTTPError) as exc:
            log.error("could not list the failed replicas: %s", _server_message(exc))
        log.error("%s failed: %s", self.what, "; ".join(failed) or reason or "no reason given")

    def delete(self, wait: float | None = None) -> bool:
        """Delete the job if it is (or may be) ours, its pods first (Foreground), and wait (up
        to ``wait``, default the delete wait) until it is gone. True when it is gone (or was
        never ours)."""
        wait = self._delete_wait if wait is None else wait
        if self._ours == "no":
            return True
        try:
            with self._api("delete"):
                self._custom.delete_namespaced_custom_object(
                    *self._coordinates(), self.name,
                    body={"propagationPolicy": "Foreground"}, _request_timeout=self._timeout)
            log.info("deleting %s (propagationPolicy=Foreground: its pods go first)", self.what)
        except ApiException as exc:
            if exc.status == 404:
                return True
            log.error("could not delete %s (%s): delete it with kubectl -n %s delete "
                      "%s %s", self.what, _server_message(exc), self.namespace,
                      self.kind.short, self.name)
            return False
        except UserError as exc:
            log.error("could not delete %s: %s", self.what, exc)
            return False
        give_up = time.monotonic() + wait
        while True:
            try:
                gone = self._get() is None
            except (UserError, ApiException) as exc:
                log.error("could not check that %s is gone: %s", self.what, _server_message(exc))
                return False
            if gone:
                log.info("deleted %s", self.what)
                return True
            if time.monotonic() >= give_up:
                log.error("%s is still there %gs after its deletion (pods still terminating, or "
                          "a finalizer holds it): see kubectl -n %s get %s %s -o yaml", self.what,
                          wait, self.namespace, self.kind.short, self.name)
                return False
            time.sleep(min(self._poll_interval, 1.0, max(give_up - time.monotonic(), 0.01)))


def launch(kind: JobKind, opts, build: Callable[[object], dict], *, api_client=None,
           kubeconfig: str | None = None, context: str | None = None,
           timeout: float | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
           log_tail: int = DEFAULT_LOG_TAIL, output: IO[str] | None = None,
           start_timeout: float | None = DEFAULT_START_TIMEOUT,
           delete_wait: float = DEFAULT_DELETE_WAIT) -> int:
    """Submit the job ``build(opts)`` makes (or re-attach to it), follow it to its end; the exit
    status.

    0 when it succeeds; 1 when it fails (its failed replicas' last log lines are logged) or when
    no replica has run for ``start_timeout`` seconds (None or 0: no limit; the reasons are logged
    as they change while it waits, and the job is deleted); 124 when ``timeout`` seconds pass
    and 128+N on signal N (SIGTERM: 143), both after deleting the job. ``timeout`` is the
    launcher's own: the operator's ``activeDeadlineSeconds`` is set too but not enforced
    promptly (training-operator v1.9 checks it only when another event wakes the job up).
    "Deleted" is logged once the job is gone; when it is still there ``delete_wait`` seconds
    after the delete, that is logged instead and the status stays the same. Bad input raises UserError before any request reaches the API server. ``api_client``
    (a ``kubernetes.client.ApiClient``) overrides kubeconfig/in-cluster configuration. ``opts``
    is a backend's options (``workers``, ``gpus_per_worker``, ``namespace``, ``validate()``).
    """
    check_counts(opts.workers, opts.gpus_per_worker, timeout)
    opts.validate()  # bad input fails here, before any configuration is read
    namespace_default = "default"
    if api_client is None:
        api_client, namespace_default = connect(kubeconfig, context)
    opts = dataclasses.replace(opts, namespace=opts.namespace or namespace_default)
    body = build(opts)
    owner = launcher_pod_owner(opts.namespace)
    if owner:
        body["metadata"]["ownerReferences"] = [owner]
    run = JobRun(api_client, kind, body, poll_interval=poll_interval, log_tail=log_tail,
                 output=PrefixedOutput(output), start_timeout=start_timeout,
                 delete_wait=delete_wait)
    deadline = None if timeout is None else time.monotonic() + timeout
    with terminate_on_signals():
        try:
            run.submit(deadline)
            job = run.wait(deadline)
        except _Timeout:
            log.error("%s did not finish within --timeout %gs; deleting it", run.what, timeout)
            run.delete()
            return TIMED_OUT
        except _NoStart as exc:
            log.error("%s: no replica ran within --start-timeout %gs; deleting it", run.what,
                      start_timeout)
            gone = run.delete()
            log.error("%s did not start within --start-timeout %gs%s: %s", run.what,
                      start_timeout, ", deleted" if gone else "", exc)
            return FAILED
        except _LostTrack as exc:
            log.error("%s", exc)
            run.delete()
            return FAILED
        except Terminated as signal:
            log.error("%s received; deleting %s", signal, run.what)
            run.delete(min(delete_wait, SIGNAL_DELETE_WAIT))
            return signal.status
        except BaseException:
            run.delete()
            raise
    if run.succeeded(job):
        log.info("%s succeeded", run.what)
        return 0
    run.report_failure(job)
    return FAILED


# --- the backends ---------------------------------------------------------------------------


def _tfjob_chief(core, namespace: str, job: str, request_timeout):
    """The TFJob operator names its pods ``<job>-worker-<i>``: worker 0 is the chief."""
    return core.read_namespaced_pod(f"{job}-worker-0", namespace,
                                    _request_timeout=request_timeout)


def _tfjob_replica(pod) -> str:
    labels = pod.metadata.labels or {}
    return "-".join((labels.get(tfjob.REPLICA_TYPE_LABEL, "pod"),
                     labels.get(tfjob.REPLICA_INDEX_LABEL, "?")))


def _tfjob_progress(status: dict) -> str | None:
    """``Worker active=2 succeeded=0 failed=0`` from ``status.replicaStatuses``."""
    now = status.get("replicaStatuses")
    if not now:
        return None
    return "; ".join(
        f"{rtype} " + " ".join(f"{k}={counts.get(k, 0)}" for k in ("active", "succeeded", "failed"))
        for rtype, counts in sorted(now.items()))


TFJOB = JobKind(
    group=tfjob.GROUP, version=tfjob.VERSION, plural=tfjob.PLURAL, kind=tfjob.KIND,
    containers=(tfjob.CONTAINER,), succeeded="Succeeded", failed="Failed",
    rbac_manifest=tfjob.RBAC_MANIFEST, rbac_hint=tfjob.RBAC_HINT,
    installer="training-operator v1.9",
    pod_selector=lambda name: f"{tfjob.JOB_NAME_LABEL}={name}",
    chief_pod=_tfjob_chief, replica_name=_tfjob_replica, progress=_tfjob_progress,
)


def launch_tfjob(opts: tfjob.TFJobOptions, **kwargs) -> int:
    """:func:`launch` for a TFJob (training-operator v1). The CLI also sets
    ``opts.active_deadline_seconds`` to the timeout, but the launcher's ``timeout`` is what holds:
    operator v1.9 does not enforce the deadline promptly (a job of 8 s ran on at 79 s)."""
    return launch(TFJOB, opts, tfjob.build_tfjob, **kwargs)


def _trainjob_chief(core, namespace: str, job: str, request_timeout):
    """The pod of completion index 0 of the ``node`` Job (its name has a random suffix, and a
    replacement pod gets another): the newest one not being deleted, else the newest."""
    selector = ",".join((f"{trainjob.JOBSET_NAME_LABEL}={job}",
                         f"{trainjob.REPLICATED_JOB_LABEL}={trainjob.NODE}",
                         f"{trainjob.COMPLETION_INDEX_LABEL}=0"))
    pods = core.list_namespaced_pod(namespace, label_selector=selector,
                                    _request_timeout=request_timeout).items
    if not pods:
        return None
    pods.sort(key=lambda p: (p.metadata.deletion_timestamp is None,
                             p.metadata.creation_timestamp or 0, p.metadata.name))
    return pods[-1]


def _trainjob_replica(pod) -> str:
    """``node-1``, ``evaluator-0``: the replicated job and the pod's completion index."""
    labels = pod.metadata.labels or {}
    return "-".join((labels.get(trainjob.REPLICATED_JOB_LABEL, "pod"),
                     labels.get(trainjob.COMPLETION_INDEX_LABEL, "?")))


def _trainjob_progress(status: dict) -> str | None:
    """``node active=2 ready=2 succeeded=0 failed=0`` from ``status.jobsStatus``."""
    jobs = status.get("jobsStatus")
    if not jobs:
        return None
    return "; ".join(
        f"{job.get('name')} " + " ".join(f"{k}={job.get(k, 0)}"
                                         for k in ("active", "ready", "succeeded", "failed"))
        for job in sorted(jobs, key=lambda j: j.get("name", "")))


TRAINJOB = JobKind(
    group=trainjob.GROUP, version=trainjob.VERSION, plural=trainjob.PLURAL, kind=trainjob.KIND,
    containers=(trainjob.NODE, trainjob.EVALUATOR), succeeded="Complete", failed="Failed",
    rbac_manifest=trainjob.RBAC_MANIFEST, rbac_hint=trainjob.RBAC_HINT,
    installer="Kubeflow Trainer v2.2 or later",
    pod_selector=lambda name: f"{trainjob.JOBSET_NAME_LABEL}={name}",
    chief_pod=_trainjob_chief, replica_name=_trainjob_replica, progress=_trainjob_progress,
    chief_prefix=f"{trainjob.NODE}-0",
)


def launch_trainjob(opts: trainjob.TrainJobOptions, **kwargs) -> int:
    """:func:`launch` for a TrainJob (Kubeflow Trainer v2); ``opts.active_deadline_seconds``
    becomes its ``spec.activeDeadlineSeconds``."""
    return launch(TRAINJOB, opts, trainjob.build_trainjob, **kwargs)
