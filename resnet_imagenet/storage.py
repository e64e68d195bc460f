"""One API over local paths and ``gs://`` URIs, without TensorFlow (the why: docs/storage.md).

URIs: a local path, ``file:///abs/path`` or ``gs://bucket/key``; any other scheme is a one-line
:class:`~resnet_imagenet.errors.UserError`. Local paths go through the standard library, gs://
through google-cloud-storage (which honours ``STORAGE_EMULATOR_HOST``). On GCS a directory is a
prefix. Writes that must never be seen half-done: :func:`atomic_write`, or :func:`atomic_path`
for a writer that wants a name (``tf.io.TFRecordWriter``). TensorFlow reads and writes its own
files (tf.data, checkpoints, SavedModels, summaries) itself; this module never imports it.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import io
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
from typing import IO, Callable, Iterator

from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("gs",)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_WILDCARD = re.compile(r"[*?\[]")
TMP_MARKER = ".tmp-"

TIMEOUT = (20, 120)  # seconds: connect, read (per request; retries come on top)
POOL_SIZE = 64  # HTTP connections kept per process: reads in flight per worker stay open
CHUNK_SIZE = 16 * 1024 * 1024  # resumable upload chunk (a multiple of 256 KiB)
SMALL_WRITE = CHUNK_SIZE  # writes up to this size are a single upload request
PUBLISH_ATTEMPTS = 5  # copies to a final name that another writer keeps replacing


def scheme(uri: str) -> str:
    """Return ``""`` for a local path, else the URI's scheme (``"gs"``); refuse unknown ones."""
    match = _SCHEME_RE.match(uri)
    if not match:
        return ""
    name = match.group(1).lower()
    if name == "file":
        return ""
    if name not in SUPPORTED_SCHEMES:
        raise UserError(
            f"unsupported URI scheme '{name}://' in '{uri}': use a local path or gs://bucket/path"
        )
    return name


def is_remote(uri: str) -> bool:
    return scheme(uri) != ""


def normalize(uri: str) -> str:
    """Canonical form: ``file://`` stripped, trailing slashes removed (but not from ``/``)."""
    uri = str(uri)
    if is_remote(uri):
        if not re.match(r"^gs://[^/]+", uri):
            raise UserError(f"malformed GCS URI '{uri}': expected gs://BUCKET/PATH")
        return uri.rstrip("/")
    if uri.lower().startswith("file://"):
        uri = uri[len("file://"):]
    return uri.rstrip("/") or "/"


