"""resnet_imagenet.storage: the same behaviour on local paths and on gs:// (the emulator).

Tests taking ``root`` run twice: on a local temporary directory and on a fresh bucket of the GCS
emulator, reached through TensorFlow's own gs:// filesystem. Path-only functions and refusals are
tested without any storage.
"""

from __future__ import annotations

import pytest

from resnet_imagenet import storage
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
    assert storage.listdir(root) == ["copies", "t2"], "the parent made for a copy stays"
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
    assert storage.local_path(uri) == str(path)


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
    assert storage.matches("train-00001-of-00004", "train-*-of-*")
    assert not storage.matches("validation-00001", "train-*")
    with pytest.raises(UserError, match="must be a local path"):
        storage.local_path("gs://bucket/x")
    with pytest.raises(ValueError, match="mode"):
        with storage.atomic_write("/tmp/never-written", "a"):
            pass
