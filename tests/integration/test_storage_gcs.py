"""storage.py on gs:// against the emulator: the calls TensorFlow really makes, seen from outside.

What TensorFlow writes is read back with google-cloud-storage and the other way round, so a pass
means TensorFlow's own traffic reached the emulator. The emulator process logs every request it
forwards (request line, Host, Range); tests read that log to check *how* TensorFlow did it
(resumable uploads, ranged reads, delimiter listings, rewrite + delete for a rename).
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

from resnet_imagenet import storage
from tests.support.gcs import (ENV_AT_START, GcsEmulator, gcs_client, start_emulator,
                                stop_emulator)

def bucket_of(uri: str):
    return gcs_client().bucket(uri[len("gs://"):])


class RequestLog:
    """The requests the emulator forwarded after this object was made."""

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


def test_write_is_a_resumable_upload(gcs_emulator, gcs_bucket):
    data = os.urandom(3 * 1024 * 1024 + 17)
    uri = f"{gcs_bucket}/up/big.bin"
    requests = RequestLog(gcs_emulator)
    storage.write_bytes(uri, data)

    bucket = bucket_of(gcs_bucket).name
    initiated = requests.matching(
        f"POST /upload/storage/v1/b/{bucket}/o?uploadType=resumable", "host=www.googleapis.com"
    )
    assert initiated, requests.lines()
    assert requests.matching("PUT /upload/", "upload_id="), "the bytes go to the session URL"
    blob = bucket_of(gcs_bucket).get_blob("up/big.bin")
    assert blob.size == len(data)
    assert blob.download_as_bytes() == data


def test_read_uses_ranges_on_the_media_host(gcs_emulator, gcs_bucket):
    data = os.urandom(2 * 1024 * 1024)
    bucket_of(gcs_bucket).blob("media/obj.bin").upload_from_string(data)
    uri = f"{gcs_bucket}/media/obj.bin"
    requests = RequestLog(gcs_emulator)

    import tensorflow as tf

    with tf.io.gfile.GFile(uri, "rb") as f:
        f.seek(1_500_000)
        assert f.read(1000) == data[1_500_000:1_501_000]
    assert storage.read_bytes(uri) == data
    reads = requests.matching(f"GET /{bucket_of(gcs_bucket).name}/media%2Fobj.bin")
    assert reads and all("host=storage.googleapis.com range=bytes=" in line for line in reads), (
        requests.lines()
    )


def test_listing_uses_prefix_and_delimiter(gcs_emulator, gcs_bucket):
    bucket = bucket_of(gcs_bucket)
    for name in ["ds/train/a.jpg", "ds/train/b.jpg", "ds/val/c.jpg", "ds/readme.txt", "dsx/other",
                 "ds/empty/"]:
        bucket.blob(name).upload_from_string(b"" if name.endswith("/") else name.encode())
    requests = RequestLog(gcs_emulator)

    assert storage.listdir(f"{gcs_bucket}/ds") == ["empty", "readme.txt", "train", "val"]
    assert storage.listdir(gcs_bucket) == ["ds", "dsx"]
    assert storage.listdir(f"{gcs_bucket}/") == ["ds", "dsx"]
    assert storage.glob(f"{gcs_bucket}/ds/*/*.jpg") == [
        f"{gcs_bucket}/ds/train/a.jpg", f"{gcs_bucket}/ds/train/b.jpg", f"{gcs_bucket}/ds/val/c.jpg"
    ]
    assert storage.isdir(f"{gcs_bucket}/ds/train"), "a prefix without a marker object is a dir"
    assert storage.is_empty_dir(f"{gcs_bucket}/ds/empty")
    assert requests.matching("delimiter=%2F", "prefix=ds%2F")


def test_stat_exists_and_deletes(gcs_emulator, gcs_bucket):
    bucket = bucket_of(gcs_bucket)
    bucket.blob("s/one.bin").upload_from_string(b"x" * 1234)
    bucket.blob("s/sub/two.bin").upload_from_string(b"y")

    assert storage.size(f"{gcs_bucket}/s/one.bin") == 1234
    assert storage.exists(gcs_bucket)
    assert storage.exists(f"{gcs_bucket}/s")
    assert not storage.exists(f"{gcs_bucket}/s/none.bin")
    assert not storage.exists("gs://no-such-bucket-for-this-test/x")

    storage.remove(f"{gcs_bucket}/s/one.bin")
    assert bucket.get_blob("s/one.bin") is None
    storage.rmtree(f"{gcs_bucket}/s")
    assert list(gcs_client().list_blobs(bucket.name, prefix="s/")) == []
    # Not storage.exists(): TensorFlow caches "this folder exists" for GCS_STAT_CACHE_MAX_AGE
    # (5 s by default) and its recursive delete does not drop that entry; listings are not cached.
    assert storage.is_empty_dir(f"{gcs_bucket}/s")


def test_rename_is_rewrite_then_delete(gcs_emulator, gcs_bucket):
    storage.write_bytes(f"{gcs_bucket}/r/src.bin", b"renamed bytes")
    requests = RequestLog(gcs_emulator)
    storage.rename(f"{gcs_bucket}/r/src.bin", f"{gcs_bucket}/r/dst.bin")

    bucket = bucket_of(gcs_bucket)
    assert bucket.get_blob("r/src.bin") is None
    assert bucket.blob("r/dst.bin").download_as_bytes() == b"renamed bytes"
    assert requests.matching("/o/r%2Fsrc.bin/rewriteTo/b/", "/o/r%2Fdst.bin")
    assert requests.matching("DELETE ", "/o/r%2Fsrc.bin")


def test_atomic_write_leaves_no_object_on_failure(gcs_bucket):
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_write(f"{gcs_bucket}/a/out.bin") as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    names = [blob.name for blob in gcs_client().list_blobs(bucket_of(gcs_bucket).name)]
    assert all(not name.startswith("a/out.bin") and storage.TMP_MARKER not in name
               for name in names), names


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