def join(base: str, *parts: str) -> str:
    base = normalize(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(normalize(uri))


def dirname(uri: str) -> str:
    uri = normalize(uri)
    if is_remote(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(uri)


def temp_name(uri: str) -> str:
    """A unique sibling of ``uri`` that :func:`is_temp` recognises (for leftovers of crashes)."""
    uri = normalize(uri)
    return join(dirname(uri), f"{TMP_MARKER}{uuid.uuid4().hex[:12]}-{basename(uri)}")


def is_temp(name: str) -> bool:
    return basename(name).startswith(TMP_MARKER)


_clients: dict[int, object] = {}
_client_lock = threading.Lock()


@functools.lru_cache(maxsize=1)  # built on first use: importing google.api_core costs ~0.2 s
def retry_policy():
    """The retry policy of every GCS request: the library's predicate (429, 5xx, connection
    errors) with a deadline of 10 minutes (a conversion task runs for hours)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.5, maximum=30.0, multiplier=2.0).with_timeout(600.0)


def client():
    """This process's google-cloud-storage client (never shared over fork), with Application
    Default Credentials (anonymous with STORAGE_EMULATOR_HOST)."""
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


def gcs_blob(uri: str):
    """The google-cloud-storage Blob of a gs:// URI (no request made), for code that must send
    one particular request itself: pre-flight's permission probes."""
    return _blob(uri)


def _not_found():
    from google.api_core.exceptions import NotFound

    return NotFound


def _list(bucket: str, prefix: str, **options):
    """The objects under ``prefix`` (an iterator of pages' blobs); a missing bucket is empty."""
    try:
        yield from client().list_blobs(bucket, prefix=prefix, retry=retry_policy(), timeout=TIMEOUT,
                                       **options)
    except _not_found():
        return


def _blob_meta(uri: str):
    bucket, key = _split(uri)
    blob = (client().bucket(bucket).get_blob(key, retry=retry_policy(), timeout=TIMEOUT)
            if key else None)
    if blob is None:
        raise FileNotFoundError(errno.ENOENT, "No such file", uri)
    return blob


def exists(uri: str) -> bool:
    """A file, or a directory (on GCS: a prefix with objects under it, or a bucket)."""
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.exists(uri)
    _, key = _split(uri)
    if key and _blob(uri).exists(retry=retry_policy(), timeout=TIMEOUT):
        return True
    return isdir(uri)


def isdir(uri: str) -> bool:
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.isdir(uri)
    bucket, key = _split(uri)
    if not key:
        return client().bucket(bucket).exists(retry=retry_policy(), timeout=TIMEOUT)
    return any(True for _ in _list(bucket, key + "/", max_results=1))


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) directly under ``uri``; ``[]`` when it does not exist (a missing
    bucket is google's NotFound: pre-flight names it)."""
    uri = normalize(uri)
    if not is_remote(uri):
        try:
            return sorted(os.listdir(uri))
        except (FileNotFoundError, NotADirectoryError):
            return []
    bucket, key = _split(uri)
    prefix = key + "/" if key else ""
    pages = client().list_blobs(bucket, prefix=prefix, delimiter="/",
                                retry=retry_policy(), timeout=TIMEOUT)
    names = {blob.name[len(prefix):] for blob in pages}
    names |= {p[len(prefix):].rstrip("/") for p in pages.prefixes}
    names.discard("")  # a directory marker object ("key/", see makedirs)
    return sorted(names)


def walk_files(uri: str) -> Iterator[str]:
    yield from sorted(sizes(uri, recursive=True))  # full URIs of every file under uri


def sizes(uri: str, recursive: bool = False) -> dict[str, int]:
    """``{full URI: bytes}`` of the files directly under ``uri`` (every one below it with
    ``recursive``): on GCS one listing, not a request per file; ``{}`` when it does not exist."""
    uri = normalize(uri)
    if not is_remote(uri):
        walk = os.walk(uri) if recursive else [next(os.walk(uri), (uri, [], []))]
        return {os.path.join(d, n): os.path.getsize(os.path.join(d, n))
                for d, _, files in walk for n in files}
    bucket, key = _split(uri)
    blobs = _list(bucket, key + "/" if key else "", **({} if recursive else {"delimiter": "/"}))
    return {f"gs://{bucket}/{b.name}": int(b.size) for b in blobs if not b.name.endswith("/")}


def glob(pattern: str) -> list[str]:
    """Sorted full URIs of the files and directories matching a shell pattern (``*``, ``?``,
    ``[...]``) part by part: a wildcard never matches a ``/``, and does match a leading dot."""
    pattern = normalize(pattern)
    sep = "/" if is_remote(pattern) else os.sep
    parts = pattern.split(sep)
    first = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), None)
    if first is None:
        return [pattern] if exists(pattern) else []
    paths = [sep.join(parts[:first]) or (sep if pattern.startswith(sep) else "")]
    for part in parts[first:]:
        found = []
        for path in paths:
            names = ([n for n in listdir(path or ".") if fnmatch.fnmatchcase(n, part)]
                     if _WILDCARD.search(part) else [part])
            children = [f"{path.rstrip(sep)}{sep}{name}" if path else name for name in names]
            found += children if _WILDCARD.search(part) else [c for c in children if exists(c)]
        paths = found
    return sorted(paths)


def version(uri: str) -> tuple[int, str]:
    """``(size, version)`` of a file, for cache keys: the object generation on GCS, the
    modification time in ns locally."""
    uri = normalize(uri)
    if not is_remote(uri):
        stat = os.stat(uri)
        return stat.st_size, str(stat.st_mtime_ns)
    blob = _blob_meta(uri)
    return int(blob.size), str(blob.generation)


