"""One launcher contract, both cluster backends, on the real control plane (tests/support/
cluster.py): a TFJob run by training-operator v1.9, and a TrainJob run by Kubeflow Trainer v2.3 on
JobSet v0.12 (tests/support/trainer_v2.py), with kube-scheduler placing the pods on kwok's
GKE-shaped nodes, kube-controller-manager's Job controller and garbage collector, and RBAC
decided by the real authorizer. Each test runs for ``tfjob`` and ``trainjob`` alike: accepted by
the API server; success, failure (pod and reason in the last line), timeout, SIGTERM, re-attach,
garbage collection with the launcher's pod; the ServiceAccount's rights. The TrainJob's TF_CONFIG
is built from the environment and hostnames read off the real pods."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from kubernetes import client

from resnet_imagenet import cli
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import lifecycle, local, options, trainjob
from resnet_imagenet.launch.lifecycle.submit import launcher_owner, submit
from resnet_imagenet.training import strategy
from tests.support.backends import (TFJOB, TRAINJOB, apply, can_i, core, custom, finish, gone,
                                    launching, render_overlay, running_pods, wait_until)
from tests.support.cluster import GPU_ACCELERATOR, GPU_POOL, NODEPOOL_LABEL

POLL = 0.1
TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model"]


def assert_kept(sent, kept, path: str) -> None:
    """``kept`` holds everything in ``sent``, unchanged (and may hold more keys)."""
    if isinstance(sent, dict):
        assert isinstance(kept, dict), path
        for key, value in sent.items():
            assert key in kept, f"{path}.{key} was dropped"
            assert_kept(value, kept[key], f"{path}.{key}")
    elif isinstance(sent, list):
        assert isinstance(kept, list) and len(kept) == len(sent), path
        for index, (a, b) in enumerate(zip(sent, kept)):
            assert_kept(a, b, f"{path}[{index}]")
    else:
        assert kept == sent, f"{path}: {sent!r} became {kept!r}"


# --- what the API server accepts --------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    {"workers": 4, "gpus_per_worker": 1, "accelerator": GPU_ACCELERATOR},
    {"workers": 2, "gpus_per_worker": 2, "evaluator": True, "accelerator": GPU_ACCELERATOR,
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training",
                      "effect": "NoSchedule"}],
     "node_selector": {NODEPOOL_LABEL: GPU_POOL}},
    {"service_account": "trainer", "gcs_secret": "gcp-key", "env": {"TF_CPP_MIN_LOG_LEVEL": "1"},
     "active_deadline_seconds": 3600, "run_id": "run-1/task-2", "shm_size": "8Gi"},
    {"pvc": "imagenet:/data", "train_args": ["--data-dir", "/data/tfrecords",
                                             "--model-dir", "/data/model"],
     "image": "registry.example/trainer@sha256:" + "0" * 64},
], ids=["default", "gpu-pool", "gpus-evaluator-selector-tolerations", "credentials",
        "pvc-digest"])
def test_every_job_the_launcher_makes_is_accepted_by_the_real_api_server(
        control_plane, kube_namespace, backend, overrides):
    body = backend.build(backend.options(kube_namespace, **overrides))
    accepted = client.CustomObjectsApi(control_plane.admin()).create_namespaced_custom_object(
        backend.cluster.group, backend.cluster.version, kube_namespace, backend.cluster.plural,
        body, dry_run="All", field_validation="Strict")
    # Nothing pruned or changed: every field the launcher sent is kept as sent (the server only
    # adds its defaults, and Trainer the time it admitted each runtime patch).
    assert_kept(body["spec"], accepted["spec"], "spec")
    assert accepted["metadata"]["annotations"] == body["metadata"]["annotations"]


def test_a_field_the_clusters_crd_does_not_know_is_refused_not_dropped(
        control_plane, kube_namespace, backend):
    """What an older operator or Trainer (Trainer v2.1 has no spec.runtimePatches) would do with
    a field it does not know: with fieldValidation=Strict the API server refuses it, in one line
    that says what to upgrade, instead of dropping it and running something else."""
    body = backend.build(backend.options(kube_namespace))
    body["spec"]["fromTheFuture"] = {"enabled": True}
    with pytest.raises(UserError) as refused:
        submit(lifecycle.JobRun(control_plane.admin(), backend.cluster, body, poll_interval=POLL))
    text = str(refused.value)
    assert "\n" not in text
    assert text.startswith(f"the API server refused {backend.cluster.kind} "
                           f"{kube_namespace}/resnet-test: ")
    assert 'unknown field "spec.fromTheFuture"' in text
    assert text.endswith("the cluster's CRD is older: upgrade it, or use the other --backend")
    assert backend.get(control_plane.admin(), kube_namespace, "resnet-test") is None


def test_a_trainjob_without_its_runtime_is_refused_in_one_line(control_plane, kube_namespace):
    """Trainer's webhook refuses a TrainJob whose runtime is not in the namespace: the line says
    so (nothing is created)."""
    # The runtime never exists here: a runtime deleted just before the launch can still be in
    # the webhook's informer cache, which then admits the TrainJob (seen once in CI).
    TRAINJOB.prepare(control_plane, kube_namespace, without=frozenset({trainjob.RUNTIME}))
    with pytest.raises(UserError) as refused:
        TRAINJOB.launch(TRAINJOB.options(kube_namespace), api_client=control_plane.admin(),
                        poll_interval=POLL, timeout=30)
    text = str(refused.value)
    assert "\n" not in text
    assert text.startswith(f"the API server refused TrainJob {kube_namespace}/resnet-test: ")
    assert "specified trainingRuntime must be created before the TrainJob is created" in text
    assert TRAINJOB.get(control_plane.admin(), kube_namespace, "resnet-test") is None


# --- TF_CONFIG --------------------------------------------------------------------------------


def resolved_env(pod) -> dict[str, str]:
    """The pod's training container's environment as the kubelet would resolve it: literal
    values, and Downward-API references to the pod's own labels and annotations."""
    (container,) = [c for c in pod.spec.containers if c.name == trainjob.NODE]
    sources = {"metadata.labels": pod.metadata.labels or {},
               "metadata.annotations": pod.metadata.annotations or {}}
    env = {}
    for var in container.env or []:
        if var.value_from is None:
            env[var.name] = var.value
            continue
        path = var.value_from.field_ref.field_path  # metadata.labels['key']
        field, _, key = path.partition("['")
        env[var.name] = sources[field][key.rstrip("']")]
    return env


