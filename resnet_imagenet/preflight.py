"""Pre-flight: can this identity read the pipeline's inputs and write its outputs on GCS?

The pipeline's first step (``components/validate.py``) calls :func:`check_pipeline` before any
conversion runs or any GPU is requested, so a missing bucket or a missing IAM grant costs
seconds, not a failed step an hour into a run. Each check is the request the later step will
make, sent with the step's own credentials (Application Default Credentials: the pod's
workload identity), so what passes here is what the steps are allowed to do:

* an input (``raw_uri``; ``tfrecord_uri`` when it holds a finished dataset) must list
  (``storage.objects.list``) and hold objects, one of which must read
  (``storage.objects.get``);
* an output prefix must take a small probe object (``storage.objects.create``) and let it be
  deleted again (``storage.objects.delete``: the converter and the trainer replace files).

A failure is one :class:`~resnet_imagenet.errors.UserError` line naming the URI, the pipeline
parameter and the missing permission. Local paths are not checked by :func:`check_pipeline` (a
local backend runs on the machine that has them); :func:`check_output_dir` is what a command
checks of its own output directory, local or gs://, before any work. TF-free:
google-cloud-storage, through :mod:`resnet_imagenet.storage`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid

from resnet_imagenet import storage
from resnet_imagenet.errors import UserError

LIST, GET = "storage.objects.list", "storage.objects.get"
CREATE, DELETE = "storage.objects.create", "storage.objects.delete"
PROBE_PREFIX = ".tmp-preflight-"  # a temporary name (storage.is_temp): safe to find and delete
DATASET_MANIFEST = "manifest.json"
# How long a command's gs:// pre-flight may take before it gives up (seconds).
TIMEOUT_ENV, DEFAULT_TIMEOUT = "RESNET_IMAGENET_PREFLIGHT_TIMEOUT", 60.0


def identity() -> str:
    """Who the requests run as, for messages: a service account's e-mail when it has one."""
    credentials = getattr(storage.client(), "_credentials", None)
    email = getattr(credentials, "service_account_email", None)
    if isinstance(email, str) and "@" in email:
        return email
    kind = type(credentials).__name__ if credentials is not None else "no credentials"
    return "anonymous credentials" if kind == "AnonymousCredentials" else \
        f"this step's identity ({kind})"


def _subject(uri: str, parameter: str) -> str:
    """``--data-dir gs://b/x`` for a command's flag, ``pipeline parameter p=gs://b/x`` else."""
    return f"{parameter} {uri}" if parameter.startswith("--") else \
        f"pipeline parameter {parameter}={uri}"


@contextlib.contextmanager
def _requesting(uri: str, parameter: str, permission: str, action: str):
    """Turn GCS's refusals into one line naming the URI, the parameter and the permission."""
    from google.api_core import exceptions

    who = "run" if parameter.startswith("--") else "run the pipeline"
    try:
        yield
    except (exceptions.Forbidden, exceptions.Unauthorized) as exc:
        raise UserError(
            f"{_subject(uri, parameter)}: {identity()} lacks {permission} ({action} was "
            f"refused: {exc.code} {type(exc).__name__}): grant it on the bucket, or {who} as "
            "an identity that has it") from None
    except exceptions.NotFound:
        bucket = uri[len("gs://"):].split("/", 1)[0]
        raise UserError(f"{_subject(uri, parameter)}: bucket gs://{bucket} does not exist (or "
                        "is not visible to this identity)") from None


def check_readable(uri: str, parameter: str) -> list[str]:
    """``uri`` (a gs:// prefix) lists and holds objects, and one of them reads; its names."""
    uri = storage.normalize(uri)
    with _requesting(uri, parameter, LIST, "listing the prefix"):
        names = storage.listdir(uri)
    if not names:
        raise UserError(f"{_subject(uri, parameter)} holds nothing: upload the data there "
                        "first, or correct the URI")
    files = [n for n in names if not n.startswith(".")]
    probe = next((n for n in ("ILSVRC2012_devkit_t12.tar.gz", "validation_labels.txt",
                              DATASET_MANIFEST, "config.json", "saved_model.pb")
                  if n in files), None)
    if probe is None:  # any object under the prefix
        probe = next(iter(storage.walk_files(uri)), None)
        probe = probe[len(uri) + 1:] if probe else None
    if probe is not None:
        with _requesting(uri, parameter, GET, f"reading {probe}"):
            storage.read_range(storage.join(uri, probe), 0, 1)
    return names


