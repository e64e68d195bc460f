"""Pipeline parameters: checked in the pipeline's first step, then turned into command lines.

The KFP components (``components/``) are thin: each one calls a function of this module or a
``resnet-imagenet`` subcommand through :func:`run`, so everything a pipeline run decides can be
reached by library tests. :func:`validate` runs in the first step of the DAG, before any data is
converted and before a TFJob (and so a GPU) is requested; its messages name the pipeline
parameter as the KFP UI shows it (``batch_size``, not ``--batch-size``).

KFP hands parameters over as JSON numbers, and a ``dsl.ParallelFor`` item or a collected
output can arrive as ``3.0`` where an int was sent; every integer is therefore read with
:func:`as_int`, which accepts integral floats and nothing else.

Pure Python: the launcher step imports it without TensorFlow.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from resnet_imagenet import storage
from resnet_imagenet.config import RESNET_DEPTHS
from resnet_imagenet.errors import UserError

BACKENDS = ("tfjob", "trainjob", "local")
# The backends whose pods run on the cluster: a TFJob (training-operator v1) or a TrainJob
# (Kubeflow Trainer v2), with the same flags and the same contract.
CLUSTER_BACKENDS = ("tfjob", "trainjob")


def as_int(name: str, value) -> int:
    """``value`` as an int; an integral float (``4.0``) is accepted, anything else refused."""
    if isinstance(value, bool):
        raise UserError(f"pipeline parameter {name}={value!r} must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise UserError(f"pipeline parameter {name}={value!r} must be an integer")


def _at_least(name: str, value, minimum: int) -> int:
    number = as_int(name, value)
    if number < minimum:
        raise UserError(f"pipeline parameter {name}={number} must be at least {minimum}")
    return number


def replicas(workers: int, gpus_per_worker: int) -> int:
    """Replicas of the synchronous all-reduce: one per GPU, or one per worker on CPUs."""
    return workers * gpus_per_worker if gpus_per_worker > 0 else workers


def validate(
    *,
    backend: str,
    workers,
    gpus_per_worker,
    batch_size,
    train_steps,
    resnet_size,
    num_classes,
    image_size,
    num_tasks,
    train_shards,
    validation_shards,
    timeout_seconds,
    uris: Mapping[str, str],
) -> None:
    """Refuse a parameter set that could not run, with one line naming the parameter.

    ``uris`` maps parameter names to the URIs the run reads or writes (raw data, TFRecords,
    model, export). With the ``tfjob`` and ``trainjob`` backends the TFRecords and model URIs
    must be object storage: the job's pods run elsewhere and cannot see the launcher pod's files.
    """
    if backend not in BACKENDS:
        raise UserError(
            f"pipeline parameter backend={backend!r} is unknown: use "
            + " or ".join(repr(b) for b in BACKENDS)
        )
    workers = _at_least("workers", workers, 1)
    gpus = _at_least("gpus_per_worker", gpus_per_worker, 0)
    batch = _at_least("batch_size", batch_size, 1)
    total = replicas(workers, gpus)
    if batch % total:
        what = (f"{total} GPUs (workers={workers} x gpus_per_worker={gpus})" if gpus
                else f"{total} CPU workers (gpus_per_worker=0)")
        suggestion = max(total, batch // total * total)
        raise UserError(
            f"pipeline parameter batch_size={batch} is not divisible by the {what}: "
            f"every replica needs the same share of the global batch, use e.g. {suggestion}"
        )
    _at_least("train_steps", train_steps, 1)
    _at_least("num_classes", num_classes, 1)
    _at_least("image_size", image_size, 1)
    depth = as_int("resnet_size", resnet_size)
    if depth not in RESNET_DEPTHS:
        raise UserError(
            f"pipeline parameter resnet_size={depth} is not a ResNet depth: use one of "
            + ", ".join(map(str, RESNET_DEPTHS))
        )
    shards = (_at_least("train_shards", train_shards, 1)
              + _at_least("validation_shards", validation_shards, 1))
    tasks = _at_least("num_tasks", num_tasks, 1)
    if tasks > shards:
        raise UserError(
            f"pipeline parameter num_tasks={tasks} is more than the {shards} shards to write: "
            f"use at most {shards} conversion tasks"
        )
    _at_least("timeout_seconds", timeout_seconds, 0)
    for name, uri in uris.items():
        if not uri or not str(uri).strip():
            raise UserError(f"pipeline parameter {name} is empty: give a gs://BUCKET/PATH URI")
        storage.scheme(uri)  # refuses unknown schemes with its own one-line message
    if backend in CLUSTER_BACKENDS:
        kind = "TFJob" if backend == "tfjob" else "TrainJob"
        for name in ("tfrecord_uri", "model_uri"):
            if name in uris and not storage.is_remote(uris[name]):
                raise UserError(
                    f"pipeline parameter {name}={uris[name]!r} is a local path, which the "
                    f"{kind}'s pods cannot see: use object storage (gs://BUCKET/PATH) with the "
                    f"{backend} backend"
                )


def task_indices(num_tasks) -> list[int]:
    """The items of the conversion ``dsl.ParallelFor``: ``[0, 1, ..., num_tasks - 1]``."""
    return list(range(_at_least("num_tasks", num_tasks, 1)))


def convert_argv(
    *,
    raw_uri: str,
    tfrecord_uri: str,
    train_shards,
    validation_shards,
    num_tasks,
    task_index,
    workers,
    seed,
) -> list[str]:
    """``resnet-imagenet convert`` for one task of the conversion ``dsl.ParallelFor``.

    Every task gets the same shard counts, task count and seed: the converter derives the file
    list and the shard assignment from them, so the tasks agree without talking.
    """
    return [
        "convert",
        "--raw-dir", raw_uri,
        "--output-dir", tfrecord_uri,
        "--train-shards", str(as_int("train_shards", train_shards)),
        "--validation-shards", str(as_int("validation_shards", validation_shards)),
        "--num-tasks", str(as_int("num_tasks", num_tasks)),
        "--task-index", str(as_int("task_index", task_index)),
        "--workers", str(_at_least("convert_workers", workers, 1)),
        "--seed", str(as_int("seed", seed)),
    ]


def finalize_argv(tfrecord_uri: str) -> list[str]:
    """``resnet-imagenet convert --finalize``: check every task's shards, write the manifest."""
    return ["convert", "--output-dir", tfrecord_uri, "--finalize"]


