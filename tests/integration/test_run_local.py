"""`resnet-imagenet run-local` end to end: the real pipeline function, run by kfp.local with the
local launcher backend, on a reduced configuration (10 images per class, ResNet-18 at 32 px, a
few steps); then a second run on the same workdir, which reuses the converted dataset.

The first run starts from the four official archives (`--archives`), the input a cluster run
reads; `make demo`'s extracted layout converts to the same bytes
(tests/unit/test_convert_archives.py), so a third full run for it would prove nothing more.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# XLA off: compiling costs more than it saves in a few steps (the demo itself turns it on).
TINY = ["--per-class", "10", "--resnet-size", "18", "--image-size", "32", "--batch-size", "16",
        "--workers", "2", "--num-tasks", "2", "--train-arg=--log-every=1",
        "--train-arg=--jit-compile=off"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run_local(workdir, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnet_imagenet", "run-local", "--workdir", str(workdir),
         *TINY, *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=840,
    )


def step_times(stdout: str) -> dict[str, str]:
    """``{step: status}`` from the summary's step-time table."""
    table = stdout.split("step times:")[1]
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^\s{4}(\S+)\s+[\d.]+ s\s+(\w+)$", table, re.M)}


def summary_path(stdout: str, label: str) -> str:
    return re.search(rf"^\s+{re.escape(label)}\s+(\S+)$", stdout, re.M).group(1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run-local") / "demo"
    result = run_local(workdir, "--archives", "--train-steps", "6", "--predict", "3")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return workdir, result.stdout


def test_the_pipeline_runs_end_to_end(first_run):
    workdir, stdout = first_run
    steps = step_times(stdout)
    order = list(steps)
    assert set(order) == {"sample-data", "validate-parameters", "dataset-ready",
                          "convert-shards", "finalize-dataset", "train", "evaluate",
                          "export-saved-model", "training-report", "predict"}
    chain = ["sample-data", "validate-parameters", "dataset-ready", "convert-shards",
             "finalize-dataset", "train", "evaluate", "export-saved-model", "predict"]
    assert [order.index(step) for step in chain] == sorted(order.index(s) for s in chain)
    assert order.index("evaluate") < order.index("training-report")
    assert set(steps.values()) == {"SUCCESS"}
    # The pipeline's convert tasks read the archives without extracting them.
    assert sorted(os.listdir(workdir / "raw")) == sorted([
        "ILSVRC2012_bbox_train_v2.tar.gz", "ILSVRC2012_devkit_t12.tar.gz",
        "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"])
    manifest = json.loads((workdir / "tfrecords" / "manifest.json").read_text())
    assert (manifest["train"]["images"], manifest["validation"]["images"]) == (80, 20)
    assert manifest["class_text"]["n00000003"] == "digit three"  # from the devkit's meta.mat

    metrics_path = summary_path(stdout, "metrics (JSON)")
    metrics = json.loads(open(metrics_path).read())
    assert metrics["images"] == 20  # 10 per class: 2 validation images in each of 10 classes
    assert metrics["step"] == 6
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert f"top-1 {metrics['top1']:.2%}   top-5 {metrics['top5']:.2%}" in stdout
    # The train step's Metrics artifact: the final training figures of the run's summary.
    summary = json.loads(open(os.path.join(summary_path(stdout, "checkpoints"), os.pardir,
                                           "train_summary.json")).read())
    assert (f"  training: final loss {summary['loss']:.4f}, "
            f"{summary['images_per_second']:.1f} images/s, 6 steps") in stdout

    saved_model = summary_path(stdout, "SavedModel")
    assert saved_model.startswith(str(workdir / "runs")) and saved_model.endswith("/1")
    assert os.path.exists(os.path.join(saved_model, "saved_model.pb"))

    logs = summary_path(stdout, "TensorBoard logs")
    assert glob.glob(os.path.join(logs, "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(logs, "validation", "events.out.tfevents.*"))
    assert f"tensorboard --logdir {logs}" in stdout

    report = open(summary_path(stdout, "report (HTML)")).read()
    assert report.count("data:image/png;base64,") >= 2
    assert "<h2>Per class (worst first)</h2>" in report

    predictions = re.findall(r"^\s{4}ILSVRC2012_val_\d{8}\.JPEG: (n\d{8}) .* p=([\d.]+) "
                             r"\((ok|wrong, true n\d{8})\)$", stdout, re.M)
    assert len(predictions) == 3  # images out of the validation archive

    kfp_outputs = summary_path(stdout, "KFP outputs")
    assert glob.glob(os.path.join(kfp_outputs, "*", "train", "model", "config.json"))


def test_a_second_run_reuses_the_converted_dataset(first_run):
    workdir, _ = first_run
    shards = sorted(glob.glob(str(workdir / "tfrecords" / "*-of-*")))
    before = {path: os.stat(path).st_mtime_ns for path in shards}
    result = run_local(workdir, "--train-steps", "2", "--predict", "0")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]

    steps = step_times(result.stdout)
    assert "use-existing-dataset" in steps
    assert "convert-shards" not in steps and "finalize-dataset" not in steps
    assert "sample-data" not in steps
    assert {path: os.stat(path).st_mtime_ns for path in shards} == before
    assert len(glob.glob(str(workdir / "runs" / "*" / "saved_model" / "1"))) == 2


def test_bad_flags_fail_before_anything_starts(tmp_path):
    result = run_local(tmp_path / "w", "--batch-size", "15")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: pipeline parameter train_batch_size=15 is not divisible by the 2 CPU workers "
        "(train_gpus_per_worker=0): every replica needs the same share of the global batch, "
        "use e.g. 14")
    assert not (tmp_path / "w").exists()
