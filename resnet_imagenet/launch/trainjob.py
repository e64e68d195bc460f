"""The TrainJob backend (Kubeflow Trainer v2, ``trainer.kubeflow.org/v1alpha1``):
:class:`TrainJobOptions`, the manifest built from them (a plain dict, without I/O), and
:data:`BACKEND`, how the lifecycle reads a TrainJob's status and finds its pods.

The TrainJob references a TrainingRuntime of ``manifests/components/trainer-v2``
(:data:`RUNTIME`, or :data:`RUNTIME_WITH_EVALUATOR` with ``--evaluator``), which holds what every
run shares; the TrainJob holds the run's own settings: ``spec.trainer`` (image, args,
``numNodes``, resources, env), ``spec.runtimePatches`` (service account, node placement,
volumes, the evaluator's directories) and ``spec.activeDeadlineSeconds``. Each pod's trainer
builds its TF_CONFIG from what JobSet gives it
(:func:`resnet_imagenet.training.strategy.tf_config_from_jobset`). See docs/launching.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema
from resnet_imagenet.launch.backend import ClusterBackend, condition
from resnet_imagenet.launch.options import APP_LABELS, GPU_RESOURCE, ClusterOptions
from resnet_imagenet.launch.runtime import train_dirs
from resnet_imagenet.training import strategy

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "resnet-imagenet-tensorflow"
RUNTIME_WITH_EVALUATOR = "resnet-imagenet-tensorflow-evaluator"
RUNTIME_KIND = "TrainingRuntime"  # namespaced: see manifests/components/trainer-v2
NODE = "node"  # the replicated job and the container Trainer v2 fills from spec.trainer
EVALUATOR = "evaluator"  # the evaluator's replicated job and container
# The replicated jobs of each runtime and their containers (what a runtime patch may name).
RUNTIME_JOBS = {
    RUNTIME: {NODE: {NODE}},
    RUNTIME_WITH_EVALUATOR: {NODE: {NODE}, EVALUATOR: {EVALUATOR}},
}
PATCH_MANAGER = "resnet-imagenet/launch"  # runtimePatches[].manager: a domain-prefixed path
RBAC_MANIFEST = "manifests/components/trainer-v2/rbac.yaml"
RBAC_HINT = (f"{RBAC_MANIFEST} (list ../../components/trainer-v2 under an overlay's "
             "components, then kubectl apply -k it)")
# What the evaluator container's args read ($(VAR) expansion), set by the runtime patch.
DATA_DIR_ENV, MODEL_DIR_ENV = "RESNET_IMAGENET_DATA_DIR", "RESNET_IMAGENET_MODEL_DIR"

# Labels JobSet and the Job controller put on the pods.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@dataclass
class TrainJobOptions(ClusterOptions):
    """:class:`~resnet_imagenet.launch.options.ClusterOptions` for a TrainJob. ``--evaluator``
    picks the runtime with the evaluator job, which runs on one GPU, so it needs
    ``gpus_per_worker`` of 1 or more. Restart and clean-up policies, retries and TTL are the
    runtime's (a TrainJob has no such fields)."""

    NAMES = "JobSet names a pod (its hostname)"

    def replica_suffixes(self) -> list[str]:
        """What JobSet appends to the name for pod hostnames: ``-node-0-<i>``, ``-evaluator-0-0``
        (``<jobset>-<replicated job>-<job index>-<completion index>``; the TrainJob's name is
        the JobSet's)."""
        suffixes = [f"-{NODE}-0-{self.workers - 1}"]
        if self.evaluator:
            suffixes.append(f"-{EVALUATOR}-0-0")
        return suffixes

    @property
    def runtime(self) -> str:
        return RUNTIME_WITH_EVALUATOR if self.evaluator else RUNTIME

    def validate(self) -> "TrainJobOptions":
        if self.evaluator and self.gpus_per_worker < 1:
            raise UserError(
                f"--evaluator with --backend trainjob runs on one GPU (the runtime "
                f"{RUNTIME_WITH_EVALUATOR} fixes its resources): give --gpus-per-worker 1 or "
                "more, or leave out --evaluator"
            )
        super().validate()
        return self


def _pod_patch(opts: TrainJobOptions, container: str, gpus: bool, env: list[dict]) -> dict:
    """The runtime patch of one replicated job's pod template: placement, and the volumes every
    pod gets (/dev/shm of ``--shm-size``, the runtime's volume resized: a strategic merge by
    name; the GCP key; the shared volume)."""
    shared_volumes, mounts = opts.shared_volumes()
    spec = opts.placement(gpus)  # tolerations: a list without merge key, replaces the runtime's
    spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": str(opts.shm_size)}},
                       *shared_volumes]
    patched: dict = {"name": container}
    if env:
        patched["env"] = env
    if mounts:
        patched["volumeMounts"] = mounts
    spec["containers"] = [patched]
    return {"metadata": {"labels": {**APP_LABELS,
                                    "app.kubernetes.io/component": "worker" if container == NODE
                                    else EVALUATOR}},
            "spec": spec}