def test_trainjob_pods_get_the_tf_config_the_local_backend_writes(control_plane, kube_namespace):
    """Read off the real pods: JobSet's labels, the Job controller's completion index, the
    hostnames and subdomain JobSet gives them and its headless Service. The trainer's function
    builds from them a TF_CONFIG naming exactly those hosts, the local backend's shape."""
    TRAINJOB.prepare(control_plane, kube_namespace)
    opts = TRAINJOB.options(kube_namespace, workers=4)
    with launching(TRAINJOB, control_plane.admin(), opts) as (result, _):
        pods = running_pods(control_plane, TRAINJOB, kube_namespace, "resnet-test", 4)
        services = core(control_plane).list_namespaced_service(kube_namespace).items
        envs = [resolved_env(pod) for pod in pods]
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=90) == 0

    configs = [json.loads(strategy.tf_config_from_jobset(env)) for env in envs]
    hosts = [f"{pod.spec.hostname}.{pod.spec.subdomain}" for pod in pods]
    assert hosts == [f"resnet-test-node-0-{i}.resnet-test" for i in range(4)]
    for index, config in enumerate(configs):
        assert config["cluster"]["worker"] == [f"{host}:{strategy.PORT}" for host in hosts]
        assert config["task"] == {"type": "worker", "index": index}
    # JobSet's headless Service, named after it, is the pods' subdomain.
    (service,) = [s for s in services if s.metadata.name == pods[0].spec.subdomain]
    assert service.spec.cluster_ip == "None"
    # The same TF_CONFIG, byte for byte, as the local backend writes for the same workers.
    for index, env in enumerate(envs):
        built = strategy.tf_config_from_jobset(env)
        assert built == local.tf_config(configs[0]["cluster"]["worker"], "worker", index)
    local_configs = [strategy.cluster_from_env(r.environ())
                     for r in local.plan(4, ["train", *TRAIN])]
    ours = [strategy.cluster_from_env({"TF_CONFIG": strategy.tf_config_from_jobset(env)})
            for env in envs]
    assert [(c.num_workers, c.task_index, c.worker_id, c.is_chief) for c in ours] == \
        [(c.num_workers, c.task_index, c.worker_id, c.is_chief) for c in local_configs]


