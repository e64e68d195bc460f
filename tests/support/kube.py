"""A Kubernetes API server in miniature on 127.0.0.1, for the launcher's tests.

It answers the requests the launcher makes the way the real API server does (status codes,
``Status`` bodies with the real messages, server-set ``uid``/``resourceVersion``/
``creationTimestamp``), so the real ``kubernetes`` client talks to it over HTTP, unchanged:

* ``tfjobs.kubeflow.org/v1``: create, get, list, patch (JSON merge patch) and delete (the
  ``DeleteOptions`` body is recorded; pods the TFJob owns are garbage-collected with it);
* ``pods``: get, list (equality label selectors);
* ``pods/log``: ``container``, ``follow`` (a chunked stream that ends when the container does),
  ``timestamps`` (RFC 3339 with trailing zeros trimmed, as the kubelet writes them),
  ``tailLines``, ``sinceSeconds``, ``previous``.

Tests play the training operator and the kubelet with the methods below, which change the stored
objects directly: conditions, pods, container states, log lines. :meth:`FakeKubernetes.deny`
makes a verb on a resource answer 403. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

USER = "system:serviceaccount:kubeflow:pipeline-runner"
GROUPS = {"tfjobs": "kubeflow.org", "pods": ""}
KINDS = {"tfjobs": "TFJob", "pods": "Pod"}
_ROUTES = [
    ("tfjobs", re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/tfjobs(?:/([^/]+))?$")),
    ("pods", re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/log)?)?$")),
]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: object


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339_nano(moment: dt.datetime) -> str:
    """Go's time.RFC3339Nano: nanoseconds with trailing zeros (and a bare dot) trimmed."""
    fraction = f"{moment.microsecond * 1000:09d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _true(query: dict, key: str) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (the client sends "True")."""
    return query.get(key) in ("1", "t", "T", "TRUE", "true", "True")


def _selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status = _status(code, reason, message, details)


