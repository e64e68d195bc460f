"""``convert`` with RAW and OUT on gs:// (the emulator): two tasks, a resume, local's bytes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from resnet_imagenet import storage
from resnet_imagenet.data import convert, sample
from tests.support.gcs import gcs_client
from tests.support.conversion import SHARDS, tree

pytestmark = pytest.mark.gcs


def upload(local: Path, bucket_uri: str, prefix: str) -> None:
    """Upload a directory with google-cloud-storage: independent of the code under test."""
    bucket = gcs_client().bucket(bucket_uri[len("gs://"):])
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: bucket.blob(f"{prefix}/{p.relative_to(local).as_posix()}")
                      .upload_from_filename(str(p)), files))


def download(bucket_uri: str, prefix: str) -> dict[str, bytes]:
    bucket = gcs_client().bucket(bucket_uri[len("gs://"):])
    return {blob.name[len(prefix) + 1:]: blob.download_as_bytes()
            for blob in bucket.list_blobs(prefix=prefix + "/")
            if not blob.name.endswith("/")}  # directory markers made by gfile.makedirs


def test_convert_on_gcs_in_two_tasks_equals_local_and_resumes(gcs_bucket, tmp_path):
    raw_local = tmp_path / "raw"
    sample.build(str(raw_local), seed=3, per_class=4)  # 40 images: every request is a round trip
    local = tmp_path / "local"
    convert.convert(str(raw_local), str(local), **SHARDS, workers=1)
    upload(raw_local, gcs_bucket, "raw")
    raw, out = f"{gcs_bucket}/raw", f"{gcs_bucket}/out"

    first = convert.convert(raw, out, **SHARDS, workers=1, num_tasks=2, task_index=0)
    assert first["manifest"] is None and len(first["written"]) == 3
    second = convert.convert(raw, out, **SHARDS, workers=1, num_tasks=2, task_index=1)
    assert second["manifest"]["train"]["images"] + second["manifest"]["validation"]["images"] == 40
    assert download(gcs_bucket, "out") == tree(local)

    # A task killed mid-run on GCS leaves a shard without its record and a temporary object.
    storage.remove(f"{out}/_shards/train-00001-of-00004.json")
    storage.remove(f"{out}/validation-00001-of-00002")
    storage.write_bytes(f"{out}/.tmp-0123456789ab-validation-00001-of-00002", b"partial")
    storage.remove(f"{out}/manifest.json")
    resumed = convert.convert(raw, out, **SHARDS, workers=1)
    assert resumed["written"] == ["train-00001-of-00004", "validation-00001-of-00002"]
    assert download(gcs_bucket, "out") == tree(local)


def test_convert_from_archives_on_gcs_equals_local_extracted(gcs_bucket, tmp_path):
    """sample-data --archives writes to gs:// (google-cloud-storage uploads); two workers read
    the archives there with ranged reads and write the shards to gs://."""
    raw_local = tmp_path / "raw"
    sample.build(str(raw_local), seed=3, per_class=4)
    local = tmp_path / "local"
    convert.convert(str(raw_local), str(local), **SHARDS, workers=1)
    raw = f"{gcs_bucket}/archives"
    sample.build(raw, seed=3, per_class=4, as_archives=True)
    out = f"{gcs_bucket}/out"

    result = convert.convert(raw, out, **SHARDS, workers=2)
    assert result["manifest"]["train"]["images"] + result["manifest"]["validation"]["images"] == 40
    written = download(gcs_bucket, "out")
    assert {k: v for k, v in written.items() if not k.startswith("_shards/archives/")} == \
        tree(local)
    assert "_shards/archives/train-n00000007.json" in written
