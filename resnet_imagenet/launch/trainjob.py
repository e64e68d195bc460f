"""The Kubeflow Trainer v2 TrainJob (``trainer.kubeflow.org/v1alpha1``) for a training run: a
manifest built from :class:`TrainJobOptions`, a plain dict, without I/O.
:mod:`resnet_imagenet.launch.cluster` submits it, follows it and cleans it up, as it does TFJobs.

Trainer v2 has no TensorFlow runtime: TensorFlow runs under the PlainML policy, and TF_CONFIG is
the user's to set (kubeflow/trainer#2699). The TrainJob references a TrainingRuntime the
manifests ship (``manifests/components/trainer-v2``): ``resnet-imagenet-tensorflow``, one
``node`` replicated job (an Indexed Job of ``numNodes`` pods, run by JobSet), or
``resnet-imagenet-tensorflow-evaluator``, the same plus an ``evaluator`` replicated job running
``evaluate --watch``. The runtime holds what every run shares (the pod security context,
/dev/shm, the port, the failure policy, the Downward-API variables TF_CONFIG is built from);
the TrainJob holds the run's own settings:

* ``spec.trainer``: the image, ``resnet-imagenet train ARGS``, ``numNodes`` (= ``--workers``),
  ``resourcesPerNode`` (CPU, memory, GPUs), and the environment (``--env``, the GCP key's path,
  and :data:`~resnet_imagenet.training.strategy.NUM_NODES_ENV`, the one thing a pod cannot read
  off itself);
* ``spec.runtimePatches``: the pods' service account, node selector (``--accelerator``,
  ``--node-selector``), tolerations (the GPU taint's automatically), volumes (``--pvc``,
  ``--gcs-secret``, /dev/shm's size), and the evaluator's directories;
* ``spec.activeDeadlineSeconds`` from ``--timeout``.

Each pod's trainer builds its TF_CONFIG from what JobSet gives it
(:func:`resnet_imagenet.training.strategy.tf_config_from_jobset`), the same shape the training
operator injects into TFJob pods and the local backend writes. What the runtime decides for
every TrainJob (restart and clean-up policies, retries, TTL) are not TrainJob fields: the TFJob
flags for them are refused here when changed, with where to change them instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import schema, tfjob
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

# TFJob flags whose settings the runtime owns under Trainer v2, with their TFJob defaults.
_RUNTIME_OWNED = {
    "restart_policy": "--restart-policy",
    "clean_pod_policy": "--clean-pod-policy",
    "backoff_limit": "--backoff-limit",
    "ttl_seconds_after_finished": "--ttl-seconds-after-finished",
}


@dataclass
class TrainJobOptions(tfjob.TFJobOptions):
    """The TFJob options (the same flags mean the same things) for a TrainJob.

    ``restart_policy``, ``clean_pod_policy``, ``backoff_limit`` and
    ``ttl_seconds_after_finished`` must keep their defaults: the runtime decides them for every
    TrainJob (a TrainJob has no such fields). ``--evaluator`` picks the runtime with the
    evaluator job, which runs on one GPU, so it needs ``gpus_per_worker`` of 1 or more.
    """

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
        defaults = {f.name: f.default for f in dataclasses.fields(tfjob.TFJobOptions)}
        for attribute, flag in _RUNTIME_OWNED.items():
            value = getattr(self, attribute)
            if value != defaults[attribute]:
                raise UserError(
                    f"{flag} {value}: with --backend trainjob the TrainingRuntime decides this "
                    f"for every TrainJob; leave the flag out, or edit the runtime in "
                    "manifests/components/trainer-v2"
                )
        if self.evaluator and self.gpus_per_worker < 1:
            raise UserError(
                f"--evaluator with --backend trainjob runs on one GPU (the runtime "
                f"{RUNTIME_WITH_EVALUATOR} fixes its resources): give --gpus-per-worker 1 or "
                "more, or leave out --evaluator"
            )
        super().validate()
        return self


def _volumes(opts: TrainJobOptions) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) every pod gets: /dev/shm of ``--shm-size`` (the runtime's volume, resized:
    a strategic merge by name), the GCP key, the shared volume."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                             "sizeLimit": str(opts.shm_size)}}]
    mounts = []
    if opts.gcs_secret:
        volumes.append({"name": "gcs-key", "secret": {"secretName": opts.gcs_secret}})
        mounts.append({"name": "gcs-key", "mountPath": tfjob.GCS_KEY_DIR, "readOnly": True})
    mount = opts.pvc_mount()
    if mount:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": mount[0]}})
        mounts.append({"name": "data", "mountPath": mount[1]})
    return volumes, mounts


def _pod_patch(opts: TrainJobOptions, container: str, gpus: bool, env: list[dict]) -> dict:
    """The runtime patch of one replicated job's pod template."""
    volumes, mounts = _volumes(opts)
    spec: dict = {}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    node_selector = dict(opts.node_selector)
    if opts.accelerator:
        node_selector[tfjob.GKE_ACCELERATOR_LABEL] = opts.accelerator
    if node_selector:
        spec["nodeSelector"] = node_selector
    tolerations = list(opts.tolerations)
    if gpus and not any(t.get("key") == tfjob.GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": tfjob.GPU_RESOURCE, "operator": "Exists",
                            "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations  # a list without merge key: replaces the runtime's
    spec["volumes"] = volumes
    patched: dict = {"name": container}
    if env:
        patched["env"] = env
    if mounts:
        patched["volumeMounts"] = mounts
    spec["containers"] = [patched]
    return {"metadata": {"labels": {**tfjob.APP_LABELS,
                                    "app.kubernetes.io/component": "worker" if container == NODE
                                    else EVALUATOR}},
            "spec": spec}


def _env(opts: TrainJobOptions) -> list[dict]:
    env = [{"name": key, "value": value} for key, value in sorted(opts.env.items())]
    if opts.gcs_secret:
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS",
                    "value": f"{tfjob.GCS_KEY_DIR}/{tfjob.GCS_KEY_FILE}"})
    return env


