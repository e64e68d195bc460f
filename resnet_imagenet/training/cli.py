"""Train ResNet with the custom multi-worker loop; TF_CONFIG decides the strategy.

Settings: the reference recipe's defaults < a ``--config YAML`` file (keys are the flag names,
with - or _) < flags given on the command line. Every worker of a cluster runs the same command.
The model directory (local or gs://) receives checkpoints, TensorBoard logs, config.json,
labels.json and train_summary.json; a rerun resumes from its latest checkpoint.

Large-batch recipe, for example for a global batch of 4096:

  resnet-imagenet train --data-dir gs://b/tfrecords --model-dir gs://b/model \\
      --batch-size 4096 --scale-lr-with-batch --warmup-epochs 5 --lr-schedule cosine \\
      --label-smoothing 0.1 --train-steps 28150

Exit status: 0 when done, 2 on bad input or a diverged loss, 143 after a SIGTERM-triggered
checkpoint or when another worker vanished (retryable under the training operator's ExitCode
restart policy; the restarted job resumes from the latest checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from resnet_imagenet import config as config_lib
from resnet_imagenet.config import RESNET_DEPTHS, SECTIONS, TrainConfig
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import strategy

log = logging.getLogger(__name__)

HELP = {
    "data_dir": "TFRecord directory (train-*/validation-* shards), local or gs://",
    "model_dir": "where checkpoints, logs and config.json go, local or gs://",
    "image_size": "training crop size in pixels",
    "num_classes": "model outputs (labels 1..N of the shards become 0..N-1)",
    "resnet_size": f"depth: one of {', '.join(map(str, RESNET_DEPTHS))}",
    "zero_init_residual": "start each residual block's last batch-norm gamma at 0",
    "bn_momentum": "batch-norm moving-average momentum (recipe 0.997; short runs want ~0.9)",
    "bn_epsilon": "batch-norm epsilon",
    "batch_size": "global batch over all replicas (must divide by the replica count)",
    "train_steps": "total optimizer steps; 0 = the recipe's 500,000 at batch 256, scaled to "
                   "the batch (see --scale-lr-with-batch)",
    "optimizer": "only 'sgd' (with momentum)",
    "momentum": "SGD momentum",
    "base_learning_rate": "learning rate for a global batch of 256",
    "lr_schedule": "'step' (decay at boundaries) or 'cosine'",
    "lr_boundaries": "step-schedule boundaries (in --boundaries-unit), e.g. 30 60 80; none = "
                     "the recipe's 150k/300k/400k/450k steps at batch 256, scaled to the batch",
    "lr_decay_factor": "learning-rate factor at each boundary",
    "boundaries_unit": "'steps' or 'epochs'",
    "num_train_images": "training images per epoch; 0 = from manifest.json, else counted",
    "scale_lr_with_batch": "lr = base * batch / 256, and the recipe's steps and boundaries "
                           "x 256 / batch (same epochs); --no-scale-lr-with-batch keeps them",
    "warmup_epochs": "linear warmup from 0 over this many epochs",
    "weight_decay": "L2 factor on convolution and dense kernels",
    "label_smoothing": "label smoothing in [0, 1)",
    "min_crop_area": "smallest random crop as a share of the image (recipe: 0.05)",
    "random_flip": "random left-right flips (off for classes that are not mirror-invariant)",
    "mixed_precision": "auto (on with GPUs), off, float16 (loss scaling) or bfloat16",
    "jit_compile": "XLA for the forward/backward pass: auto (on with GPUs), on, off",
    "checkpoint_every": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "log_every": "steps between log lines and training summaries",
    "eval_every": "steps between validation runs on the chief; 0 = only at the end",
    "data_service": "tf.data service dispatcher host:port: preprocess on its workers",
    "shuffle_buffer": "records in the shuffle buffer of each input pipeline",
    "seed": "seed of the weight initialisation, the augmentation and the per-epoch file order",
    "max_bad_records": "unreadable training records (truncated or corrupt shards, images that "
                       "do not decode) skipped before training stops: a share of the records "
                       "seen, never of fewer than one epoch's (0.1%), or a count (500)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="YAML mapping of any of the settings below (local or gs://)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings and the learning rate at step 0 and "
                             "at every boundary as one JSON object, then exit; reads no data "
                             "(epoch-based schedules take --num-train-images or DATA/manifest.json)")
    # How this run uses the hardware, not a setting of the model: not in config.json.
    parser.add_argument("--allow-cpu", action="store_true",
                        help="go on, with a warning, when this worker sees fewer GPUs than its "
                             f"launcher gave it ({strategy.GPUS_ENV}, set by `launch "
                             "--gpus-per-worker`); without it such a worker stops before training")
    # Defaults are suppressed so that run() can tell the flags given from those left out.
    defaults = TrainConfig().to_dict()
    for section, settings in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings")
        for field in dataclasses.fields(settings):
            default = defaults[field.name]
            help_text = f"{HELP[field.name]} (default: {default!r})".replace("%", "%%")
            kwargs = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kwargs.update(nargs="*", type=int, metavar="N")
            else:
                kwargs["type"] = type(default)
            if field.name in ("data_dir", "model_dir"):
                kwargs["metavar"] = field.name.split("_")[0].upper()
            group.add_argument(_flag(field.name), **kwargs)


class _RefusingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def config_from_argv(argv) -> TrainConfig:
    """The validated config that ``resnet-imagenet train ARGV`` would train with, without
    training; a bad flag or value is a one-line :class:`UserError` (not argparse's exit)."""
    parser = _RefusingParser(prog="resnet-imagenet train", add_help=False)
    add_arguments(parser)
    return resolve_config(parser.parse_args([str(a) for a in argv]))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` YAML < explicit flags."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(config_lib.load_yaml(args.config))
    values.update({name: getattr(args, name) for name in TrainConfig.field_names()
                   if hasattr(args, name)})
    return TrainConfig.from_dict(values, source=args.config or "flags").validate()


def effective_config(config: TrainConfig) -> dict:
    """What ``--print-config`` prints: the effective settings and the schedule's turning points."""
    import json

    from resnet_imagenet import storage
    from resnet_imagenet.data import labels as labels_lib
    from resnet_imagenet.training import schedules

    config = config.effective()
    images = config.data.num_train_images
    if not images and schedules.needs_epoch_length(config.optimization) and config.data.data_dir:
        manifest = storage.join(storage.normalize(config.data.data_dir), labels_lib.MANIFEST)
        if storage.exists(manifest):
            try:
                images = int(json.loads(storage.read_text(manifest))["train"]["images"])
            except (ValueError, KeyError, TypeError):
                images = 0
    steps_per_epoch = images / config.optimization.batch_size if images else None
    schedule = schedules.build(config.optimization, steps_per_epoch)
    out = config.to_dict()
    out["learning_rate"] = schedule.peak
    out["epochs"] = (round(config.optimization.train_steps / steps_per_epoch, 3)
                     if steps_per_epoch else None)
    out["schedule"] = schedules.table(schedule)
    return out


def run(args: argparse.Namespace) -> int:
    # TensorFlow's oneDNN kernels are on by default only on CPUs with AVX-512 and newer; on AVX2
    # machines (laptops, CI runners) they train ResNet ~3x faster than the default kernels. Read
    # when TensorFlow is first imported, which happens below; an explicit TF_ENABLE_ONEDNN_OPTS=0
    # still wins. GPU kernels are unaffected. Only `train` sets it, and only when it runs (not on
    # import): TensorFlow then logs two lines at import that no log level silences, which would
    # break the one-line errors of the other commands.
    config = resolve_config(args)
    if getattr(args, "print_config", False):
        import json

        print(json.dumps(effective_config(config), sort_keys=True))
        return 0
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    for name, value in (("data_dir", config.data.data_dir),
                        ("model_dir", config.runtime.model_dir)):
        if not value:
            raise UserError(f"{_flag(name)} is required (on the command line or in --config)")
    from resnet_imagenet import preflight

    preflight.check_command(reads={"--data-dir": config.data.data_dir},
                            writes={"--model-dir": config.runtime.model_dir})
    from resnet_imagenet.training import loop, stopping

    try:
        summary = loop.train(config, allow_cpu=args.allow_cpu)
    except stopping.RestartRequired as exc:
        log.warning("%s (exit status %d: retryable)", exc, stopping.RETRYABLE_EXIT_CODE)
        return stopping.RETRYABLE_EXIT_CODE
    validation = summary.get("validation") or {}
    line = (f"trained to step {summary['step']}: loss {summary['loss']:.4f}, "
            f"{summary['images_per_second']:.1f} images/s")
    if validation:
        line += f", validation top-1 {validation['top1']:.4f}, top-5 {validation['top5']:.4f}"
        if validation.get("skipped_records"):
            line += f" (over {validation['images']} images)"
    if summary.get("skipped_records"):
        line += (f"; {summary['skipped_records']} of {summary['records_seen']} training records "
                 "unreadable, skipped (shards: train_summary.json, the log)")
    print(line)
    return 0