def test_a_failing_trainjob_evaluator_is_retried_without_the_workers(control_plane,
                                                                      kube_namespace):
    """An evaluator's failure does not restart the GPU workers (JobSet's default action for a
    failed Job, RestartJobSet, would): its Job retries its pod (backoffLimit 6 in the
    -evaluator runtime), the workers' pods stay, and the run goes on."""
    TRAINJOB.prepare(control_plane, kube_namespace)
    opts = TRAINJOB.options(kube_namespace, evaluator=True, gpus_per_worker=1,
                            accelerator=GPU_ACCELERATOR)
    selector = (f"{trainjob.JOBSET_NAME_LABEL}=resnet-test,"
                f"{trainjob.REPLICATED_JOB_LABEL}={trainjob.EVALUATOR}")

    def evaluators(exclude: set):
        return [p for p in core(control_plane).list_namespaced_pod(
            kube_namespace, label_selector=selector).items
            if p.status.phase == "Running" and not p.metadata.deletion_timestamp
            and p.metadata.uid not in exclude]

    with launching(TRAINJOB, control_plane.admin(), opts) as (result, _):
        workers = running_pods(control_plane, TRAINJOB, kube_namespace, "resnet-test", 2)
        (evaluator,) = wait_until(lambda: evaluators(set()), what="a running evaluator")
        finish(control_plane, kube_namespace, [evaluator], exit_code=1, reason="Error")
        (retried,) = wait_until(lambda: evaluators({evaluator.metadata.uid}), timeout=60.0,
                                what="the evaluator's pod retried by its Job")
        still = running_pods(control_plane, TRAINJOB, kube_namespace, "resnet-test", 2)
        assert [p.metadata.uid for p in still] == [p.metadata.uid for p in workers]
        jobset = custom(control_plane).get_namespaced_custom_object(
            "jobset.x-k8s.io", "v1alpha2", kube_namespace, "jobsets", "resnet-test")
        assert (jobset.get("status") or {}).get("restarts", 0) == 0
        finish(control_plane, kube_namespace, [retried, *still])
        assert result.result(timeout=90) == 0


def test_trainjob_evaluator_runs_next_to_the_workers_on_the_gpu_pool(
        control_plane, kube_namespace):
    """--evaluator: the evaluator job of the -evaluator runtime runs `evaluate --watch` on the
    run's directories, on a GPU node, and the TrainJob completes once it and the workers have."""
    TRAINJOB.prepare(control_plane, kube_namespace)
    opts = TRAINJOB.options(kube_namespace, evaluator=True, gpus_per_worker=1,
                            accelerator=GPU_ACCELERATOR)
    with launching(TRAINJOB, control_plane.admin(), opts) as (result, _):
        workers = running_pods(control_plane, TRAINJOB, kube_namespace, "resnet-test", 2)
        selector = (f"{trainjob.JOBSET_NAME_LABEL}=resnet-test,"
                    f"{trainjob.REPLICATED_JOB_LABEL}={trainjob.EVALUATOR}")
        (evaluator,) = wait_until(lambda: [
            p for p in core(control_plane).list_namespaced_pod(
                kube_namespace, label_selector=selector).items
            if p.status.phase == "Running"], what="the evaluator running")
        finish(control_plane, kube_namespace, workers)
        time.sleep(1)
        job = TRAINJOB.get(control_plane.admin(), kube_namespace, "resnet-test")
        assert not TRAINJOB.cluster.finished(job)  # the evaluator is still at work
        finish(control_plane, kube_namespace, [evaluator])
        assert result.result(timeout=90) == 0

    (container,) = evaluator.spec.containers
    env = {e.name: e.value for e in container.env}
    assert container.command + container.args == [
        "resnet-imagenet", "evaluate", "--watch", "--data-dir", "$(RESNET_IMAGENET_DATA_DIR)",
        "--model-dir", "$(RESNET_IMAGENET_MODEL_DIR)"]
    assert (env["RESNET_IMAGENET_DATA_DIR"], env["RESNET_IMAGENET_MODEL_DIR"]) == (
        "gs://bucket/tfrecords", "gs://bucket/model")
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    node = core(control_plane).read_node(evaluator.spec.node_name)
    assert node.metadata.labels[NODEPOOL_LABEL] == GPU_POOL
    assert "JOBSET_NAME" not in env  # not part of the workers' cluster


# --- the launcher's life cycle ----------------------------------------------------------------


