"""Run training as a Kubeflow TFJob: build the manifest, submit it, follow it to its end, clean up.

What the old KFP TFJob launcher got wrong, and what this module does instead:

* **A step that succeeded when the TFJob failed.** The launcher waits for the TFJob's terminal
  condition (``Succeeded`` or ``Failed``) and exits non-zero on ``Failed``, printing the last log
  lines of the replica that failed.
* **TFJobs left running after a timeout or a cancelled run.** On ``--timeout`` and on SIGTERM
  (how KFP cancels a run) the launcher deletes the TFJob, ``propagationPolicy: Foreground`` so its
  pods go first, before it exits. ``runPolicy.activeDeadlineSeconds`` carries the same timeout to
  the operator, and an ``ownerReference`` to the launcher's pod lets Kubernetes' garbage collector
  delete the TFJob if the launcher is killed outright (SIGKILL, node loss).
* **No logs.** The chief's log (worker 0; there is no Chief replica) streams into the launcher's
  own log as ``[worker-0] ...``, across container restarts, each line once.
* **No recovery when the launcher pod restarted.** The TFJob's name is derived from the KFP run
  (``--run-id``), so a restarted launcher finds its TFJob and re-attaches instead of creating a
  second one; an annotation holds a hash of the spec, and a TFJob of that name with another spec
  is refused rather than adopted.
* ``backoffLimit``/``activeDeadlineSeconds`` placed under ``spec``, where the API server drops
  them: they live under ``spec.runPolicy``, and every manifest is checked against the CRD schema
  with unknown fields refused (:mod:`resnet_imagenet.launch.schema`) before it is submitted.

TF_CONFIG is not written here: training-operator v1.9 injects it into the ``tensorflow``
container of every replica (``{"cluster": {"worker": ["<job>-worker-0.<ns>.svc:2222", ...]},
"task": {"type": "worker", "index": i}, "environment": "cloud"}``; the evaluator is not part of
the cluster). The local backend (:mod:`resnet_imagenet.launch.local`) writes the same shape.

The launcher polls the TFJob (a GET every ``poll_interval`` seconds) rather than watching it: a
multi-day wait then survives API-server restarts, expired watches (410 Gone) and proxies that cut
long-lived connections, at the cost of one small request per interval. Logs stream continuously.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, Iterator

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from resnet_imagenet import __version__, storage
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema
from resnet_imagenet.launch.runtime import (FAILED, TIMED_OUT, PrefixedOutput, Terminated,
                                            check_counts, terminate_on_signals, train_dirs)

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
RESOURCE = f"{PLURAL}.{GROUP}"
CONTAINER = schema.DEFAULT_CONTAINER
PORT_NAME, PORT = "tfjob-port", 2222  # the port the operator puts into TF_CONFIG
DEFAULT_IMAGE = f"ghcr.io/example/resnet-imagenet-trainer:{__version__}"
RBAC_MANIFEST = "manifests/base/rbac.yaml"

# Labels the training operator puts on the pods it creates.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
# Ours.
SPEC_HASH_ANNOTATION = "resnet-imagenet/spec-hash"
RUN_ID_ANNOTATION = "resnet-imagenet/run-id"
APP_LABELS = {
    "app.kubernetes.io/name": "resnet-imagenet",
    "app.kubernetes.io/managed-by": "resnet-imagenet-launch",
}

GPU_RESOURCE = "nvidia.com/gpu"
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GCS_KEY_DIR = "/var/secrets/google"
GCS_KEY_FILE = "key.json"  # kubectl create secret generic NAME --from-file=key.json=KEY.json
RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")
CLEAN_POD_POLICIES = ("Running", "All", "None")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes' resource.Quantity syntax, as in the CRD schema.
_QUANTITY = re.compile(
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

DEFAULT_POLL_INTERVAL = 15.0
DEFAULT_LOG_TAIL = 50
# Consecutive failed polls (API server unreachable or 5xx) before the launcher gives up.
MAX_POLL_FAILURES = 20
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass
class TFJobOptions:
    """Everything that goes into the TFJob manifest; the CLI flags map onto these one to one.

    ``train_args`` are the flags of ``resnet-imagenet train``; they must name ``--data-dir`` and
    ``--model-dir``, which every pod must be able to reach: ``gs://`` URIs, or paths under the
    ``pvc`` mount. ``namespace`` None leaves it out of the manifest (``kubectl apply -n``, or
    kustomize, decides).
    """

    name: str
    train_args: list[str]
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    workers: int = 1
    gpus_per_worker: int = 0
    evaluator: bool = False
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "2Gi"
    accelerator: str = ""  # GKE: nodeSelector cloud.google.com/gke-accelerator=<this>
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)  # extra; the GPU one is automatic
    service_account: str = ""  # Workload Identity: a KSA bound to a GCP service account
    gcs_secret: str = ""  # or: a secret holding key.json, mounted at /var/secrets/google
    pvc: str = ""  # CLAIM:MOUNT_PATH, for data/model dirs on a shared volume
    env: dict[str, str] = field(default_factory=dict)
    restart_policy: str = "ExitCode"
    clean_pod_policy: str = "Running"
    backoff_limit: int = 5
    ttl_seconds_after_finished: int = 86_400
    active_deadline_seconds: int | None = None
    run_as_user: int = 10001  # the trainer image's non-root user (images/trainer/Dockerfile)
    run_id: str = ""

    def replica_suffixes(self) -> list[str]:
        """What the operator appends to the job name for pods and Services: ``-worker-<i>``..."""
        suffixes = [f"-worker-{self.workers - 1}"]
        if self.evaluator:
            suffixes.append("-evaluator-0")
        return suffixes

    def validate(self) -> "TFJobOptions":
        check_counts(self.workers, self.gpus_per_worker)
        validate_job_name(self.name, self.replica_suffixes())
        if self.namespace is not None:
            _check_name("--namespace", self.namespace, _DNS1123_LABEL, 63)
        for flag, value in (("--service-account", self.service_account),
                            ("--gcs-secret", self.gcs_secret)):
            if value:
                _check_name(flag, value, _DNS1123_SUBDOMAIN, 253)
        problem = image_problem(self.image)
        if problem:
            raise UserError(f"--image {self.image!r} {problem}: pin a version tag or a digest")
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory),
                            ("--shm-size", self.shm_size)):
            if not _QUANTITY.match(str(value)):
                raise UserError(
                    f"{flag} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        if self.restart_policy not in RESTART_POLICIES:
            raise UserError(f"--restart-policy {self.restart_policy!r}: use one of "
                            + ", ".join(RESTART_POLICIES))
        if self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise UserError(f"--clean-pod-policy {self.clean_pod_policy!r}: use one of "
                            + ", ".join(CLEAN_POD_POLICIES))
        for flag, value in (("--backoff-limit", self.backoff_limit),
                            ("--ttl-seconds-after-finished", self.ttl_seconds_after_finished)):
            if value < 0:
                raise UserError(f"{flag} {value}: must be 0 or more")
        if self.active_deadline_seconds is not None and self.active_deadline_seconds < 1:
            raise UserError(f"--timeout {self.active_deadline_seconds}: must be positive")
        for key in self.env:
            if not _ENV_NAME.match(key):
                raise UserError(f"--env {key!r} is not a valid environment variable name")
        self.pvc_mount()  # validates the flag
        for flag, uri in zip(("--data-dir", "--model-dir"), train_dirs(self.train_args)):
            self._check_reachable_from_pods(flag, uri)
        return self

    def pvc_mount(self) -> tuple[str, str] | None:
        """``(claim, mount_path)`` from ``--pvc CLAIM:MOUNT_PATH``, or None."""
        if not self.pvc:
            return None
        claim, sep, path = self.pvc.partition(":")
        if not sep or not path.startswith("/"):
            raise UserError(f"--pvc {self.pvc!r}: expected CLAIM:/mount/path, e.g. imagenet:/data")
        _check_name("--pvc", claim, _DNS1123_SUBDOMAIN, 253)
        return claim, path.rstrip("/") or "/"

    def _check_reachable_from_pods(self, flag: str, uri: str | None) -> None:
        if not uri:
            raise UserError(
                f"the train flags after '--' must include {flag}: every worker reads and writes it"
            )
        if storage.is_remote(uri):
            return
        mount = self.pvc_mount()
        path = storage.normalize(uri)
        if mount and (path == mount[1] or path.startswith(mount[1].rstrip("/") + "/")):
            return
        raise UserError(
            f"{flag} {uri} is a local path, but TFJob workers run in separate pods: use a gs:// "
            "URI, or mount a shared volume with --pvc CLAIM:/mount and put the path under it"
        )


def _check_name(flag: str, value: str, pattern: re.Pattern, longest: int) -> None:
    if len(value) > longest or not pattern.match(value):
        allowed = "'-' and '.'" if pattern is _DNS1123_SUBDOMAIN else "'-'"
        raise UserError(
            f"{flag} {value!r} is not a valid Kubernetes name: lower-case letters, digits and "
            f"{allowed}, at most {longest} characters"
        )


def validate_job_name(name: str, suffixes: list[str]) -> None:
    """A TFJob name the operator accepts *and* can derive valid pod and Service names from.

    The webhook checks only the job name; the Services it then creates, ``<name>-worker-<i>``,
    must be DNS-1035 labels of at most 63 characters too, or the job starts and never runs.
    """
    problem = schema.dns1035_problem(name)
    if problem:
        raise UserError(f"--name {name!r} {problem}")
    longest = max(suffixes, key=len)
    if len(name) + len(longest) > schema.DNS1035_MAX:
        raise UserError(
            f"--name {name!r} is too long: the operator names a Service '{name}{longest}', which "
            f"must fit in {schema.DNS1035_MAX} characters; use at most "
            f"{schema.DNS1035_MAX - len(longest)}"
        )


def job_name(run_id: str = "") -> str:
    """``resnet-train-<12 hex>``: from a hash of the KFP run (and task) id, else random.

    The same run id always gives the same name, which is what lets a restarted launcher find the
    TFJob it created. 25 characters leave room for any replica suffix.
    """
    token = hashlib.sha256(run_id.encode()).hexdigest() if run_id else uuid.uuid4().hex
    return f"resnet-train-{token[:12]}"


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned (no tag, or ``latest``), or None."""
    if not image:
        return "is empty"
    if "@" in image:
        return None  # a digest
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag, so every node would pull whatever ':latest' is that day"
    if last.rsplit(":", 1)[1] == "latest":
        return "uses ':latest', so every node would pull whatever it is that day"
    return None


