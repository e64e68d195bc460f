"""Claims on archive index units (resnet_imagenet.data.index_claims) in a local cache directory:
one winner per claim and per takeover, a live claim waited for, a dead one taken over."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from resnet_imagenet.data import archives, index_claims, sample
from resnet_imagenet.data.index_claims import Claims
from tests.support.conversion import run_convert, tree

UNIT = "train-n00000003"  # unit k = 5 of the demo archives: task 1's of 2


@pytest.fixture(scope="module")
def demo_archives(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archives") / "raw"
    sample.build(str(out), seed=0, per_class=20, as_archives=True)
    return out


@pytest.fixture(scope="module")
def one_task_out(demo_archives, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-task") / "out"
    run_convert(demo_archives, out)
    return out


def concurrently(calls) -> list:
    start = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def go(k):
        start.wait()
        results[k] = calls[k]()

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_of_tasks_racing_for_a_claim_or_a_takeover_exactly_one_wins(tmp_path):
    tasks = [Claims(str(tmp_path), k, timeout=60) for k in range(8)]
    try:
        assert sorted(concurrently([lambda c=c: c.claim("u") for c in tasks])) == \
            [False] * 7 + [True]
        # a claim of a task that died an hour ago
        (tmp_path / "v.claim").write_text(json.dumps(
            {"unit": "v", "task": 3, "token": "dead", "time": time.time() - 3600}))
        found, version = tasks[0].read_record(str(tmp_path / "v.claim"))
        assert tasks[0].stale(found, {})
        assert sorted(concurrently([lambda c=c: c.take_over("v", version) for c in tasks])) == \
            [False] * 7 + [True]
        assert not tasks[0].take_over("v", version)  # the version seen is gone
        holder = json.loads((tmp_path / "v.claim").read_text())
        assert holder["token"] != "dead" and holder["time"] > time.time() - 60
    finally:
        for claims in tasks:
            claims.__exit__(None, None, None)
    # every claim released, every heartbeat removed
    assert sorted(os.listdir(tmp_path)) == []


CLAIMANT = """
import sys, time
from resnet_imagenet.data.index_claims import Claims
claims = Claims(sys.argv[1], 1)
assert claims.claim(sys.argv[2])
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_live_claim_is_waited_for_and_taken_over_once_its_task_dies(
        demo_archives, one_task_out, tmp_path, monkeypatch, caplog):
    """Task 1 claims one of its units and is killed 3 s later (SIGKILL: no release, its
    heartbeat stops); task 0 indexes every other unit, waits for that one while task 1 beats,
    takes it over when the heartbeat is 2 s old, and converts everything."""
    out = tmp_path / "out"
    cache = out / "_shards" / archives.CACHE_DIR
    timeouts = {index_claims.TIMEOUT_ENV: "2", index_claims.POLL_ENV: "0.1"}
    for name, value in timeouts.items():
        monkeypatch.setenv(name, value)
    claimant = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(cache), UNIT],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert claimant.stdout.readline().strip() == "claimed"
        started = time.monotonic()
        killer = threading.Timer(3.0, claimant.kill)
        killer.start()
        caplog.set_level(logging.INFO)
        result = run_convert(demo_archives, out, num_tasks=2, task_index=0)
        elapsed = time.monotonic() - started
    finally:
        claimant.kill()
        claimant.wait()
    assert "waiting for 1 archive units claimed by task 1" in caplog.text
    assert f"taking over {UNIT} from task 1" in caplog.text
    assert elapsed >= 3.0 + 2.0 - 0.5  # not before the heartbeat was 2 s old
    # task 0 made the 6 units of its own, the 5 of task 1 nobody had claimed, then the dead one
    assert "indexing 6 of 12 archive units" in caplog.text
    assert "indexing 5 archive units that no other live task holds" in caplog.text
    assert "indexing 1 archive units that no other live task holds" in caplog.text
    assert result["manifest"] is None  # task 1's shards are still to be written
    assert run_convert(demo_archives, out, num_tasks=2, task_index=1)["manifest"] is not None
    # the dead task's heartbeat is all that is left of the claims
    assert [p.name for p in cache.iterdir() if p.suffix not in (".json", "")] == []
    left = {k: v for k, v in tree(out).items() if "/alive-" not in k}
    assert left == tree(one_task_out)


def test_a_claim_left_by_a_task_killed_long_ago_is_taken_over_at_once(
        demo_archives, one_task_out, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    cache = out / "_shards" / archives.CACHE_DIR
    cache.mkdir(parents=True)
    (cache / f"{UNIT}.claim").write_text(json.dumps(
        {"unit": UNIT, "task": 1, "token": "dead", "time": time.time() - 3600}))
    (cache / "alive-dead.json").write_text(json.dumps(
        {"task": 1, "token": "dead", "time": time.time() - 3000}))
    # and the temporary object of the index it was writing
    (cache / f".tmp-0123456789ab-{UNIT}.json").write_text('{"unit": "train-n0')
    monkeypatch.setenv(index_claims.POLL_ENV, "0.1")  # the timeout stays 300 s
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    run_convert(demo_archives, out, num_tasks=2, task_index=1)
    assert time.monotonic() - started < 60
    assert f"taking over {UNIT} from task 1" in caplog.text
    run_convert(demo_archives, out, num_tasks=2, task_index=0)
    assert not list(cache.glob("*.claim"))
    shutil.rmtree(cache)
    expected = {k: v for k, v in tree(one_task_out).items()
                if not k.startswith("_shards/archives/")}
    assert tree(out) == expected
