"""``resnet-imagenet train``: flags for every setting, YAML, precedence, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resnet_imagenet.cli import command_parser
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve(argv: list[str]) -> TrainConfig:
    parser, module = command_parser("train")
    assert module is cli
    return cli.resolve_config(parser.parse_args(argv))


def test_every_setting_has_a_flag():
    parser, _ = command_parser("train")
    flags = {option for action in parser._actions for option in action.option_strings}
    for name in TrainConfig.field_names():
        assert "--" + name.replace("_", "-") in flags, name


def test_defaults_are_the_recipe():
    assert resolve([]) == TrainConfig()


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "large-batch.yaml"
    yaml_file.write_text(
        "resnet-size: 34\n"
        "batch_size: 1024\n"
        "lr_boundaries: [30, 60, 80]\n"
        "boundaries-unit: epochs\n"
        "warmup_epochs: 5\n"
        "random_flip: false\n"
    )
    config = resolve(["--config", str(yaml_file), "--resnet-size", "18", "--lr-boundaries", "10",
                      "20", "--label-smoothing", "0.1", "--data-dir", "gs://b/data"])
    optimization = config.optimization
    assert config.model.resnet_size == 18  # flag over YAML
    assert optimization.lr_boundaries == [10, 20]  # flag over YAML
    assert optimization.batch_size == 1024 and optimization.boundaries_unit == "epochs"  # YAML
    assert optimization.warmup_epochs == 5.0 and config.data.random_flip is False  # YAML, typed
    assert optimization.label_smoothing == 0.1 and config.data.data_dir == "gs://b/data"  # flags
    assert optimization.momentum == 0.9 and optimization.train_steps == 0  # defaults (0: recipe)
    # the recipe's 500k steps at batch 256
    assert config.effective().optimization.train_steps == 125_000


def test_boolean_flags_go_both_ways(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("zero_init_residual: true\n")
    assert resolve(["--config", str(yaml_file)]).model.zero_init_residual is True
    assert resolve(["--config", str(yaml_file),
                    "--no-zero-init-residual"]).model.zero_init_residual is False
    assert resolve(["--no-random-flip"]).data.random_flip is False


@pytest.mark.parametrize("text, match", [
    ("batch_size: lots\n", "batch_size in .* must be int"),
    ("learning_rate: 0.1\n", "unknown key\\(s\\) learning_rate"),
    ("- a list\n", "must hold a mapping"),
    ("resnet_size: 42\n", "--resnet-size 42 is not a ResNet depth"),
    ("min_crop_area: 0\n", "--min-crop-area must be in"),
])
def test_bad_yaml_is_refused(tmp_path, text, match):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text)
    with pytest.raises(UserError, match=match):
        resolve(["--config", str(yaml_file)])


def run_cli(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_imagenet", "train", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_print_config_shows_the_effective_recipe_without_reading_data(tmp_path):
    result = run_cli("--print-config", "--batch-size", "1024",
                     "--data-dir", str(tmp_path / "nothing"), "--model-dir", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # one JSON object, nothing else
    assert (printed["batch_size"], printed["train_steps"], printed["bn_momentum"]) == (
        1024, 125_000, 0.997)
    assert printed["learning_rate"] == 0.4
    assert printed["schedule"] == [
        {"step": 0, "learning_rate": 0.4}, {"step": 37_500, "learning_rate": 0.04},
        {"step": 75_000, "learning_rate": 0.004}, {"step": 100_000, "learning_rate": 0.0004},
        {"step": 112_500, "learning_rate": 0.00004}]
    assert not os.listdir(tmp_path)  # nothing read, nothing written
    old = json.loads(run_cli("--print-config", "--batch-size", "1024",
                             "--no-scale-lr-with-batch").stdout)
    assert (old["train_steps"], old["learning_rate"], old["lr_boundaries"]) == (
        500_000, 0.1, [150_000, 300_000, 400_000, 450_000])
    cosine = json.loads(run_cli("--print-config", "--lr-schedule", "cosine", "--warmup-epochs",
                                "5", "--num-train-images", "1281167").stdout)
    assert [row["step"] for row in cosine["schedule"]] == [0, 25_023, 500_000]
    assert [row["learning_rate"] for row in cosine["schedule"]] == [0.0, 0.1, 0.0]


def test_missing_shards_exit_2_with_one_line(tmp_path):
    result = run_cli("--data-dir", str(tmp_path / "nothing"), "--model-dir",
                     str(tmp_path / "model"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no TFRecord shards match" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


def test_required_directories_and_bad_tf_config(tmp_path):
    result = run_cli()
    assert result.returncode == 2 and "error: --data-dir is required" in result.stderr
    result = run_cli("--data-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                     TF_CONFIG='{"cluster": ')
    assert result.returncode == 2 and "error: TF_CONFIG is not valid JSON" in result.stderr


def test_under_trainer_v2_the_trainer_builds_tf_config_from_the_jobset_env(tmp_path):
    """A TrainJob pod has no TF_CONFIG: the trainer builds it from JobSet's environment before
    anything else (tests/unit/test_tf_config_jobset.py has the cases)."""
    result = run_cli("--data-dir", str(tmp_path / "nothing"), "--model-dir",
                     str(tmp_path / "m"), RESNET_IMAGENET_NUM_NODES="2",
                     JOB_COMPLETION_INDEX="1", JOBSET_NAME="r", JOBSET_REPLICATED_JOB="node",
                     JOBSET_JOB_INDEX="0")
    assert 'TF_CONFIG from the JobSet: {"cluster":{"worker":["r-node-0-0.r:2222",' \
           '"r-node-0-1.r:2222"]},"task":{"type":"worker","index":1}' in result.stderr
    assert result.returncode == 2 and "no TFRecord shards match" in result.stderr


def test_a_worker_given_gpus_it_cannot_see_stops_unless_allow_cpu(tmp_path):
    """What `launch --gpus-per-worker 1` on a machine without a GPU (or a CPU-only TensorFlow in
    the image) used to do: train on the CPU, many times slower, without a word. Now the worker
    stops before it reads anything; --allow-cpu makes it a warning and training goes on."""
    args = ("--data-dir", str(tmp_path / "nothing"), "--model-dir", str(tmp_path / "m"))
    refused = run_cli(*args, RESNET_IMAGENET_GPUS="1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: this worker was given 1 GPU (--gpus-per-worker, RESNET_IMAGENET_GPUS) but "
        "TensorFlow sees none: install TensorFlow with CUDA (pip install 'tensorflow[and-cuda]', "
        "or the trainer image) and check the driver with nvidia-smi, or pass --allow-cpu to "
        "train on what is visible"], refused.stderr
    allowed = run_cli(*args, "--allow-cpu", RESNET_IMAGENET_GPUS="2")
    assert ("this worker was given 2 GPUs (--gpus-per-worker, RESNET_IMAGENET_GPUS) but "
            "TensorFlow sees none; training on the CPU (--allow-cpu)") in allowed.stderr
    # It went on, to the next check: the missing shards.
    assert allowed.returncode == 2 and "no TFRecord shards match" in allowed.stderr
    assert not (tmp_path / "m").exists()