def parse_key_values(pairs: list[str], flag: str) -> dict[str, str]:
    """``["K=V", ...]`` from repeated flags into a dict, refusing items without '='."""
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def parse_toleration(spec: str) -> dict:
    """``KEY[=VALUE][:EFFECT]`` (kubectl taint syntax) into a toleration."""
    rest, _, effect = spec.partition(":")
    key, sep, value = rest.partition("=")
    if not key or (effect and effect not in TOLERATION_EFFECTS):
        raise UserError(
            f"--toleration {spec!r}: expected KEY[=VALUE][:EFFECT], EFFECT one of "
            + ", ".join(TOLERATION_EFFECTS)
        )
    toleration = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


def spec_hash(spec: dict) -> str:
    """A short, stable digest of a TFJob spec (key order and whitespace do not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _replica(opts: TFJobOptions, component: str, replicas: int, args: list[str],
             gpus: int) -> dict:
    """One entry of ``tfReplicaSpecs``: ``replicas`` pods running ``resnet-imagenet ARGS``."""
    env = [{"name": key, "value": value} for key, value in sorted(opts.env.items())]
    # tf.data and NCCL use /dev/shm, which is 64 MiB in a container unless a volume replaces it.
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(opts.shm_size)}}]
    if opts.gcs_secret:
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS",
                    "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"})
        mounts.append({"name": "gcs-key", "mountPath": GCS_KEY_DIR, "readOnly": True})
        volumes.append({"name": "gcs-key", "secret": {"secretName": opts.gcs_secret}})
    mount = opts.pvc_mount()
    if mount:
        mounts.append({"name": "data", "mountPath": mount[1]})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": mount[0]}})
    # Memory limit = request: no overcommit, so a busy node never OOM-kills a worker for another
    # pod's sake. No CPU limit: throttling the input pipeline costs more than it protects.
    limits: dict = {"memory": str(opts.memory)}
    if gpus:
        limits[GPU_RESOURCE] = gpus

    container: dict = {
        "name": CONTAINER,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["resnet-imagenet"],
        "args": args,
    }
    if component == "worker":
        container["ports"] = [{"name": PORT_NAME, "containerPort": PORT}]
    if env:
        container["env"] = env
    container.update(
        resources={"requests": {"cpu": str(opts.cpu), "memory": str(opts.memory)},
                   "limits": limits},
        securityContext={"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        volumeMounts=mounts,
    )

    pod_spec: dict = {}
    if opts.service_account:
        pod_spec["serviceAccountName"] = opts.service_account
    node_selector = dict(opts.node_selector)
    if opts.accelerator:
        node_selector[GKE_ACCELERATOR_LABEL] = opts.accelerator
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = list(opts.tolerations)
    if gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU node pools are tainted nvidia.com/gpu (GKE adds this toleration by itself; other
        # clusters do not).
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    pod_spec.update(
        securityContext={"runAsNonRoot": True, "runAsUser": opts.run_as_user,
                         "runAsGroup": opts.run_as_user, "fsGroup": opts.run_as_user},
        containers=[container],
        volumes=volumes,
    )
    return {
        "replicas": replicas,
        "restartPolicy": opts.restart_policy,
        "template": {
            "metadata": {
                "labels": {**APP_LABELS, "app.kubernetes.io/component": component},
                # Kubeflow namespaces often inject Istio sidecars, which keep a finished pod
                # running and get in the way of the workers' gRPC; training needs neither.
                "annotations": {"sidecar.istio.io/inject": "false"},
            },
            "spec": pod_spec,
        },
    }


def build_tfjob(opts: TFJobOptions) -> dict:
    """The TFJob manifest for ``opts``, checked against the CRD schema and the webhook's rules.

    ``restartPolicy: ExitCode`` (the default) makes the operator recreate a pod that died of a
    signal (exit 128+: preemption, OOM kill, node drain) so the worker resumes from its last
    checkpoint, and fail the job on exit codes 1-127 (a bug or bad input that a retry would not
    fix). The optional Evaluator replica runs ``evaluate --watch`` next to the workers, for
    validation curves in TensorBoard without slowing training.
    """
    opts.validate()
    data_dir, model_dir = train_dirs(opts.train_args)
    specs = {
        "Worker": _replica(opts, "worker", opts.workers, ["train", *opts.train_args],
                           opts.gpus_per_worker),
    }
    if opts.evaluator:
        specs["Evaluator"] = _replica(
            opts, "evaluator", 1,
            ["evaluate", "--watch", "--data-dir", data_dir, "--model-dir", model_dir],
            min(opts.gpus_per_worker, 1),
        )
    run_policy: dict = {
        # "Running": when the job ends, pods still running (the evaluator, workers of a failed
        # job) are deleted; finished ones stay, so their logs can be read until the TTL.
        "cleanPodPolicy": opts.clean_pod_policy,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "backoffLimit": opts.backoff_limit,
    }
    if opts.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = opts.active_deadline_seconds
    spec = {"runPolicy": run_policy, "tfReplicaSpecs": specs}
    annotations = {SPEC_HASH_ANNOTATION: spec_hash(spec)}
    if opts.run_id:
        annotations[RUN_ID_ANNOTATION] = opts.run_id
    metadata: dict = {"name": opts.name}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    metadata.update(labels=dict(APP_LABELS), annotations=annotations)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
    return schema.validate_tfjob(body)


def tfjob_yaml(opts: TFJobOptions) -> str:
    """:func:`build_tfjob` as YAML for ``kubectl apply -f -``."""
    return yaml.safe_dump(build_tfjob(opts), sort_keys=False, default_flow_style=False)


# --- talking to the API server -------------------------------------------------------------


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


def _connection_reason(reason: Exception) -> str:
    """The last, telling part of urllib3's nested messages ("[Errno 111] Connection refused")."""
    return str(reason).split(": ")[-1].strip() or type(reason).__name__


