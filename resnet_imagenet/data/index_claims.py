"""Claims on index units, so that the tasks of a conversion read each archive part once.

The units of :mod:`resnet_imagenet.data.archives` (the train archive's listing, the devkit, the
1,000 class tars, the validation tar, the box archive) are shared by ``--num-tasks`` tasks that
do not talk to each other; they meet in the cache directory (``OUT/_shards/archives/``):

    <unit>.json             the unit's index (written last: its presence means done)
    <unit>.claim            {"unit", "task", "token", "time"}: who indexes it
    alive-<token>.json      {"task", "token", "time"}: that task's heartbeat

A task first claims its own share (units k with k % T == I) and indexes it. A claim is made by
a create-if-absent write (GCS: ``if_generation_match=0``; locally a hard link, which fails on an
existing name), so two tasks never both hold one. Then, for every unit still missing, it looks:

* no claim at all (its owner has not started: the pipeline runs 8 of 16 tasks at once): it
  claims the unit at once and indexes it;
* a claim whose task shows a sign of life (its heartbeat, or the claim itself, is younger than
  the timeout): it waits, polling the cache directory (one listing per poll), and logs once
  what it waits for;
* a claim without a sign of life for the timeout (its task died mid-unit): it replaces the
  claim with its own, guarded by the generation it saw (locally: compare and replace under an
  flock of the directory), so of several waiting tasks exactly one takes it over and indexes it.

Each task's heartbeat is refreshed by a thread while the task runs (every timeout / 5), however
long a unit takes. A claim is removed when its index is written. Indexes are deterministic: if
a task thought dead comes back and finishes, it writes the same bytes as the one that took over.

Timeout: :data:`DEFAULT_TIMEOUT` seconds, or ``$RESNET_IMAGENET_CLAIM_TIMEOUT``; the poll
interval :data:`DEFAULT_POLL`, or ``$RESNET_IMAGENET_CLAIM_POLL``. Times are wall-clock times
of the writers (pods' clocks are NTP-synchronised, far closer than the timeout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from typing import Callable, Iterable

from resnet_imagenet import storage

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds without a sign of life before a claim is taken over
DEFAULT_POLL = 10.0  # seconds between looks at the cache directory while waiting
TIMEOUT_ENV = "RESNET_IMAGENET_CLAIM_TIMEOUT"
POLL_ENV = "RESNET_IMAGENET_CLAIM_POLL"
CLAIM_SUFFIX = ".claim"
ALIVE_PREFIX = "alive-"
BATCH = 32  # units claimed per round once this task's own share is done


def _seconds(env: str, default: float) -> float:
    try:
        return max(float(os.environ.get(env, "")), 0.01)
    except ValueError:
        return default


def _precondition_failed():
    from google.api_core.exceptions import NotFound, PreconditionFailed

    return (PreconditionFailed, NotFound)


class Claims:
    """This task's claims in ``cache_dir`` and its heartbeat (a context manager)."""

    def __init__(self, cache_dir: str, task_index: int, timeout: float | None = None,
                 poll: float | None = None):
        self.cache_dir = storage.normalize(cache_dir)
        self.task = task_index
        self.timeout = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT) if timeout is None else timeout
        self.poll = _seconds(POLL_ENV, DEFAULT_POLL) if poll is None else poll
        self.token = uuid.uuid4().hex
        self.remote = storage.is_remote(self.cache_dir)
        self._mine: dict[str, str] = {}  # unit -> version of our claim object
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- objects
    def _uri(self, name: str) -> str:
        return storage.join(self.cache_dir, name)

    def claim_uri(self, unit: str) -> str:
        return self._uri(unit + CLAIM_SUFFIX)

    @property
    def alive_uri(self) -> str:
        return self._uri(f"{ALIVE_PREFIX}{self.token}.json")

    def _record(self, unit: str | None = None) -> bytes:
        record = {"task": self.task, "token": self.token, "time": time.time()}
        if unit is not None:
            record["unit"] = unit
        return (json.dumps(record, sort_keys=True) + "\n").encode()

    def read_record(self, uri: str) -> tuple[dict, str] | None:
        """``(record, version)`` of a claim or heartbeat; None when absent or unreadable."""
        try:
            if self.remote:
                blob = storage.gcs_blob(uri)
                data = blob.download_as_bytes(retry=storage.retry_policy(),
                                              timeout=storage.TIMEOUT)
                version = str(blob.generation)
            else:
                with open(uri, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
                version = f"{st.st_ino}:{st.st_mtime_ns}"
            return json.loads(data), version
        except (FileNotFoundError, ValueError):
            return None
        except Exception as exc:
            if self.remote and isinstance(exc, _precondition_failed()):  # NotFound: absent
                return None
            raise

    @contextlib.contextmanager
    def _locked(self):
        import fcntl  # local cache directories only (POSIX)

        os.makedirs(self.cache_dir, exist_ok=True)
        fd = os.open(self.cache_dir, os.O_RDONLY)  # the directory itself: no lock file left
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, uri: str, data: bytes, generation: int | None) -> str | None:
        """Write ``uri``: created if ``generation`` is 0, replaced if it is that version, or
        unconditionally if None. Its new version, or None when the precondition fails."""
        if self.remote:
            blob = storage.gcs_blob(uri)
            try:
                blob.upload_from_string(data, content_type="application/json",
                                        if_generation_match=generation,
                                        retry=storage.retry_policy(), timeout=storage.TIMEOUT)
                return str(blob.generation)
            except _precondition_failed():
                found = self.read_record(uri)  # a retried write that landed is ours
                return found[1] if found and found[0].get("token") == self.token else None
        tmp = storage.temp_name(uri)
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            if generation == 0:
                try:
                    os.link(tmp, uri)  # fails on an existing name: create-if-absent
                except FileExistsError:
                    return None
                except OSError:  # a file system without hard links: an exclusive create
                    try:
                        with open(uri, "xb") as f:
                            f.write(data)
                    except FileExistsError:
                        return None
            else:
                os.replace(tmp, uri)
            st = os.stat(uri)
            return f"{st.st_ino}:{st.st_mtime_ns}"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    # -- heartbeat: from this task's first claim on (a task that finds every index writes none)
    def __enter__(self) -> "Claims":
        return self

    def _beating(self) -> None:
        if self._thread is None:
            self._write(self.alive_uri, self._record(), None)
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"claims-heartbeat-{self.task}")
            self._thread.start()

    def _beat(self) -> None:
        interval = min(max(self.timeout / 5, 0.1), 60.0)
        while not self._stop.wait(interval):
            try:
                self._write(self.alive_uri, self._record(), None)
            except Exception as exc:  # a missed beat is retried; the timeout allows several
                log.warning("could not refresh the heartbeat %s: %s", self.alive_uri, exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            for unit in list(self._mine):
                self.release(unit)
            storage.remove(self.alive_uri)

    # -- claims
    def claim(self, unit: str) -> bool:
        """Create the unit's claim if nobody holds one; True if this task now holds it."""
        self._beating()
        version = self._write(self.claim_uri(unit), self._record(unit), 0)
        if version is not None:
            self._mine[unit] = version
        return version is not None

    def take_over(self, unit: str, version: str) -> bool:
        """Replace a claim seen at ``version`` (a stale one) with ours; False if it changed."""
        self._beating()
        uri = self.claim_uri(unit)
        if self.remote:
            won = self._write(uri, self._record(unit), int(version))
        else:
            with self._locked():
                found = self.read_record(uri)
                won = self._write(uri, self._record(unit), None) \
                    if found is not None and found[1] == version else None
        if won is not None:
            self._mine[unit] = won
        return won is not None

    def release(self, unit: str) -> None:
        """Remove our claim (the unit's index is written); never one another task took over."""
        version = self._mine.pop(unit, None)
        if version is None:
            return
        uri = self.claim_uri(unit)
        try:
            if self.remote:
                storage.gcs_blob(uri).delete(if_generation_match=int(version),
                                             retry=storage.retry_policy(), timeout=storage.TIMEOUT)
                return
            with self._locked():
                found = self.read_record(uri)
                if found is not None and found[0].get("token") == self.token:
                    os.remove(uri)
        except _precondition_failed():
            pass  # taken over meanwhile, or already gone
        except OSError as exc:
            log.warning("could not remove the claim %s: %s", uri, exc)

    def listing(self) -> dict[str, str]:
        """``{name: version}`` of the objects directly in the cache directory (one listing)."""
        if not self.remote:
            found = {}
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self.cache_dir):
                    if entry.is_file():
                        st = entry.stat()
                        found[entry.name] = f"{st.st_ino}:{st.st_mtime_ns}"
            return found
        bucket, _, key = self.cache_dir[len("gs://"):].partition("/")
        prefix = key + "/" if key else ""
        blobs = storage.client().list_blobs(bucket, prefix=prefix, delimiter="/",
                                            retry=storage.retry_policy(), timeout=storage.TIMEOUT)
        return {b.name[len(prefix):]: str(b.generation) for b in blobs}

    def stale(self, claim: dict, beats: dict[str, dict | None]) -> bool:
        """True when the claim's task has shown no sign of life for the timeout."""
        token = claim.get("token", "")
        if token not in beats:
            found = self.read_record(self._uri(f"{ALIVE_PREFIX}{token}.json"))
            beats[token] = found[0] if found else None
        last = max(float(claim.get("time", 0)), float((beats[token] or {}).get("time", 0)))
        return time.time() - last > self.timeout