def test_success_exits_0_with_the_chiefs_log(control_plane, kube_namespace, backend, caplog):
    caplog.set_level(logging.INFO)
    with launching(backend, control_plane.admin(), backend.options(kube_namespace)) as (
            result, output):
        chief, other = running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
        control_plane.pod_log(kube_namespace, chief.metadata.name,
                              ["step 100 loss 6.91", "step 200 loss 6.80"],
                              container=backend.container)
        control_plane.pod_log(kube_namespace, other.metadata.name, ["not streamed"],
                              container=backend.container)
        wait_until(lambda: "step 200" in output.getvalue(), what="the chief's log streamed")
        finish(control_plane, kube_namespace, [chief, other])
        assert result.result(timeout=90) == 0

    assert output.getvalue().splitlines() == [f"[{backend.chief}] step 100 loss 6.91",
                                              f"[{backend.chief}] step 200 loss 6.80"]
    assert f"{backend.cluster.kind} {kube_namespace}/resnet-test succeeded" in caplog.text
    job = backend.get(control_plane.admin(), kube_namespace, "resnet-test")
    assert backend.cluster.succeeded(job)  # left to its TTL, not deleted


def test_a_failed_worker_fails_the_launch_naming_pod_and_reason(
        control_plane, kube_namespace, backend, caplog):
    caplog.set_level(logging.INFO)
    opts = backend.options(kube_namespace)
    with launching(backend, control_plane.admin(), opts, log_tail=2) as (result, output):
        chief, other = running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
        control_plane.pod_log(kube_namespace, other.metadata.name,
                              ["step 1", "ValueError: no shards match gs://bucket/tfrecords"],
                              container=backend.container)
        control_plane.finish_pod(kube_namespace, other.metadata.name, 1)
        assert result.result(timeout=90) == 1

    replica = backend.replica(other)
    assert output.getvalue().splitlines()[-2:] == [
        f"[{replica}] step 1", f"[{replica}] ValueError: no shards match gs://bucket/tfrecords"]
    last = [r for r in caplog.records if r.name.startswith("resnet_imagenet")][-1].getMessage()
    assert other.metadata.name in last and "exited with code 1 (Error)" in last, last
    assert last.startswith(f"{backend.cluster.kind} {kube_namespace}/resnet-test failed: "
                           f"{replica} (pod {other.metadata.name})"), last


def test_timeout_deletes_the_job_and_its_pods(control_plane, kube_namespace, backend, caplog):
    caplog.set_level(logging.INFO)
    with launching(backend, control_plane.admin(), backend.options(kube_namespace),
                   timeout=4) as (result, _):
        running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
        # After its --timeout the launcher waits (up to DEFAULT_DELETE_WAIT) for the job and
        # its pods to be gone.
        assert result.result(timeout=60) == 124
    wait_until(lambda: gone(control_plane, backend, kube_namespace, "resnet-test"),
               what="the job and its pods gone")
    assert "did not finish within --timeout 4s; deleting it" in caplog.text


def launcher_process(kubeconfig: str, *args: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_imagenet", "launch", "--kubeconfig", kubeconfig,
         "--poll-interval", str(POLL), "--cpu", "1", "--memory", "1Gi", *args, "--", *TRAIN],
        env=environ, stderr=subprocess.PIPE, text=True)


def test_sigterm_deletes_the_job_before_the_launcher_exits(
        control_plane, kube_namespace, backend, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(control_plane.kubeconfig.read_text().replace(
        "namespace: default", f"namespace: {kube_namespace}"))
    name = options.job_name("run-42/task-7")
    launcher = launcher_process(str(kubeconfig), "--backend", backend.name, "--run-id",
                                "run-42/task-7", "--workers", "2", "--timeout", "120")
    try:
        running_pods(control_plane, backend, kube_namespace, name, 2, timeout=90)
        job = backend.get(control_plane.admin(), kube_namespace, name)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode == 143, stderr
    assert f"SIGTERM received; deleting {backend.cluster.kind} {kube_namespace}/{name}" in stderr
    wait_until(lambda: gone(control_plane, backend, kube_namespace, name),
               what="the job and its pods gone")
    assert job["metadata"]["annotations"][options.RUN_ID_ANNOTATION] == "run-42/task-7"
    deadline = (job["spec"]["runPolicy"]["activeDeadlineSeconds"] if backend.name == "tfjob"
                else job["spec"]["activeDeadlineSeconds"])
    assert deadline == 120


def owner_pod(plane, namespace: str, name: str) -> client.V1Pod:
    """A pod standing for the KFP step the launcher runs in (kwok runs it on the CPU pool)."""
    return core(plane).create_namespaced_pod(namespace, {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "launcher:test"}]}})