@contextlib.contextmanager
def api_errors(verb: str, resource: str, namespace: str, host: str) -> Iterator[None]:
    """Turn refusals and unreachable servers into one-line UserErrors that say what to fix."""
    try:
        yield
    except ApiException as exc:
        if exc.status == 403:
            raise UserError(
                f"permission denied: the launcher's identity may not {verb} {resource} in "
                f"namespace '{namespace}' (API server: {_server_message(exc)}); grant it with "
                f"{RBAC_MANIFEST} (kubectl apply -k manifests/base) or run the launcher with a "
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
    live in the TFJob's namespace, as Kubernetes does not allow owners across namespaces.
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
        log.warning("the launcher pod is in namespace %s and the TFJob in %s: no ownerReference, "
                    "so only the launcher itself can clean the TFJob up", pod_namespace, namespace)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


class _Timeout(Exception):
    """The launch's --timeout has passed."""


class _LostTrack(Exception):
    """The TFJob can no longer be followed: it is gone, or the API server has been away too
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


def _tensorflow_status(pod):
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == CONTAINER:
            return status
    return None


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
    """Streams the ``tensorflow`` container log of one pod into the launcher's output, each line
    once, across cut connections and restarts.

    A stream that ends is reopened with ``sinceSeconds`` reaching a little before the last line
    received (clock skew and latency), and lines not newer than the last one printed are skipped
    by their kubelet timestamps. The runtime stamps every line of one write alike (a traceback),
    so among lines of equal timestamp as many are skipped as were printed. A pod that the
    operator recreates (restartPolicy ExitCode) or a container that the kubelet restarts
    (OnFailure) is followed the same way; a container that has terminated is not asked again.
    """

    RESUME_MARGIN_S = 10
    DRAIN_S = 10.0  # for the stream of a terminated container to deliver its last lines

    def __init__(self, core, namespace: str, pod: str, prefix: str, output: PrefixedOutput,
                 poll_interval: float, request_timeout: tuple[float, float]):
        self._core = core
        self._namespace = namespace
        self._pod = pod
        self._prefix = prefix
        self._output = output
        self._poll_interval = poll_interval
        self._request_timeout = request_timeout
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._last_stamp: tuple[str, int] | None = None
        self._printed_at_last_stamp = 0
        self._last_received: float | None = None
        self._response = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{pod}", daemon=True)

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
            pod = self._core.read_namespaced_pod(self._pod, self._namespace,
                                                 _request_timeout=self._request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        status = _tensorflow_status(pod)
        if status is None or status.state is None or not status.container_id or (
                status.state.running is None and status.state.terminated is None):
            return None
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
                                "pods/log (%s)", _server_message(exc), RBAC_MANIFEST)
                    return
                log.debug("log stream of %s: %s", self._pod, _server_message(exc))
                self._stop.wait(self._poll_interval)
            except urllib3.exceptions.HTTPError as exc:  # cut or timed out: resume
                log.debug("log stream of %s: %s", self._pod, exc)
                self._stop.wait(self._poll_interval)

    def _stream(self) -> None:
        since = {}
        if self._last_received is not None:
            elapsed = time.monotonic() - self._last_received
            since["since_seconds"] = math.ceil(elapsed) + self.RESUME_MARGIN_S
        response = self._response = self._core.read_namespaced_pod_log(
            self._pod, self._namespace, container=CONTAINER, follow=True, timestamps=True,
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


class TFJobRun:
    """One TFJob, from submission (or re-attachment) to its end or its deletion."""

    def __init__(self, api_client, body: dict, *, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 log_tail: int = DEFAULT_LOG_TAIL, output: PrefixedOutput | None = None,
                 request_timeout: tuple[float, float] = (10.0, 60.0)):

        self.body = body
        self.name = body["metadata"]["name"]
        self.namespace = body["metadata"]["namespace"]
        self.ref = f"{self.namespace}/{self.name}"
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._host = api_client.configuration.host
        self._poll_interval = poll_interval
        self._log_tail = log_tail
        self._output = output or PrefixedOutput()
        self._timeout = request_timeout
        # Whether a SIGTERM or timeout must delete the TFJob: "no" until a create request is sent
        # (then "maybe", as its outcome is unknown until the server answers) or until the TFJob
        # is known to be ours (created by us, or by an earlier launcher of the same run).
        self._ours = "no"

    # -- API calls, each with the verb and resource its 403 message names --

    def _api(self, verb: str, resource: str = RESOURCE):
        return api_errors(verb, resource, self.namespace, self._host)

    def _get(self) -> dict | None:

        with self._api("get"):
            try:
                return self._custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name,
                    _request_timeout=self._timeout)
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
        """Create the TFJob; if the run's TFJob exists already, re-attach to it."""
        waiting_for_deletion = False
        while True:
            self._ours = "maybe"
            try:
                with self._api("create"):
                    try:
                        created = self._custom.create_namespaced_custom_object(
                            GROUP, VERSION, self.namespace, PLURAL, self.body,
                            _request_timeout=self._timeout)
                    except ApiException as exc:
                        self._ours = "no"  # the server answered: nothing was created
                        if exc.status != 409:
                            raise
                        created = None
            except ApiUnreachable as exc:
                self._ours = "maybe" if exc.request_sent else "no"
                raise
            if created is not None:
                self._ours = "yes"
                log.info("created TFJob %s; follow it with: kubectl -n %s get tfjob %s",
                         self.ref, self.namespace, self.name)
                return created
            existing = self._get()
            if existing is None:
                continue  # deleted in between: create it again
            if existing["metadata"].get("deletionTimestamp"):
                if not waiting_for_deletion:
                    log.info("TFJob %s is being deleted; waiting to create it anew", self.ref)
                    waiting_for_deletion = True
                self._pause(deadline)
                continue
            return self._attach(existing)

    def _attach(self, existing: dict) -> dict:
        ours = self.body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        theirs = (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if theirs != ours:
            raise UserError(
                f"a TFJob {self.ref} already exists with a different spec (spec hash {theirs} "
                f"here, {ours} wanted): delete it (kubectl -n {self.namespace} delete tfjob "
                f"{self.name}) or launch under another --name/--run-id"
            )
        self._ours = "yes"
        log.info("re-attached to the existing TFJob %s of this run (created %s)", self.ref,
                 existing["metadata"].get("creationTimestamp", "earlier"))
        owners = existing["metadata"].get("ownerReferences") or []
        mine = self.body["metadata"].get("ownerReferences") or []
        missing = [ref for ref in mine if ref["uid"] not in {o.get("uid") for o in owners}]
        if missing:
            # Adding, not replacing: the garbage collector deletes the TFJob only once every
            # owner is gone, so the earlier launcher pod's reference does no harm.
            with self._api("patch"):
                existing = self._custom.patch_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name,
                    {"metadata": {"ownerReferences": owners + missing}},
                    _request_timeout=self._timeout)
        return existing

    def wait(self, deadline: float | None = None) -> dict:
        """Poll until the TFJob succeeds or fails (returned), streaming the chief's log meanwhile.

        Raises ``_Timeout`` at the deadline, ``_LostTrack`` when it cannot follow the TFJob.
        """
        logs = ChiefLogs(self._core, self.namespace, f"{self.name}-worker-0", "worker-0",
                         self._output, self._poll_interval, self._timeout).start()
        seen: set = set()
        replicas = None
        failures = 0
        try:
            while True:
                try:
                    job = self._get()
                    failures = 0
                except Exception as exc:  # sorted by _transient: retry or give up
                    if not _transient(exc):
                        raise
                    if failures >= MAX_POLL_FAILURES:
                        raise _LostTrack(f"lost track of TFJob {self.ref}: {failures + 1} polls "
                                         f"in a row failed, the last with "
                                         f"{_server_message(exc)}") from None
                    failures += 1
                    log.warning("polling TFJob %s failed (%s); retrying", self.ref,
                                _server_message(exc))
                    self._pause(deadline)
                    continue
                if job is None:
                    raise _LostTrack(f"TFJob {self.ref} was deleted before it finished (by "
                                     "someone else, or by its TTL)")
                replicas = self._log_progress(job, seen, replicas)
                if _condition(job, "Succeeded") or _condition(job, "Failed"):
                    return job
                self._pause(deadline)
        finally:
            logs.finish()

    def _log_progress(self, job: dict, seen: set, replicas):
        status = job.get("status") or {}
        for cond in status.get("conditions") or []:
            key = (cond.get("type"), cond.get("status"), cond.get("lastTransitionTime"),
                   cond.get("reason"))
            if key not in seen and cond.get("status") == "True":
                seen.add(key)
                log.info("TFJob %s: %s (%s) %s", self.ref, cond.get("type"), cond.get("reason", ""),
                         cond.get("message", ""))
        now = status.get("replicaStatuses")
        if now and now != replicas:
            log.info("TFJob %s replicas: %s", self.ref, "; ".join(
                f"{rtype} " + " ".join(f"{k}={counts.get(k, 0)}"
                                       for k in ("active", "succeeded", "failed"))
                for rtype, counts in sorted(now.items())))
        return now

    def report_failure(self, job: dict) -> None:
        """Log why the TFJob failed and the last lines of each replica that exited non-zero."""
        cond = _condition(job, "Failed") or {}
        log.error("TFJob %s failed: %s %s", self.ref, cond.get("reason", ""),
                  cond.get("message", ""))
        try:
            with self._api("list", "pods"):
                pods = self._core.list_namespaced_pod(
                    self.namespace, label_selector=f"{JOB_NAME_LABEL}={self.name}",
                    _request_timeout=self._timeout).items
            shown = 0
            for pod in sorted(pods, key=lambda p: p.metadata.name):
                status = _tensorflow_status(pod)
                terminated = _terminated(status)
                if terminated is None or not terminated.exit_code:
                    continue
                labels = pod.metadata.labels or {}
                replica = "-".join((labels.get(REPLICA_TYPE_LABEL, "pod"),
                                    labels.get(REPLICA_INDEX_LABEL, "?")))
                log.error("%s (pod %s) exited with code %s (%s); its last %d log lines:", replica,
                          pod.metadata.name, terminated.exit_code, terminated.reason or "Error",
                          self._log_tail)
                # Restarted since it failed: the failed run is the previous container's.
                previous = status.state is None or status.state.terminated is None
                with self._api("get", "pods/log"):
                    text = self._core.read_namespaced_pod_log(
                        pod.metadata.name, self.namespace, container=CONTAINER,
                        tail_lines=self._log_tail, previous=previous,
                        _request_timeout=self._timeout)
                for line in text.splitlines():
                    self._output.write(replica, line)
                shown += 1
            if not shown:
                log.error("no failed pod of TFJob %s is left to read logs from (cleanPodPolicy or "
                          "TTL removed them); see kubectl -n %s describe tfjob %s", self.ref,
                          self.namespace, self.name)
        except (UserError, ApiException) as exc:
            log.error("could not read the failed replicas' logs: %s", _server_message(exc))

    def delete(self) -> None:
        """Delete the TFJob if it is (or may be) ours; its pods go first (Foreground)."""
        if self._ours == "no":
            return
        try:
            with self._api("delete"):
                self._custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name,
                    body={"propagationPolicy": "Foreground"}, _request_timeout=self._timeout)
            log.info("deleted TFJob %s (propagationPolicy=Foreground: its pods go first)", self.ref)
        except ApiException as exc:
            if exc.status != 404:
                log.error("could not delete TFJob %s (%s): delete it with kubectl -n %s delete "
                          "tfjob %s", self.ref, _server_message(exc), self.namespace, self.name)
        except UserError as exc:
            log.error("could not delete TFJob %s: %s", self.ref, exc)


