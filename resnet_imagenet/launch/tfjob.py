"""The Kubeflow TFJob (training-operator v1, ``kubeflow.org/v1``) for a training run: a manifest
built from :class:`TFJobOptions`, a plain dict, without I/O. :mod:`resnet_imagenet.launch.cluster`
submits it, follows it and cleans it up (the same lifecycle serves every cluster backend).

What the old KFP TFJob launcher got wrong in the manifest, and what this module does instead:

* ``backoffLimit``/``activeDeadlineSeconds`` placed under ``spec``, where the API server drops
  them: they live under ``spec.runPolicy``, and every manifest is checked against the CRD schema
  with unknown fields refused (:mod:`resnet_imagenet.launch.schema`) before it is submitted.
* A random name: the name is derived from the KFP run (``--run-id``), so that a restarted
  launcher finds its TFJob; an annotation holds a hash of the spec, so that a TFJob of that name
  with another spec is refused rather than adopted.

TF_CONFIG is not written here: training-operator v1.9 injects it into the ``tensorflow``
container of every replica (``{"cluster": {"worker": ["<job>-worker-0.<ns>.svc:2222", ...]},
"task": {"type": "worker", "index": i}, "environment": "cloud"}``; the evaluator is not part of
the cluster). The local backend (:mod:`resnet_imagenet.launch.local`) writes the same shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

import yaml

from resnet_imagenet import __version__, storage
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema
from resnet_imagenet.launch.runtime import check_counts, train_dirs

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
RESOURCE = f"{PLURAL}.{GROUP}"
CONTAINER = schema.DEFAULT_CONTAINER
PORT_NAME, PORT = "tfjob-port", 2222  # the port the operator puts into TF_CONFIG
DEFAULT_IMAGE = f"ghcr.io/example/resnet-imagenet-trainer:{__version__}"
RBAC_MANIFEST = "manifests/base/rbac.yaml"
RBAC_HINT = f"{RBAC_MANIFEST} (kubectl apply -k manifests/base)"

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

    # Who derives what name from the job's name (for the error about a name too long).
    NAMES = "the operator names a Service"

    def replica_suffixes(self) -> list[str]:
        """What the operator appends to the job name for pods and Services: ``-worker-<i>``..."""
        suffixes = [f"-worker-{self.workers - 1}"]
        if self.evaluator:
            suffixes.append("-evaluator-0")
        return suffixes

    def validate(self) -> "TFJobOptions":
        check_counts(self.workers, self.gpus_per_worker)
        validate_job_name(self.name, self.replica_suffixes(), self.NAMES)
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


def validate_job_name(name: str, suffixes: list[str],
                      names: str = TFJobOptions.NAMES) -> None:
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
            f"--name {name!r} is too long: {names} '{name}{longest}', which "
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
