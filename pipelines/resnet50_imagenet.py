"""ResNet-50 on ImageNet as one KFP v2 pipeline (the why of its shape: docs/pipeline.md).

    validate-parameters
      -> dataset-ready?
           no:  convert-shards x tfrecord_tasks (dsl.ParallelFor, at most
                convert_parallelism at once) -> finalize-dataset
           yes: use-existing-dataset            (e.g. shards made by the Inception script)
      -> train (the launcher: a TFJob or TrainJob, or local worker processes)
      -> evaluate -> export-saved-model
                  -> training-report

The defaults are the reference recipe: ResNet-50 at 224 px, 4 workers x 1 GPU, global batch
256, 500k steps. Shards, checkpoints, logs and the SavedModel go to the four ``data_*_uri``
parameters; the artifacts carry those URIs and small files. Parameter names carry their group
as a prefix (``data_``, ``export_``, ``model_``, ``step_``, ``tfrecord_``, ``train_``).

Compile-time options (:class:`Options`, ``compile_pipeline.py`` flags): the values KFP only
takes as constants, and the KFP backend the YAML is for (see :data:`KFP_BACKENDS`). Submit runs
with ``service_account="resnet-imagenet"`` (the ServiceAccount of ``manifests/base``).
``resnet-imagenet run-local`` runs this same function with ``kfp.local`` (backend ``local``).
"""

from dataclasses import dataclass
from typing import Dict, List, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Metrics

from components.convert import convert_shards, finalize_dataset
from components.dataset import dataset_ready, use_existing_dataset
from components.evaluate import evaluate
from components.export import export_saved_model
from components.images import TRAINER_IMAGE
from components.report import training_report
from components.train import train
from components.validate import validate_parameters
from pipelines import params as pipeline_params
from resnet_imagenet.errors import UserError

PIPELINE_NAME = "resnet50-imagenet"
DISPLAY_NAME = "ResNet-50 on ImageNet"

# The ServiceAccount of manifests/base: the training pods reach the bucket with its identity.
SERVICE_ACCOUNT = "resnet-imagenet"
# The generic overlay's Secret with a GCP key as key.json (manifests/overlays/generic), and
# where the launcher mounts it in the training pods; the steps get it at the same place.
BUCKET_KEY_DIR = "/var/secrets/google"
BUCKET_KEY_FILE = "key.json"
MINUTE, HOUR, DAY = 60, 3600, 24 * 3600

# The KFP backends a compiled YAML is for. "2.17": 2.17.0 or newer, with the run's deadline
# and TTL (PipelineConfig fields that first exist in 2.17.0). "2.14": 2.14.0 to 2.16.x, without
# them: those backends parse the Kubernetes platform document strictly and would silently
# ignore all of it (node selectors, tolerations, pod deadlines, the downward-API variables)
# over one field they do not know. Older than 2.14.0 is not supported: every step has a display
# name, and before 2.14.0 the driver looks producers up by display name
# (kubeflow/pipelines#11173), so the first hand-off between steps fails.
KFP_BACKENDS = ("2.17", "2.14")

# (cpu request, cpu limit, memory request, memory limit) of each kind of step.
RESOURCES = {
    "small": ("500m", "1", "1Gi", "2Gi"),  # parameter checks, listings, the launcher's watch
    "convert": ("8", "8", "8Gi", "16Gi"),  # matches the default tfrecord_workers_per_task=8
    "tensorflow": ("4", "8", "8Gi", "16Gi"),  # evaluation and export run a ResNet on CPUs
}

DEFAULT_TFRECORD_TASKS = 16  # the default of tfrecord_tasks: 1024 + 128 shards in 16 pods

# Retries of the idempotent steps: 3 more attempts after 30 s, 60 s, 120 s (convert: 15 s, ...).
RETRIES = 3


