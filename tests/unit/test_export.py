"""``resnet-imagenet export``: a SavedModel that reloads on a CPU-only process and answers
TF Serving's JSON request forms like the checkpoint it came from."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from resnet_imagenet import cli, export
from resnet_imagenet.errors import UserError
from tests.support.model_dir import (  # noqa: F401  (fixtures)
    checkpoint_logits,
    exported_model,
    near_ties,
    raw_validation,
    resnet34_checkpoint,
    trained_model,
)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _text(label: int) -> str:
    """The demo data's human text of label 1..10."""
    return f"digit {DIGITS[label - 1]}"


# Runs in a fresh interpreter that cannot see a GPU: prints what the SavedModel predicts.
_RELOAD = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    assert not tf.config.list_physical_devices("GPU")
    saved, files = sys.argv[1], sys.argv[2:]
    model = tf.saved_model.load(saved)
    encoded = tf.constant([open(f, "rb").read() for f in files])
    by_bytes = model.signatures["serving_default"](image_bytes=encoded)
    images = tf.stack([tf.image.resize(tf.io.decode_jpeg(e, channels=3), [32, 32])
                       for e in encoded])
    by_images = model.signatures["predict_images"](images=tf.cast(images, tf.uint8))
    print(json.dumps({
        "classes": by_bytes["classes"].numpy().tolist(),
        "texts": [t.decode() for t in by_bytes["top5_texts"].numpy()[:, 0]],
        "images_dtype": by_images["probabilities"].dtype.name,
        "images_classes": len(by_images["classes"].numpy()),
    }))
