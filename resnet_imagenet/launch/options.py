"""What both cluster backends take: :class:`ClusterOptions`, the flag parsers and checks behind it,
and the job name, labels and annotations every manifest carries.

A backend subclasses :class:`ClusterOptions` with its own fields and its pod-name suffixes
(:class:`~resnet_imagenet.launch.tfjob.TFJobOptions`,
:class:`~resnet_imagenet.launch.trainjob.TrainJobOptions`); the CLI flags map onto the fields one
to one. Pure: no I/O.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

from resnet_imagenet import __version__, storage
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema
from resnet_imagenet.launch.runtime import check_counts, train_dirs

DEFAULT_IMAGE = f"ghcr.io/example/resnet-imagenet-trainer:{__version__}"
SPEC_HASH_ANNOTATION = "resnet-imagenet/spec-hash"
RUN_ID_ANNOTATION = "resnet-imagenet/run-id"
APP_LABELS = {
    "app.kubernetes.io/name": "resnet-imagenet",
    "app.kubernetes.io/managed-by": "resnet-imagenet-launch",
}
GPU_RESOURCE = "nvidia.com/gpu"
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GCS_KEY_DIR = "/var/secrets/google"
DEFAULT_TERMINATION_GRACE_S = 120
GCS_KEY_FILE = "key.json"  # kubectl create secret generic NAME --from-file=key.json=KEY.json
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes' resource.Quantity syntax, as in the CRD schemas.
_QUANTITY = re.compile(
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass
class ClusterOptions(abc.ABC):
    """The settings every cluster backend's manifest takes.

    ``train_args`` are the flags of ``resnet-imagenet train``; they must name ``--data-dir`` and
    ``--model-dir``, which every pod must be able to reach: ``gs://`` URIs, or paths under the
    ``pvc`` mount. ``namespace`` None leaves it out of the manifest (``kubectl apply -n``, or
    kustomize, decides). ``active_deadline_seconds`` comes from ``--timeout``.
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
    # SIGTERM to SIGKILL for every replica: a preempted worker saves a checkpoint at its next
    # step (ResNet-50's weights and momentum, to object storage); Kubernetes' 30 s is short.
    termination_grace_period: int = DEFAULT_TERMINATION_GRACE_S
    accelerator: str = ""  # GKE: nodeSelector cloud.google.com/gke-accelerator=<this>
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)  # extra; the GPU one is automatic
    service_account: str = ""  # Workload Identity: a KSA bound to a GCP service account
    gcs_secret: str = ""  # or: a secret holding key.json, mounted at /var/secrets/google
    pvc: str = ""  # CLAIM:MOUNT_PATH, for data/model dirs on a shared volume
    env: dict[str, str] = field(default_factory=dict)
    active_deadline_seconds: int | None = None
    run_id: str = ""

    # Who derives what name from the job's name (for the error about a name too long).
    NAMES = ""

    @abc.abstractmethod
    def replica_suffixes(self) -> list[str]:
        """What the controller appends to the job's name for the pods' names (or hostnames)."""

    def validate(self) -> "ClusterOptions":
        """Raise UserError, one line naming the flag, for the first setting the cluster would
        refuse or the pods could not work with; return self."""
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
        if self.termination_grace_period < 0:
            raise UserError(f"--termination-grace-period {self.termination_grace_period}: must "
                            "be 0 or more seconds")
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
            f"{flag} {uri} is a local path, which the job's pods cannot see: use a gs:// URI, "
            "or mount a shared volume with --pvc CLAIM:/mount and put the path under it"
        )

    # -- pieces of the pods both backends describe alike --

    def environment(self) -> list[dict]:
        """The containers' ``env``: ``--env`` sorted by name, then the GCP key's path."""
        env = [{"name": key, "value": value} for key, value in sorted(self.env.items())]
        if self.gcs_secret:
            env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS",
                        "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"})
        return env

    def shared_volumes(self) -> tuple[list[dict], list[dict]]:
        """``(volumes, mounts)`` for the GCP key secret and the ``--pvc`` claim (each if set)."""
        volumes, mounts = [], []
        if self.gcs_secret:
            volumes.append({"name": "gcs-key", "secret": {"secretName": self.gcs_secret}})
            mounts.append({"name": "gcs-key", "mountPath": GCS_KEY_DIR, "readOnly": True})
        mount = self.pvc_mount()
        if mount:
            volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": mount[0]}})
            mounts.append({"name": "data", "mountPath": mount[1]})
        return volumes, mounts

    def placement(self, gpus: bool) -> dict:
        """The pod spec's ``terminationGracePeriodSeconds``, ``serviceAccountName``,
        ``nodeSelector`` and ``tolerations`` (each if any); with ``gpus``, the ``nvidia.com/gpu``
        taint is tolerated."""
        spec: dict = {"terminationGracePeriodSeconds": self.termination_grace_period}
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        node_selector = dict(self.node_selector)
        if self.accelerator:
            node_selector[GKE_ACCELERATOR_LABEL] = self.accelerator
        if node_selector:
            spec["nodeSelector"] = node_selector
        tolerations = list(self.tolerations)
        if gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
            # GPU node pools are tainted nvidia.com/gpu (GKE adds this toleration by itself;
            # other clusters do not).
            tolerations.append({"key": GPU_RESOURCE, "operator": "Exists",
                                "effect": "NoSchedule"})
        if tolerations:
            spec["tolerations"] = tolerations
        return spec

    def metadata(self, spec: dict) -> dict:
        """The job's ``metadata``: name, namespace (if set), labels, and the annotations with the
        hash of ``spec`` and the run id."""
        annotations = {SPEC_HASH_ANNOTATION: spec_hash(spec)}
        if self.run_id:
            annotations[RUN_ID_ANNOTATION] = self.run_id
        metadata: dict = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        metadata.update(labels=dict(APP_LABELS), annotations=annotations)
        return metadata


def _check_name(flag: str, value: str, pattern: re.Pattern, longest: int) -> None:
    if len(value) > longest or not pattern.match(value):
        allowed = "'-' and '.'" if pattern is _DNS1123_SUBDOMAIN else "'-'"
        raise UserError(
            f"{flag} {value!r} is not a valid Kubernetes name: lower-case letters, digits and "
            f"{allowed}, at most {longest} characters"
        )


def validate_job_name(name: str, suffixes: list[str], names: str) -> None:
    """Raise UserError unless ``name`` is a job name the controller accepts *and* can derive
    valid names from: ``name`` plus each of ``suffixes`` must be a DNS-1035 label of at most 63
    characters. ``names`` says who derives what (``"the operator names a Service"``)."""
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

    The same run id always gives the same name (what lets a restarted launcher find its job);
    25 characters leave room for any replica suffix.
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
    """``KEY[=VALUE][:EFFECT]`` (kubectl taint syntax) into a toleration; ``...:NoExecute:SECONDS``
    adds ``tolerationSeconds`` (how long a pod stays bound to a node that gets the taint)."""
    rest, _, effect = spec.partition(":")
    effect, _, seconds = effect.partition(":")
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
    if seconds:
        if effect != "NoExecute" or not seconds.isdigit():
            raise UserError(f"--toleration {spec!r}: only KEY[=VALUE]:NoExecute:SECONDS takes "
                            "seconds (a whole number: tolerationSeconds)")
        toleration["tolerationSeconds"] = int(seconds)
    return toleration


def spec_hash(spec: dict) -> str:
    """A short, stable digest of a job's spec (key order and whitespace do not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
