"""The launch of one cluster job: :func:`launch` submits it (or re-attaches), follows it to its
end, and deletes it on a timeout, a start that never comes, or a signal."""

from __future__ import annotations

import dataclasses
import time
from typing import IO

from resnet_imagenet.launch.backend import ClusterBackend
from resnet_imagenet.launch.lifecycle.client import connect, log
from resnet_imagenet.launch.lifecycle.job import (DEFAULT_API_OUTAGE_TIMEOUT, DEFAULT_DELETE_WAIT,
                                                  DEFAULT_LOG_TAIL, DEFAULT_POLL_INTERVAL,
                                                  DEFAULT_START_TIMEOUT, JobRun, Timeout)
from resnet_imagenet.launch.lifecycle.logs import report_failure
from resnet_imagenet.launch.lifecycle.restarts import DEFAULT_MAX_RESTARTS, TooManyRestarts
from resnet_imagenet.launch.lifecycle.submit import CreateFailed, launcher_owner, submit
from resnet_imagenet.launch.lifecycle.wait import LostTrack, NoStart, OutOfSight, wait
from resnet_imagenet.launch.options import ClusterOptions
from resnet_imagenet.launch.runtime import (FAILED, TIMED_OUT, PrefixedOutput, Terminated,
                                            check_counts, terminate_on_signals)

# After a signal the delete waits less, to exit within the pod's grace period (30 s by default)
# before a SIGKILL.
SIGNAL_DELETE_WAIT = 20.0


def launch(backend: ClusterBackend, opts: ClusterOptions, *, api_client=None,
           kubeconfig: str | None = None, context: str | None = None,
           timeout: float | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
           log_tail: int = DEFAULT_LOG_TAIL, output: IO[str] | None = None,
           start_timeout: float | None = DEFAULT_START_TIMEOUT,
           delete_wait: float = DEFAULT_DELETE_WAIT,
           api_outage_timeout: float | None = DEFAULT_API_OUTAGE_TIMEOUT,
           max_restarts: int = DEFAULT_MAX_RESTARTS) -> int:
    """Submit the job ``backend.manifest(opts)`` (or re-attach to it), follow it to its end; the
    exit status.

    0 when it succeeds; 1 when it fails (its failed replicas' last log lines are logged) or when
    no replica has run for ``start_timeout`` seconds (None or 0: no limit; the reasons are logged
    as they change while it waits, and the job is deleted) or when its replicas were restarted
    more than ``max_restarts`` times (a TFJob: training-operator recreates failed pods without
    limit, ``lifecycle.restarts``; deleted too); 124 when ``timeout`` seconds pass
    and 128+N on signal N (SIGTERM: 143), both after deleting the job. "Deleted" is logged once
    the job is gone; when it is still there ``delete_wait`` seconds after the delete, that is
    logged instead and the status stays the same. Bad input raises UserError before any request
    reaches the API server.

    While the API server cannot be reached (or answers 429/5xx) the launch retries, saying so
    once a minute, for ``api_outage_timeout`` seconds (None or 0: for ever); then it fails (1)
    without deleting the job it cannot see (the last line says how to check it). A create whose
    answer was lost is looked up before it is tried again, and the job it made adopted; when the
    create is given up, a job it may have made is deleted (or the last line says it could not
    be checked). A 403 mid-run is one line naming the job, its namespace and the Role to apply
    (1, after trying to delete the job).

    ``api_client`` (a ``kubernetes.client.ApiClient``) overrides
    kubeconfig/in-cluster configuration; ``opts`` are the backend's options (``namespace`` None:
    the configuration's). The chief's log goes to ``output`` (default stderr) as
    ``[worker-0] ...``.
    """
    check_counts(opts.workers, opts.gpus_per_worker, timeout)
    opts.validate()  # bad input fails here, before any configuration is read
    namespace_default = "default"
    if api_client is None:
        api_client, namespace_default = connect(kubeconfig, context)
    opts = dataclasses.replace(opts, namespace=opts.namespace or namespace_default)
    body = backend.manifest(opts)
    run = JobRun(api_client, backend, body, poll_interval=poll_interval, log_tail=log_tail,
                 output=PrefixedOutput(output), start_timeout=start_timeout,
                 delete_wait=delete_wait, api_outage_timeout=api_outage_timeout,
                 max_restarts=max_restarts)
    owner = launcher_owner(run)
    if owner:
        body["metadata"]["ownerReferences"] = [owner]
    deadline = None if timeout is None else time.monotonic() + timeout
    with terminate_on_signals():
        try:
            submit(run, deadline)
            job = wait(run, deadline)
        except Timeout:
            log.error("%s did not finish within --timeout %gs; deleting it", run.what, timeout)
            run.delete()
            return TIMED_OUT
        except NoStart as exc:
            log.error("%s: no replica ran within --start-timeout %gs; deleting it", run.what,
                      start_timeout)
            gone = run.delete()
            log.error("%s did not start within --start-timeout %gs%s: %s", run.what,
                      start_timeout, ", deleted" if gone else "", exc)
            return FAILED
        except TooManyRestarts as exc:
            run.delete()
            log.error("%s", exc)  # the last line: which pod, its exit code and why
            return FAILED
        except OutOfSight as exc:  # not deleted: the launcher cannot see what it would delete
            log.error("%s", exc)
            return FAILED
        except CreateFailed as exc:
            log.error("%s", exc)
            if run.ours == "no":
                log.error("%s was not created (no try can have made it)", run.what)
            elif run.delete():
                log.error("a try may have created %s: checked, nothing of it is left", run.what)
            else:
                log.error("a try may have created %s, and the launcher could not check: see "
                          "kubectl -n %s get %s %s, delete it with kubectl -n %s delete %s %s",
                          run.what, run.namespace, run.backend.short, run.name, run.namespace,
                          run.backend.short, run.name)
            return FAILED
        except LostTrack as exc:
            gone = run.delete()
            log.error("%s%s", exc, "" if gone else (
                f"; {run.what} may still be running: delete it with kubectl -n {run.namespace} "
                f"delete {run.backend.short} {run.name}"))
            return FAILED
        except Terminated as signal:
            log.error("%s received; deleting %s", signal, run.what)
            run.delete(min(delete_wait, SIGNAL_DELETE_WAIT))
            return signal.status
        except BaseException:
            run.delete()
            raise
    if backend.succeeded(job):
        log.info("%s succeeded", run.what)
        return 0
    report_failure(run, job)
    return FAILED
