"""TrainConfig: the reference recipe as defaults, overridable by a YAML file and by flags.

Precedence: defaults < ``--config YAML`` < explicit command-line flags. The resolved config is
written to ``MODEL/config.json`` by the chief, and evaluation/export read it back from there, so
they rebuild exactly the model that was trained (depth, classes, image size).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from resnet_imagenet.errors import UserError

RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)

# The reference recipe, at its global batch of 256: 500k steps (~100 epochs of ImageNet), the
# learning rate x0.1 at 150k, 300k, 400k and 450k steps.
REFERENCE_BATCH = 256
RECIPE_STEPS = 500_000
RECIPE_BOUNDARIES = (150_000, 300_000, 400_000, 450_000)


@dataclass
class TrainConfig:
    # data
    data_dir: str = ""
    model_dir: str = ""
    image_size: int = 224
    num_classes: int = 1000
    # model
    resnet_size: int = 50
    zero_init_residual: bool = False
    bn_momentum: float = 0.997  # the reference recipe's batch norm
    bn_epsilon: float = 1e-5
    # optimisation: the reference recipe
    batch_size: int = 256  # global, over all replicas
    train_steps: int = 0  # 0 = the recipe's length: 500,000 steps at batch 256 (see effective())
    optimizer: str = "sgd"
    momentum: float = 0.9
    base_learning_rate: float = 0.1  # at the reference batch of 256
    lr_schedule: str = "step"  # "step" | "cosine"
    lr_boundaries: list[int] = field(default_factory=list)  # [] = the recipe's (effective())
    lr_decay_factor: float = 0.1
    boundaries_unit: str = "steps"  # "steps" | "epochs"
    num_train_images: int = 0  # 0 = from DATA/manifest.json, else counted (epochs need it)
    scale_lr_with_batch: bool = True  # lr = base * batch / 256; the recipe keeps its epochs
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    # augmentation: the Inception recipe (crops of 5%..100% of the image, random flips)
    min_crop_area: float = 0.05
    random_flip: bool = True
    # systems
    mixed_precision: str = "auto"  # "auto" | "off" | "float16" | "bfloat16"
    jit_compile: str = "auto"  # "auto" | "on" | "off"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 5
    log_every: int = 100
    eval_every: int = 0  # steps between validation runs on the chief; 0 = only at the end
    data_service: str = ""
    shuffle_buffer: int = 10_000
    seed: int = 0

    def validate(self) -> "TrainConfig":
        if self.resnet_size not in RESNET_DEPTHS:
            raise UserError(
                f"--resnet-size {self.resnet_size} is not a ResNet depth: use one of "
                + ", ".join(map(str, RESNET_DEPTHS))
            )
        for name in ("batch_size", "image_size", "num_classes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr_schedule not in ("step", "cosine"):
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: use 'step' or 'cosine'")
        if self.boundaries_unit not in ("steps", "epochs"):
            raise UserError(f"--boundaries-unit {self.boundaries_unit!r}: use 'steps' or 'epochs'")
        if self.mixed_precision not in ("auto", "off", "float16", "bfloat16"):
            raise UserError(
                f"--mixed-precision {self.mixed_precision!r}: use auto, off, float16 or bfloat16"
            )
        if self.jit_compile not in ("auto", "on", "off"):
            raise UserError(f"--jit-compile {self.jit_compile!r}: use auto, on or off")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError("--label-smoothing must be in [0, 1)")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise UserError("--min-crop-area must be in (0, 1]")
        if list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise UserError("--lr-boundaries must be increasing")
        if self.optimizer != "sgd":
            raise UserError(
                f"--optimizer {self.optimizer!r}: only 'sgd' (with momentum) is supported")
        for name in ("log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise UserError("--bn-momentum must be in [0, 1)")
        if self.bn_epsilon <= 0:
            raise UserError("--bn-epsilon must be positive")
        for name in ("train_steps", "checkpoint_every", "eval_every", "num_train_images", "warmup_epochs",
                     "weight_decay", "base_learning_rate", "momentum"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative")
        return self

    def effective(self) -> "TrainConfig":
        """The settings a run uses: the recipe's length and boundaries filled in for this batch.

        ``train_steps`` 0 and an empty ``lr_boundaries`` stand for the reference recipe, which
        is defined at a global batch of 256. With ``scale_lr_with_batch`` (the default) the
        recipe keeps its length in epochs: at batch B its steps and boundaries are multiplied by
        256 / B (and the learning rate by B / 256, see ``schedules``); without it they stay the
        reference's steps. Explicit values are steps of this run and are kept as given.
        """
        ratio = REFERENCE_BATCH / self.batch_size if self.scale_lr_with_batch else 1.0
        changes: dict = {}
        if not self.train_steps:
            changes["train_steps"] = max(1, round(RECIPE_STEPS * ratio))
        if not self.lr_boundaries and self.lr_schedule == "step":
            changes["lr_boundaries"] = [max(1, round(b * ratio)) for b in RECIPE_BOUNDARIES]
            changes["boundaries_unit"] = "steps"
        return self.updated(**changes) if changes else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(unknown)} in {source}: known keys are "
                + ", ".join(sorted(known))
            )
        defaults = cls()
        values = {k: _coerce(k, v, getattr(defaults, k), source) for k, v in values.items()}
        return cls(**values)

    def updated(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value, default, source: str):
    """``value`` as the type of the field's default (an int is a valid float); else refuse."""
    def fail():
        raise UserError(f"{name} in {source} must be {type(default).__name__}, not {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail()
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            fail()
        # The one list setting, lr_boundaries, holds ints (steps or epochs).
        return [_coerce(name, v, default[0] if default else 0, source) for v in value]
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if not isinstance(value, type(default)):
        fail()
    return value


def load_yaml(uri: str) -> dict:
    """Read a YAML mapping of TrainConfig fields (local or gs://)."""
    import yaml

    from resnet_imagenet import storage

    if not storage.exists(uri):
        raise UserError(f"--config {uri} does not exist")
    try:
        values = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {uri} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {uri} must hold a mapping of training settings")
    return {k.replace("-", "_"): v for k, v in values.items()}


def save(config: TrainConfig, model_dir: str) -> None:
    from resnet_imagenet import storage

    storage.write_text(storage.join(model_dir, "config.json"), config.to_json() + "\n")


def load(model_dir: str) -> TrainConfig:
    """The config a model directory was trained with (``MODEL/config.json``)."""
    from resnet_imagenet import storage

    path = storage.join(model_dir, "config.json")
    if not storage.exists(path):
        raise UserError(
            f"{path} not found: --model-dir must be a directory written by 'resnet-imagenet train'"
        )
    return TrainConfig.from_dict(json.loads(storage.read_text(path)), source=path)
