"""The URIs of :mod:`resnet_imagenet.storage`, without TensorFlow: for ``convert`` and pre-flight.

Local paths go through the standard library; ``gs://`` goes through google-cloud-storage, with
its retry policy (exponential backoff on 429/5xx and dropped connections, :func:`_retry`), a
timeout on every request (:data:`TIMEOUT`), and a connection pool large enough for many reads in
flight per process (:data:`POOL_SIZE`). google-cloud-storage honours ``STORAGE_EMULATOR_HOST``,
so the tests reach fake-gcs-server directly.

Names, normalising and the scheme check are shared with :mod:`resnet_imagenet.storage` (they
import nothing heavy), so both modules accept exactly the same URIs. Training and evaluation
keep ``tf.io.gfile`` (TensorFlow runs there anyway); everything here is importable in a process
that never loads TensorFlow.

Object semantics on GCS: a "directory" is a prefix. :func:`atomic_write` uploads straight to the
final name, because an object becomes visible only when its upload completes: an upload cut
short (an exception, a killed process) leaves no object at all. Small writes are one request;
large ones a resumable upload in :data:`CHUNK_SIZE` chunks, cancelled on an exception.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
from typing import IO, Callable, Iterator

from resnet_imagenet.errors import UserError
from resnet_imagenet.storage import (basename, dirname, is_remote, is_temp, join, normalize,
                                     scheme, temp_name)

__all__ = [
    "basename", "dirname", "is_remote", "is_temp", "join", "normalize", "scheme", "temp_name",
    "exists", "isdir", "listdir", "size", "version", "read_bytes", "read_text", "read_range",
    "open_range", "walk_files", "makedirs", "write_bytes", "write_text", "atomic_write",
    "atomic_path", "remove", "rmtree", "is_empty_dir", "client", "reset",
]

TIMEOUT = (20, 120)  # seconds: connect, read (per request; retries come on top)
POOL_SIZE = 64  # HTTP connections kept per process: reads in flight per worker stay open
CHUNK_SIZE = 16 * 1024 * 1024  # resumable upload chunk (a multiple of 256 KiB)
SMALL_WRITE = CHUNK_SIZE  # writes up to this size are a single upload request

_clients: dict[int, object] = {}
_client_lock = threading.Lock()


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    # The library's predicate (429, 5xx, connection errors), with a longer deadline: a
    # conversion task runs for hours, and a minute of trouble on the network must not end it.
    return DEFAULT_RETRY.with_delay(initial=0.5, maximum=30.0, multiplier=2.0).with_timeout(600.0)


_RETRY = None  # built on first use: importing google.api_core costs ~0.2 s


def _policy():
    """The retry policy of every GCS request (see :func:`_retry`)."""
    global _RETRY
    if _RETRY is None:
        _RETRY = _retry()
    return _RETRY


def client():
    """This process's google-cloud-storage client (one per process: never shared over fork).

    Credentials: Application Default Credentials (a pod's workload identity, a key file in
    GOOGLE_APPLICATION_CREDENTIALS, gcloud's login); anonymous with STORAGE_EMULATOR_HOST.
    """
    pid = os.getpid()
    found = _clients.get(pid)
    if found is not None:
        return found
    with _client_lock:
        if pid not in _clients:
            import google.auth.exceptions
            import requests.adapters
            from google.cloud import storage as gcs

            try:
                # Object reads and writes need no project; not looking one up saves a request.
                instance = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
            except google.auth.exceptions.DefaultCredentialsError:
                raise UserError(
                    "no Google Cloud credentials for gs://: run 'gcloud auth "
                    "application-default login', set GOOGLE_APPLICATION_CREDENTIALS to a key "
                    "file, or run where workload identity gives the pod an account") from None
            adapter = requests.adapters.HTTPAdapter(pool_connections=POOL_SIZE,
                                                    pool_maxsize=POOL_SIZE)
            for prefix in ("https://", "http://"):
                instance._http.mount(prefix, adapter)
            _clients[pid] = instance
        return _clients[pid]


def reset() -> None:
    """Forget this process's client (for tests that point STORAGE_EMULATOR_HOST elsewhere)."""
    _clients.pop(os.getpid(), None)


def _split(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ("bucket", "a/b")."""
    bucket, _, key = normalize(uri)[len("gs://"):].partition("/")
    return bucket, key


def _blob(uri: str):
    bucket, key = _split(uri)
    return client().bucket(bucket).blob(key)


def _not_found():
    from google.api_core.exceptions import NotFound

    return NotFound


# ----------------------------------------------------------------------------------- queries


def exists(uri: str) -> bool:
    """A file, or a directory (on GCS: a prefix with objects under it, or a bucket)."""
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.exists(uri)
    _, key = _split(uri)
    if key and _blob(uri).exists(retry=_policy(), timeout=TIMEOUT):
        return True
    return isdir(uri)


def isdir(uri: str) -> bool:
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.isdir(uri)
    bucket, key = _split(uri)
    if not key:
        return client().bucket(bucket).exists(retry=_policy(), timeout=TIMEOUT)
    blobs = client().list_blobs(bucket, prefix=key + "/", max_results=1,
                                retry=_policy(), timeout=TIMEOUT)
    return any(True for _ in blobs)


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) directly under ``uri``; ``[]`` when it does not exist."""
    uri = normalize(uri)
    if not is_remote(uri):
        try:
            return sorted(os.listdir(uri))
        except (FileNotFoundError, NotADirectoryError):
            return []
    bucket, key = _split(uri)
    prefix = key + "/" if key else ""
    pages = client().list_blobs(bucket, prefix=prefix, delimiter="/",
                                retry=_policy(), timeout=TIMEOUT)
    names = {blob.name[len(prefix):] for blob in pages}
    names |= {p[len(prefix):].rstrip("/") for p in pages.prefixes}
    names.discard("")  # a directory marker object ("key/") made by other tools
    return sorted(names)


def walk_files(uri: str) -> Iterator[str]:
    """Every file under ``uri``, recursively, as full URIs in sorted order."""
    uri = normalize(uri)
    if not is_remote(uri):
        found = [os.path.join(d, n) for d, _, files in os.walk(uri) for n in files]
        yield from sorted(found)
        return
    bucket, key = _split(uri)
    prefix = key + "/" if key else ""
    names = [b.name for b in client().list_blobs(bucket, prefix=prefix, retry=_policy(),
                                                 timeout=TIMEOUT) if not b.name.endswith("/")]
    yield from (f"gs://{bucket}/{name}" for name in sorted(names))


def _remote_blob_meta(uri: str):
    blob = client().bucket(_split(uri)[0]).get_blob(_split(uri)[1], retry=_policy(),
                                                    timeout=TIMEOUT)
    if blob is None:
        raise FileNotFoundError(uri)
    return blob


def size(uri: str) -> int:
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.getsize(uri)
    return int(_remote_blob_meta(uri).size)


def version(uri: str) -> tuple[int, str]:
    """``(size, version)`` of a file: what changes when it is replaced (cache keys).

    The version is the object generation on GCS, the modification time in ns locally.
    """
    uri = normalize(uri)
    if not is_remote(uri):
        stat = os.stat(uri)
        return stat.st_size, str(stat.st_mtime_ns)
    blob = _remote_blob_meta(uri)
    return int(blob.size), str(blob.generation)


# ------------------------------------------------------------------------------------ reading


def read_bytes(uri: str) -> bytes:
    uri = normalize(uri)
    if not is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    try:
        return _blob(uri).download_as_bytes(retry=_policy(), timeout=TIMEOUT)
    except _not_found():
        raise FileNotFoundError(uri) from None


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


_local_files: dict[tuple[int, str], int] = {}


def _local_fd(path: str) -> int:
    """A read-only descriptor per (process, path), kept open: ranges of one archive are read
    hundreds of thousands of times (``os.pread`` needs no seek and is thread-safe)."""
    key = (os.getpid(), path)
    fd = _local_files.get(key)
    if fd is None:
        with _client_lock:
            fd = _local_files.get(key)
            if fd is None:
                fd = _local_files[key] = os.open(path, os.O_RDONLY)
    return fd


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a file from ``offset`` (fewer only at its end)."""
    if length <= 0:
        return b""
    uri = normalize(uri)
    if not is_remote(uri):
        fd = _local_fd(uri)
        parts, done = [], 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)
    try:
        return _blob(uri).download_as_bytes(start=offset, end=offset + length - 1,
                                            checksum=None, retry=_policy(),
                                            timeout=TIMEOUT)
    except _not_found():
        raise FileNotFoundError(uri) from None
    except Exception as exc:  # a range past the end: 416
        if getattr(exc, "code", None) == 416:
            return b""
        raise


class _RangeFile(io.RawIOBase):
    """A seekable, read-only view of ``length`` bytes of a file from ``start``."""

    def __init__(self, fetch: Callable[[int, int], bytes], start: int, length: int):
        self._fetch, self._start, self._length, self._pos = fetch, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        data = self._fetch(self._start + self._pos, want)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def open_range(uri: str, start: int = 0, length: int | None = None,
               buffer_size: int | None = None) -> IO[bytes]:
    """A buffered, seekable reader of ``length`` bytes of ``uri`` from ``start`` (a stream:
    nothing is copied to disk). Positions are relative to ``start``.

    On GCS each refill of the buffer is one ranged read, so the buffer size decides the
    trade-off: large (megabytes) to stream through an archive, small to hop between headers.
    """
    uri = normalize(uri)
    if length is None:
        length = size(uri) - start
    if buffer_size is None:
        buffer_size = 8 * 1024 * 1024 if is_remote(uri) else 256 * 1024
    raw = _RangeFile(lambda offset, n: read_range(uri, offset, n), start, length)
    raw.name = uri  # the reader's name (tarfile asks for one)
    return io.BufferedReader(raw, buffer_size=buffer_size)


# ------------------------------------------------------------------------------------ writing


def makedirs(uri: str) -> None:
    """Create a local directory (and parents); nothing to do on GCS, where prefixes are implicit."""
    uri = normalize(uri)
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)


class _GcsWriter(io.RawIOBase):
    """Buffers up to :data:`SMALL_WRITE` bytes, then streams a resumable upload."""

    def __init__(self, uri: str):
        self._blob = _blob(uri)
        self._buffer = bytearray()
        self._stream = None  # google.cloud.storage.fileio.BlobWriter once the data is large

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._stream is not None:
            return self._stream.write(data)
        self._buffer += data
        if len(self._buffer) > SMALL_WRITE:
            self._stream = self._blob.open("wb", chunk_size=CHUNK_SIZE, retry=_policy(),
                                           timeout=TIMEOUT[1], ignore_flush=True)
            self._stream.write(bytes(self._buffer))
            self._buffer = bytearray()
        return len(data)

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.close()
        else:
            self._blob.upload_from_string(bytes(self._buffer), retry=_policy(),
                                          timeout=TIMEOUT)

    def abort(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.terminate()  # cancels the resumable upload: no object appears


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``uri`` for writing so that it is either complete or absent.

    Locally: a temporary sibling (:func:`temp_name`), renamed on success and removed on an
    exception. On GCS: an upload to ``uri`` itself, which completes only on success.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    uri = normalize(uri)
    if is_remote(uri):
        writer = _GcsWriter(uri)
        handle = io.TextIOWrapper(writer, encoding="utf-8") if mode == "w" else writer
        try:
            yield handle
            if mode == "w":
                handle.flush()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return
    parent = dirname(uri)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(uri)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(uri: str) -> Iterator[str]:
    """Yield a temporary local path to write; renamed to ``uri`` on success (local only)."""
    uri = normalize(uri)
    if is_remote(uri):
        raise ValueError(f"atomic_path needs a local path, not {uri}")
    parent = dirname(uri)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(uri)
    try:
        yield tmp
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def remove(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    uri = normalize(uri)
    if not is_remote(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)
        return
    with contextlib.suppress(_not_found()):
        _blob(uri).delete(retry=_policy(), timeout=TIMEOUT)


def rmtree(uri: str) -> None:
    """Delete a directory and everything under it; a missing directory is not an error."""
    uri = normalize(uri)
    if not is_remote(uri):
        if os.path.isdir(uri):
            shutil.rmtree(uri)
        elif os.path.exists(uri):
            os.remove(uri)
        return
    bucket, key = _split(uri)
    for blob in client().list_blobs(bucket, prefix=key + "/" if key else "",
                                    retry=_policy(), timeout=TIMEOUT):
        with contextlib.suppress(_not_found()):
            blob.delete(retry=_policy(), timeout=TIMEOUT)
    if key:
        remove(uri)


def is_empty_dir(uri: str) -> bool:
    """True when ``uri`` does not exist or holds nothing."""
    return not listdir(uri)
