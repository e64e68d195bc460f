"""Kubeflow Trainer v2 on the test control plane (tests/support/cluster.py): the JobSet controller
and the Trainer controller manager, built by ``tools/build.sh`` at the versions of
``tools/versions.env``, with their CRDs of the same tags from the Go module cache.

Their webhooks are served for real, on 127.0.0.1, with a serving certificate from the plane's CA,
and registered with the API server exactly as upstream's manifests register them (rendered with
``kubectl kustomize`` from the module's own webhook kustomization; only the Service reference
becomes a loopback URL and the CA bundle ours). Leaving them out would test something no cluster
runs: JobSet's defaulting webhook is what makes each replicated job an Indexed Job with DNS
hostnames (the pod names and TF_CONFIG hang on that), and Trainer's validating webhook is what
refuses a TrainJob whose runtime patches do not fit its runtime. Both controllers' own certificate
management is off (it wants in-cluster Secrets and Services); controller-runtime reads the
certificate from ``$TMPDIR/k8s-webhook-server/serving-certs`` (Trainer) or the configured
``certDir`` (JobSet). Metrics are off; health probes answer on loopback.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from tests.support import cluster as plane_lib

TOOLS = ("jobset", "trainer")
JOBSET_BINARY = "jobset-controller"
TRAINER_BINARY = "trainer-controller-manager"
JOBSET_CRD = "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml"
TRAINER_CRDS = ("manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml",
                "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml",
                "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml")
JOBSET_WEBHOOKS = "config/components/webhook"
TRAINER_WEBHOOKS = "manifests/base/webhook"


def missing_tools() -> list[str]:
    return [name for name in TOOLS if not plane_lib.tool_dir(name).is_dir()]


def sources() -> tuple[Path, Path]:
    """JobSet's and Trainer's source trees at the pinned tags (the Go module cache)."""
    v = plane_lib.versions()
    return (plane_lib.module_dir("sigs.k8s.io/jobset", v["JOBSET_VERSION"]),
            plane_lib.module_dir("github.com/kubeflow/trainer/v2", v["TRAINER_VERSION"]))


def crd_paths(jobset_src: Path, trainer_src: Path) -> list[Path]:
    """JobSet's and Trainer's CRDs. The plane installs them with its own, before
    kube-controller-manager starts, when the Trainer tools are built: a CRD created later is
    known to the garbage collector only after its next discovery resync (every 30 s), and until
    then the JobSet of a deleted TrainJob and its pods would stay."""
    return [jobset_src / JOBSET_CRD] + [trainer_src / p for p in TRAINER_CRDS]


def _serving_cert(plane, directory: Path) -> None:
    """``tls.crt``/``tls.key`` for 127.0.0.1, signed by the plane's CA (which the webhook
    registrations then carry as their caBundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((plane.pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((plane.pki / "ca.key").read_bytes(), None)
    key = plane_lib._new_key()
    cert = plane_lib._issue(key, "trainer-v2-webhooks", issuer=ca, issuer_key=ca_key,
                            server=True, ips=("127.0.0.1",), dns=("localhost",))
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("tls.crt", plane_lib._pem(cert)), ("tls.key", plane_lib._pem(key))):
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)


def _webhook_configurations(plane, kustomization: Path, port: int, prefix: str) -> list[dict]:
    """Upstream's webhook registrations, pointed at ``https://127.0.0.1:port``."""
    import base64

    rendered = plane.kubectl("kustomize", str(kustomization)).stdout
    ca_bundle = base64.b64encode((plane.pki / "ca.crt").read_bytes()).decode()
    out = []
    for obj in yaml.safe_load_all(rendered):
        if not obj or not obj["kind"].endswith("WebhookConfiguration"):
            continue
        obj["metadata"] = {"name": prefix + obj["metadata"]["name"]}
        for hook in obj["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                    "caBundle": ca_bundle}
            hook["timeoutSeconds"] = 10
        out.append(obj)
    assert out, f"no webhook configurations in {kustomization}"
    return out


def _register(plane, configurations: list[dict]) -> None:
    from kubernetes import client

    api = client.AdmissionregistrationV1Api(plane.admin())
    for obj in configurations:
        if obj["kind"] == "MutatingWebhookConfiguration":
            api.create_mutating_webhook_configuration(obj)
        else:
            api.create_validating_webhook_configuration(obj)


def start(plane, timeout: float = plane_lib.STARTUP_TIMEOUT_S) -> None:
    """Add JobSet and Trainer v2 to a started ``plane`` (idempotent per plane)."""
    if "trainer-controller-manager" in plane.components:
        return
    missing = missing_tools()
    if missing:
        raise plane_lib.StartError(
            f"the Trainer v2 binaries are not built yet ({', '.join(missing)}): run "
            "`tools/build.sh jobset trainer` once")
    deadline = time.monotonic() + timeout
    jobset_src, trainer_src = sources()
    apiserver = plane.components["kube-apiserver"]
    # A no-op where the plane installed them at its start.
    plane._install_crds(crd_paths(jobset_src, trainer_src), deadline, apiserver)

    work = plane.workdir / "trainer-v2"
    jobset_certs = work / "jobset-certs"
    trainer_tmp = work / "trainer-tmp"  # controller-runtime: $TMPDIR/k8s-webhook-server/...
    _serving_cert(plane, jobset_certs)
    _serving_cert(plane, trainer_tmp / "k8s-webhook-server" / "serving-certs")
    js_webhook, js_probe, tr_webhook, tr_probe = plane_lib._free_ports(4)
    jobset_config = work / "jobset-config.yaml"
    jobset_config.write_text(yaml.safe_dump({
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"port": js_webhook, "host": "127.0.0.1", "certDir": str(jobset_certs)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{js_probe}"},
    }))
    trainer_config = work / "trainer-config.yaml"
    trainer_config.write_text(yaml.safe_dump({
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "certManagement": {"enable": False},
        "webhook": {"port": tr_webhook, "host": "127.0.0.1"},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{tr_probe}",
                   "readinessEndpointName": "readyz", "livenessEndpointName": "healthz"},
    }))
    kubeconfig = str(plane.kubeconfig)
    jobset = plane._component("jobset-controller", [
        str(plane_lib.tool_dir("jobset") / JOBSET_BINARY), f"--config={jobset_config}",
        f"--kubeconfig={kubeconfig}", "--zap-log-level=info"])
    trainer = plane._component("trainer-controller-manager", [
        str(plane_lib.tool_dir("trainer") / TRAINER_BINARY), f"--config={trainer_config}",
        f"--kubeconfig={kubeconfig}", "--zap-log-level=info"],
        env={"KUBECONFIG": kubeconfig, "TMPDIR": str(trainer_tmp)})
    # Registered once the servers answer, as a Deployment's readiness would gate its Service.
    plane.ready_checks.update({
        "jobset-controller": lambda: plane_lib._http_ok(f"http://127.0.0.1:{js_probe}/readyz"),
        "trainer-controller-manager":
            lambda: plane_lib._http_ok(f"http://127.0.0.1:{tr_probe}/readyz")})
    plane._wait(deadline, jobset, plane.ready_checks["jobset-controller"])
    plane._wait(deadline, trainer, plane.ready_checks["trainer-controller-manager"])
    _register(plane, _webhook_configurations(plane, jobset_src / JOBSET_WEBHOOKS, js_webhook,
                                             "jobset-"))
    _register(plane, _webhook_configurations(plane, trainer_src / TRAINER_WEBHOOKS, tr_webhook,
                                             ""))

