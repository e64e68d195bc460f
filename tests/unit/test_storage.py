"""resnet_imagenet.storage: the same behaviour on local paths and on gs:// (the emulator).

Tests taking ``root`` run twice: on a local temporary directory and on a fresh bucket of the GCS
emulator (google-cloud-storage; TensorFlow's own gs:// where a test hands it a path). Path-only
functions and refusals are tested without any storage. The gs:// specifics (resumable uploads,
ranges, the precondition-guarded copy) are in tests/integration/test_storage_gcs.py.
"""

from __future__ import annotations

import pytest

from resnet_imagenet import cli, storage
from resnet_imagenet.errors import UserError


class Boom(Exception):
    """Raised inside a write to check that nothing is left behind."""


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.gcs)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A directory URI that does not exist yet: under tmp_path, or in a fresh emulator bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("gcs_bucket") + "/store"


def leftovers(uri: str) -> list[str]:
    """Temporary files of atomic writes anywhere under ``uri``."""
    return [path for path in storage.walk_files(uri) if storage.is_temp(path)]


def test_bytes_and_text_round_trip(root):
    data = bytes(range(256)) * 1000
    uri = storage.join(root, "deep", "er", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, data)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == data
    assert storage.size(uri) == len(data)

    text_uri = storage.join(root, "note.txt")
    storage.write_text(text_uri, "ünïcode ✓\nline 2\n")
    assert storage.read_text(text_uri) == "ünïcode ✓\nline 2\n"
    storage.write_text(text_uri, "replaced")
    assert storage.read_bytes(text_uri) == b"replaced"
    assert leftovers(root) == []


def test_tfrecord_round_trip_through_atomic_path(root):
    import tensorflow as tf

    records = [f"record {i} ".encode() * (i + 1) for i in range(50)]
    shards = storage.join(root, "shards")
    uri = storage.join(shards, "train-00000-of-00001")
    with storage.atomic_path(uri) as tmp:
        assert storage.is_temp(tmp)
        assert storage.dirname(tmp) == shards
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in records:
                writer.write(record)
        assert not storage.exists(uri), "the final name appears only after a clean exit"
    assert storage.listdir(shards) == ["train-00000-of-00001"]
    assert [r.numpy() for r in tf.data.TFRecordDataset(uri)] == records


def test_directory_listing(root):
    for rel in ["b.txt", "a/x.txt", "a/y.bin", "a/sub/z.txt", "c/d/e.txt"]:
        storage.write_bytes(storage.join(root, *rel.split("/")), rel.encode())
    storage.makedirs(storage.join(root, "empty"))

    assert storage.listdir(root) == ["a", "b.txt", "c", "empty"]
    assert storage.listdir(root + "/") == storage.listdir(root)
    assert storage.listdir(storage.join(root, "a")) == ["sub", "x.txt", "y.bin"]
    assert storage.listdir(storage.join(root, "missing")) == []
    assert storage.isdir(storage.join(root, "a"))
    assert storage.isdir(storage.join(root, "c"))
    assert not storage.isdir(storage.join(root, "b.txt"))
    assert storage.is_empty_dir(storage.join(root, "empty"))
    assert storage.is_empty_dir(storage.join(root, "missing"))
    assert not storage.is_empty_dir(storage.join(root, "a"))

    assert storage.glob(storage.join(root, "a", "*.txt")) == [storage.join(root, "a", "x.txt")]
    assert storage.glob(storage.join(root, "*", "?.bin")) == [storage.join(root, "a", "y.bin")]
    assert storage.glob(storage.join(root, "nothing*")) == []
    assert list(storage.walk_files(root)) == [
        storage.join(root, *rel.split("/"))
        for rel in ["a/sub/z.txt", "a/x.txt", "a/y.bin", "b.txt", "c/d/e.txt"]
    ]
    # Sizes from one listing: the files directly under a directory (not its directories).
    assert storage.sizes(storage.join(root, "a")) == {
        storage.join(root, "a", "x.txt"): len("a/x.txt"),
        storage.join(root, "a", "y.bin"): len("a/y.bin")}
    assert storage.sizes(storage.join(root, "a"), recursive=True)[
        storage.join(root, "a", "sub", "z.txt")] == len("a/sub/z.txt")
    assert storage.sizes(storage.join(root, "missing")) == {}


def test_atomic_write_is_complete_or_absent(root):
    uri = storage.join(root, "result.json")
    with pytest.raises(Boom):
        with storage.atomic_write(uri) as f:
            f.write(b"half of it")
            raise Boom
    assert not storage.exists(uri)
    assert leftovers(root) == []

    with storage.atomic_write(uri, "w") as f:
        f.write('{"ok": true}')
        assert not storage.exists(uri)
    assert storage.read_text(uri) == '{"ok": true}'

    with pytest.raises(Boom):
        with storage.atomic_write(uri) as f:
            f.write(b"a newer version, never finished")
            raise Boom
    assert storage.read_text(uri) == '{"ok": true}', "a failed rewrite keeps the old file"
    assert storage.listdir(root) == ["result.json"]


