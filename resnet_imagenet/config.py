"""TrainConfig: the settings of a training run in four sections, the reference recipe as defaults.

    config = TrainConfig()                                  # the reference recipe
    config = TrainConfig().updated(batch_size=1024, resnet_size=18)   # flat names
    config.model.resnet_size, config.optimization.batch_size          # sectioned reads
    config.to_dict() / TrainConfig.from_dict(flat)          # MODEL/config.json, YAML, flags

Sections: ``data`` (where the shards are and how the input pipeline reads them), ``model`` (the
network), ``optimization`` (batch, optimizer, learning-rate schedule, loss terms) and
``runtime`` (where outputs go, precision, compilation, checkpoint/log/validation cadence).
Every setting has one flat name, which is also its flag (``--batch-size``), its YAML key and its
key in ``MODEL/config.json``; flat names are unique across sections.

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


@dataclass(frozen=True)
class Recipe:
    """A published training recipe: its settings, with its length and learning-rate boundaries
    in steps at its global batch ``batch_size``.

    A run at another batch keeps the recipe's epochs when the learning rate scales with the
    batch (:meth:`steps_at`), as :meth:`TrainConfig.effective` applies it.
    """

    name: str
    batch_size: int
    train_steps: int
    lr_boundaries: tuple[int, ...]
    base_learning_rate: float
    momentum: float
    weight_decay: float
    bn_momentum: float
    bn_epsilon: float
    min_crop_area: float

    def steps_at(self, batch_size: int, scale_with_batch: bool) -> tuple[int, list[int]]:
        """(train steps, boundaries in steps) at ``batch_size``: x ``self.batch_size /
        batch_size`` when the learning rate scales with the batch, else the recipe's own."""
        ratio = self.batch_size / batch_size if scale_with_batch else 1.0
        return (max(1, round(self.train_steps * ratio)),
                [max(1, round(b * ratio)) for b in self.lr_boundaries])


RECIPES = {
    # ResNet-50 v1.5 on ImageNet at a global batch of 256: 500k steps (~100 epochs), the learning
    # rate 0.1 x0.1 at 150k, 300k, 400k and 450k steps; SGD with momentum 0.9, L2 1e-4; batch
    # norm momentum 0.997, epsilon 1e-5; Inception crops of 5%..100% of the image.
    "reference": Recipe(
        name="reference", batch_size=256, train_steps=500_000,
        lr_boundaries=(150_000, 300_000, 400_000, 450_000), base_learning_rate=0.1,
        momentum=0.9, weight_decay=1e-4, bn_momentum=0.997, bn_epsilon=1e-5,
        min_crop_area=0.05),
}
REFERENCE = RECIPES["reference"]


