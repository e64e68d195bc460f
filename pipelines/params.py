"""Pipeline parameters: checked in the pipeline's first step, then turned into command lines.

:func:`validate` runs in the first step of the DAG; its one-line messages name the pipeline
parameter as the KFP UI shows it. Every integer is read with :func:`as_int` (KFP may hand over
``3.0``). The components call :func:`run` with the ``*_argv`` command lines built here. Pure
Python: the launcher step imports it without TensorFlow. The why: docs/pipeline.md.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from resnet_imagenet import storage
from resnet_imagenet.config import RESNET_DEPTHS
from resnet_imagenet.errors import UserError

BACKENDS = ("tfjob", "trainjob", "local")
# The backends whose pods run on the cluster: a TFJob (training-operator v1) or a TrainJob
# (Kubeflow Trainer v2), with the same flags and the same contract.
KUBERNETES_BACKENDS = ("tfjob", "trainjob")
# The train step's pod deadline is the longest allowed training plus this: time for the launcher
# to delete the TFJob/TrainJob after its own timeout and to fail the step cleanly.
TRAIN_STEP_GRACE = 3600


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
    train_backend: str,
    train_workers,
    train_gpus_per_worker,
    train_batch_size,
    train_steps,
    model_resnet_depth,
    model_num_classes,
    model_image_size,
    tfrecord_tasks,
    tfrecord_shards_train,
    tfrecord_shards_validation,
    train_timeout_seconds,
    train_timeout_max_seconds=0,
    train_start_timeout_seconds=0,
    uris: Mapping[str, str],
    tolerations: Mapping[str, Iterable] | None = None,
    train_extra_args: Sequence[str] = (),
) -> None:
    """Refuse a parameter set that could not run, with one line naming the parameter.

    ``uris`` maps parameter names to the URIs the run reads or writes (raw data, TFRecords,
    model, export). With a Kubernetes backend the TFRecords and model URIs must be object
    storage: the training pods run elsewhere and cannot see the launcher pod's files.

    ``train_timeout_max_seconds`` is the longest training the compiled pipeline allows: its
    train step's pod deadline is an hour longer, so the launcher's own timeout always ends
    training first and deletes the TFJob/TrainJob instead of leaving it running on GPUs. With a
    Kubernetes backend the timeout must therefore be between 1 and that maximum (0 = no limit
    is only for the ``local`` backend). ``tolerations`` maps parameter names to lists of
    Kubernetes tolerations (see :func:`toleration_flag`). ``train_extra_args`` are parsed
    and checked with the trainer's own flags, on top of the settings above, so a bad one stops
    the run here rather than after the conversion.
    """
    if train_backend not in BACKENDS:
        raise UserError(
            f"pipeline parameter train_backend={train_backend!r} is unknown: use "
            + " or ".join(repr(b) for b in BACKENDS)
        )
    workers = _at_least("train_workers", train_workers, 1)
    gpus = _at_least("train_gpus_per_worker", train_gpus_per_worker, 0)
    batch = _at_least("train_batch_size", train_batch_size, 1)
    total = replicas(workers, gpus)
    if batch % total:
        what = (f"{total} GPUs (train_workers={workers} x train_gpus_per_worker={gpus})" if gpus
                else f"{total} CPU workers (train_gpus_per_worker=0)")
        suggestion = max(total, batch // total * total)
        raise UserError(
            f"pipeline parameter train_batch_size={batch} is not divisible by the {what}: "
            f"every replica needs the same share of the global batch, use e.g. {suggestion}"
        )
    _at_least("train_steps", train_steps, 0)  # 0: the recipe's length
    _at_least("model_num_classes", model_num_classes, 1)
    _at_least("model_image_size", model_image_size, 1)
    depth = as_int("model_resnet_depth", model_resnet_depth)
    if depth not in RESNET_DEPTHS:
        raise UserError(
            f"pipeline parameter model_resnet_depth={depth} is not a ResNet depth: use one of "
            + ", ".join(map(str, RESNET_DEPTHS))
        )
    shards = (_at_least("tfrecord_shards_train", tfrecord_shards_train, 1)
              + _at_least("tfrecord_shards_validation", tfrecord_shards_validation, 1))
    tasks = _at_least("tfrecord_tasks", tfrecord_tasks, 1)
    if tasks > shards:
        raise UserError(
            f"pipeline parameter tfrecord_tasks={tasks} is more than the {shards} shards to "
            f"write: use at most {shards} conversion tasks"
        )
    _at_least("train_start_timeout_seconds", train_start_timeout_seconds, 0)  # 0: for ever
    timeout = _at_least("train_timeout_seconds", train_timeout_seconds, 0)
    limit = as_int("train_timeout_max_seconds", train_timeout_max_seconds)
    if train_backend in KUBERNETES_BACKENDS and limit and not 0 < timeout <= limit:
        raise UserError(
            f"pipeline parameter train_timeout_seconds={timeout} is outside 1..{limit}: the "
            f"train step's pod deadline is {limit + TRAIN_STEP_GRACE} s, and the launcher "
            "must time out first to delete the training job; use at most "
            f"{limit} or compile the pipeline with a longer --train-timeout-max"
        )
    for name, uri in uris.items():
        if not uri or not str(uri).strip():
            raise UserError(f"pipeline parameter {name} is empty: give a gs://BUCKET/PATH URI")
        storage.scheme(uri)  # refuses unknown schemes with its own one-line message
    if train_backend in KUBERNETES_BACKENDS:
        kind = "TFJob" if train_backend == "tfjob" else "TrainJob"
        for name in ("data_tfrecord_uri", "data_model_uri"):
            if name in uris and not storage.is_remote(uris[name]):
                raise UserError(
                    f"pipeline parameter {name}={uris[name]!r} is a local path, which the "
                    f"{kind}'s pods cannot see: use object storage (gs://BUCKET/PATH) with the "
                    f"{train_backend} backend"
                )
    for name, items in (tolerations or {}).items():
        for toleration in items or ():
            toleration_flag(name, toleration)
    _check_train_args(train_extra_args, resnet_size=depth,
                      num_classes=as_int("model_num_classes", model_num_classes),
                      image_size=as_int("model_image_size", model_image_size), batch_size=batch,
                      train_steps=as_int("train_steps", train_steps))


def _check_train_args(extra: Sequence[str], **settings) -> None:
    from resnet_imagenet.training.cli import config_from_argv

    extra = [str(a) for a in extra or ()]
    argv = ["--data-dir", "unused", "--model-dir", "unused"]
    for name, value in settings.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    try:
        config_from_argv(argv + extra)
    except UserError as exc:
        raise UserError(f"pipeline parameter train_extra_args={extra!r}: {exc} (see "
                        "'resnet-imagenet train --help')") from None


def toleration_flag(name: str, toleration) -> str:
    """One Kubernetes toleration (a dict, as in a pod spec) as the launcher's
    ``--toleration KEY[=VALUE][:EFFECT]``; refuses what that form cannot say.

    Both toleration parameters of the pipeline take this one format: the step pods' list goes
    to kfp-kubernetes as is, the GPU pool's list is turned into launcher flags here. ``name``
    is the pipeline parameter, for the message.
    """
    example = '{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}'
    if not isinstance(toleration, Mapping):
        raise UserError(f"pipeline parameter {name}: {toleration!r} is not a toleration: give "
                        f"Kubernetes tolerations, e.g. [{example}]")
    unknown = sorted(set(toleration) - {"key", "operator", "value", "effect",
                                        "tolerationSeconds"})
    if unknown:
        raise UserError(f"pipeline parameter {name}: unknown toleration field(s) "
                        f"{', '.join(unknown)} in {dict(toleration)}: use key, operator, value, "
                        "effect, tolerationSeconds")
    key, value = str(toleration.get("key") or ""), str(toleration.get("value") or "")
    operator = toleration.get("operator") or ("Equal" if value else "Exists")
    effect = str(toleration.get("effect") or "")
    problem = ""
    if operator not in ("Equal", "Exists"):
        problem = f"operator {operator!r} is not Equal or Exists"
    elif not key:
        problem = "it has no key"
    elif operator == "Exists" and value:
        problem = "operator Exists takes no value"
    elif operator == "Equal" and not value:
        problem = "operator Equal needs a value"
    elif effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        problem = f"effect {effect!r} is not NoSchedule, PreferNoSchedule or NoExecute"
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and not problem:
        if effect != "NoExecute":
            problem = "tolerationSeconds needs effect NoExecute (Kubernetes ignores it otherwise)"
        elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
                seconds < 0 or seconds != int(seconds):
            problem = f"tolerationSeconds {seconds!r} is not a whole number of seconds"
    if problem:
        raise UserError(f"pipeline parameter {name}: toleration {dict(toleration)}: {problem}")
    return (key + (f"={value}" if operator == "Equal" else "") + (f":{effect}" if effect else "")
            + (f":{int(seconds)}" if seconds is not None else ""))


def task_indices(num_tasks) -> list[int]:
    """The items of the conversion ``dsl.ParallelFor``: ``[0, 1, ..., num_tasks - 1]``."""
    return list(range(_at_least("tfrecord_tasks", num_tasks, 1)))


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
        "--train-shards", str(as_int("tfrecord_shards_train", train_shards)),
        "--validation-shards", str(as_int("tfrecord_shards_validation", validation_shards)),
        "--num-tasks", str(as_int("tfrecord_tasks", num_tasks)),
        "--task-index", str(as_int("task_index", task_index)),
        "--workers", str(_at_least("tfrecord_workers_per_task", workers, 1)),
        "--seed", str(as_int("tfrecord_seed", seed)),
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
        "--resnet-size", str(as_int("model_resnet_depth", resnet_size)),
        "--num-classes", str(as_int("model_num_classes", num_classes)),
        "--image-size", str(as_int("model_image_size", image_size)),
        "--batch-size", str(as_int("train_batch_size", batch_size)),
        "--train-steps", str(as_int("train_steps", train_steps)),
        "--checkpoint-every", str(as_int("train_checkpoint_every", checkpoint_every)),
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
    gpu_tolerations: Iterable[Mapping] | None,
    service_account: str,
    train: Sequence[str],
    gcs_secret: str = "",
    start_timeout_seconds=None,
) -> list[str]:
    """``resnet-imagenet launch ... -- <train flags>`` from the pipeline's parameters.

    ``run_id`` (the KFP run id) names the TFJob or TrainJob, so a retried launcher step
    re-attaches to the job its first attempt created instead of starting a second one. Node
    pool selection and tolerations (Kubernetes toleration dicts, turned into the launcher's
    ``KEY[=VALUE][:EFFECT]`` by :func:`toleration_flag`; the launcher adds the
    ``nvidia.com/gpu`` one by itself) apply to the job's pods, which run as
    ``service_account`` (the identity that reaches the bucket) and, with ``gcs_secret``, get
    that Secret's key file; the launcher step itself requests no GPU. Both cluster backends
    take the same flags; ``start_timeout_seconds`` (None: the launcher's default, 0: no limit)
    is their ``--start-timeout``.
    """
    argv = [
        "launch",
        "--backend", backend,
        "--workers", str(as_int("train_workers", workers)),
        "--gpus-per-worker", str(as_int("train_gpus_per_worker", gpus_per_worker)),
    ]
    if evaluator:
        argv.append("--evaluator")
    if backend in KUBERNETES_BACKENDS:
        if trainer_image:
            argv += ["--image", trainer_image]
        if namespace:
            argv += ["--namespace", namespace]
        for key, value in sorted((gpu_node_selector or {}).items()):
            argv += ["--node-selector", f"{key}={value}"]
        for toleration in gpu_tolerations or ():
            argv += ["--toleration", toleration_flag("train_gpu_tolerations", toleration)]
        if service_account:
            argv += ["--service-account", service_account]
        if gcs_secret:
            argv += ["--gcs-secret", gcs_secret]
        if start_timeout_seconds is not None:
            argv += ["--start-timeout",
                     str(as_int("train_start_timeout_seconds", start_timeout_seconds))]
    if run_id:
        argv += ["--run-id", run_id]
    timeout = as_int("train_timeout_seconds", timeout_seconds)
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
