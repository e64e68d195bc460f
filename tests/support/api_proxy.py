"""A proxy between the launcher and the test control plane's API server that loses chosen
answers, as a network, a load balancer or an API server stopped mid-request does.

The launcher talks plain HTTP to the proxy (an ``ApiClient`` from :meth:`ApiProxy.api_client`);
the proxy forwards every request, one upstream connection each, over TLS with the admin's
client certificate, and streams the answer back (chunked where the server streams, so the
chief's ``follow`` log flows as it comes). Rules, each for a number of requests:

* :meth:`ApiProxy.lose_answer`: forward the request, read the server's whole answer (so what it
  did is done), then close the client's connection without a byte of it: the client sees the
  connection cut (``RemoteDisconnected``) after sending its request;
* :meth:`ApiProxy.fail`: answer with a ``Status`` (503, or 404: what a look-up gets while the
  create it looks for is still being handled) without forwarding.

Why not a TLS pass-through: the proxy must see the method and path to pick the create, so it
ends TLS itself; the launcher's code is the same over HTTP and HTTPS (urllib3 below the
kubernetes client).
"""

from __future__ import annotations

import http.client
import http.server
import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length", "host", "date",
               "server"}

_STATUSES = {
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    404: ("NotFound", "not found"),
}


@dataclass
class _Rule:
    method: str
    path: str  # the request's path (no query) ends with this
    action: str  # "lose" or an HTTP status to answer with
    times: int

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and \
            urllib.parse.urlsplit(path).path.endswith(self.path)


class ApiProxy:
    def __init__(self, plane):
        target = urllib.parse.urlsplit(plane.server)
        upstream = (target.hostname, target.port)
        context = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))
        context.load_cert_chain(str(plane.pki / "admin.crt"), str(plane.pki / "admin.key"))
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.lost: list[tuple[str, str, int]] = []  # (method, path, status) of lost answers
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                action = proxy._action(self.command, self.path)
                if action not in (None, "lose"):
                    self._answer(int(action))
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPSConnection(*upstream, context=context, timeout=300)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    if action == "lose":
                        response.read()
                        with proxy._lock:
                            proxy.lost.append((self.command, self.path, response.status))
                        self.close_connection = True  # closed without an answer
                        return
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    size = response.getheader("Content-Length")
                    if size is not None:
                        self.send_header("Content-Length", size)
                        self.end_headers()
                        self.wfile.write(response.read())
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while chunk := response.read1(65536):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client went away (a log stream stopped)
                    self.close_connection = True
                finally:
                    conn.close()

            def _answer(self, status: int) -> None:
                reason, message = _STATUSES.get(status, ("InternalError", "an error on the server"))
                data = json.dumps({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": reason, "code": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def lose_answer(self, method: str, path: str, times: int = 1) -> None:
        """Forward the next ``times`` ``method`` requests whose path ends with ``path``, and
        drop the connection instead of passing on the answer."""
        with self._lock:
            self._rules.append(_Rule(method, path, "lose", times))

    def fail(self, method: str, path: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` such requests with ``status`` (503 or 404), not forwarding
        them."""
        with self._lock:
            self._rules.append(_Rule(method, path, str(status), times))

    def _action(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.times -= 1
                    return rule.action
        return None

    def api_client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.endpoint
        return client.ApiClient(configuration)

    def __enter__(self) -> "ApiProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
