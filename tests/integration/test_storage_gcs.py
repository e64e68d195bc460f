"""gs:// against the emulator: resnet_imagenet.storage (google-cloud-storage) and TensorFlow's
own gs:// filesystem (tf.data, checkpoints, SavedModels), each reading what the other wrote.

google-cloud-storage reaches fake-gcs-server directly (``STORAGE_EMULATOR_HOST``); TensorFlow goes
through the emulator's proxy, which logs every request it forwards (request line, Host, Range):
tests read that log to check *how* TensorFlow did it (resumable uploads, ranged reads).
Tests that use the emulator fixtures are marked ``gcs`` by the plugin (tests/support/gcs.py).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

import pytest
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud.storage.blob import Blob

from resnet_imagenet import storage
from tests.support.gcs import (ENV_AT_START, GcsEmulator, gcs_client, start_emulator,
                                stop_emulator)


def bucket_of(uri: str):
    return gcs_client().bucket(uri[len("gs://"):])


def names(bucket_uri: str) -> list[str]:
    return sorted(b.name for b in gcs_client().bucket(bucket_uri[5:]).list_blobs())


class RequestLog:
    """The requests the emulator's proxy forwarded (TensorFlow's) after this object was made."""

    def __init__(self, emulator: GcsEmulator):
        self.path = emulator.log_file
        with open(self.path, "rb") as f:
            self.start = f.seek(0, os.SEEK_END)

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return [line for line in f.read().decode().splitlines() if " request " in line]

    def matching(self, *parts: str) -> list[str]:
        return [line for line in self.lines() if all(part in line for part in parts)]


def test_tensorflow_writes_are_resumable_uploads(gcs_emulator, gcs_bucket):
    import tensorflow as tf

    data = os.urandom(3 * 1024 * 1024 + 17)
    uri = f"{gcs_bucket}/up/big.bin"
    requests = RequestLog(gcs_emulator)
    with tf.io.gfile.GFile(uri, "wb") as f:
        f.write(data)

    bucket = bucket_of(gcs_bucket).name
    initiated = requests.matching(
        f"POST /upload/storage/v1/b/{bucket}/o?uploadType=resumable", "host=www.googleapis.com"
    )
    assert initiated, requests.lines()
    assert requests.matching("PUT /upload/", "upload_id="), "the bytes go to the session URL"
    assert storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data


def test_tensorflow_reads_use_ranges_on_the_media_host(gcs_emulator, gcs_bucket):
    import tensorflow as tf

    data = os.urandom(2 * 1024 * 1024)
    uri = f"{gcs_bucket}/media/obj.bin"
    storage.write_bytes(uri, data)
    requests = RequestLog(gcs_emulator)
    with tf.io.gfile.GFile(uri, "rb") as f:
        f.seek(1_500_000)
        assert f.read(1000) == data[1_500_000:1_501_000]
    reads = requests.matching(f"GET /{bucket_of(gcs_bucket).name}/media%2Fobj.bin")
    assert reads and all("host=storage.googleapis.com range=bytes=" in line for line in reads), (
        requests.lines()
    )


def test_listing_prefixes_and_markers(gcs_bucket):
    bucket = bucket_of(gcs_bucket)
    for name in ["ds/train/a.jpg", "ds/train/b.jpg", "ds/val/c.jpg", "ds/readme.txt", "dsx/other",
                 "ds/empty/"]:
        bucket.blob(name).upload_from_string(b"" if name.endswith("/") else name.encode())

    assert storage.listdir(f"{gcs_bucket}/ds") == ["empty", "readme.txt", "train", "val"]
    assert storage.listdir(gcs_bucket) == ["ds", "dsx"]
    assert storage.listdir(f"{gcs_bucket}/") == ["ds", "dsx"]
    assert storage.glob(f"{gcs_bucket}/ds/*/*.jpg") == [
        f"{gcs_bucket}/ds/train/a.jpg", f"{gcs_bucket}/ds/train/b.jpg", f"{gcs_bucket}/ds/val/c.jpg"
    ]
    assert storage.isdir(f"{gcs_bucket}/ds/train"), "a prefix without a marker object is a dir"
    assert storage.is_empty_dir(f"{gcs_bucket}/ds/empty")
    assert list(storage.walk_files(f"{gcs_bucket}/ds/empty")) == [], "a marker is not a file"


def test_stat_exists_and_deletes(gcs_bucket):
    bucket = bucket_of(gcs_bucket)
    bucket.blob("s/one.bin").upload_from_string(b"x" * 1234)
    bucket.blob("s/sub/two.bin").upload_from_string(b"y")

    assert storage.size(f"{gcs_bucket}/s/one.bin") == 1234
    assert storage.exists(gcs_bucket)
    assert storage.exists(f"{gcs_bucket}/s")
    assert not storage.exists(f"{gcs_bucket}/s/none.bin")
    missing = "gs://no-such-bucket-for-this-test"
    assert not storage.exists(f"{missing}/x") and not storage.exists(missing)
    assert not storage.isdir(missing) and list(storage.walk_files(missing)) == []
    with pytest.raises(NotFound):  # pre-flight turns it into "bucket ... does not exist"
        storage.listdir(missing)

    storage.remove(f"{gcs_bucket}/s/one.bin")
    assert bucket.get_blob("s/one.bin") is None
    storage.rmtree(f"{gcs_bucket}/s")
    assert list(gcs_client().list_blobs(bucket.name, prefix="s/")) == []
    assert not storage.exists(f"{gcs_bucket}/s")


class Rewrites:
    """Records every Blob.rewrite (the server-side copy) and can change what happens around it."""

    def __init__(self, monkeypatch, before=None, after=None):
        self.calls: list[dict] = []
        real = Blob.rewrite

        def rewrite(blob, source, **kwargs):
            self.calls.append({"source": source.name, "target": blob.name, **kwargs})
            if before:
                before(blob, len(self.calls))
            result = real(blob, source, **kwargs)
            if after:
                after(blob, len(self.calls))
            return result

        monkeypatch.setattr(Blob, "rewrite", rewrite)


def test_a_write_is_a_temporary_object_copied_under_a_precondition(gcs_bucket, monkeypatch):
    rewrites = Rewrites(monkeypatch)
    uri = f"{gcs_bucket}/w/out.json"
    storage.write_text(uri, "first")
    storage.write_text(uri, "second")
    assert storage.read_text(uri) == "second" and names(gcs_bucket) == ["w/out.json"]
    first, second = rewrites.calls
    assert storage.is_temp(first["source"]) and first["target"] == "w/out.json"
    assert first["if_generation_match"] == 0, "the first write: 'must not exist yet'"
    assert second["if_generation_match"] not in (0, None), "then: 'still the version I saw'"


def test_rename_is_a_guarded_copy_then_delete(gcs_bucket, monkeypatch):
    storage.write_bytes(f"{gcs_bucket}/r/src.bin", b"renamed bytes")
    storage.write_bytes(f"{gcs_bucket}/r/dst.bin", b"old")
    rewrites = Rewrites(monkeypatch)
    with pytest.raises(FileExistsError):
        storage.rename(f"{gcs_bucket}/r/src.bin", f"{gcs_bucket}/r/dst.bin", overwrite=False)
    assert rewrites.calls == []
    storage.rename(f"{gcs_bucket}/r/src.bin", f"{gcs_bucket}/r/dst.bin")
    assert names(gcs_bucket) == ["r/dst.bin"]
    assert bucket_of(gcs_bucket).blob("r/dst.bin").download_as_bytes() == b"renamed bytes"
    (call,) = rewrites.calls
    assert call["source"] == "r/src.bin" and call["if_generation_match"] not in (0, None)


def test_a_retried_copy_that_had_landed_is_done(gcs_bucket, monkeypatch):
    """The copy succeeded but its answer was lost; the retry meets the precondition's 412."""
    def lost_answer(blob, call):
        if call == 1:
            raise PreconditionFailed("the retry of a copy that landed")

    rewrites = Rewrites(monkeypatch, after=lost_answer)
    storage.write_bytes(f"{gcs_bucket}/x.bin", b"payload")
    assert len(rewrites.calls) == 1
    assert storage.read_bytes(f"{gcs_bucket}/x.bin") == b"payload"
    assert names(gcs_bucket) == ["x.bin"]


