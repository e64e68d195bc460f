"""Run the whole KFP pipeline on this machine: the demo of `make demo`.

    demo data (built if missing) -> convert -> multi-worker training -> evaluate -> export
    -> report, then predictions on a few validation images

This is the *same* pipeline function that ``compile_pipeline.py`` compiles for a cluster
(``pipelines/resnet50_imagenet.py``), run by ``kfp.local`` with the subprocess runner in this
Python environment, and with the ``local`` launcher backend: training runs as ``--workers``
processes with TF_CONFIG, exactly the contract of a TFJob. The steps' Kubernetes settings
(resources, node selectors, tolerations) have no effect here; retries do.

Layout of WORKDIR (default ./demo):

    raw/                 demo dataset in the raw ImageNet layout, or (--archives) as the four
                         official archives (made once; convert reads either)
    tfrecords/           TFRecord shards + manifest.json (converted once, then reused)
    runs/<run id>/model  checkpoints and TensorBoard logs of one run
    runs/<run id>/saved_model/1
    runs/<run id>/kfp    KFP outputs: artifacts, metrics, the HTML report
    runs/<run id>/report.html   a copy of the report

The default configuration is sized for a 2-core laptop: ResNet-18 on 24x24 images.

The ``resnet-imagenet run-local`` command: registered in the ``resnet_imagenet.commands``
entry-point group (pyproject.toml), so the library's CLI runs it without importing kfp itself.
kfp is imported only when the pipeline runs.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

from pipelines import params as pipeline_params
from resnet_imagenet import preflight, storage
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

# The line of `resnet-imagenet --help` for this command (see resnet_imagenet.cli).
SUMMARY = "run the whole KFP pipeline on this machine (demo data -> convert -> train -> ... )"

# The demo configuration: ResNet-18 on the digits at 24 px (3 px per pixel of the 8x8 originals:
# nothing is lost, and a step costs ~3/4 of one at 32 px). Measured on 2 cores: see README.
DEMO = {
    "resnet_size": 18,
    "num_classes": 10,  # the digits of resnet_imagenet.data.sample
    "image_size": 24,
    "batch_size": 64,
    "train_steps": 280,  # ~12.5 epochs of the 1,438 training digits
    "train_shards": 4,
    "validation_shards": 2,
    "num_tasks": 2,
}
# Trainer flags of the demo. Digits are not mirror-invariant and fill their frame, so no flips
# and milder crops than ImageNet's: crops of half the image (the old setting) cut away what
# tells a 1 from a 7 or an 8 from a 9, and left the network at ~77% on its own training crops
# after 200 steps (validation 90-93%); crops of >= 80% keep the digit. Zero-initialised
# residual gammas (Goyal et al.) train faster from the start. A short cosine schedule peaking at
# 0.1 (--base-learning-rate is per 256 images: 0.4 at batch 64), and a batch-norm moving average
# that covers the run (the recipe's 0.997 would still be 43% at its initial values after 280
# steps). No XLA: on CPU, oneDNN kernels (see cli.py) are about twice as fast as XLA's here.
DEMO_TRAIN_ARGS = [
    "--lr-schedule", "cosine", "--base-learning-rate", "0.4", "--warmup-epochs", "1",
    "--no-random-flip", "--min-crop-area", "0.8", "--zero-init-residual",
    "--bn-momentum", "0.9",
    "--log-every", "20",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"^Executing task '([^']+)'")
_FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
_VALIDATION_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


@dataclass
class StepClock:
    """Wall-clock time of each step, in the order the steps started.

    kfp.local reports a task's start and end only in its log records ("Executing task 'x'",
    "Task 'x' finished with status ..."), so the clock is a filter on the root logger: it sees
    every record (kfp swaps the root logger's *handlers* around each task, not its filters)
    and lets all of them through. Parallel iterations of a ParallelFor share their task name;
    their step spans from the first start to the last end.
    """

    spans: dict[str, list] = field(default_factory=dict)

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.msg))
        if match := _STARTED.match(message):
            self.spans.setdefault(match.group(1), [record.created, None, "RUNNING"])
        elif (match := _FINISHED.match(message)) and match.group(1) in self.spans:
            span = self.spans[match.group(1)]
            span[1], span[2] = record.created, match.group(2)
        return True

    @contextlib.contextmanager
    def measure(self, name: str):
        """Time a step that runs outside KFP (building the demo data, predicting)."""
        start = time.time()
        self.spans[name] = [start, None, "RUNNING"]
        yield
        self.spans[name][1:] = [time.time(), "SUCCESS"]

    def rows(self) -> list[tuple[str, float, str]]:
        return [(name, (end or start) - start, status)
                for name, (start, end, status) in self.spans.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo", metavar="DIR",
                        help="where the data, models and KFP outputs go (default ./demo)")
    parser.add_argument("--workers", type=int, default=2,
                        help="training worker processes, each with TF_CONFIG (default 2)")
    parser.add_argument("--archives", action="store_true",
                        help="build the demo data as the four official ILSVRC2012 archives "
                        "(read without extracting) instead of the extracted layout; has no "
                        "effect once WORKDIR/raw exists, which may hold either")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="demo images per class when the raw data is built (default: all "
                        "1,797); has no effect once WORKDIR/raw exists")
    parser.add_argument("--resnet-size", type=int, default=DEMO["resnet_size"],
                        help=f"ResNet depth (default {DEMO['resnet_size']})")
    parser.add_argument("--image-size", type=int, default=DEMO["image_size"],
                        help=f"image size in pixels (default {DEMO['image_size']})")
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"],
                        help=f"global batch size (default {DEMO['batch_size']})")
    parser.add_argument("--train-steps", type=int, default=DEMO["train_steps"],
                        help=f"training steps (default {DEMO['train_steps']})")
    parser.add_argument("--num-tasks", type=int, default=DEMO["num_tasks"],
                        help=f"parallel conversion tasks (default {DEMO['num_tasks']})")
    parser.add_argument("--train-arg", action="append", default=[], metavar="FLAG",
                        help="a further `resnet-imagenet train` flag, repeatable; write it "
                        "with '=': --train-arg=--log-every=10")
    parser.add_argument("--predict", type=int, default=5, metavar="N",
                        help="validation images to classify with the SavedModel (default 5)")


def pipeline_arguments(args: argparse.Namespace, workdir: str, run_dir: str) -> dict:
    """The pipeline parameters of a local run: the demo recipe and the local backend."""
    return {
        "data_raw_uri": storage.join(workdir, "raw"),
        "data_tfrecord_uri": storage.join(workdir, "tfrecords"),
        "data_model_uri": storage.join(run_dir, "model"),
        "data_export_uri": storage.join(run_dir, "saved_model"),
        "tfrecord_shards_train": DEMO["train_shards"],
        "tfrecord_shards_validation": DEMO["validation_shards"],
        "tfrecord_tasks": args.num_tasks,
        "tfrecord_workers_per_task": 1,
        "train_backend": "local",
        "train_workers": args.workers,
        "train_gpus_per_worker": 0,
        "train_timeout_seconds": 0,
        "model_resnet_depth": args.resnet_size,
        "model_num_classes": DEMO["num_classes"],
        "model_image_size": args.image_size,
        "train_batch_size": args.batch_size,
        "train_steps": args.train_steps,
        # One checkpoint, at the end: a demo run is short, and each checkpoint is ~100 MB.
        "train_checkpoint_every": args.train_steps,
        "train_extra_args": [*DEMO_TRAIN_ARGS, *args.train_arg],
    }


def _validate(params: dict) -> None:
    """The pipeline's first step, run here too, so bad flags fail before anything starts."""
    names = ("train_backend", "train_workers", "train_gpus_per_worker", "train_batch_size",
             "train_steps", "model_resnet_depth", "model_num_classes", "model_image_size",
             "tfrecord_tasks", "tfrecord_shards_train", "tfrecord_shards_validation",
             "train_timeout_seconds")
    pipeline_params.validate(
        **{name: params[name] for name in names},
        uris={k: params[k] for k in ("data_raw_uri", "data_tfrecord_uri", "data_model_uri",
                                     "data_export_uri")},
        train_extra_args=params["train_extra_args"],
    )


def _pipeline_function():
    """The pipeline function, imported with kfp; a one-line UserError when either is missing."""
    try:
        from pipelines.resnet50_imagenet import resnet50_imagenet
    except ImportError as exc:
        raise UserError(
            f"cannot import the pipeline ({exc}): run-local needs kfp and kfp-kubernetes (the "
            "package's dependencies) and components/ of this repository; install a checkout "
            "with 'pip install -e .'"
        ) from None
    return resnet50_imagenet


def _run_pipeline(pipeline, params: dict, pipeline_root: str, clock: StepClock) -> dict:
    """Run the pipeline function with kfp.local; returns its outputs (KFP artifacts, values)."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True)
    root = logging.getLogger()
    root.addFilter(clock)
    # kfp.local indents its tasks' output by swapping builtins.print, which is not thread-safe:
    # two parallel ParallelFor iterations can leave the indenting print installed for good.
    original_print = builtins.print
    try:
        with warnings.catch_warnings():
            # The steps name the cluster's launcher image, and carry resources and retries for
            # Kubernetes; kfp.local warns about both, and both are expected here.
            warnings.filterwarnings("ignore", message=r".*non-Python base image")
            warnings.filterwarnings("ignore", message=r".*no effect in the current local runner")
            task = pipeline(**params)
    except RuntimeError as exc:
        failed = _ANSI.sub("", str(exc)).strip()
        raise PipelineFailed(f"{failed} Its log is above; KFP outputs: {pipeline_root}") from None
    finally:
        builtins.print = original_print
        root.removeFilter(clock)
    return dict(task.outputs)


class PipelineFailed(Exception):
    """A step of the local pipeline failed (its own log says why)."""


def _validation_samples(raw_dir: str, count: int, scratch: str) -> list[tuple[str, str]]:
    """The first ``count`` validation images of the raw data with their true synsets.

    From the official archives they are copied out of the validation tar into ``scratch``.
    """
    from resnet_imagenet.data import archives

    if archives.detect(raw_dir):
        return archives.validation_samples(raw_dir, count, scratch)
    # ILSVRC2012_val_<n>.JPEG: line n of validation_labels.txt is its synset.
    names = sorted(n for n in storage.listdir(storage.join(raw_dir, "validation"))
                   if _VALIDATION_NAME.match(n))[:count]
    labels = storage.read_text(storage.join(raw_dir, "validation_labels.txt")).split()
    return [(storage.join(raw_dir, "validation", name),
             labels[int(_VALIDATION_NAME.match(name).group(1)) - 1]) for name in names]


def _predict(saved_model: str, samples: list[tuple[str, str]]) -> list[dict]:
    """Classify the sample images with the exported SavedModel (what ``predict`` runs)."""
    from resnet_imagenet import predict

    results = predict.predict(saved_model, [path for path, _ in samples], top_k=1)
    for result, (_, synset) in zip(results, samples):
        result["true_synset"] = synset
    return results


def _training_line(outputs: dict) -> str:
    """The train step's Metrics artifact (what the KFP UI compares runs by), in one line."""
    figures = getattr(outputs.get("training_metrics"), "metadata", None) or {}
    if not figures:
        return "  training: no figures (the train step logged no metrics)"
    return (f"  training: final loss {figures.get('final_loss', float('nan')):.4f}, "
            f"{figures.get('images_per_second', 0):.1f} images/s, "
            f"{int(figures.get('steps', 0))} steps")


def _summary(params: dict, outputs: dict, predictions: list[dict], clock: StepClock,
             pipeline_root: str, report: str) -> str:
    metrics = json.loads(storage.read_text(outputs["evaluation_details"].path))
    logs = storage.join(params["data_model_uri"], "logs")
    lines = [
        "",
        "=" * 72,
        f"resnet-imagenet run-local: ResNet-{params['model_resnet_depth']} at "
        f"{params['model_image_size']} px, {params['train_workers']} workers, "
        f"{params['train_steps']} steps",
        f"  top-1 {metrics['top1']:.2%}   top-5 {metrics['top5']:.2%}   "
        f"({metrics['images']} validation images, step {metrics.get('step', '?')})",
        _training_line(outputs),
        "",
        f"  SavedModel       {outputs['saved_model_uri']}",
        f"  checkpoints      {storage.join(params['data_model_uri'], 'checkpoints')}",
        f"  TensorBoard logs {logs}",
        f"  TFRecords        {params['data_tfrecord_uri']}",
        f"  KFP outputs      {pipeline_root}",
        f"  report (HTML)    {report}",
        f"  metrics (JSON)   {outputs['evaluation_details'].path}",
        "",
        f"  tensorboard --logdir {logs}",
        "",
    ]
    if predictions:
        lines.append("  predictions (SavedModel):")
        for result in predictions:
            name = os.path.basename(result["file"])
            if "error" in result:
                lines.append(f"    {name}: error: {result['error']}")
                continue
            top = result["top"][0]
            verdict = "ok" if top.get("synset") == result["true_synset"] else \
                f"wrong, true {result['true_synset']}"
            lines.append(f"    {name}: {top.get('synset', top.get('label'))} "
                         f"{top.get('text', '')!r} p={top['probability']:.2f} ({verdict})")
        lines.append("")
    lines.append("  step times:")
    for name, seconds, status in clock.rows():
        lines.append(f"    {name:<28} {seconds:7.1f} s  {status}")
    lines.append("=" * 72)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    workdir = preflight.check_output_dir(os.path.abspath(args.workdir), "--workdir")
    if args.predict < 0:
        raise UserError("--predict must be 0 or more")
    if args.per_class is not None and args.per_class < 2:
        raise UserError("--per-class must be at least 2 (one train and one validation image)")
    run_dir = storage.join(workdir, "runs", time.strftime("%Y%m%d-%H%M%S"))
    params = pipeline_arguments(args, workdir, run_dir)
    _validate(params)
    pipeline = _pipeline_function()  # before any work: kfp and components/ must be there
    if storage.exists(params["data_model_uri"]):
        raise UserError(f"{run_dir} exists already: wait a second and run again")
    pipeline_root = storage.join(run_dir, "kfp")
    clock = StepClock()
    started = time.time()

    if not storage.exists(params["data_raw_uri"]):
        from resnet_imagenet.data import sample

        with clock.measure("sample-data"):
            sample.build(params["data_raw_uri"], per_class=args.per_class,
                         as_archives=args.archives)
    try:
        outputs = _run_pipeline(pipeline, params, pipeline_root, clock)
        predictions = []
        if args.predict:
            with clock.measure("predict"):
                predictions = _predict(outputs["saved_model_uri"], _validation_samples(
                    params["data_raw_uri"], args.predict, storage.join(run_dir, "samples")))
    except PipelineFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # The report where a browser finds it, next to the run's model: KFP's name has no suffix.
    report = storage.join(run_dir, "report.html")
    storage.copy(outputs["report"].path, report)
    print(_summary(params, outputs, predictions, clock, pipeline_root, report))
    print(f"  total {time.time() - started:.0f} s")
    return 0
