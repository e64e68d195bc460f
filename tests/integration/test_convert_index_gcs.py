"""Tasks indexing the official archives on gs:// (the emulator) at the same time: each archive
part is read once over all tasks, and a claim left by a dead task is taken over.

Every task is a process of its own with ``STORAGE_EMULATOR_HOST`` set for it alone; for the byte
counts each one goes through its own counting proxy (tests/support/byte_proxy.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from resnet_imagenet.data import archives, index_claims, sample
from tests.support.byte_proxy import ByteCountingProxy
from tests.support.conversion import SHARDS, run_convert, tree
from tests.support.gcs import ENV_AT_START, gcs_client
from tests.support.handmade import box_xml

pytestmark = pytest.mark.gcs

CACHE = "_shards/archives/"
INDEX_TASK = """
import json, logging, os, sys, time
from resnet_imagenet.data import convert_worker
logging.basicConfig(level=logging.INFO, format="task %(process)d: %(message)s")
raw, out, num_tasks, task_index = sys.argv[1:5]
if len(sys.argv) > 5:  # start together: every task waits for the others to be ready
    ready = sys.argv[5]
    open(os.path.join(ready, task_index), "w").close()
    while len(os.listdir(ready)) < int(num_tasks):
        time.sleep(0.01)
dataset = convert_worker.load_input(raw, out, None, int(num_tasks), int(task_index))
print(json.dumps({"train": len(dataset.train), "validation": len(dataset.validation)}))
"""


def new_bucket(gcs_server) -> tuple[object, str]:
    bucket = gcs_client(gcs_server).create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    return bucket, f"gs://{bucket.name}"


def upload(bucket, prefix: str, files: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: bucket.blob(f"{prefix}/{kv[0]}").upload_from_string(kv[1]),
                      files.items()))


def download(bucket, prefix: str) -> dict[str, bytes]:
    return {b.name[len(prefix) + 1:]: b.download_as_bytes()
            for b in bucket.list_blobs(prefix=prefix + "/") if not b.name.endswith("/")}


def task_env(gcs_server, endpoint: str | None = None, **extra) -> dict[str, str]:
    """The environment of one task process: the emulator (or a proxy in front of it) for it
    alone; the test process itself keeps ENV_AT_START."""
    return {**ENV_AT_START, **gcs_server.env(), "STORAGE_EMULATOR_HOST":
            endpoint or gcs_server.endpoint, "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **extra}


def wide_layout(classes: int = 8, per_class: int = 6, size: int = 320 * 1024) -> dict:
    """An extracted layout whose class tars (~2 MiB) dwarf the 64 KiB hops of the train
    archive's listing; the image bytes are noise (indexing reads headers, not images)."""
    rng = np.random.default_rng(0)
    wnids = [f"n{c:08d}" for c in range(classes)]
    files = {"metadata.txt": "".join(f"{w}\tclass {w}\n" for w in wnids).encode()}
    for w in wnids:
        for n in range(per_class):
            files[f"train/{w}/{w}_{n}.JPEG"] = rng.bytes(size)
        files[f"bounding_boxes/{w}/{w}_0.xml"] = box_xml(f"{w}_0", w, 64, 48,
                                                         (1, 2, 30, 40)).encode()
    labels = []
    for n in range(1, 9):
        files[f"validation/ILSVRC2012_val_{n:08d}.JPEG"] = rng.bytes(4096)
        labels.append(wnids[n % classes])
    files["validation_labels.txt"] = ("\n".join(labels) + "\n").encode()
    return files