def size(uri: str) -> int:
    return version(uri)[0]


def is_empty_dir(uri: str) -> bool:
    return not listdir(uri)  # a missing directory too


def read_bytes(uri: str) -> bytes:
    uri = normalize(uri)
    if not is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    try:
        return _blob(uri).download_as_bytes(retry=retry_policy(), timeout=TIMEOUT)
    except _not_found():
        raise FileNotFoundError(errno.ENOENT, "No such file", uri) from None


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
                                            checksum=None, retry=retry_policy(),
                                            timeout=TIMEOUT)
    except _not_found():
        raise FileNotFoundError(errno.ENOENT, "No such file", uri) from None
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

    seekable = readable

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


def makedirs(uri: str) -> None:
    """Create a directory and its parents; on GCS an empty marker object ``key/`` (what the
    console and TensorFlow make), so that an empty directory is listed."""
    uri = normalize(uri)
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)
        return
    bucket, key = _split(uri)
    if key and not isdir(uri):
        client().bucket(bucket).blob(key + "/").upload_from_string(
            b"", retry=retry_policy(), timeout=TIMEOUT)


def _publish(source, uri: str, overwrite: bool = True) -> None:
    """Copy the object ``source`` (a Blob) to ``uri`` server-side, each try guarded by the
    generation ``uri`` has just before (0: absent). A 412 with ``uri`` holding the source's size
    and CRC32C is a retried copy that landed; other bytes are another writer: FileExistsError
    without ``overwrite``, else another try (the last writer wins, as with a local rename)."""
    from google.api_core.exceptions import PreconditionFailed

    if source.crc32c is None or source.size is None:
        source.reload(retry=retry_policy(), timeout=TIMEOUT)
    target = _blob(uri)
    for _ in range(PUBLISH_ATTEMPTS):
        current = target.bucket.get_blob(target.name, retry=retry_policy(), timeout=TIMEOUT)
        if current is not None and not overwrite:
            raise FileExistsError(errno.EEXIST, "File exists", uri)
        generation = current.generation if current is not None else 0
        try:
            token = None
            while True:  # one call, or several for a large copy between locations
                token, _, _ = target.rewrite(source, token=token, if_generation_match=generation,
                                             retry=retry_policy(), timeout=TIMEOUT)
                if token is None:
                    return
        except PreconditionFailed:
            landed = target.bucket.get_blob(target.name, retry=retry_policy(), timeout=TIMEOUT)
            if (landed is not None and landed.size == source.size
                    and landed.crc32c == source.crc32c):
                return
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "File exists", uri) from None
    raise OSError(errno.EAGAIN, f"other writers kept replacing {uri} while this one copied "
                  f"to it ({PUBLISH_ATTEMPTS} attempts)", uri)