@dataclass(frozen=True)
class Options:
    """What KFP takes only at compile time; ``compile_pipeline.py`` has a flag for each.

    Deadlines are each step pod's ``activeDeadlineSeconds`` (a failed attempt that KFP
    retries). Those of conversion and evaluation depend on the data size: the defaults fit
    ImageNet (1.28M images in 16 tasks of 8 processes; 50,000 validation images on 8 CPUs)
    several times over.
    """

    kfp_backend: str = "2.17"
    convert_parallelism: int = 8  # conversion pods at once (ParallelFor parallelism)
    bucket_key_secret: str = ""  # mount this Secret's key.json into every step and the job
    small_deadline: int = 30 * MINUTE  # checks, listings, finalize, report
    convert_deadline: int = 12 * HOUR  # one conversion task
    evaluate_deadline: int = 6 * HOUR
    export_deadline: int = 2 * HOUR
    train_timeout_max: int = 14 * DAY  # the largest train_timeout_seconds a run may ask
    ttl_after_finished: int = 7 * DAY  # the run's Workflow and pods are deleted after this

    @property
    def train_deadline(self) -> int:
        """The train step's pod: the launcher's own timeout ends training an hour before."""
        return self.train_timeout_max + pipeline_params.TRAIN_STEP_GRACE

    @property
    def run_deadline(self) -> int:
        """The whole run: the longest training plus the longest path of the other steps, with
        conversion of the default task count in waves of ``convert_parallelism`` (two by
        default) and one retry of each step."""
        waves = -(-DEFAULT_TFRECORD_TASKS // self.convert_parallelism)
        others = (2 * self.small_deadline  # validate, dataset ready
                  + 2 * waves * self.convert_deadline + 2 * self.small_deadline  # + finalize
                  + 2 * self.evaluate_deadline + 2 * self.export_deadline)
        return self.train_deadline + others

    def check(self) -> None:
        if self.kfp_backend not in KFP_BACKENDS:
            raise UserError(f"--kfp-backend {self.kfp_backend!r} is unknown: use "
                            + " or ".join(KFP_BACKENDS))
        if self.convert_parallelism < 1:
            raise UserError(f"--convert-parallelism {self.convert_parallelism} must be at "
                            "least 1")
        for name in ("small_deadline", "convert_deadline", "evaluate_deadline",
                     "export_deadline", "train_timeout_max", "ttl_after_finished"):
            if getattr(self, name) < 60:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} s is too "
                                "short: give at least 60 seconds")

    def deadline(self, kind: str) -> int:
        return {"small": self.small_deadline, "convert": self.convert_deadline,
                "tensorflow": self.evaluate_deadline, "export": self.export_deadline,
                "train": self.train_deadline}[kind]


class Outputs(NamedTuple):
    saved_model_uri: str
    training_metrics: Metrics
    evaluation_details: Artifact
    report: HTML


def _configure(task: dsl.PipelineTask, kind: str, display_name: str, deadline: int,
               node_selector, tolerations, options: Options) -> dsl.PipelineTask:
    """Resources, deadline, node placement, the bucket key and caching for one step.

    Caching is off for every step: each reads or writes object storage that KFP cannot see, so a
    cached result could point at data that has since changed or gone.
    """
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[kind]
    task.set_display_name(display_name)
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    task.set_caching_options(False)
    kubernetes.set_timeout(task, deadline)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    if options.bucket_key_secret:
        kubernetes.use_secret_as_volume(task, secret_name=options.bucket_key_secret,
                                        mount_path=BUCKET_KEY_DIR)
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS",
                              f"{BUCKET_KEY_DIR}/{BUCKET_KEY_FILE}")
    return task


def _retry(task: dsl.PipelineTask, first_wait: str = "30s") -> dsl.PipelineTask:
    return task.set_retry(num_retries=RETRIES, backoff_duration=first_wait, backoff_factor=2.0,
                          backoff_max_duration="3600s")


