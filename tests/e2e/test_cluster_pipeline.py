"""On a real cluster: apply an overlay, check what it grants and serves, run the pipeline.

Not run in CI (skipped without KUBECONFIG); `tests/e2e/run_on_cluster.sh` documents the
settings and runs it. The cluster needs Kubeflow Pipelines and training-operator v1.9, and the
account in KUBECONFIG must be allowed to apply the manifests and to impersonate service
accounts (`kubectl auth can-i --as`). Settings (environment):

  RESNET_E2E_OVERLAY     gke-gpu (default) or generic
  RESNET_E2E_NAMESPACE   namespace to deploy into and run in (default: the overlay's)
  RESNET_E2E_BUCKET      gs://bucket[/prefix] the cluster's identity can write (required)
  RESNET_E2E_GSA         gke-gpu: the Google service account for Workload Identity
  KFP_HOST               Kubeflow Pipelines API endpoint (the pipeline test needs it)
  RESNET_E2E_GPUS        GPUs per TFJob worker (default 1; 0 trains on CPU nodes)
  RESNET_E2E_ACCELERATOR gke-gpu: the node pool's accelerator (default nvidia-l4)

The overlay is applied through a temporary kustomization on top of it that sets only the
namespace, the bucket and the Google service account: the manifests under test are the
repository's own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest
import yaml

from tests.support.manifests import MANIFESTS, kubectl

pytestmark = pytest.mark.e2e

OVERLAY = os.environ.get("RESNET_E2E_OVERLAY", "gke-gpu")
SERVICE_ACCOUNT = "resnet-imagenet"
TENSORBOARD = "resnet-imagenet-tensorboard"


def setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        pytest.fail(f"{name} is not set: see tests/e2e/run_on_cluster.sh")
    return value.rstrip("/")


def run_kubectl(*args: str, input: str | None = None, timeout: float = 300) -> str:
    result = subprocess.run([kubectl(), *args], input=input, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def namespace() -> str:
    overlay = yaml.safe_load((MANIFESTS / "overlays" / OVERLAY / "kustomization.yaml").read_text())
    return os.environ.get("RESNET_E2E_NAMESPACE") or overlay["namespace"]


@pytest.fixture(scope="module")
def logdir() -> str:
    return f"{setting('RESNET_E2E_BUCKET')}/resnet-imagenet/runs"


@pytest.fixture(scope="module")
def applied(tmp_path_factory, namespace, logdir) -> str:
    """`kubectl apply -k` of the overlay, with this cluster's namespace, bucket and identity."""
    work = tmp_path_factory.mktemp("overlay")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [os.path.relpath(MANIFESTS / "overlays" / OVERLAY, work)],
        "configMapGenerator": [{"name": TENSORBOARD, "behavior": "merge",
                                "literals": [f"logdir={logdir}"]}],
    }
    if OVERLAY == "gke-gpu":
        kustomization["patches"] = [{
            "target": {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT},
            "patch": yaml.safe_dump({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": SERVICE_ACCOUNT, "annotations": {
                    "iam.gke.io/gcp-service-account": setting("RESNET_E2E_GSA")}}}),
        }]
    (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    run_kubectl("get", "namespace", namespace)
    run_kubectl("get", "crd", "tfjobs.kubeflow.org")
    run_kubectl("apply", "-k", str(work))
    run_kubectl("-n", namespace, "rollout", "status", f"deployment/{TENSORBOARD}",
                "--timeout=600s", timeout=660)
    return namespace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(applied):
    """http://127.0.0.1:PORT of the TensorBoard Service, through `kubectl port-forward`."""
    port = free_port()
    forward = subprocess.Popen(
        [kubectl(), "-n", applied, "port-forward", f"svc/{TENSORBOARD}", f"{port}:6006"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "Forwarding from" in forward.stdout.readline(), "port-forward did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.load(response)


def test_tensorboard_serves_the_configured_logdir(tensorboard, logdir):
    assert get_json(f"{tensorboard}/data/logdir") == {"logdir": logdir}


@pytest.mark.parametrize("verb, resource, subresource, allowed", [
    ("create", "tfjobs.kubeflow.org", "", True),
    ("patch", "tfjobs.kubeflow.org", "", True),
    ("delete", "tfjobs.kubeflow.org", "", True),
    ("list", "pods", "", True),
    ("watch", "pods", "", False),
    ("get", "pods", "log", True),
    ("delete", "pods", "", False),
    ("create", "deployments.apps", "", False),
    ("get", "secrets", "", False),
    ("update", "tfjobs.kubeflow.org", "status", False),
])
def test_service_account_has_exactly_the_launchers_rights(applied, verb, resource, subresource,
                                                           allowed):
    """Asked of the API server itself, as the service account (impersonation); nothing is
    granted outside the namespace."""
    user = f"system:serviceaccount:{applied}:{SERVICE_ACCOUNT}"
    ask = [kubectl(), "auth", "can-i", verb, resource, f"--subresource={subresource}",
           "--as", user]
    here = subprocess.run([*ask, "-n", applied], capture_output=True, text=True, timeout=60)
    assert here.stdout.strip() == ("yes" if allowed else "no"), here.stderr
    everywhere = subprocess.run([*ask, "--all-namespaces"], capture_output=True, text=True,
                                timeout=60)
    assert everywhere.stdout.strip() == "no", "a right outside the namespace"


def pipeline_arguments(work: str) -> dict:
    """A small run of the real pipeline: the demo dataset, ResNet-18 at 64 px, 2 workers."""
    gpus = int(os.environ.get("RESNET_E2E_GPUS", "1"))
    arguments = {
        "data_raw_uri": f"{work}/raw",
        "data_tfrecord_uri": f"{work}/tfrecords",
        "data_export_uri": f"{work}/export",
        "tfrecord_shards_train": 4, "tfrecord_shards_validation": 2, "tfrecord_tasks": 2,
        "tfrecord_workers_per_task": 2,
        "train_workers": 2, "train_gpus_per_worker": gpus,
        "model_resnet_depth": 18, "model_image_size": 64, "train_batch_size": 32,
        "train_steps": 200, "train_checkpoint_every": 100, "train_timeout_seconds": 3600,
    }
    if OVERLAY == "gke-gpu" and gpus:
        accelerator = os.environ.get("RESNET_E2E_ACCELERATOR", "nvidia-l4")
        arguments["train_gpu_node_selector"] = {"cloud.google.com/gke-accelerator": accelerator}
    return arguments


@pytest.mark.timeout(2 * 3600)
def test_pipeline_runs_and_tensorboard_shows_it(applied, tensorboard, logdir, tmp_path):
    """Demo data in the bucket -> the compiled pipeline, submitted as the UI would run it ->
    SUCCEEDED, a SavedModel in the bucket, and the run's curves in TensorBoard."""
    import kfp

    from compile_pipeline import compile_pipeline
    from pipelines.resnet50_imagenet import Options
    from resnet_imagenet import storage
    from resnet_imagenet.data import sample

    host = setting("KFP_HOST")
    run_name = f"e2e-{uuid.uuid4().hex[:8]}"
    work = f"{setting('RESNET_E2E_BUCKET')}/resnet-imagenet/e2e/{run_name}"
    model_uri = f"{logdir}/{run_name}"
    sample.build(f"{work}/raw", seed=0)
    # Outside GKE the steps and the training pods read the bucket with the overlay's key.
    package = compile_pipeline(str(tmp_path / "pipeline.yaml"), Options(
        bucket_key_secret="resnet-imagenet-gcp-key" if OVERLAY == "generic" else ""))
    client = kfp.Client(host=host, namespace=applied)
    run = client.create_run_from_pipeline_package(
        package, arguments={**pipeline_arguments(work), "data_model_uri": model_uri},
        run_name=run_name, experiment_name="resnet-imagenet-e2e", namespace=applied,
        service_account=SERVICE_ACCOUNT, enable_caching=False)
    finished = client.wait_for_run_completion(run.run_id, timeout=2 * 3600 - 300)
    assert finished.state == "SUCCEEDED", f"run {run.run_id}: {finished.state} {finished.error}"
    assert storage.exists(f"{work}/export/1/saved_model.pb")

    deadline = time.monotonic() + 300  # TensorBoard rescans its logdir every 60 s
    while True:
        runs = get_json(f"{tensorboard}/data/runs")
        if f"{run_name}/logs/train" in runs:
            break
        assert time.monotonic() < deadline, f"{run_name} not in TensorBoard's runs: {runs}"
        time.sleep(15)
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")[f"{run_name}/logs/train"]
    assert tags, "no training scalars"