def train_argv(
    *,
    data_uri: str,
    model_uri: str,
    resnet_size,
    num_classes,
    image_size,
    batch_size,
    train_steps,
    checkpoint_every,
    extra: Sequence[str] = (),
) -> list[str]:
    """The trainer's flags (what follows ``--`` on the launcher's command line).

    ``extra`` holds any further ``resnet-imagenet train`` flags, for settings the pipeline has
    no parameter of its own for (learning-rate schedule, mixed precision, ...).
    """
    extra = [str(a) for a in extra or ()]
    return [
        "--data-dir", data_uri,
        "--model-dir", model_uri,
        "--resnet-size", str(as_int("resnet_size", resnet_size)),
        "--num-classes", str(as_int("num_classes", num_classes)),
        "--image-size", str(as_int("image_size", image_size)),
        "--batch-size", str(as_int("batch_size", batch_size)),
        "--train-steps", str(as_int("train_steps", train_steps)),
        "--checkpoint-every", str(as_int("checkpoint_every", checkpoint_every)),
        *extra,
    ]


def launch_argv(
    *,
    backend: str,
    workers,
    gpus_per_worker,
    evaluator: bool,
    trainer_image: str,
    namespace: str,
    run_id: str,
    timeout_seconds,
    gpu_node_selector: Mapping[str, str] | None,
    gpu_tolerations: Iterable[str] | None,
    service_account: str,
    train: Sequence[str],
) -> list[str]:
    """``resnet-imagenet launch ... -- <train flags>`` from the pipeline's parameters.

    ``run_id`` (the KFP run id) names the TFJob or TrainJob, so a retried launcher step
    re-attaches to the job its first attempt created instead of starting a second one. Node pool
    selection and tolerations (``KEY[=VALUE][:EFFECT]``, as ``kubectl taint``; the launcher adds
    the ``nvidia.com/gpu`` one by itself) apply to the job's pods, which run as
    ``service_account`` (the identity that reaches the bucket); the launcher step itself
    requests no GPU. Both cluster backends take the same flags.
    """
    argv = [
        "launch",
        "--backend", backend,
        "--workers", str(as_int("workers", workers)),
        "--gpus-per-worker", str(as_int("gpus_per_worker", gpus_per_worker)),
    ]
    if evaluator:
        argv.append("--evaluator")
    if backend in CLUSTER_BACKENDS:
        if trainer_image:
            argv += ["--image", trainer_image]
        if namespace:
            argv += ["--namespace", namespace]
        for key, value in sorted((gpu_node_selector or {}).items()):
            argv += ["--node-selector", f"{key}={value}"]
        for toleration in gpu_tolerations or ():
            argv += ["--toleration", str(toleration)]
        if service_account:
            argv += ["--service-account", service_account]
    if run_id:
        argv += ["--run-id", run_id]
    timeout = as_int("timeout_seconds", timeout_seconds)
    if timeout:
        argv += ["--timeout", str(timeout)]
    return argv + ["--", *train]


def run(argv: Sequence[str]) -> None:
    """Run one ``resnet-imagenet`` subcommand in this process; raise if it exits non-zero.

    The subcommand has already printed its one-line reason on stderr, which is the step's log.
    """
    from resnet_imagenet.cli import main

    status = main(list(argv))
    if status:
        raise RuntimeError(
            f"'resnet-imagenet {argv[0]}' exited with status {status}; its error is in the "
            "log above"
        )