def run_tasks(commands: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c, e in zip(commands, envs)]
    results = []
    for cmd, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def test_four_tasks_read_each_archive_once_for_the_index(gcs_server, tmp_path):
    bucket, root = new_bucket(gcs_server)
    packed = sample.to_archives(wide_layout())
    upload(bucket, "raw", packed)
    raw, out = f"{root}/raw", f"{root}/out"
    tasks = 4
    claims = {index_claims.POLL_ENV: "0.2", index_claims.TIMEOUT_ENV: "60"}
    ready = tmp_path / "ready"
    ready.mkdir()
    proxies = [ByteCountingProxy(gcs_server.endpoint) for _ in range(tasks)]
    for proxy in proxies:
        proxy.__enter__()
    try:
        results = run_tasks(
            [[sys.executable, "-c", INDEX_TASK, raw, out, str(tasks), str(i), str(ready)]
             for i in range(tasks)],
            [task_env(gcs_server, proxy.endpoint, **claims) for proxy in proxies])
    finally:
        for proxy in proxies:
            proxy.__exit__(None, None, None)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"train": 48, "validation": 8}

    report = {}
    for name in (archives.TRAIN, archives.VALIDATION, archives.BOXES, archives.DEVKIT):
        per_task = [p.read_bytes(f"raw/{name}") for p in proxies]
        report[name] = {"per_task": per_task, "total": sum(per_task),
                        "one_pass": len(packed[name])}
    print("bytes read for the index:", json.dumps(report, indent=1))
    train = report[archives.TRAIN]
    assert train["total"] <= 1.1 * train["one_pass"], train
    for name in (archives.VALIDATION, archives.BOXES, archives.DEVKIT):
        # one task reads each whole (a .tar.gz is one stream: read once, whoever reads it)
        assert report[name]["total"] <= 1.1 * report[name]["one_pass"], (name, report[name])
    assert sum(1 for r in results if "waiting for" in r.stderr) >= 1, \
        "no task waited for another: the test did not run the tasks at the same time"

    # every index as one task alone makes it, and no claim or heartbeat left
    alone = run_tasks([[sys.executable, "-c", INDEX_TASK, raw, f"{root}/alone", "1", "0"]],
                      [task_env(gcs_server)])[0]
    assert alone.returncode == 0, alone.stderr
    shared, single = download(bucket, "out"), download(bucket, "alone")
    assert shared == single
    assert sorted(k[len(CACHE):] for k in shared) == sorted(
        ["boxes.json", "devkit.json", "train.json", "validation.json"]
        + [f"train-n{c:08d}.json" for c in range(8)] + [f"boxes/n{c:08d}.json" for c in range(8)])


def test_a_claim_of_a_dead_task_is_taken_over_and_the_conversion_completes(gcs_server,
                                                                            tmp_path):
    """Task 1 of an earlier attempt was killed while indexing a class tar: its claim and its
    heartbeat are an hour old, the object it was writing a temporary one. Two tasks started
    again (the timeout still 300 s) take the unit over and convert to the local bytes."""
    raw_local = tmp_path / "raw"
    sample.build(str(raw_local), seed=3, per_class=4, as_archives=True)
    local = tmp_path / "local"
    run_convert(raw_local, local)
    bucket, root = new_bucket(gcs_server)
    upload(bucket, "raw", {p.name: p.read_bytes() for p in raw_local.iterdir()})
    unit, dead = "train-n00000003", uuid.uuid4().hex
    cache = f"out/{CACHE}"
    stale = {f"{cache}{unit}.claim": {"unit": unit, "task": 1, "token": dead,
                                      "time": time.time() - 3600},
             f"{cache}alive-{dead}.json": {"task": 1, "token": dead, "time": time.time() - 3500},
             f"{cache}.tmp-0123456789ab-{unit}.json": '{"unit": "train-n0'}
    for name, value in stale.items():
        bucket.blob(name).upload_from_string(value if isinstance(value, str)
                                             else json.dumps(value))
    convert = [sys.executable, "-m", "resnet_imagenet", "convert", "--raw-dir",
               f"{root}/raw", "--output-dir", f"{root}/out", "--workers", "1",
               "--train-shards", str(SHARDS["train_shards"]),
               "--validation-shards", str(SHARDS["validation_shards"]), "--num-tasks", "2"]
    started = time.monotonic()
    results = run_tasks([convert + ["--task-index", str(i)] for i in range(2)],
                        [task_env(gcs_server, **{index_claims.POLL_ENV: "0.2"})] * 2)
    for result in results:
        assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 120  # not a wait for the 300 s timeout
    assert sum(f"taking over {unit} from task 1" in r.stderr for r in results) == 1
    written = download(bucket, "out")
    assert not [k for k in written if k.endswith(".claim")]
    assert {k: v for k, v in written.items() if not k.startswith(CACHE)} == \
        {k: v for k, v in tree(local).items() if not k.startswith(CACHE)}
    assert json.loads(written[f"{CACHE}{unit}.json"])["unit"] == unit