""")


def _half_precision_ops(saved: str) -> list[str]:
    """Nodes of the SavedModel's graph and functions that compute in float16/bfloat16."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    half = {types_pb2.DT_HALF, types_pb2.DT_BFLOAT16}
    found = []
    for meta_graph in proto.meta_graphs:
        nodes = list(meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            nodes += list(function.node_def)
        for node in nodes:
            for attr in node.attr.values():
                if attr.type in half or half & set(attr.list.type):
                    found.append(node.name)
    return found


@pytest.fixture(scope="module")
def served(exported_model):
    """The exported test model, loaded once for this module."""
    import tensorflow as tf

    return tf.saved_model.load(exported_model)


def test_export_reloads_in_a_cpu_only_process_and_predicts_like_the_checkpoint(
        trained_model, exported_model):
    saved = exported_model  # export.export(MODEL, EXPORT) of the trained model
    export_dir = os.path.dirname(saved)
    assert os.path.basename(saved) == "1"
    assert os.listdir(export_dir) == ["1"]  # no staging folder left behind
    for name in ("saved_model.pb", "variables/variables.index", "assets.extra/README.md"):
        assert os.path.isfile(os.path.join(saved, name)), name
    with open(os.path.join(saved, "assets.extra", "README.md")) as f:
        readme = f.read()
    assert '{"instances": [{"b64": ' in readme and ":predict" in readme

    files = [path for path, _ in raw_validation(trained_model.raw_dir)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", _RELOAD, saved, *files], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])

    logits, _ = checkpoint_logits(trained_model)
    expected = logits.argmax(axis=1) + 1
    differ = np.array(reloaded["classes"]) != expected
    assert not (differ & ~near_ties(logits, 1)).any()
    assert reloaded["texts"] == [_text(k) for k in reloaded["classes"]]
    assert reloaded["images_dtype"] == "float32" and reloaded["images_classes"] == len(files)


def test_the_b64_json_request_decodes_to_the_same_answer(served, exported_model, trained_model):
    import tensorflow as tf

    model = served
    files = [path for path, _ in raw_validation(trained_model.raw_dir)][:3]
    encoded = [open(f, "rb").read() for f in files]
    direct = model.signatures["serving_default"](image_bytes=tf.constant(encoded))
    b64 = [{"b64": base64.b64encode(e).decode()} for e in encoded]

    answer = export.serve_json(model, json.dumps({"instances": b64}))

    predictions = answer["predictions"]
    assert [p["classes"] for p in predictions] == direct["classes"].numpy().tolist()
    for p, probabilities, synsets in zip(predictions, direct["probabilities"].numpy(),
                                         direct["top5_synsets"].numpy()):
        assert p["probabilities"] == pytest.approx(probabilities.tolist())
        assert sum(p["top5_probabilities"]) <= 1.0 + 1e-6
        assert p["top5_classes"][0] == p["classes"]
        assert p["top5_synsets"] == [s.decode() for s in synsets]
        assert p["top5_texts"] == [_text(k) for k in p["top5_classes"]]

    # The named row form and the columnar form are the same request.
    named = export.serve_json(model, {"instances": [{"image_bytes": v} for v in b64]})
    assert [p["classes"] for p in named["predictions"]] == [p["classes"] for p in predictions]
    columnar = export.serve_json(exported_model, {"inputs": {"image_bytes": b64}})
    assert columnar["outputs"]["classes"] == [p["classes"] for p in predictions]

    # predict_images takes the preprocessed pixels as nested lists of 0..255.
    from resnet_imagenet.data.preprocessing import preprocess_eval_batch

    pixels = preprocess_eval_batch(tf.constant(encoded), 32).numpy().tolist()
    by_pixels = export.serve_json(model, {"signature_name": "predict_images",
                                          "instances": pixels})
    assert [p["classes"] for p in by_pixels["predictions"]] == [p["classes"] for p in predictions]


@pytest.mark.parametrize("body, message", [
    ({"instances": [{"b64": base64.b64encode(b"not an image").decode()}]},
     "Unknown image file format"),
    ({"instances": [{"b64": "%%%"}]}, "Unable to base64 decode"),
    ({"signature_name": "classify", "instances": [1]}, '"classify" not found'),
    ({"instances": [], "inputs": []}, "exactly one of"),
    ({"instances": [{"images": {"b64": "AA=="}}]}, "exactly the keys image_bytes"),
    ({"signature_name": "predict_images", "instances": [[[0, 0, 0]]]}, "does not match"),
    ("{not json", "JSON Parse error"),
])
def test_bad_requests_get_an_error_like_tf_serving(served, body, message):
    answer = export.serve_json(served, body)
    assert list(answer) == ["error"] and message in answer["error"]


def test_an_existing_version_is_refused_and_overwrite_exports_float32(
        trained_model, exported_model, tmp_path, capsys):
    import keras

    export_dir = tmp_path / "saved"
    shutil.copytree(os.path.dirname(exported_model), export_dir)
    pb = export_dir / "1" / "saved_model.pb"
    before = (pb.stat().st_mtime_ns, pb.read_bytes())

    status = cli.main(["export", "--model-dir", trained_model.model_dir,
                       "--export-dir", str(export_dir)])
    assert status == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert str(export_dir / "1") in line and "--overwrite" in line and "--version 2" in line
    assert (pb.stat().st_mtime_ns, pb.read_bytes()) == before

    # A process that trained under mixed precision still exports a float32 graph.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        assert export.export(trained_model.model_dir, str(export_dir), overwrite=True) \
            == str(export_dir / "1")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert pb.stat().st_mtime_ns != before[0]
    assert os.listdir(export_dir) == ["1"]
    assert _half_precision_ops(str(export_dir / "1")) == []


def test_a_retried_export_keeps_the_version_it_made_and_refuses_another(
        trained_model, exported_model, tmp_path):
    """The pipeline's export step (reuse=True, retried by KFP): a version exported from the same
    checkpoint is kept as it is; one from another checkpoint is still refused."""
    provenance = os.path.join(exported_model, "assets.extra", "export.json")
    assert json.loads(open(provenance).read()) == {
        "checkpoint": trained_model.checkpoint, "step": trained_model.step}
    export_dir = tmp_path / "saved"
    shutil.copytree(os.path.dirname(exported_model), export_dir)
    pb = export_dir / "1" / "saved_model.pb"
    before = pb.stat().st_mtime_ns
    assert export.export(trained_model.model_dir, str(export_dir), reuse=True) == \
        str(export_dir / "1")
    assert pb.stat().st_mtime_ns == before and os.listdir(export_dir) == ["1"]
    provenance = export_dir / "1" / "assets.extra" / "export.json"
    provenance.write_text(json.dumps({"checkpoint": "elsewhere/ckpt-1", "step": 1}))
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        export.export(trained_model.model_dir, str(export_dir), reuse=True)
    assert pb.stat().st_mtime_ns == before


def test_the_highest_version_is_served_and_a_wrong_checkpoint_writes_nothing(
        trained_model, exported_model, resnet34_checkpoint, tmp_path, capsys):
    base = tmp_path / "saved"
    for version in ("1", "0010", "2"):
        shutil.copytree(exported_model, base / version)
    (base / "latest").mkdir()  # not a version: ignored, as by TF Serving
    assert export.resolve_saved_model(str(base)) == str(base / "0010")
    assert export.resolve_saved_model(str(base / "2")) == str(base / "2")

    target = tmp_path / "out"
    status = cli.main(["export", "--model-dir", trained_model.model_dir, "--export-dir",
                       str(target), "--checkpoint", resnet34_checkpoint])
    assert status == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "ResNet-34" in line
    assert not target.exists() or os.listdir(target) == []


def test_a_truncated_checkpoint_is_one_line_and_writes_nothing(trained_model, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model.model_dir, model_dir)
    checkpoint = str(model_dir / "checkpoints" / os.path.basename(trained_model.checkpoint))
    data = f"{checkpoint}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    target = tmp_path / "out"
    status = cli.main(["export", "--model-dir", str(model_dir), "--export-dir", str(target)])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {checkpoint} is damaged (")
    assert err[0].endswith("): pass --checkpoint with an earlier one of its directory")
    assert not target.exists() or os.listdir(target) == []