def test_a_restarted_launcher_reattaches_to_its_job(
        control_plane, kube_namespace, backend, monkeypatch):
    name = options.job_name("run-7")
    first, second = (owner_pod(control_plane, kube_namespace, n) for n in ("step-1", "step-2"))
    opts = backend.options(kube_namespace, name=name, run_id="run-7")
    # What a launcher killed outright leaves behind: its job, owned by its pod, running.
    earlier = backend.build(opts)
    earlier["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": "step-1", "uid": first.metadata.uid}]
    created = submit(lifecycle.JobRun(control_plane.admin(), backend.cluster, earlier))
    running_pods(control_plane, backend, kube_namespace, name, 2)

    monkeypatch.setenv("POD_NAMESPACE", kube_namespace)
    monkeypatch.setenv("POD_NAME", "step-2")
    monkeypatch.setenv("POD_UID", second.metadata.uid)
    with launching(backend, control_plane.admin(), opts) as (result, _):
        wait_until(lambda: len(backend.get(control_plane.admin(), kube_namespace, name)
                               ["metadata"]["ownerReferences"]) == 2, what="the second owner")
        pods = running_pods(control_plane, backend, kube_namespace, name, 2)
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=90) == 0

    job = backend.get(control_plane.admin(), kube_namespace, name)
    assert job["metadata"]["uid"] == created["metadata"]["uid"]  # no second job
    assert [o["name"] for o in job["metadata"]["ownerReferences"]] == ["step-1", "step-2"]


def test_a_job_of_the_same_name_with_another_spec_is_refused_and_left_alone(
        control_plane, kube_namespace, backend):
    submit(lifecycle.JobRun(control_plane.admin(), backend.cluster,
                            backend.build(backend.options(kube_namespace, workers=3))))
    with pytest.raises(UserError, match="already exists with a different spec"):
        backend.launch(backend.options(kube_namespace, workers=2),
                       api_client=control_plane.admin(), poll_interval=POLL)
    job = backend.get(control_plane.admin(), kube_namespace, "resnet-test")
    three = backend.build(backend.options(kube_namespace, workers=3))
    assert job["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION] == \
        three["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION]


def test_garbage_collector_deletes_the_job_when_the_launchers_pod_goes(
        control_plane, kube_namespace, backend, monkeypatch, caplog):
    step = owner_pod(control_plane, kube_namespace, "train-step")
    monkeypatch.setenv("POD_NAMESPACE", kube_namespace)
    monkeypatch.setenv("POD_NAME", "train-step")
    monkeypatch.setenv("POD_UID", step.metadata.uid)
    with launching(backend, control_plane.admin(), backend.options(kube_namespace)) as (
            result, _):
        running_pods(control_plane, backend, kube_namespace, "resnet-test", 2)
        core(control_plane).delete_namespaced_pod("train-step", kube_namespace)
        wait_until(lambda: gone(control_plane, backend, kube_namespace, "resnet-test"),
                   what="garbage collection of the job and its pods")
        assert result.result(timeout=90) == 1  # it was still following it
    assert f"{backend.cluster.kind} {kube_namespace}/resnet-test was deleted before it finished" \
        in caplog.text


# --- RBAC -------------------------------------------------------------------------------------


