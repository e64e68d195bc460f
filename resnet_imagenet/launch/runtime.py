"""What every launch backend shares: exit statuses, checks of their counts and train flags, signals
that end a launch cleanly (:func:`terminate_on_signals`), prefixed log output."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import IO, Iterator

from resnet_imagenet.errors import UserError

# Exit statuses of `resnet-imagenet launch` besides 0 (success) and 2 (bad input, from the CLI).
FAILED = 1  # the training failed; the log names the failed replica and its exit status
TIMED_OUT = 124  # as timeout(1); a signal N gives 128 + N, as in a shell (SIGTERM: 143)


def check_counts(workers: int, gpus_per_worker: int, timeout: float | None = None,
                 ) -> None:
    """What every backend needs of its numbers: a worker at least, no negative GPUs, a timeout
    that leaves time to run (None: no limit)."""
    if workers < 1:
        raise UserError(f"--workers {workers}: at least 1 worker is needed")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {gpus_per_worker}: must be 0 or more")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout {timeout:g}: must be positive (or left out for no limit)")


def train_dirs(train_args: list[str]) -> tuple[str | None, str | None]:
    """``--data-dir`` and ``--model-dir`` as given in the train flags (None where absent)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--data-dir")
    parser.add_argument("--model-dir")
    known, _ = parser.parse_known_args(list(train_args))
    return known.data_dir, known.model_dir


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so ``except Exception`` retry loops let it by."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Raise :class:`Terminated` on the first SIGTERM/SIGINT inside the block; ignore repeats.

    Repeats are ignored so that a second signal (KFP and Kubernetes may send SIGTERM more than
    once, impatient users press Ctrl-C twice) cannot interrupt the clean-up the first one started.
    Handlers can only be installed from the main thread; elsewhere (tests calling the launcher from
    a thread) the block runs with the process's handlers unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, _frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class PrefixedOutput:
    """Writes other processes' log lines as ``[worker-0] line``, whole lines, from any thread."""

    def __init__(self, stream: IO[str] | None = None):
        # Resolved at write time by default, so pytest's capture and redirected stderr both work.
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, prefix: str, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        with self._lock:
            stream.write(f"[{prefix}] {line.rstrip()}\n")
            stream.flush()
