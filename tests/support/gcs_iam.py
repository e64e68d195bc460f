"""An IAM policy in front of the GCS emulator: refuses chosen permissions with GCS's 403.

fake-gcs-server grants everything to everyone. :class:`PolicyProxy` forwards requests to it
unchanged, except those that need a permission the policy withholds on a bucket: those get the
403 JSON error GCS itself sends. google-cloud-storage is pointed at the proxy with
``STORAGE_EMULATOR_HOST``, so the code under test sees a real HTTP refusal, as it would from a
bucket whose IAM lacks the grant. Runs in threads of the test process (google-cloud-storage,
unlike TensorFlow, releases the GIL while it waits).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_OBJECT = re.compile(r"^(?:/download|/upload)?/storage/v1/b/([^/]+)/o(?:/(.+))?$")


def permission(method: str, path: str) -> tuple[str | None, str | None]:
    """``(permission, bucket)`` a JSON-API request needs (None for others, e.g. buckets)."""
    match = _OBJECT.match(urlsplit(path).path)
    if not match:
        return None, None
    bucket, name = match.group(1), match.group(2)
    if method == "POST":
        return "storage.objects.create", bucket
    if method == "DELETE":
        return "storage.objects.delete", bucket
    if method == "GET":
        return ("storage.objects.get" if name else "storage.objects.list"), bucket
    return None, bucket


class PolicyProxy:
    """``with PolicyProxy(emulator) as proxy: proxy.deny(permission, bucket)``; ``proxy.endpoint``."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.denied: set[tuple[str, str]] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                needed, bucket = permission(self.command, self.path)
                if (needed, bucket) in proxy.denied:
                    error = json.dumps({"error": {"code": 403, "message": (
                        f"anonymous caller does not have {needed} access to the Google Cloud "
                        f"Storage bucket {unquote(bucket)}."), "errors": [{
                            "message": "forbidden", "domain": "global", "reason": "forbidden"}]}})
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error.encode())
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "host")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def deny(self, needed: str, bucket: str) -> None:
        self.denied.add((needed, bucket.removeprefix("gs://")))

    def __enter__(self) -> "PolicyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
