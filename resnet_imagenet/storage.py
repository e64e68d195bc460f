"""One small API over local paths and ``gs://`` URIs.

Everything in the library that touches a file whose location a user chooses goes through this
module, so the same code runs on a laptop (local directories) and on a cluster (GCS). It is built
on ``tf.io.gfile``, which speaks both, for the steps where TensorFlow runs anyway (training,
evaluation, export). Where TensorFlow is not needed (``convert``, ``sample-data``, pre-flight)
:mod:`resnet_imagenet.fs` offers the same URIs through the standard library and
google-cloud-storage; the naming helpers here (``normalize``, ``join``, ...) serve both.

URIs: a local path (absolute or relative), ``file:///abs/path`` or ``gs://bucket/key``. Any other
scheme is refused with a one-line :class:`~resnet_imagenet.errors.UserError`.

Writes that must never be seen half-done go through :func:`atomic_write` (temporary name in the
same directory, then rename). On GCS an object only becomes visible once its upload completes, so
the rename there (copy + delete) is what gives "complete or absent" for the final name too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import uuid
from typing import IO, Iterator

from resnet_imagenet.errors import UserError

SUPPORTED_SCHEMES = ("gs",)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
TMP_MARKER = ".tmp-"


def _gfile():
    # Imported lazily: `resnet-imagenet --help` and the launcher must not pay for TensorFlow.
    import tensorflow as tf

    return tf.io.gfile


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


def exists(uri: str) -> bool:
    return _gfile().exists(normalize(uri))


def isdir(uri: str) -> bool:
    return _gfile().isdir(normalize(uri))


def makedirs(uri: str) -> None:
    _gfile().makedirs(normalize(uri))


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) directly under ``uri``; ``[]`` when it does not exist.

    Directory names come back without the trailing slash GCS adds.
    """
    uri = normalize(uri)
    gfile = _gfile()
    if not gfile.isdir(uri):
        return []
    return sorted({name.rstrip("/") for name in gfile.listdir(uri)})


def glob(pattern: str) -> list[str]:
    """Sorted full URIs matching a shell pattern (``*``, ``?``, ``[...]``) in the last parts."""
    return sorted(_gfile().glob(normalize(pattern)))


def walk_files(uri: str) -> Iterator[str]:
    """Every file under ``uri``, recursively, as full URIs in sorted order."""
    uri = normalize(uri)
    # gfile.walk visits directories in listing order, which on local disks is arbitrary.
    found = [join(dirpath, name) for dirpath, _dirs, files in _gfile().walk(uri) for name in files]
    yield from sorted(found)


def size(uri: str) -> int:
    return _gfile().stat(normalize(uri)).length


def read_bytes(uri: str) -> bytes:
    with _gfile().GFile(normalize(uri), "rb") as f:
        return f.read()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either complete or absent (temp name + rename)."""
    with atomic_write(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def temp_name(uri: str) -> str:
    """A unique sibling of ``uri`` that :func:`is_temp` recognises (for leftovers of crashes)."""
    uri = normalize(uri)
    return join(dirname(uri), f"{TMP_MARKER}{uuid.uuid4().hex[:12]}-{basename(uri)}")


def is_temp(name: str) -> bool:
    return basename(name).startswith(TMP_MARKER)


def rename(src: str, dst: str, overwrite: bool = True) -> None:
    _gfile().rename(normalize(src), normalize(dst), overwrite=overwrite)


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``uri`` for writing; rename it to ``uri`` on success only.

    On an exception the temporary file is removed and ``uri`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    uri = normalize(uri)
    parent = dirname(uri)
    if parent and not exists(parent):
        makedirs(parent)
    tmp = temp_name(uri)
    gfile = _gfile()
    try:
        with gfile.GFile(tmp, mode) as f:
            yield f
        gfile.rename(tmp, uri, overwrite=True)
    except BaseException:
        with contextlib.suppress(Exception):
            if gfile.exists(tmp):
                gfile.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(uri: str) -> Iterator[str]:
    """Yield a temporary sibling *path* for writers that want a name (TFRecordWriter, savers).

    The caller writes the file at the yielded path; on a clean exit it is renamed to ``uri``.
    """
    uri = normalize(uri)
    parent = dirname(uri)
    if parent and not exists(parent):
        makedirs(parent)
    tmp = temp_name(uri)
    gfile = _gfile()
    try:
        yield tmp
        gfile.rename(tmp, uri, overwrite=True)
    except BaseException:
        with contextlib.suppress(Exception):
            if gfile.exists(tmp):
                gfile.remove(tmp)
        raise


def copy(src: str, dst: str, overwrite: bool = True) -> None:
    """Copy one file (also across local and gs://), atomically at the destination."""
    src, dst = normalize(src), normalize(dst)
    parent = dirname(dst)
    if parent and not exists(parent):
        makedirs(parent)
    tmp = temp_name(dst)
    gfile = _gfile()
    if not overwrite and gfile.exists(dst):
        raise FileExistsError(dst)
    gfile.copy(src, tmp, overwrite=True)
    gfile.rename(tmp, dst, overwrite=True)


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst``."""
    src, dst = normalize(src), normalize(dst)
    for path in walk_files(src):
        rel = path[len(src):].lstrip("/")
        copy(path, join(dst, *rel.split("/")))


def remove(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    gfile = _gfile()
    uri = normalize(uri)
    if gfile.exists(uri):
        gfile.remove(uri)


def rmtree(uri: str) -> None:
    """Delete a directory and everything under it; a missing directory is not an error."""
    gfile = _gfile()
    uri = normalize(uri)
    if gfile.exists(uri):
        if gfile.isdir(uri):
            gfile.rmtree(uri)
        else:
            gfile.remove(uri)


def is_empty_dir(uri: str) -> bool:
    """True when ``uri`` does not exist or holds nothing."""
    return not listdir(uri)


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def local_path(uri: str) -> str:
    """The local filesystem path of a local URI; refuses remote ones (for tools that need a path)."""
    if is_remote(uri):
        raise UserError(f"'{uri}' must be a local path here, not a remote URI")
    return normalize(uri)
