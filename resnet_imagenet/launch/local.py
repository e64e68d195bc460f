"""The TFJob contract on one machine: N worker processes with TF_CONFIG, as the operator sets it.

Each worker gets exactly the TF_CONFIG training-operator v1.9 injects into a TFJob's pods, with
``127.0.0.1:<free port>`` in place of ``<job>-worker-<i>.<ns>.svc:2222``::

    {"cluster":{"worker":["127.0.0.1:41231","127.0.0.1:41232"]},
     "task":{"type":"worker","index":1},"environment":"cloud"}        (on one line)

and, like the operator, none at all when the job is a single worker without an evaluator. Worker
0 is the chief. The optional evaluator runs ``evaluate --watch`` with task type ``evaluator``
and is, as in the operator, not part of the cluster.

Process management is what makes this safe to use from a pipeline:

* output of every process is prefixed per replica (``[worker-1] ...``);
* the first process to fail stops the others (SIGTERM, then SIGKILL after a grace period) and the
  launch fails, naming the process and its exit status; otherwise MultiWorkerMirroredStrategy's
  survivors would wait for their dead peer forever;
* SIGINT/SIGTERM to the launcher, and ``--timeout``, stop every process the same way;
* no orphans: each process leads its own process group, which is signalled as a whole, and on
  Linux the kernel kills each one should the launcher die without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.runtime import (FAILED, TIMED_OUT, PrefixedOutput, Terminated,
                                            check_counts, terminate_on_signals, train_dirs)
from resnet_imagenet.training import strategy

log = logging.getLogger(__name__)

POLL_S = 0.1
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL: time for a worker to write its preemption checkpoint
EVALUATOR_GRACE_S = 600.0  # after the workers succeed, time for the evaluator's last checkpoint


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now.

    The sockets stay open until all ports are chosen, so the kernel cannot hand out one twice;
    another program could still take a port before a worker binds it, a race every launcher that
    picks ports has (the operator avoids it with a Service per pod).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(workers: list[str], task_type: str, index: int,
              evaluator: str | None = None) -> str:
    """TF_CONFIG as training-operator v1.9 writes it (and the trainer builds it under Trainer
    v2): Go's compact JSON, key order included; the evaluator, when there is one, in the
    cluster of every replica."""
    return strategy.tf_config_json(workers, task_type, index, evaluator)


@dataclass
class Replica:
    """One process of the launch: its name in logs, its command and its environment changes."""

    name: str  # worker-0, evaluator-0
    command: list[str]
    env: dict[str, str | None]  # None removes the variable

    def shell_command(self) -> str:
        """The process as one line a shell can run (``env [-u VAR] VAR=value ... command``)."""
        env = [f"-u {key}" if value is None else f"{key}={shlex.quote(value)}"
               for key, value in self.env.items()]
        return " ".join(["env", *env, shlex.join(self.command)])

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


def plan(workers: int, command: list[str], evaluator_command: list[str] | None = None,
         gpus_per_worker: int = 0) -> list[Replica]:
    """The processes of a launch, each with TF_CONFIG and the GPUs it may see.

    Worker ``i`` sees GPUs ``i*G .. i*G+G-1`` (CUDA_VISIBLE_DEVICES), so workers sharing a machine
    do not all grab every GPU; with G = 0 they see none, as a TFJob pod without a GPU limit does.
    With G > 0 they are told G (``strategy.GPUS_ENV``), and stop if they see fewer.
    The evaluator sees none: it must not take memory from the workers' GPUs.
    """
    check_counts(workers, gpus_per_worker)
    distributed = workers + (1 if evaluator_command else 0) > 1
    ports = free_ports(workers + (1 if evaluator_command else 0)) if distributed else []
    addresses = [f"127.0.0.1:{port}" for port in ports[:workers]]
    evaluator = f"127.0.0.1:{ports[workers]}" if evaluator_command else None
    replicas = []
    for index in range(workers):
        gpus = range(index * gpus_per_worker, (index + 1) * gpus_per_worker)
        replicas.append(Replica(f"worker-{index}", list(command), {
            "TF_CONFIG": tf_config(addresses, "worker", index, evaluator) if distributed else None,
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
            strategy.GPUS_ENV: str(gpus_per_worker) if gpus_per_worker else None,
        }))
    if evaluator_command:
        replicas.append(Replica("evaluator-0", list(evaluator_command), {
            "TF_CONFIG": tf_config(addresses, "evaluator", 0, evaluator),
            "CUDA_VISIBLE_DEVICES": "",
        }))
    return replicas


def train_command(train_args: list[str]) -> list[str]:
    """``resnet-imagenet train ARGS`` with this interpreter, so a virtualenv need not be active."""
    return [sys.executable, "-m", "resnet_imagenet", "train", *train_args]


def evaluator_command(train_args: list[str]) -> list[str]:
    data_dir, model_dir = train_dirs(train_args)
    if not (data_dir and model_dir):
        raise UserError(
            "--evaluator needs --data-dir and --model-dir in the train flags after '--'")
    return [sys.executable, "-m", "resnet_imagenet", "evaluate", "--watch",
            "--data-dir", data_dir, "--model-dir", model_dir]


def _die_with_parent(parent: int):
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the launcher dies (else None)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


class ProcessGroup:
    """Started replicas, their output pumps, and stopping all of them."""

    def __init__(self, replicas: list[Replica], output: PrefixedOutput):
        self.replicas = replicas
        self.procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        self._output = output

    def start(self) -> None:
        preexec = _die_with_parent(os.getpid())
        # All processes first, output pumps after: no other thread of ours runs while fork()
        # executes the preexec_fn.
        for replica in self.replicas:
            self.procs.append(subprocess.Popen(
                replica.command, env=replica.environ(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=preexec,
            ))
            log.info("started %s (pid %d): %s", replica.name, self.procs[-1].pid,
                     " ".join(replica.command))
        for replica, proc in zip(self.replicas, self.procs):
            pump = threading.Thread(target=self._pump, args=(replica.name, proc.stdout),
                                    name=f"output-{replica.name}", daemon=True)
            pump.start()
            self._pumps.append(pump)

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                self._output.write(name, raw.decode("utf-8", errors="replace"))

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group still running, SIGKILL what is left after ``grace``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                # The whole group: also the children of a worker, even of one that has exited.
                _signal_group(proc.pid, sig)
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        for proc in self.procs:
            proc.wait()
        for pump in self._pumps:
            pump.join(timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone already


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with code {status}"


def run_replicas(replicas: list[Replica], *, timeout: float | None = None,
                 output: IO[str] | None = None, stop_grace: float = STOP_GRACE_S,
                 evaluator_grace: float = EVALUATOR_GRACE_S) -> int:
    """Run the processes to the end; 0 when every one succeeds.

    1 when one fails (after stopping the rest), 124 on ``timeout``, 128+N on signal N.
    """
    group = ProcessGroup(replicas, PrefixedOutput(output))
    deadline = None if timeout is None else time.monotonic() + timeout
    workers = [i for i, r in enumerate(replicas) if r.name.startswith("worker-")]
    evaluator_deadline = None
    with terminate_on_signals():
        try:
            group.start()
            while True:
                codes = [proc.poll() for proc in group.procs]
                failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
                if failed is not None:
                    log.error("%s %s; stopping the other processes", replicas[failed].name,
                              _describe(codes[failed]))
                    group.stop(stop_grace)
                    return FAILED
                if all(code == 0 for code in codes):
                    log.info("all %d process(es) finished successfully", len(codes))
                    return 0
                if all(codes[i] == 0 for i in workers) and evaluator_deadline is None:
                    log.info("workers finished; giving the evaluator up to %gs for the last "
                             "checkpoint", evaluator_grace)
                    evaluator_deadline = time.monotonic() + evaluator_grace
                now = time.monotonic()
                if evaluator_deadline is not None and now >= evaluator_deadline:
                    log.warning("the evaluator did not finish in %gs; stopping it", evaluator_grace)
                    group.stop(stop_grace)
                    return 0
                if deadline is not None and now >= deadline:
                    log.error("not finished within --timeout %gs; stopping every process", timeout)
                    group.stop(stop_grace)
                    return TIMED_OUT
                time.sleep(POLL_S)
        except Terminated as sig:
            log.error("%s received; stopping every process", sig)
            group.stop(stop_grace)
            return sig.status
        except BaseException:
            group.stop(stop_grace)
            raise


def launch_local(train_args: list[str], *, workers: int = 1, gpus_per_worker: int = 0,
                 evaluator: bool = False, timeout: float | None = None,
                 command: list[str] | None = None, output: IO[str] | None = None,
                 dry_run: bool = False, stop_grace: float = STOP_GRACE_S) -> int:
    """``workers`` processes of ``resnet-imagenet train TRAIN_ARGS`` (or of ``command``).

    ``dry_run`` prints each process's TF_CONFIG and command line instead of running them.
    """
    check_counts(workers, gpus_per_worker, timeout)
    replicas = plan(workers, command or train_command(train_args),
                    evaluator_command(train_args) if evaluator else None, gpus_per_worker)
    if dry_run:
        stream = output or sys.stdout
        for replica in replicas:
            stream.write(f"# {replica.name}\n{replica.shell_command()}\n")
        return 0
    return run_replicas(replicas, timeout=timeout, output=output, stop_grace=stop_grace)
