"""A real kill of ``convert`` (with worker processes) mid-shard, then a rerun: same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from resnet_imagenet.data import imagenet
from resnet_imagenet.data.convert_plan import make_plan
from tests.support.conversion import run_convert, tree

BLOCKED_SHARD = 2  # train-00002-of-00004


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(demo_raw, raw)
    clean = tmp_path / "clean"
    run_convert(raw, clean)

    # Replace one image of one shard by a named pipe: reading it blocks until the test kills
    # the command, which is therefore caught mid-shard, deterministically, after every other
    # shard is complete.
    plan = make_plan(imagenet.load(str(raw)), 4, 2, seed=0)
    blocked = plan.shards[BLOCKED_SHARD]
    pipe = raw / blocked.files[2].rel
    original = pipe.read_bytes()
    pipe.unlink()
    os.mkfifo(pipe)

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_imagenet", "convert", "--raw-dir", str(raw),
         "--output-dir", str(out), "--train-shards", "4", "--validation-shards", "2",
         "--workers", "2"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    others = [s.name for s in plan.shards if s is not blocked]
    try:
        deadline = time.monotonic() + 180
        while not all((out / "_shards" / f"{name}.json").exists() for name in others):
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "conversion did not progress"
            time.sleep(0.1)
        temps = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
        assert len(temps) == 1 and temps[0].endswith("-" + blocked.name)
    finally:  # the whole process group: the command and its workers, as a pod kill would
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / blocked.name).exists()
    assert not (out / "manifest.json").exists()

    pipe.unlink()
    pipe.write_bytes(original)
    result = run_convert(raw, out)
    assert result["written"] == [blocked.name]
    assert tree(out) == tree(clean)  # including the shards the worker processes wrote