def test_atomic_path_failure_leaves_nothing(root):
    uri = storage.join(root, "model", "weights.bin")
    with pytest.raises(Boom):
        with storage.atomic_path(uri) as tmp:
            storage.write_bytes(tmp, b"partial")
            raise Boom
    assert not storage.exists(uri)
    assert leftovers(root) == []


def test_copy_copy_tree_and_deletes(root, tmp_path):
    local_src = str(tmp_path / "src.bin")
    storage.write_bytes(local_src, b"payload")
    uri = storage.join(root, "copies", "one.bin")
    storage.copy(local_src, uri)
    assert storage.read_bytes(uri) == b"payload"
    with pytest.raises(FileExistsError):
        storage.copy(local_src, uri, overwrite=False)
    back = str(tmp_path / "back" / "one.bin")
    storage.copy(uri, back)
    assert storage.read_bytes(back) == b"payload"

    tree = {"t/a.txt": b"a", "t/sub/b.txt": b"b", "t/sub/deeper/c.txt": b"c"}
    for rel, data in tree.items():
        storage.write_bytes(storage.join(root, *rel.split("/")), data)
    storage.copy_tree(storage.join(root, "t"), storage.join(root, "t2"))
    copied = {
        path[len(storage.join(root, "t2")) + 1:]: storage.read_bytes(path)
        for path in storage.walk_files(storage.join(root, "t2"))
    }
    assert copied == {rel[len("t/"):]: data for rel, data in tree.items()}

    storage.remove(uri)
    assert not storage.exists(uri)
    storage.remove(uri)  # a missing file is not an error
    storage.rmtree(storage.join(root, "t"))
    assert not storage.exists(storage.join(root, "t"))
    # A local directory stays when its last file goes; a GCS prefix is only its objects.
    assert storage.listdir(root) == (["t2"] if storage.is_remote(root) else ["copies", "t2"])
    storage.rmtree(storage.join(root, "t"))  # nor is a missing directory
    storage.rmtree(storage.join(root, "t2", "a.txt"))  # a file is removed too
    assert storage.listdir(storage.join(root, "t2")) == ["sub"]
    assert leftovers(root) == []


def test_rename(root):
    src, dst = storage.join(root, "from.bin"), storage.join(root, "to.bin")
    storage.write_bytes(src, b"moved")
    storage.write_bytes(dst, b"old")
    with pytest.raises(Exception, match="exists"):
        storage.rename(src, dst, overwrite=False)
    storage.rename(src, dst)
    assert not storage.exists(src)
    assert storage.read_bytes(dst) == b"moved"


@pytest.mark.parametrize("uri", ["s3://bucket/key", "http://example.com/x", "hdfs://nn/path"])
@pytest.mark.parametrize(
    "call",
    [
        storage.exists, storage.read_bytes, storage.listdir, storage.glob, storage.rmtree,
        lambda uri: storage.write_bytes(uri, b"x"),
        lambda uri: storage.join(uri, "child"),
        lambda uri: list(storage.walk_files(uri)),
    ],
)
def test_unknown_scheme_is_a_one_line_user_error(uri, call):
    with pytest.raises(UserError) as excinfo:
        call(uri)
    message = str(excinfo.value)
    assert uri in message and "gs://" in message
    assert "\n" not in message


@pytest.mark.parametrize("uri", ["gs://", "gs:///object"])
def test_malformed_gcs_uri_is_refused(uri):
    with pytest.raises(UserError, match="malformed GCS URI"):
        storage.exists(uri)


def test_file_scheme_is_a_local_path(tmp_path):
    path = tmp_path / "f" / "data.bin"
    uri = "file://" + str(path)
    assert storage.normalize(uri) == str(path)
    assert storage.normalize("FILE://" + str(path)) == str(path)
    assert not storage.is_remote(uri)
    storage.write_bytes(uri, b"via file://")
    assert path.read_bytes() == b"via file://"
    assert storage.read_bytes(str(path)) == b"via file://"
    assert storage.listdir("file://" + str(tmp_path)) == ["f"]


