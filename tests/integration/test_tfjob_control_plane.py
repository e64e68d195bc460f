"""What is TFJob-only of the launcher against a real control plane (the life cycle of both
backends: tests/integration/test_launch_cluster.py) (tests/support/cluster.py): kube-apiserver with
the training-operator's CRD and webhook, the operator itself creating pods and Services,
kube-scheduler placing them on kwok's GKE-shaped nodes, kube-controller-manager's garbage
collector, RBAC decided by the real authorizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from resnet_imagenet import cli
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import lifecycle, local, tfjob
from resnet_imagenet.launch.lifecycle.submit import submit
from resnet_imagenet.training import strategy
from tests.support.backends import (TFJOB, apply_overlay, can_i, core, custom, finish,
                                    launching, running_pods, wait_until)
from tests.support.cluster import (ACCELERATOR_LABEL, CPU_POOL, GPU_ACCELERATOR, GPU_POOL,
                                   NODEPOOL_LABEL, REPO)

TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model"]
POLL = 0.1


# --- what the API server accepts --------------------------------------------------------------


def test_the_manifests_examples_are_accepted(control_plane, kube_namespace):
    for path in sorted((REPO / "manifests").rglob("tfjob-example.yaml")):
        body = yaml.safe_load(path.read_text())
        body["metadata"]["namespace"] = kube_namespace
        custom(control_plane).create_namespaced_custom_object(
            tfjob.GROUP, tfjob.VERSION, kube_namespace, tfjob.PLURAL, body, dry_run="All")


@pytest.mark.parametrize("break_it, message", [
    # The CRD's schema (structural: the type of a field).
    (lambda job: job["spec"]["tfReplicaSpecs"]["Worker"].update(replicas="two"),
     "spec.tfReplicaSpecs.Worker.replicas"),
    # The operator's webhook (its rule: a container named tensorflow).
    (lambda job: job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
     .update(name="trainer"), "tensorflow"),
], ids=["crd-schema", "webhook"])
def test_a_malformed_tfjob_is_refused_with_the_servers_message_in_one_line(
        control_plane, kube_namespace, break_it, message):
    body = tfjob.build_tfjob(TFJOB.options(kube_namespace))
    break_it(body)
    run = lifecycle.JobRun(control_plane.admin(), tfjob.BACKEND, body, poll_interval=POLL)
    with pytest.raises(UserError) as refused:
        submit(run)
    text = str(refused.value)
    assert "\n" not in text
    assert text.startswith(f"the API server refused TFJob {kube_namespace}/resnet-test: ")
    assert message in text
    assert TFJOB.get(control_plane.admin(), kube_namespace, "resnet-test") is None


# --- the launcher's life cycle --------------------------------------------------------------------


def test_four_workers_get_the_tf_config_the_local_backend_writes(control_plane, kube_namespace):
    opts = TFJOB.options(kube_namespace, workers=4)
    with launching(TFJOB, control_plane.admin(), opts) as (result, _):
        pods = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 4, timeout=30.0)

        def services():
            return core(control_plane).list_namespaced_service(
                kube_namespace, label_selector=f"{tfjob.JOB_NAME_LABEL}=resnet-test").items

        # The operator creates each worker's Service after its pod: kwok can run all four pods
        # before the last Services exist.
        wait_until(lambda: len(services()) == 4, timeout=30.0, what="four worker Services")
        names = sorted(s.metadata.name for s in services())
        configs = []
        for pod in pods:
            (container,) = pod.spec.containers
            env = {e.name: e.value for e in container.env or []}
            configs.append(strategy.cluster_from_env(env))
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=60) == 0

    assert names == [f"resnet-test-worker-{i}" for i in range(4)]
    local_replicas = local.plan(4, ["train", *TRAIN])
    local_configs = [strategy.cluster_from_env(r.environ()) for r in local_replicas]
    assert [(c.num_workers, c.task_type, c.task_index, c.worker_id, c.is_chief)
            for c in configs] == \
        [(c.num_workers, c.task_type, c.task_index, c.worker_id, c.is_chief)
         for c in local_configs]
    # The operator's addresses: one Service per worker, the TFJob's port.
    assert configs[0].workers == tuple(
        f"resnet-test-worker-{i}.{kube_namespace}.svc:{tfjob.PORT}" for i in range(4))


def test_an_evaluator_is_in_every_replicas_tf_config_and_the_workers_train_with_it(
        control_plane, kube_namespace):
    """training-operator v1.9 names the Evaluator in the cluster of every replica (the workers'
    too): the workers' TF_CONFIG is exactly what the local backend writes, the trainer leaves
    the evaluator out of its cluster, and the evaluator runs `evaluate --watch`."""
    opts = TFJOB.options(kube_namespace, workers=2, evaluator=True)
    with launching(TFJOB, control_plane.admin(), opts) as (result, _):
        running = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 3,
                               timeout=30.0)
        pods = sorted((p for p in running if "-worker-" in p.metadata.name),
                      key=lambda p: p.metadata.name)
        (evaluator,) = [p for p in running if "-evaluator-" in p.metadata.name]
        envs = [{e.name: e.value for e in p.spec.containers[0].env or []}
                for p in pods + [evaluator]]
        finish(control_plane, kube_namespace, [evaluator, *pods])
        assert result.result(timeout=60) == 0

    service = f"{kube_namespace}.svc:{tfjob.PORT}"
    workers = [f"resnet-test-worker-{i}.{service}" for i in range(2)]
    evaluator_address = f"resnet-test-evaluator-0.{service}"
    assert [env["TF_CONFIG"] for env in envs] == [
        local.tf_config(workers, "worker", 0, evaluator_address),
        local.tf_config(workers, "worker", 1, evaluator_address),
        local.tf_config(workers, "evaluator", 0, evaluator_address)]
    assert envs[0]["TF_CONFIG"] == (
        f'{{"cluster":{{"evaluator":["{evaluator_address}"],"worker":["{workers[0]}",'
        f'"{workers[1]}"]}},"task":{{"type":"worker","index":0}},"environment":"cloud"}}')
    clusters = [strategy.cluster_from_env(env) for env in envs[:2]]
    assert [(c.workers, c.worker_id, c.is_chief) for c in clusters] == [
        (tuple(workers), 0, True), (tuple(workers), 1, False)]
    with pytest.raises(UserError, match="makes this process the evaluator"):
        strategy.cluster_from_env(envs[2])  # `train` in the evaluator's pod would be refused
    (container,) = evaluator.spec.containers
    assert [*(container.command or []), *(container.args or [])][:3] == [
        "resnet-imagenet", "evaluate", "--watch"]


# --- RBAC, manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["gke-gpu", "generic"])
def test_overlay_rbac_is_enough_for_the_launcher_and_no_more(
        control_plane, kube_namespace, overlay, tmp_path, caplog):
    apply_overlay(control_plane, overlay, kube_namespace)
    kubeconfig = control_plane.service_account_kubeconfig(
        kube_namespace, "resnet-imagenet", tmp_path / "sa-kubeconfig")

    # End to end as the ServiceAccount itself (its token, not admin).
    as_sa = control_plane.api_client(kubeconfig)
    with launching(TFJOB, as_sa, TFJOB.options(kube_namespace)) as (result, output):
        chief, other = running_pods(control_plane, TFJOB, kube_namespace, "resnet-test", 2,
                                    timeout=30.0)
        control_plane.pod_log(kube_namespace, chief.metadata.name, ["step 1"])
        wait_until(lambda: "[worker-0] step 1" in output.getvalue(), timeout=30.0,
                   what="the chief's log")
        finish(control_plane, kube_namespace, [chief, other])
        assert result.result(timeout=60) == 0
    assert "cannot stream" not in caplog.text

    other_namespace = control_plane.create_namespace(f"{kube_namespace}-other")
    try:
        assert can_i(control_plane, kube_namespace, "create", "tfjobs.kubeflow.org",
                     "-n", kube_namespace) == "yes"
        for args in (["get", "secrets", "-n", kube_namespace],
                     ["create", "tfjobs.kubeflow.org", "-n", other_namespace],
                     ["get", "pods", "-n", other_namespace],
                     ["list", "nodes"], ["list", "namespaces"],
                     ["create", "clusterroles.rbac.authorization.k8s.io"],
                     ["create", "rolebindings.rbac.authorization.k8s.io", "-n", kube_namespace]):
            assert can_i(control_plane, kube_namespace, *args) == "no", args
    finally:
        core(control_plane).delete_namespace(other_namespace)


def test_without_the_rolebinding_the_launcher_names_verb_resource_and_namespace(
        control_plane, kube_namespace, tmp_path, capsys):
    apply_overlay(control_plane, "gke-gpu", kube_namespace)
    client.RbacAuthorizationV1Api(control_plane.admin()).delete_namespaced_role_binding(
        "resnet-imagenet-launcher", kube_namespace)
    kubeconfig = control_plane.service_account_kubeconfig(
        kube_namespace, "resnet-imagenet", tmp_path / "sa-kubeconfig")
    status = cli.main(["launch", "--kubeconfig", kubeconfig, "--poll-interval", str(POLL),
                       "--timeout", "30", "--", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith(
        "error: permission denied: the launcher's identity may not create tfjobs.kubeflow.org "
        f"in namespace '{kube_namespace}' (API server: tfjobs.kubeflow.org is forbidden: User "
        f"\"system:serviceaccount:{kube_namespace}:resnet-imagenet\" cannot create resource "
        f"\"tfjobs\" in API group \"kubeflow.org\" in the namespace \"{kube_namespace}\")")
    assert tfjob.RBAC_MANIFEST in err[0]


def test_tensorboard_runs_on_the_cpu_pool_as_its_service_account(control_plane, kube_namespace):
    apply_overlay(control_plane, "gke-gpu", kube_namespace)

    def scheduled():
        pods = core(control_plane).list_namespaced_pod(
            kube_namespace, label_selector="app.kubernetes.io/name=resnet-imagenet-tensorboard"
        ).items
        return pods if pods and all(p.spec.node_name for p in pods) else None

    (pod,) = wait_until(scheduled, timeout=30.0, what="the TensorBoard pod scheduled")
    node = core(control_plane).read_node(pod.spec.node_name)
    assert node.metadata.labels[NODEPOOL_LABEL] == CPU_POOL
    assert ACCELERATOR_LABEL not in node.metadata.labels
    assert pod.spec.service_account_name == "resnet-imagenet"
    # A GPU node would not take it anyway (its taint), and it asks for no GPU.
    assert "nvidia.com/gpu" not in (pod.spec.containers[0].resources.limits or {})


def test_the_plane_serves_kubectl_through_the_kubeconfig_it_wrote(control_plane):
    nodes = control_plane.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert sorted(nodes) == sorted(
        f"node/gke-test-{pool}-{i}" for pool in (GPU_POOL, CPU_POOL) for i in range(2))
    gpu = core(control_plane).read_node(f"gke-test-{GPU_POOL}-0")
    assert gpu.status.allocatable["nvidia.com/gpu"] == "4"
    assert gpu.metadata.labels[ACCELERATOR_LABEL] == GPU_ACCELERATOR
    assert [(t.key, t.value, t.effect) for t in gpu.spec.taints] == [
        ("nvidia.com/gpu", "present", "NoSchedule")]
    assert Path(control_plane.kubeconfig).is_file()


def test_the_plane_and_the_gcs_emulators_proxy_share_a_session(control_plane, gcs_emulator):
    """The GCS fixture routes HTTPS through its proxy for the test (HTTPS_PROXY); the
    Kubernetes client and kubectl reach 127.0.0.1 directly all the same."""
    assert os.environ["HTTPS_PROXY"] == gcs_emulator.proxy
    assert "127.0.0.1" in os.environ["NO_PROXY"].split(",")
    names = [n.metadata.name for n in client.CoreV1Api(
        control_plane.api_client(control_plane.kubeconfig)).list_node().items]
    assert len(names) == 4
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kubectl")), "--kubeconfig",
         str(control_plane.kubeconfig), "get", "nodes", "-o", "name"],
        capture_output=True, text=True, timeout=60)  # with this process's environment
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 4
