"""ResNet-50 on ImageNet as one KFP v2 pipeline.

    validate-parameters
      -> dataset-ready?
           no:  convert-shards x num_tasks (dsl.ParallelFor) -> finalize-dataset
           yes: use-existing-dataset            (e.g. shards made by the Inception script)
      -> train (the launcher: a TFJob, or local worker processes)
      -> evaluate -> export-saved-model
                  -> training-report

The defaults are the reference recipe: ResNet-50 at 224 px, 4 workers x 1 GPU, global batch
256, 500k steps. Data never passes through KFP's artifact store: shards, checkpoints, logs and
the SavedModel are written to the four URIs given as parameters; the artifacts carry those URIs
and small files (manifest, training config, metrics, the HTML report).

Kubernetes settings (kfp-kubernetes): every step is CPU-only, with requests and limits, and
can be pinned to a node pool with ``step_node_selector``/``step_tolerations``. The GPU node
pool (``gpu_node_selector``/``gpu_tolerations``), the worker count and the GPUs per worker go
into the TFJob that the train step creates. The train step gets its pod's name, namespace and
UID from the downward API, so the launcher makes its pod the TFJob's owner and Kubernetes
deletes the TFJob when the run's pods are deleted.

Service account: kfp-kubernetes 2.17 cannot set one per task; the run's service account is
chosen when the run is submitted (``kfp.Client().create_run_from_pipeline_package(...,
service_account="resnet-imagenet")``, the ServiceAccount of ``manifests/base``); the RBAC there
also binds KFP's default ``pipeline-runner``/``default-editor`` accounts.

``resnet-imagenet run-local`` runs this same function with ``kfp.local`` (backend ``local``).
"""

from typing import Dict, List, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact

from components.convert import convert_shards, finalize_dataset
from components.dataset import dataset_ready, use_existing_dataset
from components.evaluate import evaluate
from components.export import export_saved_model
from components.images import TRAINER_IMAGE
from components.report import training_report
from components.train import train
from components.validate import validate_parameters

PIPELINE_NAME = "resnet50-imagenet"

# The ServiceAccount of manifests/base: the TFJob's pods reach the bucket with its identity.
SERVICE_ACCOUNT = "resnet-imagenet"
SEVEN_DAYS = 7 * 24 * 3600

# (cpu request, cpu limit, memory request, memory limit) of each kind of step.
RESOURCES = {
    "small": ("500m", "1", "1Gi", "2Gi"),  # parameter checks, listings, the launcher's watch
    "convert": ("8", "8", "8Gi", "16Gi"),  # matches the default convert_workers=8
    "tensorflow": ("4", "8", "8Gi", "16Gi"),  # evaluation and export run a ResNet on CPUs
}


class Outputs(NamedTuple):
    saved_model_uri: str
    metrics: Artifact
    report: HTML