def _at_least(section, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(section, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}")


def _not_negative(section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")


@dataclass
class DataSettings:
    """The TFRecords and how the input pipeline reads and augments them."""

    data_dir: str = ""
    num_train_images: int = 0  # 0 = from DATA/manifest.json, else counted (epochs need it)
    # augmentation: the Inception recipe (crops of 5%..100% of the image, random flips)
    min_crop_area: float = REFERENCE.min_crop_area
    random_flip: bool = True
    shuffle_buffer: int = 10_000
    data_service: str = ""
    seed: int = 0
    # unreadable records skipped before training stops: a share of those seen, or a count
    max_bad_records: str = "0.1%"

    def validate(self) -> None:
        from resnet_imagenet.data.bad_records import Bound

        if not 0.0 < self.min_crop_area <= 1.0:
            raise UserError("--min-crop-area must be in (0, 1]")
        _not_negative(self, ("num_train_images",))
        Bound(self.max_bad_records)


@dataclass
class ModelSettings:
    """The network: ResNet depth, outputs, input size and batch norm."""

    resnet_size: int = 50
    num_classes: int = 1000
    image_size: int = 224
    zero_init_residual: bool = False
    bn_momentum: float = REFERENCE.bn_momentum
    bn_epsilon: float = REFERENCE.bn_epsilon

    def validate(self) -> None:
        if self.resnet_size not in RESNET_DEPTHS:
            raise UserError(
                f"--resnet-size {self.resnet_size} is not a ResNet depth: use one of "
                + ", ".join(map(str, RESNET_DEPTHS))
            )
        _at_least(self, ("image_size", "num_classes"), 1)
        if not 0.0 <= self.bn_momentum < 1.0:
            raise UserError("--bn-momentum must be in [0, 1)")
        if self.bn_epsilon <= 0:
            raise UserError("--bn-epsilon must be positive")


@dataclass
class OptimizationSettings:
    """The global batch, the optimizer, the learning-rate schedule and the loss terms."""

    batch_size: int = REFERENCE.batch_size  # global, over all replicas
    train_steps: int = 0  # 0 = the recipe's length, scaled to the batch (see effective())
    optimizer: str = "sgd"
    momentum: float = REFERENCE.momentum
    base_learning_rate: float = REFERENCE.base_learning_rate  # at the recipe's batch
    lr_schedule: str = "step"  # "step" | "cosine"
    lr_boundaries: list[int] = field(default_factory=list)  # [] = the recipe's (effective())
    lr_decay_factor: float = 0.1
    boundaries_unit: str = "steps"  # "steps" | "epochs"
    scale_lr_with_batch: bool = True  # lr = base * batch / 256; the recipe keeps its epochs
    warmup_epochs: float = 0.0
    weight_decay: float = REFERENCE.weight_decay
    label_smoothing: float = 0.0

    def validate(self) -> None:
        _at_least(self, ("batch_size",), 1)
        if self.lr_schedule not in ("step", "cosine"):
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: use 'step' or 'cosine'")
        if self.boundaries_unit not in ("steps", "epochs"):
            raise UserError(f"--boundaries-unit {self.boundaries_unit!r}: use 'steps' or 'epochs'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError("--label-smoothing must be in [0, 1)")
        if list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise UserError("--lr-boundaries must be increasing")
        if self.lr_boundaries and self.lr_schedule == "cosine":
            raise UserError(
                f"--lr-boundaries {' '.join(map(str, self.lr_boundaries))} has no effect with "
                "--lr-schedule cosine (it decays along a cosine to 0): drop --lr-boundaries, "
                "or use --lr-schedule step")
        if self.optimizer != "sgd":
            raise UserError(
                f"--optimizer {self.optimizer!r}: only 'sgd' (with momentum) is supported")
        _not_negative(self, ("train_steps", "warmup_epochs", "weight_decay",
                             "base_learning_rate", "momentum"))

    def effective(self) -> "OptimizationSettings":
        """``train_steps`` 0 and empty ``lr_boundaries`` (step schedule) filled in from the
        reference recipe for this batch (:meth:`Recipe.steps_at`), whose batch the learning rate
        scales from too (``schedules.peak_learning_rate``); explicit values are kept."""
        steps, boundaries = REFERENCE.steps_at(self.batch_size, self.scale_lr_with_batch)
        changes: dict = {}
        if not self.train_steps:
            changes["train_steps"] = steps
        if not self.lr_boundaries and self.lr_schedule == "step":
            changes["lr_boundaries"] = boundaries
            changes["boundaries_unit"] = "steps"
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class RuntimeSettings:
    """Where outputs go and how the run executes: precision, XLA, checkpoints, logs, validation."""

    model_dir: str = ""
    mixed_precision: str = "auto"  # "auto" | "off" | "float16" | "bfloat16"
    jit_compile: str = "auto"  # "auto" | "on" | "off"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 5
    log_every: int = 100
    eval_every: int = 0  # steps between validation runs on the chief; 0 = only at the end

    def validate(self) -> None:
        if self.mixed_precision not in ("auto", "off", "float16", "bfloat16"):
            raise UserError(
                f"--mixed-precision {self.mixed_precision!r}: use auto, off, float16 or bfloat16"
            )
        if self.jit_compile not in ("auto", "on", "off"):
            raise UserError(f"--jit-compile {self.jit_compile!r}: use auto, on or off")
        _at_least(self, ("log_every", "keep_checkpoints"), 1)
        _not_negative(self, ("checkpoint_every", "eval_every"))


# section attribute of TrainConfig -> its settings class, in the order of --help
SECTIONS = {"data": DataSettings, "model": ModelSettings, "optimization": OptimizationSettings,
            "runtime": RuntimeSettings}
SECTION_OF = {f.name: section for section, cls in SECTIONS.items()
              for f in dataclasses.fields(cls)}


@dataclass
class TrainConfig:
    """The settings of one training run, by section (flat names: :meth:`updated`,
    :meth:`to_dict`, :meth:`from_dict`)."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def validate(self) -> "TrainConfig":
        """Refuse settings out of range with the flag's one-line error; returns ``self``."""
        for section in SECTIONS:
            getattr(self, section).validate()
        return self

    def effective(self) -> "TrainConfig":
        """The settings a run uses: the recipe's length and boundaries filled in for this batch.

        ``train_steps`` 0 and an empty ``lr_boundaries`` stand for the reference recipe, which
        is defined at a global batch of 256. With ``scale_lr_with_batch`` (the default) the
        recipe keeps its length in epochs: at batch B its steps and boundaries are multiplied by
        256 / B (and the learning rate by B / 256, see ``schedules``); without it they stay the
        reference's steps. Explicit values are steps of this run and are kept as given.
        """
        optimization = self.optimization.effective()
        if optimization is self.optimization:
            return self
        return dataclasses.replace(self, optimization=optimization)

    def to_dict(self) -> dict:
        """Every setting by its flat name (the keys of MODEL/config.json)."""
        return {name: value for section in SECTIONS
                for name, value in dataclasses.asdict(getattr(self, section)).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        """The flat names of every setting, section by section."""
        return list(SECTION_OF)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """A config from flat names (MODEL/config.json, YAML, flags), each coerced to its
        setting's type; unknown names and wrong types are refused naming ``source``."""
        known = set(SECTION_OF)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(unknown)} in {source}: known keys are "
                + ", ".join(sorted(known))
            )
        defaults = cls().to_dict()
        return cls().updated(**{k: _coerce(k, v, defaults[k], source) for k, v in values.items()})

    def updated(self, **changes) -> "TrainConfig":
        """A copy with settings changed by their flat names (``updated(batch_size=1024)``)."""
        unknown = sorted(set(changes) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"TrainConfig has no setting(s) {', '.join(unknown)}")
        sections = {}
        for section in SECTIONS:
            mine = {k: v for k, v in changes.items() if SECTION_OF[k] == section}
            if mine:
                sections[section] = dataclasses.replace(getattr(self, section), **mine)
        return dataclasses.replace(self, **sections) if sections else self


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
    """Read a YAML mapping of TrainConfig settings by flat name (local or gs://)."""
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
