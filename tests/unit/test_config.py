"""TrainConfig's sections against its flat names: MODEL/config.json, YAML and flags stay flat."""

from __future__ import annotations

import dataclasses
import json

import pytest

from resnet_imagenet import config as config_lib
from resnet_imagenet.cli import command_parser
from resnet_imagenet.config import (RECIPES, SECTIONS, DataSettings, ModelSettings,
                                    OptimizationSettings, RuntimeSettings, TrainConfig)
from resnet_imagenet.errors import UserError

# MODEL/config.json as training wrote it before the settings had sections.
FLAT_CONFIG_JSON = {
    "base_learning_rate": 0.1, "batch_size": 16, "bn_epsilon": 1e-05, "bn_momentum": 0.9,
    "boundaries_unit": "steps", "checkpoint_every": 20, "data_dir": "/data", "data_service": "",
    "eval_every": 0, "image_size": 32, "jit_compile": "off", "keep_checkpoints": 5,
    "label_smoothing": 0.0, "log_every": 10, "lr_boundaries": [20, 40], "lr_decay_factor": 0.1,
    "lr_schedule": "step", "min_crop_area": 0.35, "mixed_precision": "off",
    "model_dir": "/model", "momentum": 0.9, "num_classes": 10, "num_train_images": 0,
    "optimizer": "sgd", "random_flip": False, "resnet_size": 18, "scale_lr_with_batch": True,
    "seed": 0, "shuffle_buffer": 64, "train_steps": 50, "warmup_epochs": 0.0,
    "weight_decay": 0.0001, "zero_init_residual": False,
}
# Settings added since, at their defaults when an older config.json loads.
ADDED_SINCE = {"max_bad_records": "0.1%"}


def test_every_flat_name_belongs_to_exactly_one_section():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(TrainConfig.field_names())
    assert set(names) == set(FLAT_CONFIG_JSON) | set(ADDED_SINCE)


def test_a_flat_config_json_of_before_loads_into_its_sections(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLAT_CONFIG_JSON))
    config = config_lib.load(str(tmp_path))
    assert config.data == DataSettings(data_dir="/data", min_crop_area=0.35, random_flip=False,
                                       shuffle_buffer=64)
    assert config.model == ModelSettings(resnet_size=18, num_classes=10, image_size=32,
                                         bn_momentum=0.9)
    assert config.optimization == OptimizationSettings(batch_size=16, train_steps=50,
                                                       lr_boundaries=[20, 40])
    assert config.runtime == RuntimeSettings(model_dir="/model", mixed_precision="off",
                                             jit_compile="off", checkpoint_every=20, log_every=10)
    assert config.to_dict() == {**FLAT_CONFIG_JSON, **ADDED_SINCE}
    config_lib.save(config, str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == {
        **FLAT_CONFIG_JSON, **ADDED_SINCE}


def test_updated_routes_flat_names_to_their_sections_and_copies():
    base = TrainConfig()
    changed = base.updated(batch_size=1024, resnet_size=18, model_dir="m")
    assert (changed.optimization.batch_size, changed.model.resnet_size,
            changed.runtime.model_dir) == (1024, 18, "m")
    assert changed.data is base.data  # untouched sections are shared, not copied
    assert base == TrainConfig()  # the original is unchanged
    assert base.updated() is base
    with pytest.raises(TypeError, match="no setting\\(s\\) learning_rate"):
        base.updated(learning_rate=0.1)


def test_from_dict_refuses_unknown_keys_and_wrong_types_as_before():
    with pytest.raises(UserError, match="unknown key\\(s\\) optimization in f.yaml: known keys "
                                        "are base_learning_rate, batch_size, bn_epsilon"):
        TrainConfig.from_dict({"optimization": {"batch_size": 8}}, source="f.yaml")
    with pytest.raises(UserError, match="warmup_epochs in flags must be float, not 'x'"):
        TrainConfig.from_dict({"warmup_epochs": "x"}, source="flags")
    assert TrainConfig.from_dict({"warmup_epochs": 5}).optimization.warmup_epochs == 5.0


def test_the_reference_recipe_scales_its_steps_with_the_batch():
    reference = RECIPES["reference"]
    assert reference.steps_at(256, scale_with_batch=True) == (
        500_000, [150_000, 300_000, 400_000, 450_000])
    assert reference.steps_at(1024, scale_with_batch=True) == (
        125_000, [37_500, 75_000, 100_000, 112_500])
    assert reference.steps_at(1024, scale_with_batch=False) == (
        500_000, [150_000, 300_000, 400_000, 450_000])
    effective = TrainConfig().updated(batch_size=1024).effective()
    assert (effective.optimization.train_steps, effective.optimization.lr_boundaries) == (
        125_000, [37_500, 75_000, 100_000, 112_500])
    assert TrainConfig().updated(train_steps=10, lr_schedule="cosine").effective() == \
        TrainConfig().updated(train_steps=10, lr_schedule="cosine")  # nothing to fill in


@pytest.mark.parametrize("changes, message", [
    ({"resnet_size": 42}, "--resnet-size 42 is not a ResNet depth"),
    ({"num_classes": 0}, "--num-classes must be at least 1"),
    ({"min_crop_area": 0.0}, "--min-crop-area must be in \\(0, 1\\]"),
    ({"lr_boundaries": [20, 10]}, "--lr-boundaries must be increasing"),
    ({"lr_schedule": "cosine", "lr_boundaries": [2, 4]},
     "--lr-boundaries 2 4 has no effect with --lr-schedule cosine .*drop --lr-boundaries"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints must be at least 1"),
    ({"eval_every": -1}, "--eval-every must not be negative"),
])
def test_each_section_refuses_its_settings_with_the_flag_named(changes, message):
    with pytest.raises(UserError, match=message):
        TrainConfig().updated(**changes).validate()


def test_help_groups_the_flags_by_section():
    parser, _ = command_parser("train")
    groups = {group.title: [a.dest for a in group._group_actions]
              for group in parser._action_groups}
    for section, settings in SECTIONS.items():
        assert groups[f"{section} settings"] == [f.name for f in dataclasses.fields(settings)]
    help_text = parser.format_help()
    position = 0
    for heading, flag in (("data settings:", "--data-dir"), ("model settings:", "--resnet-size"),
                          ("optimization settings:", "--batch-size"),
                          ("runtime settings:", "--model-dir")):
        position = help_text.index("  " + flag, help_text.index("\n" + heading, position))