def _configure(task: dsl.PipelineTask, kind: str, display_name: str,
               node_selector, tolerations) -> dsl.PipelineTask:
    """Resources, node placement and caching for one step.

    Caching is off for every step: each reads or writes object storage that KFP cannot see, so a
    cached result could point at data that has since changed or gone.
    """
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[kind]
    task.set_display_name(display_name)
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    task.set_caching_options(False)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Train ResNet-50 on ImageNet: convert to TFRecords (skipped when present), "
    "multi-worker training as a TFJob, evaluation, SavedModel export, report.",
)
def resnet50_imagenet(
    raw_uri: str,
    tfrecord_uri: str,
    model_uri: str,
    export_uri: str,
    train_shards: int = 1024,
    validation_shards: int = 128,
    num_tasks: int = 16,
    convert_workers: int = 8,
    seed: int = 0,
    backend: str = "tfjob",
    workers: int = 4,
    gpus_per_worker: int = 1,
    evaluator: bool = False,
    trainer_image: str = TRAINER_IMAGE,
    namespace: str = "",
    gpu_node_selector: Dict[str, str] = {},
    gpu_tolerations: List[str] = [],
    service_account: str = SERVICE_ACCOUNT,
    timeout_seconds: int = SEVEN_DAYS,
    resnet_size: int = 50,
    num_classes: int = 1000,
    image_size: int = 224,
    batch_size: int = 256,
    train_steps: int = 500_000,
    checkpoint_every: int = 5000,
    train_args: List[str] = [],
    export_overwrite: bool = False,
    step_node_selector: Dict[str, str] = {},
    step_tolerations: List[dict] = [],
) -> Outputs:
    """Parameters, in the order the KFP UI lists them.

    Args:
        raw_uri: the raw ILSVRC2012 layout (train/, validation/, validation_labels.txt, ...).
        tfrecord_uri: the TFRecord shards; conversion is skipped when they are complete.
        model_uri: checkpoints, TensorBoard logs (MODEL/logs), config and summary.
        export_uri: the SavedModel goes to EXPORT/1/.
        train_shards: number of train shards (Inception: 1024).
        validation_shards: number of validation shards (Inception: 128).
        num_tasks: conversion tasks running in parallel (pods).
        convert_workers: converter processes in each conversion task.
        seed: shuffling seed of the conversion (same seed, same shards).
        backend: "tfjob" (Kubernetes) or "local" (worker processes in the step's pod).
        workers: TFJob Worker replicas (worker 0 is the chief).
        gpus_per_worker: GPUs per worker (nvidia.com/gpu); 0 trains on CPUs.
        evaluator: add an Evaluator replica (continuous validation for TensorBoard).
        trainer_image: image of the TFJob's replicas.
        namespace: namespace of the TFJob; empty: the namespace of the step's pod.
        gpu_node_selector: node selector of the GPU pods, e.g.
            {"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}.
        gpu_tolerations: extra tolerations of the TFJob's pods, "KEY[=VALUE][:EFFECT]" as
            in `kubectl taint` (the nvidia.com/gpu one is added when GPUs are requested).
        service_account: Kubernetes service account of the TFJob's pods (bucket access).
        timeout_seconds: the TFJob is deleted and the step fails after this; 0: no limit.
        resnet_size: ResNet depth (18, 34, 50, 101, 152, 200).
        num_classes: classes of the dataset (ImageNet: 1000).
        image_size: training and evaluation image size in pixels.
        batch_size: global batch, divisible by workers x gpus_per_worker.
        train_steps: training steps.
        checkpoint_every: steps between checkpoints.
        train_args: further `resnet-imagenet train` flags, e.g. ["--lr-schedule", "cosine"].
        export_overwrite: replace EXPORT/1 when it exists.
        step_node_selector: node selector of every pipeline step (all CPU-only).
        step_tolerations: tolerations of every pipeline step.
    """
    def configure(task, kind, display_name):
        return _configure(task, kind, display_name, step_node_selector, step_tolerations)

    checked = configure(validate_parameters(
        backend=backend, workers=workers, gpus_per_worker=gpus_per_worker,
        batch_size=batch_size, train_steps=train_steps, resnet_size=resnet_size,
        num_classes=num_classes, image_size=image_size, num_tasks=num_tasks,
        train_shards=train_shards, validation_shards=validation_shards,
        timeout_seconds=timeout_seconds,
        raw_uri=raw_uri, tfrecord_uri=tfrecord_uri, model_uri=model_uri, export_uri=export_uri,
    ), "small", "validate parameters")
    ready = configure(dataset_ready(tfrecord_uri=tfrecord_uri), "small", "dataset ready?")
    ready.after(checked)

    with dsl.If(ready.output == False, name="convert"):  # noqa: E712 (a KFP condition)
        with dsl.ParallelFor(items=checked.output, name="convert-tasks") as task_index:
            shards = configure(convert_shards(
                raw_uri=raw_uri, tfrecord_uri=tfrecord_uri, train_shards=train_shards,
                validation_shards=validation_shards, num_tasks=num_tasks,
                task_index=task_index, workers=convert_workers, seed=seed,
            ), "convert", "convert shards")
            # Preemptible nodes and flaky object storage: a task resumes from its last
            # complete shard, so retrying is cheap.
            shards.set_retry(num_retries=3, backoff_duration="15s", backoff_factor=2.0)
        converted = configure(finalize_dataset(tfrecord_uri=tfrecord_uri),
                              "small", "finalize dataset").after(shards)
    with dsl.Else(name="reuse-dataset"):
        existing = configure(use_existing_dataset(tfrecord_uri=tfrecord_uri),
                             "small", "use existing dataset")
    data_uri = dsl.OneOf(converted.outputs["Output"], existing.outputs["Output"])

    trained = configure(train(
        data_uri=data_uri, model_uri=model_uri, backend=backend, workers=workers,
        gpus_per_worker=gpus_per_worker, evaluator=evaluator, trainer_image=trainer_image,
        namespace=namespace, gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations, service_account=service_account,
        timeout_seconds=timeout_seconds, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        resnet_size=resnet_size, num_classes=num_classes, image_size=image_size,
        batch_size=batch_size, train_steps=train_steps, checkpoint_every=checkpoint_every,
        train_args=train_args,
    ), "small", "train")
    # The TFJob's owner is this step's pod: the downward API tells the launcher who it is.
    for env, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                       ("POD_UID", "metadata.uid")):
        kubernetes.use_field_path_as_env(trained, env, field)
    # No automatic retry: the TFJob restarts failed workers itself (restartPolicy, backoffLimit),
    # and a retried launcher after a timeout would start training over. Retrying the run in
    # the KFP UI re-attaches to the TFJob: its name is derived from the run id.

    evaluated = configure(evaluate(data_uri=data_uri, model=trained.outputs["model"]),
                          "tensorflow", "evaluate")
    exported = configure(export_saved_model(
        model=trained.outputs["model"], export_uri=export_uri, overwrite=export_overwrite,
    ), "tensorflow", "export SavedModel").after(evaluated)
    reported = configure(training_report(
        model=trained.outputs["model"], metrics_json=evaluated.outputs["metrics_json"],
    ), "small", "training report")
    return Outputs(saved_model_uri=exported.outputs["Output"],
                   metrics=evaluated.outputs["metrics_json"],
                   report=reported.outputs["report"])