class _GcsWriter(io.RawIOBase):
    """Buffers up to :data:`SMALL_WRITE` bytes, then streams a resumable upload."""

    def __init__(self, uri: str):
        self.blob = _blob(uri)
        self._buffer = bytearray()
        self._stream = None  # google.cloud.storage.fileio.BlobWriter once the data is large

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._stream is not None:
            return self._stream.write(data)
        self._buffer += data
        if len(self._buffer) > SMALL_WRITE:
            self._stream = self.blob.open("wb", chunk_size=CHUNK_SIZE, retry=retry_policy(),
                                          timeout=TIMEOUT[1], ignore_flush=True)
            self._stream.write(bytes(self._buffer))
            self._buffer = bytearray()
        return len(data)

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.close()
        else:
            self.blob.upload_from_string(bytes(self._buffer), retry=retry_policy(), timeout=TIMEOUT)

    def abort(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.terminate()  # cancels the resumable upload: no object appears


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb", overwrite: bool = True) -> Iterator[IO]:
    """Open a file to write that becomes ``uri`` only on a clean exit of the ``with``.

    The data goes to a temporary sibling (:func:`temp_name`), renamed to ``uri`` locally or
    copied to it by :func:`_publish` on GCS, and removed on an exception (a resumable upload cut
    short leaves no object). ``overwrite=False``: FileExistsError if ``uri`` exists by then."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    uri = normalize(uri)
    if not is_remote(uri):
        with atomic_path(uri, overwrite) as tmp, open(tmp, mode, encoding=(
                "utf-8" if mode == "w" else None)) as f:
            yield f
        return
    writer = _GcsWriter(temp_name(uri))
    handle = io.TextIOWrapper(writer, encoding="utf-8") if mode == "w" else writer
    try:
        yield handle
        if mode == "w":
            handle.flush()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    try:
        _publish(writer.blob, uri, overwrite)
    finally:
        try:
            writer.blob.delete(retry=retry_policy(), timeout=TIMEOUT)
        except Exception as exc:  # the write's outcome stands; convert removes such leftovers
            if not isinstance(exc, _not_found()):
                log.warning("could not delete the temporary object %s: %s",
                            f"gs://{writer.blob.bucket.name}/{writer.blob.name}", exc)


@contextlib.contextmanager
def atomic_path(uri: str, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary sibling of ``uri`` for writers that want a name (TFRecordWriter, a
    saver: on GCS TensorFlow's own filesystem writes it); it becomes ``uri`` on a clean exit
    (:func:`rename`) and is removed on an exception."""
    uri = normalize(uri)
    parent = dirname(uri)
    if parent and not is_remote(uri):
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(uri)
    try:
        yield tmp
        rename(tmp, uri, overwrite)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            remove(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either complete or absent (:func:`atomic_write`)."""
    with atomic_write(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def copy(src: str, dst: str, overwrite: bool = True) -> None:
    """Copy one file, also between local paths and gs://, atomically at the destination (GCS to
    GCS is one server-side copy); ``overwrite=False``: FileExistsError when ``dst`` exists."""
    src, dst = normalize(src), normalize(dst)
    if not overwrite and exists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", dst)
    if is_remote(src) and is_remote(dst):
        _publish(_blob_meta(src), dst, overwrite)
        return
    with atomic_write(dst, "wb", overwrite) as writer:
        if not is_remote(src):
            with open(src, "rb") as reader:
                shutil.copyfileobj(reader, writer, CHUNK_SIZE)
            return
        try:
            _blob(src).download_to_file(writer, retry=retry_policy(), timeout=TIMEOUT)
        except _not_found():
            raise FileNotFoundError(errno.ENOENT, "No such file", src) from None


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst``."""
    src, dst = normalize(src), normalize(dst)
    for path in walk_files(src):
        rel = path[len(src):].lstrip("/")
        copy(path, join(dst, *rel.split("/")))


def rename(src: str, dst: str, overwrite: bool = True) -> None:
    """Move a file (locally also a directory) to ``dst``; ``overwrite=False``: FileExistsError
    when ``dst`` exists. On GCS a copy (:func:`_publish`) then the source's deletion."""
    src, dst = normalize(src), normalize(dst)
    if not is_remote(src) and not is_remote(dst):
        if not overwrite and os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst)
        os.replace(src, dst)
        return
    copy(src, dst, overwrite)
    remove(src)


def remove(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    uri = normalize(uri)
    if not is_remote(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)
        return
    with contextlib.suppress(_not_found()):
        _blob(uri).delete(retry=retry_policy(), timeout=TIMEOUT)


def rmtree(uri: str) -> None:
    """Delete a directory and everything under it, or a file; a missing one is not an error."""
    uri = normalize(uri)
    if not is_remote(uri):
        return shutil.rmtree(uri) if os.path.isdir(uri) else remove(uri)
    bucket, key = _split(uri)
    for blob in _list(bucket, key + "/" if key else ""):
        with contextlib.suppress(_not_found()):
            blob.delete(retry=retry_policy(), timeout=TIMEOUT)
    if key:
        remove(uri)
