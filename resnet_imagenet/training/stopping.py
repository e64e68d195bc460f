"""How training stops before its last step: the exceptions, the exit code, the SIGTERM flag.

:class:`RestartRequired` (a SIGTERM-triggered checkpoint, a lost peer) maps to exit status
:data:`RETRYABLE_EXIT_CODE`, which a restart of the job resumes from; :class:`TrainingDiverged`
is a :class:`~resnet_imagenet.errors.UserError` (status 2: retrying does not help).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

# 128 + SIGTERM. restartPolicy: ExitCode restarts pods that exit with 128..255 and fails the
# job on 1..127 (the UserError status 2 included: bad input does not get better by retrying).
RETRYABLE_EXIT_CODE = 143


class RestartRequired(Exception):
    """Training stopped in a way that a restart of the job resumes from (exit 143)."""


class Preempted(RestartRequired):
    """Training stopped on SIGTERM after saving ``checkpoint`` at ``step``; rerun to resume."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped by SIGTERM at step {step} after saving {checkpoint}; "
                         "run the same command again to resume")
        self.step = step
        self.checkpoint = checkpoint


class PeerLost(RestartRequired):
    """A collective failed: another worker is gone. Restarting all workers resumes."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run cannot continue as configured."""


class StopSignal:
    """Set by SIGTERM, read by the loop once per step. Python signal handlers can only be
    installed from the main thread; elsewhere (an embedding application) SIGTERM is left alone.

        stop = StopSignal()
        with stop.installed():
            ... stop.requested ...
    """

    def __init__(self):
        self.requested = False

    def _handler(self, signum, _frame):
        if not self.requested:
            log.warning("received %s: saving a checkpoint at the next step boundary",
                        signal.Signals(signum).name)
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
