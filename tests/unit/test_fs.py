"""resnet_imagenet.fs on local paths, and its one-line refusal without GCS credentials."""

from __future__ import annotations

import pytest

from resnet_imagenet import cli, fs


def test_local_files_ranges_and_atomic_writes(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    fs.write_bytes(target, bytes(range(100)))
    assert fs.read_range(target, 90, 20) == bytes(range(90, 100))
    assert fs.listdir(str(tmp_path / "a")) == ["b.bin"] and fs.listdir(str(tmp_path / "x")) == []
    with pytest.raises(RuntimeError), fs.atomic_write(target, "wb") as f:
        f.write(b"half")
        raise RuntimeError("cut short")
    assert fs.read_bytes(target) == bytes(range(100))  # untouched, no temporary file left
    assert fs.listdir(str(tmp_path / "a")) == ["b.bin"]
    with fs.open_range(target, 10, 30, buffer_size=8) as f:
        f.seek(25)
        assert f.read() == bytes(range(35, 40))
    size, version = fs.version(target)
    assert size == 100 and version
    fs.rmtree(str(tmp_path / "a"))
    assert not fs.exists(str(tmp_path / "a"))


def test_gs_without_credentials_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    fs.reset()
    try:
        status = cli.main(["convert", "--raw-dir", "gs://bucket/raw", "--output-dir",
                           str(tmp_path / "out")])
    finally:
        fs.reset()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["error: no Google Cloud credentials for gs://: run 'gcloud auth "
                   "application-default login', set GOOGLE_APPLICATION_CREDENTIALS to a key "
                   "file, or run where workload identity gives the pod an account"]
    assert not (tmp_path / "out").exists()
