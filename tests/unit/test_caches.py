"""The per-machine caches under RESNET_IMAGENET_CACHE on bad input: a folder that cannot be
written, a Go too old for the pinned modules, what a killed build left behind.

tools/build.sh runs here with a fake ``go`` first on PATH (a shell script that answers the few
commands the script makes), so these tests take seconds; the real build is what ``make test``
runs before the suite. The schema install from an empty cache is in
tests/integration/test_caches_from_empty.py (it needs PyPI).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import pipeline_check
from resnet_imagenet.errors import UserError
from tests.support import cluster
from tests.support.repo import ROOT

BUILD = ROOT / "tools" / "build.sh"
KWOK = "kwok-" + next(line.split("=", 1)[1].split()[0]
                      for line in (ROOT / "tools" / "versions.env").read_text().splitlines()
                      if line.startswith("KWOK_VERSION="))

# A `go` that reports VERSION and otherwise does what build.sh asks of it, without a network:
# `go mod download -json` names an empty go.mod, `go build -o FILE PKG` writes FILE and
# `go build -o DIR/ PKG...` writes DIR/<last path element of PKG> for each. FAIL=1 makes every command but `go env` fail as a broken network would.
FAKE_GO = r"""#!/usr/bin/env bash
set -eu
if [ "$1 $2" = "env GOVERSION" ]; then echo "go$VERSION"; exit 0; fi
if [ "${FAIL:-0}" = 1 ]; then echo "go: simulated: dial tcp: no route to host" >&2; exit 1; fi
case "$1 ${2:-}" in
  "mod init") echo "module $3" > go.mod ;;
  "mod download") touch "$FAKE_TMP/empty.mod"; echo "{\"GoMod\": \"$FAKE_TMP/empty.mod\"}" ;;
  "build "*)
    while [ "$1" != "-o" ]; do shift; done
    out=$2; shift 2
    if [ "${out%/}" = "$out" ]; then set -- "$out"; else set -- "${@/#*\//$out}"; fi
    for exe in "$@"; do echo "#!/bin/sh" > "$exe"; chmod +x "$exe"; done ;;
esac
exit 0
"""


def build(tmp_path: Path, cache: Path, *args: str, version: str = "1.26.8",
          fail: bool = False) -> subprocess.CompletedProcess:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "go").write_text(FAKE_GO)
    (fake / "go").chmod(0o755)
    path = [str(fake)] + [p for p in os.environ["PATH"].split(":")
                          if p and not (Path(p) / "go").exists()]
    env = {**os.environ, "PATH": ":".join(path), "RESNET_IMAGENET_CACHE": str(cache),
           "VERSION": version, "FAIL": "1" if fail else "0", "FAKE_TMP": str(tmp_path)}
    return subprocess.run([str(BUILD), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def not_a_folder(tmp_path: Path) -> Path:
    """A cache path that cannot be made, even by root (permissions do not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "cache"


def test_build_refuses_a_cache_it_cannot_write_in_one_line(tmp_path):
    cache = not_a_folder(tmp_path)
    done = build(tmp_path, cache, "kwok")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: cannot write the cache directory {cache}/bin: make it writable, or point "
        "RESNET_IMAGENET_CACHE at a folder you own"]


@pytest.mark.parametrize("args", [("bogus",), ("--print-dir", "bogus"), ("kwok", "bogus")])
def test_build_refuses_an_unknown_tool_in_one_line_before_anything(tmp_path, args):
    done = build(tmp_path, tmp_path / "cache", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: unknown tool 'bogus': pick from kubernetes etcd kwok training-operator jobset "
        "trainer"]
    assert not (tmp_path / "cache").exists()


def test_build_refuses_a_go_older_than_the_modules_need_in_one_line(tmp_path):
    done = build(tmp_path, tmp_path / "cache", "kwok", version="1.22.1")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: go 1.22.1 ({tmp_path}/fakebin/go) is older than the 1.26.0")
    assert line.endswith("install Go >= 1.26.0 (https://go.dev/dl) and put it first on PATH")
    assert not (tmp_path / "cache").exists()


def test_build_removes_what_a_killed_build_left_and_renames_only_when_done(tmp_path):
    cache = tmp_path / "cache"
    leftover_bin = cache / "bin" / f"{KWOK}.tmp.AbC123"
    leftover_work = cache / "work" / "k8s.XyZ789"
    for folder in (leftover_bin, leftover_work):
        folder.mkdir(parents=True)
        (folder / "half-written").write_text("x")
    done = build(tmp_path, cache, "kwok")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (cache / "bin").iterdir()) == [KWOK]
    assert os.access(cache / "bin" / KWOK / "kwok", os.X_OK)
    assert list((cache / "work").iterdir()) == []
    assert "built kwok in " in done.stderr
    again = build(tmp_path, cache, "kwok", fail=True)  # built: a no-op that needs no Go at all
    assert (again.returncode, again.stderr) == (0, "")


def test_a_failed_resolution_leaves_nothing_that_looks_built(tmp_path):
    cache = tmp_path / "cache"
    done = build(tmp_path, cache, "kwok", fail=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        "error: cannot resolve the Go modules of kwok (tools/versions.env); last lines of the log:")
    assert "simulated: dial tcp" in done.stderr
    assert list((cache / "bin").iterdir()) == [] and list((cache / "work").iterdir()) == []


def test_schemas_refuse_a_cache_they_cannot_write_in_one_line(tmp_path, monkeypatch):
    cache = not_a_folder(tmp_path)
    monkeypatch.setenv("RESNET_IMAGENET_CACHE", str(cache))
    with pytest.raises(UserError) as raised:
        pipeline_check.schemas("2.17.0")
    assert str(raised.value) == (
        f"cannot write the cache folder {cache}/kfp-schemas (Not a directory): make it writable, "
        "or point RESNET_IMAGENET_CACHE at a folder you own")


def test_pipeline_check_exits_2_on_an_unwritable_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_IMAGENET_CACHE", str(not_a_folder(tmp_path)))
    assert pipeline_check.main([]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: cannot write the cache folder ") and "RESNET_IMAGENET_CACHE" in line


def test_webhook_pki_refuses_a_cache_it_cannot_write_in_one_line(tmp_path, monkeypatch):
    cache = not_a_folder(tmp_path)
    monkeypatch.setenv("RESNET_IMAGENET_CACHE", str(cache))
    with pytest.raises(cluster.StartError) as raised:
        cluster.webhook_pki()
    assert str(raised.value) == (
        f"cannot write the cache folder {cache} (Not a directory): make it writable, or point "
        "RESNET_IMAGENET_CACHE at a folder you own")


def test_webhook_pki_is_made_from_empty_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_IMAGENET_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "webhook-pki.tmp.killed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # a killed start's, long ago
    pki = cluster.webhook_pki()
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["webhook-pki"]
    before = (pki / "tls.crt").stat()
    assert cluster.webhook_pki() == pki and (pki / "tls.crt").stat() == before