def test_path_helpers():
    assert storage.scheme("/a/b") == ""
    assert storage.scheme("gs://b/k") == "gs"
    assert storage.scheme("GS://b/k") == "gs"
    assert storage.normalize("gs://bucket/") == "gs://bucket"
    assert storage.normalize("gs://bucket/dir//") == "gs://bucket/dir"
    assert storage.normalize("/") == "/"
    assert storage.normalize("rel/dir/") == "rel/dir"
    assert storage.join("gs://bucket/", "a", "b.txt") == "gs://bucket/a/b.txt"
    assert storage.join("/data/", "a") == "/data/a"
    assert storage.basename("gs://bucket/a/b.txt/") == "b.txt"
    assert storage.dirname("gs://bucket/a/b.txt") == "gs://bucket/a"
    assert storage.dirname("gs://bucket/b.txt") == "gs://bucket"
    assert storage.dirname("/data/a") == "/data"
    tmp = storage.temp_name("gs://bucket/a/model.keras")
    assert storage.dirname(tmp) == "gs://bucket/a" and tmp.endswith("-model.keras")
    assert storage.is_temp(tmp) and not storage.is_temp("gs://bucket/a/model.keras")
    assert storage.temp_name("/x/y") != storage.temp_name("/x/y")
    with pytest.raises(ValueError, match="mode"):
        with storage.atomic_write("/tmp/never-written", "a"):
            pass


def test_glob_matches_part_by_part(root):
    for rel in ["d/train-00000-of-00002", "d/train-00001-of-00002", "d/.tmp-1a2b-train-x",
                "d/_shards/train-00000-of-00002.json", "e/train-00000-of-00001"]:
        storage.write_bytes(storage.join(root, *rel.split("/")), b"x")
    d = storage.join(root, "d")
    assert storage.glob(storage.join(d, "train-*-of-*")) == [
        storage.join(d, "train-00000-of-00002"), storage.join(d, "train-00001-of-00002")]
    assert storage.glob(storage.join(d, "*")) == [storage.join(d, n) for n in (
        ".tmp-1a2b-train-x", "_shards", "train-00000-of-00002", "train-00001-of-00002")], \
        "a wildcard matches a leading dot and directories, and never crosses a /"
    assert storage.glob(storage.join(root, "*", "train-0000[0]-of-*")) == [
        storage.join(d, "train-00000-of-00002"), storage.join(root, "e", "train-00000-of-00001")]
    assert storage.glob(storage.join(d, "_shards")) == [storage.join(d, "_shards")]
    assert storage.glob(storage.join(root, "missing", "*")) == []


def test_ranges_versions_and_a_failed_rewrite(root):
    target = storage.join(root, "a", "b.bin")
    storage.write_bytes(target, bytes(range(100)))
    assert storage.read_range(target, 90, 20) == bytes(range(90, 100))
    assert storage.read_range(target, 200, 5) == b""
    assert storage.listdir(storage.join(root, "a")) == ["b.bin"]
    with pytest.raises(RuntimeError), storage.atomic_write(target, "wb") as f:
        f.write(b"half")
        raise RuntimeError("cut short")
    assert storage.read_bytes(target) == bytes(range(100))  # untouched, no temporary file left
    assert storage.listdir(storage.join(root, "a")) == ["b.bin"]
    with storage.open_range(target, 10, 30, buffer_size=8) as f:
        f.seek(25)
        assert f.read() == bytes(range(35, 40))
    size, version = storage.version(target)
    assert size == 100 and version
    storage.write_bytes(target, b"new")
    assert storage.version(target) != (size, version)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a", "missing"))
    with pytest.raises(FileExistsError), storage.atomic_write(target, overwrite=False) as f:
        f.write(b"never")
    assert storage.read_bytes(target) == b"new" and leftovers(root) == []
    storage.rmtree(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a"))


def test_gs_without_credentials_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    storage.reset()
    try:
        status = cli.main(["convert", "--raw-dir", "gs://bucket/raw", "--output-dir",
                           str(tmp_path / "out")])
    finally:
        storage.reset()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["error: no Google Cloud credentials for gs://: run 'gcloud auth "
                   "application-default login', set GOOGLE_APPLICATION_CREDENTIALS to a key "
                   "file, or run where workload identity gives the pod an account"]
    assert not (tmp_path / "out").exists()


def test_the_declared_google_cloud_storage_can_cancel_an_upload():
    """An aborted large write cancels its resumable upload with ``BlobWriter.terminate``, which
    google-cloud-storage has from 3.0 on: on 2.x closing the writer would complete the object."""
    import tomllib

    from google.cloud.storage.fileio import BlobWriter
    from packaging.requirements import Requirement

    from tests.support.repo import ROOT

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (requirement,) = [Requirement(r) for r in pyproject["project"]["dependencies"]
                      if Requirement(r).name == "google-cloud-storage"]
    assert not requirement.specifier.contains("2.99") and requirement.specifier.contains("3.0")
    assert callable(BlobWriter.terminate)
