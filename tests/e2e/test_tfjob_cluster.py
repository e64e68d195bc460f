"""The TFJob launcher on a real cluster with training-operator v1.9: a tiny 2-worker training.

Skipped without KUBECONFIG (tests/e2e/conftest.py); not run in CI. No bucket needed: the data
and the model live on a PersistentVolumeClaim that every pod mounts (``--pvc``). On kind, whose
single node makes a ReadWriteOnce volume shareable between pods:

    kind create cluster --name resnet-e2e
    kubectl apply --server-side \\
        -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"
    kubectl -n kubeflow wait --for=condition=Available deployment/training-operator --timeout=300s
    make images                       # builds REGISTRY/resnet-imagenet-trainer:TAG (CPU works)
    kind load docker-image ghcr.io/example/resnet-imagenet-trainer:0.1.0 --name resnet-e2e
    KUBECONFIG=~/.kube/config .venv/bin/python -m pytest -m e2e -v tests/e2e/test_tfjob_cluster.py

Settings (environment): RESNET_E2E_IMAGE, the trainer image (default: the launcher's default
image, what ``make images`` tags); RESNET_E2E_STORAGE_CLASS, for the claim (default: the
cluster's default; on a multi-node cluster pick a ReadWriteMany class and set
RESNET_E2E_ACCESS_MODE=ReadWriteMany). Each run works in a namespace of its own, deleted at the
end. The demo dataset is built and converted on this machine and copied into the claim.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
import uuid

import pytest

from resnet_imagenet import cli
from resnet_imagenet.launch import lifecycle, tfjob
from resnet_imagenet.launch.lifecycle.client import connect
from resnet_imagenet.launch.options import DEFAULT_IMAGE
from tests.support.manifests import kubectl

pytestmark = pytest.mark.e2e

IMAGE = os.environ.get("RESNET_E2E_IMAGE", DEFAULT_IMAGE)
CLAIM = "resnet-e2e-data"
TINY_TRAINING = ["--resnet-size", "18", "--image-size", "32", "--batch-size", "8",
                 "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def api():
    client, _ = connect()
    return client


@pytest.fixture(scope="module")
def namespace(api):
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"resnet-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name, body={"propagationPolicy": "Foreground"})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


@pytest.fixture(scope="module")
def data(api, namespace, demo_raw, tmp_path_factory) -> str:
    """The demo dataset's TFRecords on a claim, at /data/tfrecords in every pod that mounts it."""
    from kubernetes import client

    local = tmp_path_factory.mktemp("e2e") / "tfrecords"
    assert cli.main(["convert", "--raw-dir", demo_raw, "--output-dir", str(local),
                     "--train-shards", "2", "--validation-shards", "2"]) == 0
    core = client.CoreV1Api(api)
    claim = {"metadata": {"name": CLAIM}, "spec": {
        "accessModes": [os.environ.get("RESNET_E2E_ACCESS_MODE", "ReadWriteOnce")],
        "resources": {"requests": {"storage": "1Gi"}}}}
    if os.environ.get("RESNET_E2E_STORAGE_CLASS"):
        claim["spec"]["storageClassName"] = os.environ["RESNET_E2E_STORAGE_CLASS"]
    core.create_namespaced_persistent_volume_claim(namespace, claim)
    holder = {"metadata": {"name": "data-holder"}, "spec": {
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        "containers": [{"name": "hold", "image": IMAGE, "command": ["sleep", "3600"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}]}}
    core.create_namespaced_pod(namespace, holder)
    wait_for(lambda: core.read_namespaced_pod("data-holder", namespace).status.phase == "Running",
             600, "the data holder pod")
    subprocess.run([kubectl(), "-n", namespace, "cp", str(local), "data-holder:/data/tfrecords"],
                   check=True, timeout=300)
    core.delete_namespaced_pod("data-holder", namespace, grace_period_seconds=0)
    return "/data/tfrecords"


def options(namespace: str, name: str, train_steps: int) -> tfjob.TFJobOptions:
    return tfjob.TFJobOptions(
        name=name, namespace=namespace, image=IMAGE, workers=2, pvc=f"{CLAIM}:/data",
        cpu="500m", memory="2Gi", shm_size="256Mi", run_id=name,
        train_args=["--data-dir", "/data/tfrecords", "--model-dir", f"/data/{name}",
                    "--train-steps", str(train_steps), *TINY_TRAINING])


def tfjobs(api, namespace: str) -> list[dict]:
    from kubernetes import client

    return client.CustomObjectsApi(api).list_namespaced_custom_object(
        tfjob.GROUP, tfjob.VERSION, namespace, tfjob.PLURAL)["items"]


def test_two_workers_train_and_a_second_launch_reattaches(api, namespace, data):
    opts = options(namespace, "resnet-e2e-train", train_steps=4)
    output = io.StringIO()
    status = lifecycle.launch(tfjob.BACKEND, opts, api_client=api, timeout=1200,
                              poll_interval=5, output=output)
    assert status == 0, output.getvalue()[-3000:]
    assert "[worker-0] " in output.getvalue()  # the chief's log came through
    (job,) = tfjobs(api, namespace)
    assert any(c["type"] == "Succeeded" and c["status"] == "True"
               for c in job["status"]["conditions"])

    # The same run again (a restarted launcher): the finished TFJob is found, not recreated.
    assert lifecycle.launch(tfjob.BACKEND, opts, api_client=api, timeout=60,
                            poll_interval=5) == 0
    assert [j["metadata"]["uid"] for j in tfjobs(api, namespace)] == [job["metadata"]["uid"]]


def test_timeout_deletes_the_tfjob_and_its_pods(api, namespace, data):
    from kubernetes import client

    opts = options(namespace, "resnet-e2e-timeout", train_steps=1_000_000)
    assert lifecycle.launch(tfjob.BACKEND, opts, api_client=api, timeout=60,
                            poll_interval=5) == 124
    selector = f"{tfjob.JOB_NAME_LABEL}={opts.name}"
    core = client.CoreV1Api(api)
    wait_for(lambda: not any(j["metadata"]["name"] == opts.name for j in tfjobs(api, namespace))
             and not core.list_namespaced_pod(namespace, label_selector=selector).items,
             120, "the TFJob and its pods to be deleted")
