"""The TFJob backend (training-operator v1, ``kubeflow.org/v1``): :class:`TFJobOptions`, the
manifest built from them (a plain dict, without I/O), and :data:`BACKEND`, how the lifecycle
reads a TFJob's status and finds its pods.

The operator injects TF_CONFIG into the ``tensorflow`` container of every replica; the manifest
does not write it. Worker 0 is the chief; an optional Evaluator replica runs
``evaluate --watch``. See docs/launching.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema
from resnet_imagenet.launch.backend import ClusterBackend, condition
from resnet_imagenet.launch.options import APP_LABELS, GPU_RESOURCE, ClusterOptions
from resnet_imagenet.launch.runtime import train_dirs
from resnet_imagenet.training import strategy

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
RESOURCE = f"{PLURAL}.{GROUP}"
CONTAINER = schema.DEFAULT_CONTAINER
PORT_NAME, PORT = "tfjob-port", 2222  # the port the operator puts into TF_CONFIG
RBAC_MANIFEST = "manifests/base/rbac.yaml"
RBAC_HINT = f"{RBAC_MANIFEST} (kubectl apply -k manifests/base)"

# Labels the training operator puts on the pods it creates.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"

RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")
CLEAN_POD_POLICIES = ("Running", "All", "None")


@dataclass
class TFJobOptions(ClusterOptions):
    """:class:`~resnet_imagenet.launch.options.ClusterOptions` plus the TFJob's run policy and
    the pods' user (the trainer image's non-root user, images/trainer/Dockerfile)."""

    restart_policy: str = "ExitCode"
    clean_pod_policy: str = "Running"
    backoff_limit: int = 5
    ttl_seconds_after_finished: int = 86_400
    run_as_user: int = 10001

    NAMES = "the operator names a Service"

    def replica_suffixes(self) -> list[str]:
        """What the operator appends to the job name for pods and Services: ``-worker-<i>``..."""
        suffixes = [f"-worker-{self.workers - 1}"]
        if self.evaluator:
            suffixes.append("-evaluator-0")
        return suffixes

    def validate(self) -> "TFJobOptions":
        super().validate()
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
        return self


def _replica(opts: TFJobOptions, component: str, replicas: int, args: list[str],
             gpus: int) -> dict:
    """One entry of ``tfReplicaSpecs``: ``replicas`` pods running ``resnet-imagenet ARGS``."""
    env = opts.environment()
    if gpus and component == "worker":  # the trainer stops if it sees fewer (--allow-cpu)
        env.append({"name": strategy.GPUS_ENV, "value": str(gpus)})
    shared_volumes, shared_mounts = opts.shared_volumes()
    # tf.data and NCCL use /dev/shm, which is 64 MiB in a container unless a volume replaces it.
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, *shared_mounts]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(opts.shm_size)}},
               *shared_volumes]
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
    pod_spec = opts.placement(bool(gpus))
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
    signal (exit 128+: preemption, OOM kill, node drain), so the worker resumes from its last
    checkpoint, and fail the job on exit codes 1-127.
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
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": opts.metadata(spec),
            "spec": spec}
    return schema.validate_tfjob(body)


class TFJobBackend(ClusterBackend):
    """TFJobs: pods ``<job>-worker-<i>`` (worker 0 the chief), conditions Succeeded/Failed,
    replica counts in ``status.replicaStatuses``."""

    name = "tfjob"
    group, version, plural, kind = GROUP, VERSION, PLURAL, KIND
    installer = "training-operator v1.9"
    rbac_manifest, rbac_hint = RBAC_MANIFEST, RBAC_HINT
    containers = (CONTAINER,)
    chief_prefix = "worker-0"
    restart_reason = f"{KIND}Restarting"  # training-operator's event at each recreated pod

    def manifest(self, opts: TFJobOptions) -> dict:
        return build_tfjob(opts)

    def succeeded(self, job: dict) -> bool:
        return condition(job, "Succeeded") is not None

    def failure(self, job: dict) -> dict | None:
        return condition(job, "Failed")

    def progress(self, status: dict) -> str | None:
        """``Worker active=2 succeeded=0 failed=0`` from ``status.replicaStatuses``."""
        now = status.get("replicaStatuses")
        if not now:
            return None
        return "; ".join(
            f"{rtype} " + " ".join(f"{k}={counts.get(k, 0)}"
                                   for k in ("active", "succeeded", "failed"))
            for rtype, counts in sorted(now.items()))

    def pod_selector(self, name: str) -> str:
        return f"{JOB_NAME_LABEL}={name}"

    def chief_pod(self, core, namespace: str, name: str, request_timeout):
        """The operator names its pods ``<job>-worker-<i>``: worker 0 is the chief."""
        return core.read_namespaced_pod(f"{name}-worker-0", namespace,
                                        _request_timeout=request_timeout)

    def replica_name(self, pod) -> str:
        labels = pod.metadata.labels or {}
        return "-".join((labels.get(REPLICA_TYPE_LABEL, "pod"),
                         labels.get(REPLICA_INDEX_LABEL, "?")))


BACKEND = TFJobBackend()