def build_trainjob(opts: TrainJobOptions) -> dict:
    """The TrainJob manifest for ``opts``, checked against the CRD schema and what Trainer v2's
    webhook refuses."""
    opts.validate()
    data_dir, model_dir = train_dirs(opts.train_args)
    limits: dict = {"memory": str(opts.memory)}
    if opts.gpus_per_worker:
        # A string, as Trainer's defaulting webhook stores quantities (the spec hash and a
        # re-attach then compare like with like).
        limits[GPU_RESOURCE] = str(opts.gpus_per_worker)
    trainer = {
        "image": opts.image,
        "command": ["resnet-imagenet"],
        "args": ["train", *opts.train_args],
        "numNodes": opts.workers,
        "resourcesPerNode": {"requests": {"cpu": str(opts.cpu), "memory": str(opts.memory)},
                             "limits": limits},
        "env": [*opts.environment(),
                {"name": strategy.NUM_NODES_ENV, "value": str(opts.workers)},
                # the trainer stops if it sees fewer (--allow-cpu)
                *([{"name": strategy.GPUS_ENV, "value": str(opts.gpus_per_worker)}]
                  if opts.gpus_per_worker else [])],
    }
    jobs = [{"name": NODE, "template": {"spec": {"template": _pod_patch(
        opts, NODE, bool(opts.gpus_per_worker), env=[])}}}]
    if opts.evaluator:
        env = [*opts.environment(), {"name": DATA_DIR_ENV, "value": data_dir},
               {"name": MODEL_DIR_ENV, "value": model_dir}]
        jobs.append({"name": EVALUATOR, "template": {"spec": {"template": _pod_patch(
            opts, EVALUATOR, True, env=env)}}})
    spec: dict = {
        "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": opts.runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {
            "template": {"spec": {"replicatedJobs": jobs}}}}],
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": opts.metadata(spec),
            "spec": spec}
    return schema.validate_trainjob(body, RUNTIME_JOBS[opts.runtime])


class TrainJobBackend(ClusterBackend):
    """TrainJobs: a JobSet of the same name whose ``node`` Indexed Job runs the workers (pod of
    completion index 0 the chief), conditions Complete/Failed, counts in ``status.jobsStatus``."""

    name = "trainjob"
    group, version, plural, kind = GROUP, VERSION, PLURAL, KIND
    installer = "Kubeflow Trainer v2.2 or later"
    rbac_manifest, rbac_hint = RBAC_MANIFEST, RBAC_HINT
    containers = (NODE, EVALUATOR)
    chief_prefix = f"{NODE}-0"
    # Not Foreground: Trainer v2.3 applies the JobSet of a TrainJob that waits for its
    # dependents again each time the garbage collector removed it (docs/launching.md). The
    # TrainJob goes at once; the launcher waits for the pods.
    propagation_policy = "Background"

    def manifest(self, opts: TrainJobOptions) -> dict:
        return build_trainjob(opts)

    def refusal_hint(self, message: str, namespace: str) -> str:
        if "trainingRuntime must be created" in message:
            return (f"; install the runtimes in namespace '{namespace}' (the overlay with "
                    "../../components/trainer-v2, kubectl apply -k)")
        return ""

    def succeeded(self, job: dict) -> bool:
        return condition(job, "Complete") is not None

    def failure(self, job: dict) -> dict | None:
        return condition(job, "Failed")

    def progress(self, status: dict) -> str | None:
        """``node active=2 ready=2 succeeded=0 failed=0`` from ``status.jobsStatus``."""
        jobs = status.get("jobsStatus")
        if not jobs:
            return None
        return "; ".join(
            f"{job.get('name')} " + " ".join(f"{k}={job.get(k, 0)}"
                                             for k in ("active", "ready", "succeeded", "failed"))
            for job in sorted(jobs, key=lambda j: j.get("name", "")))

    def pod_selector(self, name: str) -> str:
        return f"{JOBSET_NAME_LABEL}={name}"

    def chief_pod(self, core, namespace: str, name: str, request_timeout):
        """The pod of completion index 0 of the ``node`` Job (its name has a random suffix, and a
        replacement pod gets another): the newest one not being deleted, else the newest."""
        selector = ",".join((f"{JOBSET_NAME_LABEL}={name}", f"{REPLICATED_JOB_LABEL}={NODE}",
                             f"{COMPLETION_INDEX_LABEL}=0"))
        pods = core.list_namespaced_pod(namespace, label_selector=selector,
                                        _request_timeout=request_timeout).items
        if not pods:
            return None
        pods.sort(key=lambda p: (p.metadata.deletion_timestamp is None,
                                 p.metadata.creation_timestamp or 0, p.metadata.name))
        return pods[-1]

    def replica_name(self, pod) -> str:
        """``node-1``, ``evaluator-0``: the replicated job and the pod's completion index."""
        labels = pod.metadata.labels or {}
        return "-".join((labels.get(REPLICATED_JOB_LABEL, "pod"),
                         labels.get(COMPLETION_INDEX_LABEL, "?")))


BACKEND = TrainJobBackend()