def test_the_service_account_can_run_a_trainjob_and_no_more(
        control_plane, kube_namespace, tmp_path, caplog):
    """The gke-gpu overlay with the trainer-v2 component: end to end as the ServiceAccount's own
    token; then the authorizer's answers: trainjobs here, nothing of JobSets, Jobs, runtimes,
    secrets or other namespaces."""
    TRAINJOB.prepare(control_plane, kube_namespace)
    apply(control_plane, render_overlay(control_plane, kube_namespace, with_trainer_v2=True))
    kubeconfig = control_plane.service_account_kubeconfig(
        kube_namespace, "resnet-imagenet", tmp_path / "sa-kubeconfig")
    as_sa = control_plane.api_client(kubeconfig)
    with launching(TRAINJOB, as_sa, TRAINJOB.options(kube_namespace)) as (result, output):
        chief, other = running_pods(control_plane, TRAINJOB, kube_namespace, "resnet-test", 2)
        control_plane.pod_log(kube_namespace, chief.metadata.name, ["step 1"],
                              container=TRAINJOB.container)
        wait_until(lambda: "[node-0] step 1" in output.getvalue(), what="the chief's log")
        finish(control_plane, kube_namespace, [chief, other])
        assert result.result(timeout=90) == 0
    assert "cannot stream" not in caplog.text

    for verb in ("create", "get", "list", "patch", "delete"):
        assert can_i(control_plane, kube_namespace, verb, "trainjobs.trainer.kubeflow.org",
                     "-n", kube_namespace) == "yes", verb
    assert can_i(control_plane, kube_namespace, "watch", "trainjobs.trainer.kubeflow.org",
                 "-n", kube_namespace) == "no"
    other_namespace = control_plane.create_namespace(f"{kube_namespace}-other")
    try:
        for args in (["update", "trainjobs.trainer.kubeflow.org", "-n", kube_namespace],
                     ["create", "jobsets.jobset.x-k8s.io", "-n", kube_namespace],
                     ["delete", "jobs.batch", "-n", kube_namespace],
                     ["create", "trainingruntimes.trainer.kubeflow.org", "-n", kube_namespace],
                     ["create", "clustertrainingruntimes.trainer.kubeflow.org"],
                     ["get", "secrets", "-n", kube_namespace],
                     ["create", "trainjobs.trainer.kubeflow.org", "-n", other_namespace],
                     ["list", "nodes"]):
            assert can_i(control_plane, kube_namespace, *args) == "no", args
    finally:
        core(control_plane).delete_namespace(other_namespace)


def test_without_the_trainjob_rule_the_launcher_names_verb_resource_and_namespace(
        control_plane, kube_namespace, tmp_path, capsys):
    """The overlay without the trainer-v2 component: the TFJob rules only."""
    TRAINJOB.prepare(control_plane, kube_namespace)
    apply(control_plane, render_overlay(control_plane, kube_namespace))
    kubeconfig = control_plane.service_account_kubeconfig(
        kube_namespace, "resnet-imagenet", tmp_path / "sa-kubeconfig")
    status = cli.main(["launch", "--backend", "trainjob", "--kubeconfig", kubeconfig,
                       "--poll-interval", str(POLL), "--timeout", "30", "--", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith(
        "error: permission denied: the launcher's identity may not create "
        f"trainjobs.trainer.kubeflow.org in namespace '{kube_namespace}'")
    assert trainjob.RBAC_MANIFEST in err[0]


# --- KFP's Retry: the run's Workflow owns the job -------------------------------------------


def argo_workflow(plane, namespace: str, name: str) -> dict:
    """A Workflow object standing for a KFP run (Argo's group, version and kind; its CRD
    installed once per plane, schemaless: the launcher only needs its identity)."""
    from kubernetes.client import ApiextensionsV1Api

    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "workflows.argoproj.io"},
           "spec": {"group": "argoproj.io", "scope": "Namespaced",
                    "names": {"kind": "Workflow", "plural": "workflows",
                              "singular": "workflow", "listKind": "WorkflowList"},
                    "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {
                                      "type": "object",
                                      "x-kubernetes-preserve-unknown-fields": True}}}]}}
    try:
        ApiextensionsV1Api(plane.admin()).create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:
            raise

    def created():
        try:
            return custom(plane).create_namespaced_custom_object(
                "argoproj.io", "v1alpha1", namespace, "workflows",
                {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                 "metadata": {"name": name}, "spec": {}})
        except client.ApiException as exc:
            if exc.status == 404:  # the CRD is not served yet
                return None
            raise
    return wait_until(created, what="the Workflow CRD served")


def step_pod(plane, namespace: str, name: str, workflow: dict) -> client.V1Pod:
    """A KFP step's pod: owned by the run's Workflow, as Argo makes them."""
    return core(plane).create_namespaced_pod(namespace, {
        "metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
            "name": workflow["metadata"]["name"], "uid": workflow["metadata"]["uid"],
            "controller": True}]},
        "spec": {"containers": [{"name": "main", "image": "launcher:test"}]}})


def as_step(monkeypatch, namespace: str, pod: client.V1Pod) -> None:
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    monkeypatch.setenv("POD_NAME", pod.metadata.name)
    monkeypatch.setenv("POD_UID", pod.metadata.uid)


