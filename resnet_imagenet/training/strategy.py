"""The distribution strategy, chosen from the environment the process runs in.

* ``TF_CONFIG`` naming more than one worker (what the training operator injects into every TFJob
  pod, and what the local launcher writes): ``MultiWorkerMirroredStrategy``, NCCL all-reduce on
  GPUs, RING (gRPC) on CPUs. Worker 0 is the chief (or the task of type ``chief``, if the
  cluster has one).
* Several local GPUs: ``MirroredStrategy``.
* Otherwise the default strategy (one device).

``TF_CONFIG`` is parsed and checked here before TensorFlow starts any server, so a malformed one
is a one-line error rather than a gRPC stack trace or a hang.

Under Kubeflow Trainer v2 nobody injects ``TF_CONFIG`` (its PlainML policy leaves it to the
user): :func:`tf_config_from_jobset` builds it, the same shape, from what JobSet gives each pod of
the ``resnet-imagenet-tensorflow`` runtime, and :func:`ensure_tf_config` sets it before the
strategy starts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

WORKER_JOBS = ("chief", "worker")
EVALUATOR_JOB = "evaluator"
PORT = 2222  # the workers' gRPC port: the training operator's, and the runtime's containerPort

# What a pod of the resnet-imagenet-tensorflow TrainingRuntime has (manifests/components/
# trainer-v2).
# The Job controller sets the completion index in every pod of an Indexed Job:
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
# The runtime copies JobSet's pod labels into these (Downward API):
JOBSET_NAME_ENV = "JOBSET_NAME"  # jobset.sigs.k8s.io/jobset-name: the TrainJob's name
REPLICATED_JOB_ENV = "JOBSET_REPLICATED_JOB"  # jobset.sigs.k8s.io/replicatedjob-name: "node"
JOB_INDEX_ENV = "JOBSET_JOB_INDEX"  # jobset.sigs.k8s.io/job-index: 0 (one node Job)
# The TrainJob's spec.trainer.env (the launcher sets it to numNodes): no label carries it.
NUM_NODES_ENV = "RESNET_IMAGENET_NUM_NODES"
# The GPUs a launcher gave this worker (`launch --gpus-per-worker`, every backend sets it): the
# trainer stops when it sees fewer (a CPU-only TensorFlow, no driver) unless --allow-cpu.
GPUS_ENV = "RESNET_IMAGENET_GPUS"
# Optional: the runtime's spec.network.subdomain; JobSet's default is the JobSet's name.
SUBDOMAIN_ENV = "JOBSET_SUBDOMAIN"
_JOBSET_ENVS = (COMPLETION_INDEX_ENV, JOBSET_NAME_ENV, REPLICATED_JOB_ENV, JOB_INDEX_ENV)


@dataclass(frozen=True)
class Cluster:
    """Where this process sits in the training cluster."""

    workers: tuple[str, ...] = field(default_factory=tuple)  # chief first, then workers
    task_type: str = "worker"
    task_index: int = 0
    has_chief_job: bool = False

    @property
    def num_workers(self) -> int:
        return max(1, len(self.workers))

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def worker_id(self) -> int:
        """0..num_workers-1, the chief being 0."""
        if self.task_type == "chief":
            return 0
        return self.task_index + (1 if self.has_chief_job else 0)

    @property
    def is_chief(self) -> bool:
        return self.worker_id == 0


def tf_config_json(workers: list[str], task_type: str, index: int,
                   evaluator: str | None = None) -> str:
    """TF_CONFIG as training-operator v1.9 writes it: Go's compact JSON, key order included
    (a Go map's keys sorted: "evaluator" before "worker"). With an Evaluator replica the
    operator names it in the cluster of every replica, the workers' too."""
    cluster = {"evaluator": [evaluator]} if evaluator else {}
    cluster["worker"] = workers
    return json.dumps({
        "cluster": cluster,
        "task": {"type": task_type, "index": index},
        "environment": "cloud",
    }, separators=(",", ":"))


def tf_config_from_jobset(environ=None) -> str | None:
    """TF_CONFIG for a pod of a JobSet's Indexed Job, or None outside one (no
    ``RESNET_IMAGENET_NUM_NODES``).

    Worker ``i`` is the pod of completion index ``i``; JobSet gives it the hostname
    ``<jobset>-<replicated job>-<job index>-<i>`` and the subdomain of its headless Service
    (named after the JobSet), so its address is ``<that>.<subdomain>:2222``, the form Trainer v2
    itself uses for a runtime's endpoints.
    """
    environ = os.environ if environ is None else environ
    if NUM_NODES_ENV not in environ:
        return None
    missing = [name for name in _JOBSET_ENVS if not environ.get(name, "").strip()]
    if missing:
        raise UserError(
            f"{NUM_NODES_ENV} is set but {', '.join(missing)} is not: run the TrainJob with the "
            "resnet-imagenet-tensorflow runtime (manifests/components/trainer-v2), which sets "
            "them, or set TF_CONFIG yourself"
        )
    numbers = {}
    for name in (NUM_NODES_ENV, COMPLETION_INDEX_ENV, JOB_INDEX_ENV):
        try:
            numbers[name] = int(environ[name])
        except ValueError:
            raise UserError(f"{name}={environ[name]!r} is not a whole number") from None
    nodes, index = numbers[NUM_NODES_ENV], numbers[COMPLETION_INDEX_ENV]
    if not 0 <= index < nodes:
        raise UserError(f"{COMPLETION_INDEX_ENV}={index} is out of range for {NUM_NODES_ENV}="
                        f"{nodes}: the TrainJob's numNodes and its environment disagree")
    jobset = environ[JOBSET_NAME_ENV].strip()
    subdomain = environ.get(SUBDOMAIN_ENV, "").strip() or jobset
    prefix = f"{jobset}-{environ[REPLICATED_JOB_ENV].strip()}-{numbers[JOB_INDEX_ENV]}"
    workers = [f"{prefix}-{i}.{subdomain}:{PORT}" for i in range(nodes)]
    return tf_config_json(workers, "worker", index)


def ensure_tf_config(environ=None) -> None:
    """Set TF_CONFIG from JobSet's environment when it is absent (see
    :func:`tf_config_from_jobset`); an existing TF_CONFIG always wins."""
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG", "").strip():
        return
    built = tf_config_from_jobset(environ)
    if built is not None:
        environ["TF_CONFIG"] = built
        log.info("TF_CONFIG from the JobSet: %s", built)


def cluster_from_env(environ=None) -> Cluster:
    """Parse ``TF_CONFIG``; no variable (or no cluster in it) means a single worker."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return Cluster()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}): "
                        'expected {"cluster": {"worker": [...]}, "task": {...}}') from None
    if not isinstance(config, dict):
        raise UserError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster = config.get("cluster") or {}
    task = config.get("task") or {}
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError("TF_CONFIG 'cluster' and 'task' must be JSON objects")
    if not cluster:
        return Cluster()
    other_jobs = sorted(set(cluster) - set(WORKER_JOBS) - {EVALUATOR_JOB})
    if other_jobs:
        raise UserError(
            f"TF_CONFIG names job(s) {', '.join(other_jobs)}: this trainer runs synchronous "
            "all-reduce training with 'worker' replicas (and at most one evaluator), no "
            "parameter servers"
        )
    # The evaluator (training-operator puts it in every replica's cluster) takes no part in the
    # all-reduce: the workers leave it out, as MultiWorkerMirroredStrategy does.
    evaluators = cluster.get(EVALUATOR_JOB) or []
    if not isinstance(evaluators, list) or len(evaluators) > 1:
        raise UserError(f"TF_CONFIG names {len(evaluators)} evaluators; at most one is allowed")
    if task.get("type") == EVALUATOR_JOB:
        raise UserError("TF_CONFIG makes this process the evaluator (task type 'evaluator'): "
                        "an evaluator runs `resnet-imagenet evaluate --watch`, not train")
    chief = list(cluster.get("chief") or [])
    workers = list(cluster.get("worker") or [])
    if len(chief) > 1:
        raise UserError(f"TF_CONFIG names {len(chief)} chiefs; at most one is allowed")
    if not all(isinstance(a, str) and ":" in a for a in chief + workers):
        raise UserError("TF_CONFIG cluster addresses must be 'host:port' strings")
    task_type = task.get("type")
    task_index = task.get("index")
    if task_type not in WORKER_JOBS or not isinstance(task_index, int):
        raise UserError(
            f"TF_CONFIG task {task!r} is invalid: expected {{\"type\": \"worker\", \"index\": i}}"
        )
    members = chief if task_type == "chief" else workers
    if not 0 <= task_index < len(members):
        raise UserError(
            f"TF_CONFIG task index {task_index} is out of range: the cluster has "
            f"{len(members)} {task_type} address(es)"
        )
    return Cluster(workers=tuple(chief + workers), task_type=task_type, task_index=task_index,
                   has_chief_job=bool(chief))


def local_gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def make_strategy(cluster: Cluster):
    """The strategy for this process (see the module docstring). Call before any other TF op:
    MultiWorkerMirroredStrategy must configure the runtime before it starts."""
    import tensorflow as tf

    gpus = local_gpus()
    if cluster.is_multi_worker:
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        log.info("MultiWorkerMirroredStrategy: worker %d of %d (%s), %s all-reduce",
                 cluster.worker_id, cluster.num_workers, "chief" if cluster.is_chief else "worker",
                 implementation.name)
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation))
    if len(gpus) > 1:
        log.info("MirroredStrategy over %d local GPUs", len(gpus))
        return tf.distribute.MirroredStrategy()
    log.info("single device: %s", "GPU" if gpus else "CPU")
    return tf.distribute.get_strategy()