def launch_tfjob(opts: TFJobOptions, *, api_client=None, kubeconfig: str | None = None,
                 context: str | None = None, timeout: float | None = None,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, log_tail: int = DEFAULT_LOG_TAIL,
                 output: IO[str] | None = None) -> int:
    """Submit the TFJob for ``opts`` (or re-attach to it), follow it to its end; the exit status.

    0 when it succeeds; 1 when it fails (its failed replicas' last log lines are logged); 124
    when ``timeout`` seconds pass and 128+N on signal N (SIGTERM: 143), both after deleting the
    TFJob. Bad input raises UserError before any request reaches the API server. ``api_client``
    (a ``kubernetes.client.ApiClient``) overrides kubeconfig/in-cluster configuration. Give
    ``opts.active_deadline_seconds`` the same timeout (the CLI does) so that the operator enforces
    it should the launcher itself be gone.
    """
    check_counts(opts.workers, opts.gpus_per_worker, timeout)
    opts.validate()  # bad input fails here, before any configuration is read
    namespace_default = "default"
    if api_client is None:
        api_client, namespace_default = connect(kubeconfig, context)
    opts = dataclasses.replace(opts, namespace=opts.namespace or namespace_default)
    body = build_tfjob(opts)
    owner = launcher_pod_owner(opts.namespace)
    if owner:
        body["metadata"]["ownerReferences"] = [owner]
    run = TFJobRun(api_client, body, poll_interval=poll_interval, log_tail=log_tail,
                   output=PrefixedOutput(output))
    deadline = None if timeout is None else time.monotonic() + timeout
    with terminate_on_signals():
        try:
            run.submit(deadline)
            job = run.wait(deadline)
        except _Timeout:
            log.error("TFJob %s did not finish within --timeout %gs; deleting it", run.ref, timeout)
            run.delete()
            return TIMED_OUT
        except _LostTrack as exc:
            log.error("%s", exc)
            run.delete()
            return FAILED
        except Terminated as signal:
            log.error("%s received; deleting TFJob %s", signal, run.ref)
            run.delete()
            return signal.status
        except BaseException:
            run.delete()
            raise
    if _condition(job, "Succeeded"):
        log.info("TFJob %s succeeded", run.ref)
        return 0
    run.report_failure(job)
    return FAILED
