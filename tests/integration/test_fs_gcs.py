"""resnet_imagenet.fs on gs:// (the emulator, through google-cloud-storage): what convert uses."""

from __future__ import annotations

import pytest

from resnet_imagenet import fs
from tests.support.gcs import gcs_client

pytestmark = pytest.mark.gcs


def names(bucket_uri: str) -> list[str]:
    return sorted(b.name for b in gcs_client().bucket(bucket_uri[5:]).list_blobs())


def test_files_and_prefixes(gcs_bucket):
    fs.write_text(f"{gcs_bucket}/a/b/one.txt", "one\n")
    fs.write_bytes(f"{gcs_bucket}/a/two", bytes(range(256)))
    assert fs.read_text(f"{gcs_bucket}/a/b/one.txt") == "one\n"
    assert fs.read_range(f"{gcs_bucket}/a/two", 10, 5) == bytes(range(10, 15))
    assert fs.read_range(f"{gcs_bucket}/a/two", 250, 20) == bytes(range(250, 256))
    assert fs.listdir(f"{gcs_bucket}/a") == ["b", "two"]
    assert fs.listdir(f"{gcs_bucket}/nothing") == []
    assert fs.isdir(f"{gcs_bucket}/a") and not fs.isdir(f"{gcs_bucket}/a/two")
    assert fs.exists(f"{gcs_bucket}/a/two") and fs.exists(f"{gcs_bucket}/a/b")
    assert not fs.exists(f"{gcs_bucket}/a/three")
    assert fs.size(f"{gcs_bucket}/a/two") == 256
    assert fs.version(f"{gcs_bucket}/a/two")[0] == 256
    with fs.open_range(f"{gcs_bucket}/a/two", 100, 50, buffer_size=16) as f:
        f.seek(40)
        assert f.read() == bytes(range(140, 150))
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(f"{gcs_bucket}/a/three")
    fs.remove(f"{gcs_bucket}/a/two")
    fs.remove(f"{gcs_bucket}/a/two")  # missing: not an error
    fs.rmtree(f"{gcs_bucket}/a")
    assert names(gcs_bucket) == []


def test_a_large_write_is_a_resumable_upload_that_an_error_cancels(gcs_bucket):
    data = bytes(range(256)) * (fs.SMALL_WRITE // 256 + 4096)  # more than one request holds
    with pytest.raises(RuntimeError):
        with fs.atomic_write(f"{gcs_bucket}/big", "wb") as f:
            f.write(data)
            raise RuntimeError("the writer fails half-way")
    assert names(gcs_bucket) == []  # cancelled: no object, not even a partial one
    with fs.atomic_write(f"{gcs_bucket}/big", "wb") as f:
        f.write(data[:1000])
        f.write(data[1000:])
    assert fs.read_bytes(f"{gcs_bucket}/big") == data
    with pytest.raises(RuntimeError):
        with fs.atomic_write(f"{gcs_bucket}/small", "wb") as f:
            f.write(b"x")
            raise RuntimeError("fails")
    assert names(gcs_bucket) == ["big"]