class FakeKubernetes:
    """The API server (started by :meth:`start`) and the store it serves."""

    def __init__(self, user: str = USER):
        self.user = user
        self.requests: list[Request] = []
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._logs: dict[str, list[tuple[dt.datetime, str]]] = {}  # containerID -> lines
        self._denied: set[tuple[str, str]] = set()
        self._outages: dict[tuple[str, str], int] = {}  # (method, plural) -> requests to fail
        self._cond = threading.Condition()
        self._version = 0
        self._stopping = False
        self._cuts = 0  # bumped to end every log stream, as a flaky network or proxy would
        self._server: ThreadingHTTPServer | None = None

    # -- the server --

    def start(self) -> "FakeKubernetes":
        fake = self

        class Handler(_Handler):
            api = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-kubernetes", daemon=True).start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def api_client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def write_kubeconfig(self, path, namespace: str = "default") -> str:
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        }))
        return str(path)

    # -- what the tests ask and do (the operator's and the kubelet's part) --

    def deny(self, verb: str, resource: str) -> None:
        """Answer ``verb`` on ``resource`` ("tfjobs", "pods", "pods/log") with 403 Forbidden."""
        self._denied.add((verb, resource))

    def outage(self, method: str, plural: str, requests: int) -> None:
        """Answer the next ``requests`` ``method`` requests on ``plural`` with 503, as an API
        server does while it restarts or its etcd is unavailable."""
        with self._cond:
            self._outages[(method, plural)] = requests

    def requests_to(self, method: str, plural: str = "tfjobs") -> list[Request]:
        return [r for r in self.requests if r.method == method and f"/{plural}" in r.path]

    def tfjob(self, namespace: str, name: str) -> dict | None:
        with self._cond:
            obj = self._objects.get(("tfjobs", namespace, name))
            return copy.deepcopy(obj)

    def wait_for_tfjob(self, namespace: str, timeout: float = 10.0) -> dict:
        """The first TFJob that appears in ``namespace``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [o for (plural, ns, _), o in self._objects.items()
                         if plural == "tfjobs" and ns == namespace]
                if found:
                    return copy.deepcopy(found[0])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no TFJob was created in namespace {namespace}")
                self._cond.wait(remaining)

    def put_tfjob(self, body: dict) -> dict:
        """Store a TFJob as if an earlier launcher had created it."""
        with self._cond:
            return copy.deepcopy(self._create("tfjobs", body["metadata"]["namespace"], body))

    def set_condition(self, namespace: str, name: str, ctype: str, reason: str = "",
                      message: str = "") -> None:
        """What the operator does on a transition: the new condition True, Running False at the
        end, the replica counts updated."""
        with self._cond:
            job = self._objects[("tfjobs", namespace, name)]
            status = job.setdefault("status", {})
            now = _rfc3339(_now())
            conditions = status.setdefault("conditions", [])
            if ctype in ("Succeeded", "Failed"):
                for cond in conditions:
                    if cond["type"] == "Running":
                        cond["status"] = "False"
                status["completionTime"] = now
            conditions.append({
                "type": ctype, "status": "True", "reason": reason or f"TFJob{ctype}",
                "message": message or f"TFJob {namespace}/{name} is {ctype.lower()}.",
                "lastUpdateTime": now, "lastTransitionTime": now})
            status["replicaStatuses"] = {"Worker": self._replica_counts(namespace, name)}
            self._touch(job)

    def start_pod(self, namespace: str, job_name: str, index: int = 0,
                  replica_type: str = "worker") -> str:
        """Create (or, as the operator does for restartPolicy ExitCode, recreate) a replica's pod
        with its ``tensorflow`` container running."""
        name = f"{job_name}-{replica_type}-{index}"
        with self._cond:
            job = self._objects[("tfjobs", namespace, job_name)]
            self._objects.pop(("pods", namespace, name), None)
            container_id = f"containerd://{uuid.uuid4().hex}"
            self._logs[container_id] = []
            self._create("pods", namespace, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": namespace,
                    "labels": {"training.kubeflow.org/job-name": job_name,
                               "training.kubeflow.org/operator-name": "tfjob-controller",
                               "training.kubeflow.org/replica-type": replica_type,
                               "training.kubeflow.org/replica-index": str(index)},
                    "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "TFJob",
                                         "name": job_name, "uid": job["metadata"]["uid"],
                                         "controller": True, "blockOwnerDeletion": True}],
                },
                "spec": {"containers": [{"name": "tensorflow", "image": "trainer:test"}]},
                "status": {"phase": "Running", "containerStatuses": [{
                    "name": "tensorflow", "image": "trainer:test", "imageID": "trainer@sha256:0",
                    "containerID": container_id, "ready": True, "restartCount": 0,
                    "state": {"running": {"startedAt": _rfc3339(_now())}},
                }]},
            })
        return name

    def log(self, namespace: str, pod: str, *lines: str) -> None:
        """The pod's ``tensorflow`` container writes ``lines`` at once; the runtime stamps every
        line of one write alike."""
        with self._cond:
            status = self._container(namespace, pod)
            moment = _now()
            self._logs[status["containerID"]].extend((moment, line) for line in lines)
            self._cond.notify_all()

    def cut_log_streams(self) -> None:
        """End every open log stream early, while the containers keep running."""
        with self._cond:
            self._cuts += 1
            self._cond.notify_all()

    def terminate(self, namespace: str, pod: str, exit_code: int, reason: str = "") -> None:
        """The pod's ``tensorflow`` container exits with ``exit_code``."""
        with self._cond:
            status = self._container(namespace, pod)
            status["state"] = {"terminated": {
                "exitCode": exit_code, "reason": reason or ("Error" if exit_code else "Completed"),
                "containerID": status["containerID"], "finishedAt": _rfc3339(_now())}}
            status["ready"] = False
            pod_obj = self._objects[("pods", namespace, pod)]
            pod_obj["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            self._touch(pod_obj)

    # -- the store; callers hold self._cond --

    def _touch(self, obj: dict) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._cond.notify_all()

    def _create(self, plural: str, namespace: str, body: dict) -> dict:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{KINDS[plural]} \"\" is invalid: metadata.name: "
                           "Required value: name or generateName is required")
        if (plural, namespace, name) in self._objects:
            raise ApiError(409, "AlreadyExists", f"{self._resource(plural)} \"{name}\" already "
                           "exists", {"name": name, "group": GROUPS[plural], "kind": plural})
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                    creationTimestamp=_rfc3339(_now()))
        self._objects[(plural, namespace, name)] = obj
        self._touch(obj)
        return obj

    def _container(self, namespace: str, pod: str) -> dict:
        return self._objects[("pods", namespace, pod)]["status"]["containerStatuses"][0]

    def _replica_counts(self, namespace: str, job_name: str) -> dict:
        counts = {"active": 0, "succeeded": 0, "failed": 0}
        for (plural, ns, _), pod in self._objects.items():
            if plural == "pods" and ns == namespace and \
                    pod["metadata"]["labels"]["training.kubeflow.org/job-name"] == job_name:
                phase = pod["status"]["phase"]
                counts[{"Running": "active", "Succeeded": "succeeded"}.get(phase, "failed")] += 1
        return counts

    @staticmethod
    def _resource(plural: str) -> str:
        return f"{plural}.{GROUPS[plural]}" if GROUPS[plural] else plural

    def _check_access(self, verb: str, plural: str, namespace: str, name: str | None,
                      subresource: str = "") -> None:
        resource = plural + (f"/{subresource}" if subresource else "")
        if (verb, resource) in self._denied:
            what = self._resource(plural) + (f" \"{name}\"" if name else "")
            raise ApiError(403, "Forbidden", (
                f"{what} is forbidden: User \"{self.user}\" cannot {verb} resource \"{resource}\" "
                f"in API group \"{GROUPS[plural]}\" in the namespace \"{namespace}\""),
                {"name": name or "", "group": GROUPS[plural], "kind": plural})

    def _not_found(self, plural: str, name: str) -> ApiError:
        return ApiError(404, "NotFound", f"{self._resource(plural)} \"{name}\" not found",
                        {"name": name, "group": GROUPS[plural], "kind": plural})

    def handle(self, method: str, plural: str, namespace: str, name: str | None,
               query: dict, body, content_type: str) -> tuple[int, dict]:
        """One non-streaming request: (HTTP status, JSON body)."""
        if name:
            verb = {"GET": "get", "PATCH": "patch", "DELETE": "delete"}.get(method)
        else:
            verb = {"GET": "list", "POST": "create"}.get(method)
        if verb is None or (plural == "pods" and verb not in ("get", "list")):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        if _true(query, "watch"):
            raise ApiError(405, "MethodNotAllowed", "watch is not served by this fake")
        self._check_access(verb, plural, namespace, name)
        with self._cond:
            if self._outages.get((method, plural)):
                self._outages[(method, plural)] -= 1
                raise ApiError(503, "ServiceUnavailable", "the server is currently unable to "
                               "handle the request")
            if verb == "create":
                return 201, copy.deepcopy(self._create(plural, namespace, body))
            if verb == "list":
                items = [copy.deepcopy(o) for (p, ns, _), o in sorted(self._objects.items())
                         if p == plural and ns == namespace
                         and _selected(o, query.get("labelSelector", ""))]
                return 200, {"kind": f"{KINDS[plural]}List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": str(self._version)}, "items": items}
            obj = self._objects.get((plural, namespace, name))
            if obj is None:
                raise self._not_found(plural, name)
            if verb == "get":
                return 200, copy.deepcopy(obj)
            if verb == "patch":
                if content_type != "application/merge-patch+json":
                    raise ApiError(415, "UnsupportedMediaType", "the body of the request was "
                                   f"in an unknown format: {content_type}")
                patched = _merge_patch(obj, body)
                self._objects[(plural, namespace, name)] = patched
                self._touch(patched)
                return 200, copy.deepcopy(patched)
            # delete: the garbage collector removes what the object owns
            del self._objects[(plural, namespace, name)]
            uid = obj["metadata"]["uid"]
            for key, other in list(self._objects.items()):
                owners = other["metadata"].get("ownerReferences", [])
                if any(ref.get("uid") == uid for ref in owners):
                    del self._objects[key]
            self._cond.notify_all()
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": GROUPS[plural], "kind": plural,
                                     "uid": uid}}

    def log_lines(self, namespace: str, pod: str, query: dict):
        """The ``pods/log`` request: an iterator of text lines, following the container when
        asked to (it then ends when the container terminates, the pod goes, or the server
        stops)."""
        self._check_access("get", "pods", namespace, pod, "log")
        with self._cond:
            obj = self._objects.get(("pods", namespace, pod))
            if obj is None:
                raise self._not_found("pods", pod)
            status = obj["status"]["containerStatuses"][0]
            if query.get("container", "tensorflow") != status["name"]:
                raise ApiError(400, "BadRequest", f"container {query['container']} is not valid "
                               f"for pod {pod}")
            if _true(query, "previous"):
                last = (status.get("lastState") or {}).get("terminated")
                if not last:
                    raise ApiError(400, "BadRequest", f"previous terminated container "
                                   f"\"tensorflow\" in pod \"{pod}\" not found")
                container_id = last["containerID"]
            else:
                container_id = status["containerID"]
            lines = list(self._logs[container_id])
            cuts = self._cuts
        sent = len(lines)
        if "sinceSeconds" in query:
            since = _now() - dt.timedelta(seconds=int(query["sinceSeconds"]))
            lines = [line for line in lines if line[0] >= since]
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) else []
        return self._follow(namespace, pod, container_id, lines, sent, cuts,
                            _true(query, "follow"), _true(query, "timestamps"))

    def _follow(self, namespace, pod, container_id, lines, sent, cuts, follow, stamps):
        while True:
            for moment, text in lines:
                yield f"{_rfc3339_nano(moment)} {text}" if stamps else text
            if not follow:
                return
            with self._cond:
                while True:
                    logged = self._logs[container_id]
                    obj = self._objects.get(("pods", namespace, pod))
                    current = obj and obj["status"]["containerStatuses"][0]
                    ended = (self._stopping or self._cuts != cuts or not current
                             or current["containerID"] != container_id
                             or "terminated" in current["state"])
                    if len(logged) > sent or ended:
                        break
                    self._cond.wait(0.5)
                lines, sent = logged[sent:], len(logged)
            if ended and not lines:
                return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeKubernetes

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.api.requests.append(Request(self.command, url.path, query, body))
        try:
            for plural, pattern in _ROUTES:
                match = pattern.match(url.path)
                if match:
                    break
            else:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            namespace, name = match.group(1), match.group(2)
            if plural == "pods" and match.group(3):
                if self.command != "GET":
                    raise ApiError(405, "MethodNotAllowed", f"{self.command} pods/log")
                self._stream(self.api.log_lines(namespace, name, query))
                return
            content_type = (self.headers.get("Content-Type") or "").split(";")[0]
            self._reply(*self.api.handle(self.command, plural, namespace, name, query, body,
                                         content_type))
        except ApiError as exc:
            self._reply(exc.status["code"], exc.status)

    def _stream(self, lines) -> None:
        """Send log lines as they come, chunked, as the API server relays the kubelet's."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for line in lines:
                self._chunk(line)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunk(self, line: str) -> None:
        data = (line + "\n").encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PATCH = do_DELETE = _serve


@pytest.fixture
def kube():
    """A running :class:`FakeKubernetes`."""
    fake = FakeKubernetes().start()
    yield fake
    fake.stop()
