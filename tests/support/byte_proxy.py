"""A plain-HTTP proxy in front of the GCS emulator that counts the bytes of each object read.

One per process under test (its ``STORAGE_EMULATOR_HOST``), so the counts are per process:

    with ByteCountingProxy(gcs_server.endpoint) as proxy:
        env = {..., "STORAGE_EMULATOR_HOST": proxy.endpoint}
        ...
        proxy.read_bytes("raw/ILSVRC2012_img_train.tar")   # body bytes of its media downloads

Requests are forwarded one by one (HTTP/1.1 keep-alive towards the client, a fresh connection
to the emulator per request); what is counted is the body of every ``alt=media`` GET answered
2xx, by object name. Upload session URLs the emulator hands out point at the emulator itself,
so large (resumable) uploads bypass the proxy: only reads are counted here.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import threading
import urllib.parse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length"}


def _object_of(path: str) -> str | None:
    """The object name of a media download (``.../b/<bucket>/o/<object>?alt=media``)."""
    parsed = urllib.parse.urlsplit(path)
    if "alt=media" not in parsed.query or "/o/" not in parsed.path:
        return None
    return urllib.parse.unquote(parsed.path.split("/o/", 1)[1])


class ByteCountingProxy:
    def __init__(self, upstream: str):
        target = urllib.parse.urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.counts: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                name = _object_of(self.path) if self.command == "GET" else None
                if name is not None and 200 <= response.status < 300:
                    with proxy._lock:
                        proxy.counts[name] += len(data)
                        proxy.requests[name] += 1
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def read_bytes(self, name: str) -> int:
        with self._lock:
            return self.counts[name]

    def __enter__(self) -> "ByteCountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
