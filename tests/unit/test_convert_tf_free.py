"""``convert`` without TensorFlow: the same bytes as the converter that used tf.io.gfile, and
no process of a run (the command, its workers) imports TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_imagenet.data import convert, tfrecord
from tests.support.handmade import tree_digest, write_archives, write_raw

# The whole output tree (shards, records, config, labels, manifest) for tests.support.handmade's
# layout with 3 train and 2 validation shards and seed 7, as written by the converter of commit
# 462fe05, which read and wrote through tf.io.gfile and imported TensorFlow in every worker.
TF_ERA_DIGEST = "436103a90ae9646d61cce2b019e02d5d4ccb1951384c54fce9c06e9372213432"
ARGS = {"train_shards": 3, "validation_shards": 2, "seed": 7}


def tf_era_digest(out: Path, skip: str | None = None) -> str:
    """``tree_digest`` of ``out`` with manifest.json as that converter wrote it: without the
    per-shard counts added since (checked here against the shards themselves)."""
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in ("train", "validation"):
        shards = sorted(out.glob(f"{split}-*"))
        assert manifest[split].pop("shard_images") == [
            len(tfrecord.read_records(str(p))) for p in shards]
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return tree_digest(out, skip=skip)

# Installed in every process of the run through PYTHONPATH: records that the process started
# and makes any import of TensorFlow fail loudly, after noting who tried.
SITECUSTOMIZE = '''
import os, sys, traceback
_DIR = os.environ["TF_WATCH_DIR"]
open(os.path.join(_DIR, f"started-{os.getpid()}"), "w").write(" ".join(sys.argv))

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            with open(os.path.join(_DIR, f"tensorflow-{os.getpid()}"), "w") as f:
                f.write("".join(traceback.format_stack()))
            raise ImportError("tensorflow imported during convert")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
'''


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    return write_raw(tmp_path_factory.mktemp("handmade") / "raw")


def test_output_bytes_equal_the_tensorflow_era_converter(handmade, tmp_path):
    convert.convert(str(handmade), str(tmp_path / "out"), workers=1, **ARGS)
    assert tf_era_digest(tmp_path / "out") == TF_ERA_DIGEST


def run_watched(tmp_path: Path, raw: Path, out: Path) -> tuple[subprocess.CompletedProcess, Path]:
    watch = tmp_path / "watch"
    watch.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "TF_WATCH_DIR": str(watch),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "resnet_imagenet", "convert", "--raw-dir", str(raw),
         "--output-dir", str(out), "--workers", "2", "--train-shards", "3",
         "--validation-shards", "2", "--seed", "7"],
        env=env, capture_output=True, text=True, timeout=300)
    return result, watch


@pytest.mark.parametrize("layout", ["extracted", "archives"])
def test_no_process_of_a_run_imports_tensorflow(handmade, tmp_path, layout):
    raw = handmade if layout == "extracted" else write_archives(handmade, tmp_path / "archives")
    result, watch = run_watched(tmp_path, raw, tmp_path / "out")
    tried = sorted(p.read_text() for p in watch.glob("tensorflow-*"))
    assert not tried, "TensorFlow imported by:\n" + "\n".join(tried)
    assert result.returncode == 0, result.stderr
    started = [p.read_text() for p in watch.glob("started-*")]
    # the command and both workers ran under the hook (workers are spawned interpreters)
    assert sum("multiprocessing" in argv for argv in started) >= 2, started
    assert len(started) >= 3
    # the archives give the bytes of their extracted layout (plus their index, in _shards/)
    assert tf_era_digest(tmp_path / "out", skip="_shards/archives") == TF_ERA_DIGEST
