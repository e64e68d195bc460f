"""The Kubernetes client of the launcher: :func:`connect`, and :func:`api_errors`, which turns
refusals and unreachable servers into one-line UserErrors that say what to fix.

Also the small readers the lifecycle modules share (API timestamps, one-line messages) and
:data:`log`, the lifecycle's one logger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from typing import Iterator

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError

# One logger for the whole lifecycle, under the name its lines have always carried (the README's
# examples, log queries of existing deployments).
log = logging.getLogger("resnet_imagenet.launch.cluster")

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ApiUnreachable(UserError):
    """The API server could not be reached (refused, DNS, TLS, timeout).

    ``request_sent`` is False when no connection was ever made, so the request cannot have had
    an effect; after a cut or a read timeout it may have.
    """

    def __init__(self, message: str, request_sent: bool, reason: str = ""):
        super().__init__(message)
        self.request_sent = request_sent
        self.reason = reason or message  # the short cause ("[Errno 111] Connection refused")


def connect(kubeconfig: str | None = None, context: str | None = None):
    """An ``ApiClient`` and the default namespace: kubeconfig when named, else in a pod its
    service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            with open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
                namespace = f.read().strip()
        else:
            _check_kubeconfig_files(kubeconfig)
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                active = next(c for c in contexts if c["name"] == context)
            namespace = active.get("context", {}).get("namespace", "")
    except (config.ConfigException, OSError, StopIteration) as exc:
        raise UserError(
            f"no usable Kubernetes configuration ({str(exc).strip() or type(exc).__name__}): "
            "set KUBECONFIG or pass --kubeconfig, or run the launcher in a pod"
        ) from None
    return client.ApiClient(configuration), namespace or "default"


def _check_kubeconfig_files(kubeconfig: str | None) -> None:
    """Name a kubeconfig that is not there (the client only says "No configuration found")."""
    if kubeconfig is not None:
        if not os.path.isfile(kubeconfig):
            raise UserError(f"--kubeconfig {kubeconfig} is not a file: pass the path of a "
                            "kubeconfig (kubectl config view --raw shows yours), or leave the "
                            "flag out to use $KUBECONFIG or ~/.kube/config")
        return
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed and not any(os.path.isfile(os.path.expanduser(p)) for p in listed):
        raise UserError(f"KUBECONFIG={os.environ['KUBECONFIG']} names no existing file: point "
                        "it at a kubeconfig, pass --kubeconfig, or unset it to use "
                        "~/.kube/config")


def server_message(exc: Exception) -> str:
    """One line for an error: an API error's Status message (the client's own ``str`` dumps
    headers and body over many lines), else the error's text."""
    if not hasattr(exc, "body"):
        return str(exc)
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def timestamp(value: str | None) -> dt.datetime | None:
    """An RFC 3339 timestamp of the API (``2026-01-02T03:04:05Z``) as an aware datetime."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def webhook_denial(exc: ApiException) -> bool:
    """A 403 from an admission webhook (it refuses the object), not from RBAC."""
    return exc.status == 403 and "admission webhook" in server_message(exc)


def _connection_reason(reason: Exception) -> str:
    """The last, telling part of urllib3's nested messages ("[Errno 111] Connection refused")."""
    return str(reason).split(": ")[-1].strip() or type(reason).__name__


@contextlib.contextmanager
def api_errors(verb: str, resource: str, namespace: str, host: str,
               rbac: str) -> Iterator[None]:
    """Turn refusals and unreachable servers into one-line UserErrors that say what to fix.

    403 (not a webhook's) names ``verb``, ``resource`` and ``namespace`` and how to grant them
    (``rbac``); 401 and an unreachable ``host`` (:class:`ApiUnreachable`) say what to check.
    """
    try:
        yield
    except ApiException as exc:
        if exc.status == 403 and not webhook_denial(exc):
            raise UserError(
                f"permission denied: the launcher's identity may not {verb} {resource} in "
                f"namespace '{namespace}' (API server: {server_message(exc)}); grant it with "
                f"{rbac} or run the launcher with a "
                "service account bound to that Role"
            ) from None
        if exc.status == 401:
            raise UserError(
                f"the Kubernetes API server at {host} did not accept the launcher's credentials "
                "(401 Unauthorized): refresh the kubeconfig's token or check the service account"
            ) from None
        raise
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ApiUnreachable(
            f"cannot reach the Kubernetes API server at {host}: {_connection_reason(reason)}; "
            "check KUBECONFIG/--kubeconfig (or the pod's network) and that the cluster is up",
            request_sent=not isinstance(reason, urllib3.exceptions.ConnectTimeoutError),
            reason=_connection_reason(reason),
        ) from None


def transient(exc: BaseException) -> bool:
    """Worth another poll: the server is unreachable for now, overloaded, or restarting."""
    status = getattr(exc, "status", None) or 0
    return isinstance(exc, ApiUnreachable) or status == 429 or status >= 500


def may_have_acted(exc: BaseException) -> bool:
    """Whether a request that failed with the transient ``exc`` may still have taken effect: it
    was sent and no answer came back (a cut connection, a read timeout), or the server failed
    while handling it (5xx: a 500 or 504 after etcd's timeout may follow a write that
    persisted). A 429 is refused before the request is handled."""
    if isinstance(exc, ApiUnreachable):
        return exc.request_sent
    return (getattr(exc, "status", None) or 0) >= 500


def short_reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the connection's error, or the status and message."""
    if isinstance(exc, ApiUnreachable):
        return exc.reason
    message = one_line(server_message(exc))
    status = getattr(exc, "status", None)
    return message if not status or message.startswith(str(status)) else f"{status}: {message}"


def duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``1.5 min``: how the outage lines count time."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{round(seconds / 60, 1):g} min"