def test_another_writer_in_between(gcs_bucket, monkeypatch):
    """Someone replaces the final name between the look at its generation and the copy. GCS
    then answers the copy with 412; fake-gcs-server does not check preconditions of a rewrite,
    so the test gives that answer itself."""
    def intruder(blob, call):
        if call == 1:
            Blob(blob.name, blob.bucket).upload_from_string(b"theirs")
            raise PreconditionFailed("the generation no longer matches")

    rewrites = Rewrites(monkeypatch, before=intruder)
    with pytest.raises(FileExistsError):
        storage.copy(__file__, f"{gcs_bucket}/c/new.bin", overwrite=False)
    assert bucket_of(gcs_bucket).blob("c/new.bin").download_as_bytes() == b"theirs"
    assert names(gcs_bucket) == ["c/new.bin"], "the temporary object is gone"

    rewrites.calls.clear()
    storage.write_bytes(f"{gcs_bucket}/c/last.bin", b"mine")  # overwrite: the last writer wins
    assert [c["if_generation_match"] == 0 for c in rewrites.calls] == [True, False]
    assert bucket_of(gcs_bucket).blob("c/last.bin").download_as_bytes() == b"mine"


def test_copies_between_local_and_gs(gcs_bucket, tmp_path):
    local = tmp_path / "a.bin"
    local.write_bytes(b"local bytes")
    storage.copy(str(local), f"{gcs_bucket}/up/a.bin")
    storage.copy(f"{gcs_bucket}/up/a.bin", f"{gcs_bucket}/other/a.bin")
    storage.copy(f"{gcs_bucket}/other/a.bin", str(tmp_path / "down" / "a.bin"))
    assert (tmp_path / "down" / "a.bin").read_bytes() == b"local bytes"
    with pytest.raises(FileNotFoundError):
        storage.copy(f"{gcs_bucket}/none.bin", str(tmp_path / "none.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "down"], "no temporary left"
    assert names(gcs_bucket) == ["other/a.bin", "up/a.bin"]


def test_files_and_prefixes(gcs_bucket):
    storage.write_text(f"{gcs_bucket}/a/b/one.txt", "one\n")
    storage.write_bytes(f"{gcs_bucket}/a/two", bytes(range(256)))
    assert storage.read_text(f"{gcs_bucket}/a/b/one.txt") == "one\n"
    assert storage.read_range(f"{gcs_bucket}/a/two", 10, 5) == bytes(range(10, 15))
    assert storage.read_range(f"{gcs_bucket}/a/two", 250, 20) == bytes(range(250, 256))
    assert storage.listdir(f"{gcs_bucket}/a") == ["b", "two"]
    assert storage.listdir(f"{gcs_bucket}/nothing") == []
    assert storage.isdir(f"{gcs_bucket}/a") and not storage.isdir(f"{gcs_bucket}/a/two")
    assert storage.exists(f"{gcs_bucket}/a/two") and storage.exists(f"{gcs_bucket}/a/b")
    assert not storage.exists(f"{gcs_bucket}/a/three")
    assert storage.size(f"{gcs_bucket}/a/two") == 256
    assert storage.version(f"{gcs_bucket}/a/two")[0] == 256
    with storage.open_range(f"{gcs_bucket}/a/two", 100, 50, buffer_size=16) as f:
        f.seek(40)
        assert f.read() == bytes(range(140, 150))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{gcs_bucket}/a/three")
    storage.remove(f"{gcs_bucket}/a/two")
    storage.remove(f"{gcs_bucket}/a/two")  # missing: not an error
    storage.rmtree(f"{gcs_bucket}/a")
    assert names(gcs_bucket) == []


def test_a_large_write_is_a_resumable_upload_that_an_error_cancels(gcs_bucket):
    data = bytes(range(256)) * (storage.SMALL_WRITE // 256 + 4096)  # more than one request holds
    with pytest.raises(RuntimeError):
        with storage.atomic_write(f"{gcs_bucket}/big", "wb") as f:
            f.write(data)
            raise RuntimeError("the writer fails half-way")
    assert names(gcs_bucket) == []  # cancelled: no object, not even a partial one
    with storage.atomic_write(f"{gcs_bucket}/big", "wb") as f:
        f.write(data[:1000])
        f.write(data[1000:])
    assert storage.read_bytes(f"{gcs_bucket}/big") == data
    with pytest.raises(RuntimeError):
        with storage.atomic_write(f"{gcs_bucket}/small", "wb") as f:
            f.write(b"x")
            raise RuntimeError("fails")
    assert names(gcs_bucket) == ["big"]


def test_atomic_write_leaves_no_object_on_failure(gcs_bucket):
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_write(f"{gcs_bucket}/a/out.bin") as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    names_left = [blob.name for blob in gcs_client().list_blobs(bucket_of(gcs_bucket).name)]
    assert all(not name.startswith("a/out.bin") and storage.TMP_MARKER not in name
               for name in names_left), names_left


def test_an_output_directory_that_is_an_object_is_refused(gcs_bucket):
    from resnet_imagenet import preflight
    from resnet_imagenet.errors import UserError

    storage.write_bytes(f"{gcs_bucket}/export", b"not a folder")
    with pytest.raises(UserError, match=f"^--export-dir {gcs_bucket}/export is a file: "
                                        "choose a directory$"):
        preflight.check_output_dir(f"{gcs_bucket}/export", "--export-dir")
    assert preflight.check_output_dir(f"{gcs_bucket}/new", "--export-dir") == f"{gcs_bucket}/new"


@pytest.mark.slow
def test_subprocess_inherits_the_routing(gcs_emulator, gcs_bucket):
    """A child process (a CLI run, a training worker) reaches the emulator through the inherited
    environment. Its read cache blocks are made 1 MiB (TensorFlow reads that setting once per
    process, hence here), so its read at an offset is a Range request that does not start at 0."""
    data = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(f"{gcs_bucket}/parent.bin", data)
    script = (
        "import sys\n"
        "import tensorflow as tf\n"
        "from resnet_imagenet import storage\n"
        "root = sys.argv[1]\n"
        "with tf.io.gfile.GFile(root + '/parent.bin', 'rb') as f:\n"
        "    f.seek(2_500_000)\n"
        "    storage.write_bytes(root + '/child.bin', f.read(1000))\n"
    )
    requests = RequestLog(gcs_emulator)
    subprocess.run(
        [sys.executable, "-c", script, gcs_bucket],
        env={**os.environ, "GCS_READ_CACHE_BLOCK_SIZE_MB": "1"},
        check=True,
        timeout=180,
    )
    assert bucket_of(gcs_bucket).blob("child.bin").download_as_bytes() == data[2_500_000:2_501_000]
    starts = [int(line.split("range=bytes=")[1].split("-")[0])
              for line in requests.matching("/parent.bin HTTP", "range=bytes=")]
    assert starts and all(0 < start <= 2_500_000 for start in starts), requests.lines()


def _proxy_address(emulator: GcsEmulator) -> tuple[str, int]:
    url = urllib.parse.urlsplit(emulator.proxy)
    return url.hostname, url.port


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT example.com:443 HTTP/1.1",
        "CONNECT www.googleapis.com:80 HTTP/1.1",
        "CONNECT oauth2.googleapis.com:443 HTTP/1.1",
        "CONNECT 169.254.169.254:80 HTTP/1.1",
        "GET http://metadata.google.internal/computeMetadata/v1/ HTTP/1.1",
    ],
)
def test_proxy_refuses_anything_but_google_storage(gcs_emulator, request_line):
    with socket.create_connection(_proxy_address(gcs_emulator), timeout=10) as conn:
        conn.sendall(f"{request_line}\r\nHost: test\r\n\r\n".encode())
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 403 "), reply
    with open(gcs_emulator.log_file) as f:
        assert f"refused {request_line!r}" in f.read()


@pytest.mark.parametrize("host", ["www.googleapis.com", "storage.googleapis.com"])
def test_proxy_serves_google_storage_hosts_with_the_test_ca(gcs_emulator, host):
    context = ssl.create_default_context(cafile=gcs_emulator.ca_file)
    conn = http.client.HTTPSConnection(*_proxy_address(gcs_emulator), context=context, timeout=10)
    conn.set_tunnel(host, 443)
    try:
        conn.request("GET", "/storage/v1/b")
        response = conn.getresponse()
        assert response.status == 200
        assert b'"kind":"storage#buckets"' in response.read().replace(b" ", b"")
    finally:
        conn.close()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


@pytest.mark.gcs
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PDEATHSIG is Linux")
def test_stopping_the_emulator_leaves_no_process(tmp_path):
    proc, emulator = start_emulator(tmp_path)
    assert _running(emulator.pid) and _running(emulator.server_pid)
    stop_emulator(proc)
    assert proc.returncode == 0
    assert _gone_within(emulator.server_pid, 5)


@pytest.mark.gcs
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PDEATHSIG is Linux")
def test_killing_the_emulator_process_takes_fake_gcs_server_down(tmp_path):
    proc, emulator = start_emulator(tmp_path)
    os.kill(emulator.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone_within(emulator.server_pid, 5)
    stop_emulator(proc)


_ROUTING = ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "STORAGE_EMULATOR_HOST",
            "CURL_CA_BUNDLE", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK")


def _child_env(names) -> dict[str, str | None]:
    """What a process started the ordinary way (inheriting os.environ) sees of ``names``."""
    code = "import json, os, sys; print(json.dumps({n: os.environ.get(n) for n in sys.argv[1:]}))"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                          check=True, timeout=60)
    return json.loads(done.stdout)


def test_a_running_emulator_changes_no_environment(gcs_server):
    """With the emulator up, a pip or any child a test starts sees the environment the session
    started with: no proxy to the emulator, no emulator host, no test CA."""
    seen = _child_env(_ROUTING)
    assert seen == {name: ENV_AT_START.get(name) for name in _ROUTING}
    assert gcs_server.proxy not in seen.values() and gcs_server.endpoint not in seen.values()
    assert gcs_server.ca_file not in seen.values()


def test_the_routing_lasts_only_as_long_as_the_test(gcs_server):
    """``gcs_emulator`` is this, per test: its routing reaches children, then goes."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in gcs_server.env().items():
            patch.setenv(name, value)
        inside = _child_env(_ROUTING)
    assert inside["HTTPS_PROXY"] == inside["https_proxy"] == gcs_server.proxy
    assert inside["STORAGE_EMULATOR_HOST"] == gcs_server.endpoint
    assert inside["CURL_CA_BUNDLE"] == gcs_server.ca_file
    assert "127.0.0.1" in inside["NO_PROXY"].split(",")
    assert _child_env(_ROUTING) == {name: ENV_AT_START.get(name) for name in _ROUTING}
