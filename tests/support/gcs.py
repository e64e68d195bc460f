"""pytest plugin: a GCS emulator reached by TensorFlow's ``gs://`` and by google-cloud-storage.

Fixtures:

* ``gcs_server`` (session): starts ``gcs_emulator.py`` in its own process (fake-gcs-server on
  127.0.0.1 plus the TLS-terminating HTTPS CONNECT proxy in front of it; see that module for why
  and how), once per test session (per xdist worker). It changes no environment variable: a
  ``pip`` or any other process a test starts the ordinary way never tunnels to the emulator.
* ``gcs_emulator`` (function): that emulator, with its routing (:meth:`GcsEmulator.env`) in
  ``os.environ`` for the one test that asks for it (``monkeypatch``), so that TensorFlow in the
  test process and every process the test spawns (CLI runs, training workers) reach it:

  - ``STORAGE_EMULATOR_HOST``: google-cloud-storage uses the emulator's plain-HTTP endpoint;
  - ``HTTPS_PROXY``: TensorFlow's libcurl sends ``CONNECT www.googleapis.com:443`` (and
    ``storage.googleapis.com:443``) to the proxy, which serves those and refuses everything else;
  - ``CURL_CA_BUNDLE``: TensorFlow's libcurl trusts the test CA that signed the proxy's certificate;
  - ``NO_PROXY``: 127.0.0.1 and localhost are reached directly (the emulator endpoint, and the
    upload session URLs it hands out);
  - ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (TensorFlow's bearer token: no auth traffic),
    ``NO_GCE_CHECK`` (no probe of the GCE metadata server) and, unless already set, short
    ``GCS_RETRY_CONFIG_*`` (a broken emulator fails in seconds, not minutes).

  TensorFlow reads the proxy and CA variables for every request and its token and retry policy
  when a process first touches ``gs://``, which in a test process is inside such a test.
  Give a subprocess started outside such a test ``env={**os.environ, **emulator.env()}``.
* ``gcs_bucket`` (function): a fresh, uniquely named bucket, as ``"gs://<bucket>"``, with the
  routing of ``gcs_emulator``. Buckets live in the emulator's memory and go with it at the end
  of the session.

:func:`gcs_client` returns a google-cloud-storage client for the emulator (anonymous credentials),
to set up or inspect objects independently of TensorFlow; given a ``gcs_server`` it needs no
environment, so module-scoped fixtures can fill buckets.

Tests that use these fixtures are marked ``gcs`` automatically (``-m "not gcs"`` skips them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

EMULATOR_SCRIPT = Path(__file__).with_name("gcs_emulator.py")
STARTUP_TIMEOUT_S = 30

# Part of the routing: who TensorFlow and google-auth are, without any auth traffic.
_AUTH_ENV = {
    # TensorFlow: the bearer token to send. Checked before any credential file or the GCE
    # metadata server, and then cached for the life of the process, so no auth traffic ever.
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
    # TensorFlow and google-auth: never probe the GCE metadata server (169.254.169.254).
    "NO_GCE_CHECK": "true",
}
# Defaults only (a developer may override them): TensorFlow retries failed GCS requests 10 times
# with exponential backoff, which turns a broken emulator into minutes of silence per call.
_RETRY_ENV_DEFAULTS = {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
    "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
    "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
}
_LOOPBACK_NAMES = ("127.0.0.1", "localhost")
# The environment before any fixture ran: what every test and child must see outside a
# ``gcs_emulator`` test (tests compare against it; the machine may set CA variables of its own).
ENV_AT_START = dict(os.environ)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"gcs_server", "gcs_emulator"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gcs)


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: where it listens and the environment that routes clients to it."""

    endpoint: str  # http://127.0.0.1:PORT, for STORAGE_EMULATOR_HOST
    proxy: str  # http://127.0.0.1:PORT, for HTTPS_PROXY
    ca_file: str  # PEM of the test CA
    log_file: str  # the emulator process's stderr: refused CONNECTs, fake-gcs-server errors
    pid: int  # the emulator process (proxy, and parent of fake-gcs-server)
    server_pid: int  # fake-gcs-server

    def env(self) -> dict[str, str]:
        """The variables to set on top of ``os.environ`` for a process to use this emulator."""
        inherited = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
        no_proxy = [host for host in inherited.split(",") if host.strip()]
        no_proxy += [host for host in _LOOPBACK_NAMES if host not in no_proxy]
        no_proxy_value = ",".join(no_proxy)
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # libcurl and requests read the lower-case names first; set both spellings.
            "HTTPS_PROXY": self.proxy,
            "https_proxy": self.proxy,
            "NO_PROXY": no_proxy_value,
            "no_proxy": no_proxy_value,
            "CURL_CA_BUNDLE": self.ca_file,
            **_AUTH_ENV,
            **{name: os.environ.get(name, value) for name, value in _RETRY_ENV_DEFAULTS.items()},
        }


def start_emulator(workdir: Path) -> tuple[subprocess.Popen, GcsEmulator]:
    """Make a test CA and a certificate for the Google storage hosts; start the emulator process.

    The process runs until its stdin is closed (see :func:`stop_emulator`), or this process dies.
    """
    import trustme

    from tests.support.gcs_emulator import GOOGLE_STORAGE_HOSTS

    ca = trustme.CA()
    ca_file, tls_pem, log_file = workdir / "ca.pem", workdir / "tls.pem", workdir / "emulator.log"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert(*sorted(GOOGLE_STORAGE_HOSTS)).private_key_and_cert_chain_pem.write_to_path(
        str(tls_pem)
    )
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(EMULATOR_SCRIPT), "--tls-pem", str(tls_pem)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            # Not in the terminal's process group: a Ctrl-C interrupts the tests, whose teardown
            # then stops the emulator, instead of the emulator vanishing under them.
            start_new_session=True,
        )
    try:
        ready = json.loads(_ready_line(proc, STARTUP_TIMEOUT_S))
    except (RuntimeError, ValueError) as exc:
        stop_emulator(proc)
        raise RuntimeError(f"GCS emulator failed to start: {exc}\n{log_file.read_text()}") from None
    return proc, GcsEmulator(
        endpoint=f"http://127.0.0.1:{ready['http_port']}",
        proxy=f"http://127.0.0.1:{ready['proxy_port']}",
        ca_file=str(ca_file),
        log_file=str(log_file),
        pid=proc.pid,
        server_pid=ready["emulator_pid"],
    )


def _ready_line(proc: subprocess.Popen, timeout: float) -> bytes:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"no ready line within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the emulator process exited with status {proc.wait()}")
    return line


def stop_emulator(proc: subprocess.Popen) -> None:
    """Close the process's stdin, which makes it stop fake-gcs-server and exit; kill it if stuck."""
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    proc, emulator = start_emulator(tmp_path_factory.mktemp("gcs-emulator"))
    try:
        yield emulator
    finally:
        stop_emulator(proc)


@pytest.fixture
def gcs_emulator(gcs_server: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    for name, value in gcs_server.env().items():
        monkeypatch.setenv(name, value)
    return gcs_server


def gcs_client(emulator: GcsEmulator | None = None):
    """A google-cloud-storage client for the emulator, with anonymous credentials.

    ``emulator``: the one to reach (a ``gcs_server``); without it, the one that
    ``STORAGE_EMULATOR_HOST`` names (inside a test that uses ``gcs_emulator``).
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    endpoint = emulator.endpoint if emulator else os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint:
        raise RuntimeError("gcs_client() needs the emulator: pass gcs_server, or request the "
                           "gcs_emulator fixture")
    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_client(gcs_emulator).create_bucket(name)
    return f"gs://{name}"