def build_pipeline(options: Options = Options()):
    """The pipeline function for ``options`` (compile it, or call it under ``kfp.local``)."""
    options.check()
    config = None
    if options.kfp_backend == "2.17":
        config = dsl.PipelineConfig(active_deadline_seconds=options.run_deadline,
                                    ttl_seconds_after_finished=options.ttl_after_finished)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        display_name=DISPLAY_NAME,
        description="Train ResNet-50 on ImageNet: convert to TFRecords (skipped when present), "
        "multi-worker training as a TFJob or TrainJob, evaluation, SavedModel export, report.",
        pipeline_config=config,
    )
    def resnet50_imagenet(
        data_raw_uri: str,
        data_tfrecord_uri: str,
        data_model_uri: str,
        data_export_uri: str,
        export_overwrite: bool = False,
        model_resnet_depth: int = 50,
        model_num_classes: int = 1000,
        model_image_size: int = 224,
        step_node_selector: Dict[str, str] = {},
        step_tolerations: List[dict] = [],
        tfrecord_shards_train: int = 1024,
        tfrecord_shards_validation: int = 128,
        tfrecord_tasks: int = DEFAULT_TFRECORD_TASKS,
        tfrecord_workers_per_task: int = 8,
        tfrecord_seed: int = 0,
        train_backend: str = "tfjob",
        train_workers: int = 4,
        train_gpus_per_worker: int = 1,
        train_gpu_node_selector: Dict[str, str] = {},
        train_gpu_tolerations: List[dict] = [],
        train_batch_size: int = 256,
        train_steps: int = 0,
        train_checkpoint_every: int = 5000,
        train_evaluator: bool = False,
        train_extra_args: List[str] = [],
        train_image: str = TRAINER_IMAGE,
        train_namespace: str = "",
        train_service_account: str = SERVICE_ACCOUNT,
        train_timeout_seconds: int = 7 * DAY,
        train_start_timeout_seconds: int = 1800,
    ) -> Outputs:
        """Parameters; the KFP UI lists them alphabetically.

        Args:
            data_raw_uri: the raw ILSVRC2012 layout (train/, validation/,
                validation_labels.txt, ...).
            data_tfrecord_uri: the TFRecord shards; conversion is skipped when complete.
            data_model_uri: checkpoints, TensorBoard logs (MODEL/logs), config and summary.
            data_export_uri: the SavedModel goes to EXPORT/1/.
            export_overwrite: replace EXPORT/1 when it holds another model.
            model_resnet_depth: ResNet depth (18, 34, 50, 101, 152, 200).
            model_num_classes: classes of the dataset (ImageNet: 1000).
            model_image_size: training and evaluation image size in pixels.
            step_node_selector: node selector of every pipeline step (all CPU-only).
            step_tolerations: Kubernetes tolerations of every pipeline step, e.g.
                [{"key": "dedicated", "operator": "Equal", "value": "ml",
                "effect": "NoSchedule"}].
            tfrecord_shards_train: number of train shards (Inception: 1024).
            tfrecord_shards_validation: number of validation shards (Inception: 128).
            tfrecord_tasks: conversion tasks (pods); at most --convert-parallelism at once.
            tfrecord_workers_per_task: converter processes in each conversion task.
            tfrecord_seed: shuffling seed of the conversion (same seed, same shards).
            train_backend: "tfjob" (Kubeflow Training Operator), "trainjob" (Kubeflow
                Trainer v2) or "local" (worker processes in the step's pod).
            train_workers: worker replicas (worker 0 is the chief).
            train_gpus_per_worker: GPUs per worker (nvidia.com/gpu); 0 trains on CPUs.
            train_gpu_node_selector: node selector of the training pods, e.g.
                {"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}.
            train_gpu_tolerations: extra Kubernetes tolerations of the training pods, in the
                format of step_tolerations (the nvidia.com/gpu one is added when GPUs are
                requested).
            train_batch_size: global batch, divisible by workers x GPUs per worker.
            train_steps: training steps; 0 = the recipe (500,000 at batch 256, scaled to
                train_batch_size so the epochs stay the same: 125,000 at 1024).
            train_checkpoint_every: steps between checkpoints.
            train_evaluator: add an Evaluator replica (continuous validation for TensorBoard).
            train_extra_args: further `resnet-imagenet train` flags, e.g.
                ["--lr-schedule", "cosine"].
            train_image: image of the training pods.
            train_namespace: namespace of the training job; empty: the step pod's namespace.
            train_service_account: service account of the training pods (bucket access).
            train_timeout_seconds: the job is deleted and the step fails after this; at most
                --train-timeout-max (14 days by default).
            train_start_timeout_seconds: the job is deleted and the step fails when none of
                its replicas has run for this long (unschedulable pods, images not pulled,
                crash loops, a GPU stock-out); 0 waits for ever (a queue that hands out GPUs).
        """
        def configure(task, kind, display_name, deadline_kind=None):
            return _configure(task, kind, display_name, options.deadline(deadline_kind or kind),
                              step_node_selector, step_tolerations, options)

        checked = configure(validate_parameters(
            train_backend=train_backend, train_workers=train_workers,
            train_gpus_per_worker=train_gpus_per_worker, train_batch_size=train_batch_size,
            train_steps=train_steps, model_resnet_depth=model_resnet_depth,
            model_num_classes=model_num_classes, model_image_size=model_image_size,
            tfrecord_tasks=tfrecord_tasks, tfrecord_shards_train=tfrecord_shards_train,
            tfrecord_shards_validation=tfrecord_shards_validation,
            train_timeout_seconds=train_timeout_seconds,
            train_timeout_max_seconds=options.train_timeout_max,
            train_start_timeout_seconds=train_start_timeout_seconds,
            train_gpu_tolerations=train_gpu_tolerations, step_tolerations=step_tolerations,
            train_extra_args=train_extra_args,
            data_raw_uri=data_raw_uri, data_tfrecord_uri=data_tfrecord_uri,
            data_model_uri=data_model_uri, data_export_uri=data_export_uri,
        ), "small", "validate parameters")
        # Not retried: a refusal is final, and a run with bad parameters should fail at once.
        ready = _retry(configure(dataset_ready(tfrecord_uri=data_tfrecord_uri), "small",
                                 "dataset ready?"))
        ready.after(checked)

        with dsl.If(ready.output == False, name="convert"):  # noqa: E712 (a KFP condition)
            with dsl.ParallelFor(items=checked.output, name="convert-tasks",
                                 parallelism=options.convert_parallelism) as task_index:
                shards = configure(convert_shards(
                    raw_uri=data_raw_uri, tfrecord_uri=data_tfrecord_uri,
                    train_shards=tfrecord_shards_train,
                    validation_shards=tfrecord_shards_validation, num_tasks=tfrecord_tasks,
                    task_index=task_index, workers=tfrecord_workers_per_task,
                    seed=tfrecord_seed,
                ), "convert", "convert shards")
                # Preemptible nodes and flaky object storage: a task resumes from its last
                # complete shard, so retrying is cheap.
                _retry(shards, first_wait="15s")
            converted = _retry(configure(finalize_dataset(tfrecord_uri=data_tfrecord_uri),
                                         "small", "finalize dataset")).after(shards)
        with dsl.Else(name="reuse-dataset"):
            existing = _retry(configure(use_existing_dataset(tfrecord_uri=data_tfrecord_uri),
                                        "small", "use existing dataset"))
        data_uri = dsl.OneOf(converted.outputs["Output"], existing.outputs["Output"])

        trained = configure(train(
            data_uri=data_uri, model_uri=data_model_uri, backend=train_backend,
            workers=train_workers, gpus_per_worker=train_gpus_per_worker,
            evaluator=train_evaluator, trainer_image=train_image, namespace=train_namespace,
            gpu_node_selector=train_gpu_node_selector, gpu_tolerations=train_gpu_tolerations,
            service_account=train_service_account, gcs_secret=options.bucket_key_secret,
            timeout_seconds=train_timeout_seconds, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            start_timeout_seconds=train_start_timeout_seconds,
            resnet_size=model_resnet_depth, num_classes=model_num_classes,
            image_size=model_image_size, batch_size=train_batch_size, train_steps=train_steps,
            checkpoint_every=train_checkpoint_every, train_args=train_extra_args,
        ), "small", "train", deadline_kind="train")
        # The downward API tells the launcher which pod it runs in; that pod's Workflow (the
        # run) becomes the job's owner.
        for env, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                           ("POD_UID", "metadata.uid")):
            kubernetes.use_field_path_as_env(trained, env, field)
        # No automatic retry: the job restarts failed workers itself (restartPolicy,
        # backoffLimit), and a retried launcher after a timeout would start training over.
        # Retrying the run in the KFP UI re-attaches to the job: its name comes from the run id,
        # and its owner is the run's Workflow (the launcher reads it off its pod), which the
        # retry keeps while it deletes the failed step's pod.

        evaluated = _retry(configure(evaluate(data_uri=data_uri, model=trained.outputs["model"]),
                                     "tensorflow", "evaluate"))
        exported = _retry(configure(export_saved_model(
            model=trained.outputs["model"], export_uri=data_export_uri,
            overwrite=export_overwrite,
        ), "tensorflow", "export SavedModel", deadline_kind="export").after(evaluated))
        reported = _retry(configure(training_report(
            model=trained.outputs["model"],
            evaluation_details=evaluated.outputs["evaluation_details"],
        ), "small", "training report"))
        return Outputs(saved_model_uri=exported.outputs["Output"],
                       training_metrics=trained.outputs["training_metrics"],
                       evaluation_details=evaluated.outputs["evaluation_details"],
                       report=reported.outputs["report"])

    return resnet50_imagenet


resnet50_imagenet = build_pipeline()