def check_writable(uri: str, parameter: str) -> None:
    """A probe object can be created under ``uri`` (a gs:// prefix) and deleted again."""
    uri = storage.normalize(uri)
    probe = storage.join(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    with _requesting(uri, parameter, CREATE, "writing a probe object"):
        # One upload, the request of that permission alone (a storage.write_bytes would also
        # delete its temporary object).
        storage.gcs_blob(probe).upload_from_string(b"", retry=storage.retry_policy(),
                                                   timeout=storage.TIMEOUT)
    with _requesting(uri, parameter, DELETE, f"deleting the probe object {probe}"):
        storage.remove(probe)


def check_pipeline(*, raw: tuple[str, str], tfrecord: tuple[str, str],
                   outputs: dict[str, str]) -> list[str]:
    """Check every gs:// URI of a pipeline run; returns what was checked, one line each.

    ``raw`` and ``tfrecord`` are ``(pipeline parameter name, URI)``; ``outputs`` maps the
    other written URIs' parameter names to them (model, export). The raw data must be readable
    unless the TFRecords URI already holds a finished dataset (``manifest.json``), which then
    only needs to be readable: the pipeline will not convert. The raw data's top level (local
    or gs://) must be the archives or the extracted layout, down to the list of its classes
    (``imagenet.check_top_level``: a few requests): the conversion's own refusal would come
    after the step's retries (kfp.local and Argo retry every failure). What only a listing of
    every class finds (an empty class, a validation label count) is still the conversion's.
    """
    checked = []
    (raw_name, raw_uri), (tfrecord_name, tfrecord_uri) = raw, tfrecord
    finished = False
    if tfrecord_uri and storage.is_remote(tfrecord_uri):
        with _requesting(tfrecord_uri, tfrecord_name, LIST, "listing the prefix"):
            finished = DATASET_MANIFEST in storage.listdir(tfrecord_uri)
    elif tfrecord_uri:
        finished = storage.exists(storage.join(tfrecord_uri, DATASET_MANIFEST))
    if raw_uri and not finished:
        if storage.is_remote(raw_uri):
            names = check_readable(raw_uri, raw_name)
        elif storage.isdir(raw_uri):
            names = storage.listdir(raw_uri)
        else:
            raise UserError(f"pipeline parameter {raw_name}={raw_uri} is not a directory: point "
                            "it at the ILSVRC2012 archives or the extracted layout (train/, "
                            "validation/, validation_labels.txt)")
        from resnet_imagenet.data import archives, imagenet

        if not archives.detect(raw_uri):
            if "train" not in names:
                raise UserError(f"pipeline parameter {raw_name}={raw_uri} holds neither the "
                                f"four ILSVRC2012 archives ({', '.join(archives.OFFICIAL)}) nor "
                                "the extracted layout (train/, validation/, "
                                "validation_labels.txt)")
            try:
                imagenet.check_top_level(raw_uri)
            except UserError as exc:
                raise UserError(f"pipeline parameter {raw_name}: {exc}") from None
        checked.append(f"{raw_name} {raw_uri}: readable")
    if tfrecord_uri and storage.is_remote(tfrecord_uri):
        if finished:
            check_readable(tfrecord_uri, tfrecord_name)
            checked.append(f"{tfrecord_name} {tfrecord_uri}: a finished dataset, readable")
        else:
            check_writable(tfrecord_uri, tfrecord_name)
            checked.append(f"{tfrecord_name} {tfrecord_uri}: writable")
    for name, uri in outputs.items():
        if uri and storage.is_remote(uri):
            check_writable(uri, name)
            checked.append(f"{name} {uri}: writable")
    return checked


def check_output_dir(uri: str, flag: str) -> str:
    """Refuse an output directory that cannot be one, before any work; returns it normalized.

    Refused: a file (a local file, or a GCS object) of that name; locally also a path under a
    file, or whose nearest existing folder this process cannot write in.
    """
    uri = storage.normalize(uri)
    if storage.exists(uri) and not storage.isdir(uri):
        raise UserError(f"{flag} {uri} is a file: choose a directory")
    if storage.is_remote(uri):
        return uri
    parent = os.path.abspath(uri)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {uri} is under {parent}, which is a file: choose a directory "
                        "elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {uri}: cannot write in {parent} (permission denied): choose a "
                        "directory you can write in, or fix its permissions")
    return uri


def check_command(reads: dict[str, str], writes: dict[str, str] | None = None,
                  timeout: float | None = None) -> None:
    """A command's gs:// inputs (``{flag: uri}``) read and its outputs take a probe object,
    before TensorFlow touches them; local paths are left to the command.

    Bounded by ``timeout`` seconds (default ``$RESNET_IMAGENET_PREFLIGHT_TIMEOUT`` or 60):
    without a network or a reachable credential source the requests would retry for minutes.
    """
    checks = [(flag, uri, check_readable) for flag, uri in reads.items()]
    checks += [(flag, uri, check_writable) for flag, uri in (writes or {}).items()]
    checks = [(flag, storage.normalize(uri), check) for flag, uri, check in checks
              if uri and storage.is_remote(uri)]
    if not checks:
        return
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
    state = {"at": checks[0][:2], "error": None}

    def run() -> None:
        try:
            for flag, uri, check in checks:
                state["at"] = (flag, uri)
                check(uri, flag)
        except BaseException as exc:  # handed to the caller's thread
            state["error"] = exc

    worker = threading.Thread(target=run, name="preflight", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # left behind: a daemon thread does not keep the process alive
        flag, uri = state["at"]
        raise UserError(f"{flag} {uri}: Google Cloud Storage did not answer within {timeout:g} s "
                        f"({TIMEOUT_ENV}): check this machine's network or proxy and its "
                        "credentials (gcloud auth application-default login, "
                        "GOOGLE_APPLICATION_CREDENTIALS or workload identity)")
    error = state["error"]
    if isinstance(error, UserError):
        raise error
    if error is not None:
        flag, uri = state["at"]
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"{flag} {uri}: cannot reach Google Cloud Storage "
                        f"({type(error).__name__}: {first}): check this machine's network or "
                        "proxy and its credentials") from None