Index = Callable[[list[str]], Iterable[tuple[str, dict]]]


def share(names: list[str], own: list[str], index: Index, read: Callable[[str], dict | None],
          claims: Claims, num_tasks: int = 1, what: str = "archive units",
          total: int | None = None) -> dict[str, dict]:
    """Every unit of ``names`` (each with a cache object ``<name>.json``), indexed once over all
    tasks: ``own`` first, then the units nobody claimed and those whose claim went stale; the
    others are waited for. ``index(names)`` makes and writes indexes, yielding ``(name,
    index)``; ``read(name)`` reads one from the cache (None if absent or of another key)."""
    done: dict[str, dict] = {}

    def run(units: list[str]) -> None:
        for name, result in index(units):
            done[name] = result
            claims.release(name)

    won = [n for n in own if claims.claim(n)]
    won = _not_done(won, read, done, claims)
    if won:
        total = len(names) if total is None else total
        if total == 1:
            log.info("indexing %s", what)
        else:
            log.info("indexing %d of %d %s (%d indexed already)", len(won), total, what,
                     total - len(names))
        run(won)
    seen: dict[str, str] = {}  # name -> version of the cache or claim object last read
    claim_of: dict[str, tuple[dict, str]] = {}
    awaited: tuple = ()
    while True:
        pending = [n for n in names if n not in done]
        if not pending:
            return done
        listing = claims.listing()
        for name in pending:
            version = listing.get(name + ".json")
            if version is not None and seen.get(name + ".json") != version:
                seen[name + ".json"] = version
                found = read(name)
                if found is not None:
                    done[name] = found
        pending = [n for n in pending if n not in done]
        free, stale, waiting, beats = [], [], {}, {}
        for name in pending:
            version = listing.get(name + CLAIM_SUFFIX)
            if version is None:
                free.append(name)
                continue
            if name not in claim_of or claim_of[name][1] != version:
                found = claims.read_record(claims.claim_uri(name))
                if found is None:  # released or replaced since the listing: look again
                    waiting[name] = -1
                    continue
                claim_of[name] = found
            record, version = claim_of[name]
            if record.get("token") == claims.token:
                stale.append(name)  # ours but not done (an index that did not read back)
            elif claims.stale(record, beats):
                stale.append(name)
            else:
                waiting[name] = record.get("task", -1)
        candidates = _rotate(free + stale, claims.task, num_tasks)[:BATCH]
        won = []
        for name in candidates:
            if name in free:
                ok = claims.claim(name)
            else:
                record, version = claim_of[name]
                ok = record.get("token") == claims.token or claims.take_over(name, version)
                if ok and record.get("token") != claims.token:
                    log.warning("taking over %s from task %s: no sign of life for %g s", name,
                                record.get("task"), claims.timeout)
            if ok:
                won.append(name)
        won = _not_done(won, read, done, claims)
        if won:
            if len(names) == 1:
                log.info("indexing %s (no other live task holds it)", what)
            else:
                log.info("indexing %d %s that no other live task holds", len(won), what)
            run(won)
            continue
        tasks = tuple(sorted({t for t in waiting.values() if t >= 0}))
        if tasks and tasks != awaited:  # once per change of whom it waits for
            awaited = tasks
            log.info("waiting for %d %s claimed by task%s %s (looking every %g s; a claim "
                     "without a sign of life for %g s is taken over)", len(waiting), what,
                     "s" if len(tasks) != 1 else "", ", ".join(map(str, tasks)) or "-",
                     claims.poll, claims.timeout)
        time.sleep(claims.poll)


def _not_done(won: list[str], read, done: dict, claims: Claims) -> list[str]:
    """The units of ``won`` whose index is still missing (another task may have finished one
    between our look and our claim); the claims of the others are released."""
    left = []
    for name in won:
        found = read(name)
        if found is None:
            left.append(name)
        else:
            done[name] = found
            claims.release(name)
    return left


def _rotate(names: list[str], task: int, num_tasks: int) -> list[str]:
    """``names`` starting at a task-dependent place, so that waiting tasks claim apart."""
    if not names:
        return names
    start = len(names) * (task % max(num_tasks, 1)) // max(num_tasks, 1)
    return names[start:] + names[:start]