def build_trainjob(opts: TrainJobOptions) -> dict:
    """The TrainJob manifest for ``opts``, checked against the CRD schema and what Trainer v2's
    webhook refuses."""
    opts.validate()
    data_dir, model_dir = train_dirs(opts.train_args)
    limits: dict = {"memory": str(opts.memory)}
    if opts.gpus_per_worker:
        # A string, as Trainer's defaulting webhook stores quantities (the spec hash and a
        # re-attach then compare like with like).
        limits[tfjob.GPU_RESOURCE] = str(opts.gpus_per_worker)
    trainer = {
        "image": opts.image,
        "command": ["resnet-imagenet"],
        "args": ["train", *opts.train_args],
        "numNodes": opts.workers,
        "resourcesPerNode": {"requests": {"cpu": str(opts.cpu), "memory": str(opts.memory)},
                             "limits": limits},
        "env": _env(opts) + [{"name": strategy.NUM_NODES_ENV, "value": str(opts.workers)}],
    }
    jobs = [{"name": NODE, "template": {"spec": {"template": _pod_patch(
        opts, NODE, bool(opts.gpus_per_worker), env=[])}}}]
    if opts.evaluator:
        env = _env(opts) + [{"name": DATA_DIR_ENV, "value": data_dir},
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
    annotations = {tfjob.SPEC_HASH_ANNOTATION: tfjob.spec_hash(spec)}
    if opts.run_id:
        annotations[tfjob.RUN_ID_ANNOTATION] = opts.run_id
    metadata: dict = {"name": opts.name}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    metadata.update(labels=dict(tfjob.APP_LABELS), annotations=annotations)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
    return schema.validate_trainjob(body, RUNTIME_JOBS[opts.runtime])


def trainjob_yaml(opts: TrainJobOptions) -> str:
    """:func:`build_trainjob` as YAML for ``kubectl apply -f -``."""
    return yaml.safe_dump(build_trainjob(opts), sort_keys=False, default_flow_style=False)