def test_a_retried_step_reattaches_and_the_runs_deletion_collects_the_job(
        control_plane, kube_namespace, monkeypatch, caplog):
    """The job's owner is the run's Workflow, not the step's pod: KFP's Retry deletes the
    failed step's pod, and the job (still training) outlives it, the retry re-attaching to it;
    deleting the run still garbage-collects the job."""
    caplog.set_level(logging.INFO)
    workflow = argo_workflow(control_plane, kube_namespace, "resnet-run")
    opts = TFJOB.options(kube_namespace, name=options.job_name("run-r"), run_id="run-r")
    name = opts.name
    first = step_pod(control_plane, kube_namespace, "train-step-1", workflow)
    as_step(monkeypatch, kube_namespace, first)
    # The first attempt's launcher submits the job, owned as the launcher owns it ...
    run = lifecycle.JobRun(control_plane.admin(), TFJOB.cluster, TFJOB.build(opts))
    owner = launcher_owner(run)
    assert owner == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                     "name": "resnet-run", "uid": workflow["metadata"]["uid"]}
    run.body["metadata"]["ownerReferences"] = [owner]
    created = submit(run)
    running_pods(control_plane, TFJOB, kube_namespace, name, 2)
    # ... and dies outright (an OOM kill, a lost node): the step fails, and KFP's Retry
    # deletes its pod.
    core(control_plane).delete_namespaced_pod("train-step-1", kube_namespace)
    wait_until(lambda: not [p for p in core(control_plane).list_namespaced_pod(
        kube_namespace).items if p.metadata.name == "train-step-1"], what="the step pod gone")
    time.sleep(3)  # time enough for the garbage collector, had the pod owned the job
    assert TFJOB.get(control_plane.admin(), kube_namespace, name)["metadata"]["uid"] == \
        created["metadata"]["uid"]

    second = step_pod(control_plane, kube_namespace, "train-step-2", workflow)
    as_step(monkeypatch, kube_namespace, second)
    with launching(TFJOB, control_plane.admin(), opts) as (result, _):
        pods = running_pods(control_plane, TFJOB, kube_namespace, name, 2)
        finish(control_plane, kube_namespace, pods)
        assert result.result(timeout=90) == 0
    assert f"re-attached to the existing TFJob {kube_namespace}/{name}" in caplog.text
    job = TFJOB.get(control_plane.admin(), kube_namespace, name)
    assert job["metadata"]["uid"] == created["metadata"]["uid"]
    assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [workflow["metadata"]["uid"]]

    # Deleting the run (its Workflow) collects the job and its pods.
    custom(control_plane).delete_namespaced_custom_object(
        "argoproj.io", "v1alpha1", kube_namespace, "workflows", "resnet-run")
    wait_until(lambda: gone(control_plane, TFJOB, kube_namespace, name),
               what="the job collected with its Workflow")


def test_a_retry_after_the_job_failed_reports_it_and_trains_anew(
        control_plane, kube_namespace, caplog):
    """A job of this run that has failed is reported, then replaced (not adopted: the retry
    would only report the same failure again); training resumes from its checkpoint."""
    caplog.set_level(logging.INFO)
    opts = TFJOB.options(kube_namespace, name=options.job_name("run-f"), run_id="run-f")
    name = opts.name
    with launching(TFJOB, control_plane.admin(), opts) as (result, _):
        pods = running_pods(control_plane, TFJOB, kube_namespace, name, 2)
        finish(control_plane, kube_namespace, [pods[1]], exit_code=1, reason="Error")
        assert result.result(timeout=90) == 1
    failed = TFJOB.get(control_plane.admin(), kube_namespace, name)
    assert TFJOB.cluster.failure(failed) is not None
    with launching(TFJOB, control_plane.admin(), opts) as (result, _):
        def new_pods():
            pods = running_pods(control_plane, TFJOB, kube_namespace, name, 2)
            job = TFJOB.get(control_plane.admin(), kube_namespace, name)
            return pods if job and job["metadata"]["uid"] != failed["metadata"]["uid"] else None
        finish(control_plane, kube_namespace, wait_until(new_pods, what="the new job's pods"))
        assert result.result(timeout=90) == 0
    assert (f"TFJob {kube_namespace}/{name} of this run failed earlier (TFJobFailed: "
            in caplog.text)
    assert f"deleted TFJob {kube_namespace}/{name}" in caplog.text
