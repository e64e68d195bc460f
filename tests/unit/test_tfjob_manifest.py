"""The TFJob manifest: what the operator needs, valid for the CRD (strictly) and its webhook."""

from __future__ import annotations

import copy

import pytest
import yaml

from resnet_imagenet import cli
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import options, schema, tfjob
from resnet_imagenet.launch.lifecycle.submit import launcher_pod_owner
from resnet_imagenet.training import strategy

TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model",
         "--batch-size", "256"]


def build(**overrides) -> dict:
    values = {"name": "resnet50", "train_args": TRAIN, "workers": 4}
    values.update(overrides)
    return tfjob.build_tfjob(tfjob.TFJobOptions(**values))


def pod(job: dict, replica: str = "Worker") -> dict:
    return job["spec"]["tfReplicaSpecs"][replica]["template"]["spec"]


def test_default_manifest_holds_the_operators_contract():
    job = build()
    assert schema.schema_errors(job) == [] and schema.webhook_errors(job) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    assert list(job["spec"]["tfReplicaSpecs"]) == ["Worker"]  # worker 0 is the chief
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert (worker["replicas"], worker["restartPolicy"]) == (4, "ExitCode")
    (container,) = pod(job)["containers"]
    assert container["name"] == "tensorflow"
    assert container["command"] + container["args"] == ["resnet-imagenet", "train", *TRAIN]
    assert container["ports"] == [{"name": "tfjob-port", "containerPort": 2222}]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"memory": "16Gi"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in \
        pod(job)["volumes"]
    assert pod(job)["securityContext"]["runAsNonRoot"] is True
    assert "nodeSelector" not in pod(job) and "tolerations" not in pod(job)


def test_run_policy_lives_under_run_policy():
    job = build(active_deadline_seconds=3600, backoff_limit=7)
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running",
                                        "ttlSecondsAfterFinished": 86400,
                                        "backoffLimit": 7, "activeDeadlineSeconds": 3600}
    assert set(job["spec"]) == {"runPolicy", "tfReplicaSpecs"}


def test_strict_schema_refuses_what_the_api_server_would_silently_drop():
    # The old launcher's mistake: run policy fields directly under spec.
    job = build()
    job["spec"]["backoffLimit"] = 3
    assert schema.schema_errors(job) == [
        "spec: Additional properties are not allowed ('backoffLimit' was unexpected)"]
    job = build()
    pod(job)["containers"][0]["gpus"] = 1
    assert schema.schema_errors(job) == [
        "spec.tfReplicaSpecs.Worker.template.spec.containers[0]: Additional properties are not "
        "allowed ('gpus' was unexpected)"]
    job = build()
    job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "4"
    assert schema.schema_errors(job) == [
        "spec.tfReplicaSpecs.Worker.replicas: '4' is not of type 'integer'"]
    with pytest.raises(UserError, match="the TFJob manifest is not valid: spec: Additional"):
        schema.validate_tfjob({**build(), "spec": {**build()["spec"], "backoffLimit": 3}})


def test_open_maps_of_the_schema_stay_open():
    job = build(node_selector={"example.com/any-label": "x"}, env={"NCCL_DEBUG": "INFO"})
    job["metadata"]["labels"]["team"] = "vision"
    assert schema.schema_errors(job) == []


@pytest.mark.parametrize("change, error", [
    (lambda j: j["metadata"].update(name="ResNet"), "metadata.name 'ResNet' must be lower-case"),
    (lambda j: pod(j)["containers"][0].update(name="main"),
     "must have at least one container with name tensorflow"),
    (lambda j: pod(j)["containers"][0].pop("image"),
     "spec.tfReplicaSpecs[Worker].template.spec.containers[0].image: must be required"),
    (lambda j: j["spec"]["tfReplicaSpecs"].update(
        Chief=copy.deepcopy(j["spec"]["tfReplicaSpecs"]["Worker"]),
        Master=copy.deepcopy(j["spec"]["tfReplicaSpecs"]["Worker"])),
     "must not have more than 1 Chief or Master role"),
])
def test_webhook_rules_of_training_operator(change, error):
    job = build()
    change(job)
    errors = schema.webhook_errors(job)
    assert len(errors) == 1 and error in errors[0]


def test_gpus_node_pool_and_evaluator():
    job = build(gpus_per_worker=2, evaluator=True, accelerator="nvidia-tesla-v100",
                tolerations=[options.parse_toleration("dedicated=ml:NoSchedule")])
    assert schema.schema_errors(job) == []
    worker, evaluator = pod(job), pod(job, "Evaluator")
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert evaluator["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # A worker that sees fewer GPUs than this stops (test_train_cli.py); the evaluator watches.
    assert {"name": strategy.GPUS_ENV, "value": "2"} in worker["containers"][0]["env"]
    assert "env" not in evaluator["containers"][0]
    assert "env" not in pod(build())["containers"][0]
    assert worker["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}
    assert worker["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["tfReplicaSpecs"]["Evaluator"]["replicas"] == 1
    assert evaluator["containers"][0]["args"] == [
        "evaluate", "--watch", "--data-dir", "gs://bucket/tfrecords",
        "--model-dir", "gs://bucket/model"]
    assert "ports" not in evaluator["containers"][0]  # not part of the training cluster


def test_gcs_credentials_workload_identity_or_a_key_secret():
    identity = pod(build(service_account="trainer"))
    assert identity["serviceAccountName"] == "trainer"
    assert "env" not in identity["containers"][0]
    keyed = pod(build(gcs_secret="gcp-key"))
    container = keyed["containers"][0]
    assert {"name": "GOOGLE_APPLICATION_CREDENTIALS",
            "value": "/var/secrets/google/key.json"} in container["env"]
    assert {"name": "gcs-key", "mountPath": "/var/secrets/google", "readOnly": True} in \
        container["volumeMounts"]
    assert {"name": "gcs-key", "secret": {"secretName": "gcp-key"}} in keyed["volumes"]


def test_a_shared_volume_makes_local_paths_valid():
    spec = pod(build(pvc="imagenet:/data", train_args=["--data-dir", "/data/tfrecords",
                                                       "--model-dir", "/data/runs/r50"]))
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "imagenet"}} in spec["volumes"]
    assert {"name": "data", "mountPath": "/data"} in spec["containers"][0]["volumeMounts"]
    with pytest.raises(UserError, match="--model-dir /other is a local path"):
        build(pvc="imagenet:/data", train_args=["--data-dir", "/data/t", "--model-dir", "/other"])
    with pytest.raises(UserError, match="must include --model-dir"):
        build(train_args=["--data-dir", "gs://b/t"])
    with pytest.raises(UserError, match="unsupported URI scheme 's3://'"):
        build(train_args=["--data-dir", "s3://b/t", "--model-dir", "gs://b/m"])


def test_spec_hash_annotation_follows_the_spec_only():
    job = build(run_id="run-1")
    digest = job["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION]
    assert digest == options.spec_hash(job["spec"])
    assert options.spec_hash(job["spec"]) == options.spec_hash(
        yaml.safe_load(yaml.safe_dump(job["spec"], sort_keys=True)))  # key order does not matter
    assert build(run_id="run-2")["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION] == \
        job["metadata"]["annotations"][options.SPEC_HASH_ANNOTATION]
    assert options.spec_hash(build(workers=8)["spec"]) != options.spec_hash(job["spec"])


def test_job_names_from_run_ids():
    name = options.job_name("8f2c1e0a-run/train-task")
    assert name == options.job_name("8f2c1e0a-run/train-task")  # a restarted launcher finds it
    assert name != options.job_name("another-run")
    assert options.job_name() != options.job_name()  # no run id: a fresh name every time
    assert schema.dns1035_problem(name) is None and len(name) <= 63 - len("-evaluator-0")


def test_name_length_leaves_room_for_the_operators_service_names():
    suffixes = tfjob.TFJobOptions(name="x", train_args=TRAIN, workers=16).replica_suffixes()
    names = tfjob.TFJobOptions.NAMES
    options.validate_job_name("a" * (63 - len("-worker-15")), suffixes, names)
    with pytest.raises(UserError, match="'a{54}-worker-15', which must fit in 63"):
        options.validate_job_name("a" * 54, suffixes, names)


@pytest.mark.parametrize("image, problem", [
    ("reg.io/team/trainer:1.2.0", None),
    ("localhost:5000/trainer@sha256:" + "0" * 64, None),
    ("localhost:5000/trainer", "has no tag"),
    ("trainer:latest", "uses ':latest'"),
    ("", "is empty"),
])
def test_images_must_be_pinned(image, problem):
    found = options.image_problem(image)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize("spec, toleration", [
    ("nvidia.com/gpu", {"key": "nvidia.com/gpu", "operator": "Exists"}),
    ("pool=gpu:NoExecute", {"key": "pool", "operator": "Equal", "value": "gpu",
                            "effect": "NoExecute"}),
    ("spot:PreferNoSchedule", {"key": "spot", "operator": "Exists", "effect": "PreferNoSchedule"}),
    ("node.kubernetes.io/unreachable:NoExecute:600",
     {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
      "tolerationSeconds": 600}),
])
def test_tolerations_in_kubectl_taint_syntax(spec, toleration):
    assert options.parse_toleration(spec) == toleration


@pytest.mark.parametrize("spec", ["a:NoSchedule:60", "a:NoExecute:soon", "a:NoExecute:-1"])
def test_toleration_seconds_only_as_a_whole_number_with_noexecute(spec):
    with pytest.raises(UserError, match="only KEY\\[=VALUE\\]:NoExecute:SECONDS"):
        options.parse_toleration(spec)


def test_every_replica_gets_the_termination_grace_period():
    """A preempted worker saves a checkpoint between SIGTERM and SIGKILL: 120 s by default,
    --termination-grace-period for both backends (the CRDs' schemas accept both)."""
    from resnet_imagenet.launch import trainjob

    job = build(evaluator=True)
    assert {pod(job)["terminationGracePeriodSeconds"],
            pod(job, "Evaluator")["terminationGracePeriodSeconds"]} == {120}
    opts = trainjob.TrainJobOptions(name="resnet50", train_args=TRAIN, evaluator=True,
                                    gpus_per_worker=1, termination_grace_period=300)
    body = trainjob.build_trainjob(opts)
    (patch,) = body["spec"]["runtimePatches"]
    jobs = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            for j in jobs] == [300, 300]
    assert schema.schema_errors(body, schema.TRAINJOB_CRD_FILE) == []
    with pytest.raises(UserError, match="--termination-grace-period -1: must be 0 or more"):
        build(termination_grace_period=-1)


def test_yaml_is_the_manifest():
    opts = tfjob.TFJobOptions(name="resnet50", train_args=TRAIN, evaluator=True, namespace="ml")
    assert yaml.safe_load(tfjob.BACKEND.manifest_yaml(opts)) == tfjob.build_tfjob(opts)


def test_dry_run_prints_the_manifest_for_kubectl(capsys, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "run-99")
    argv = ["launch", "--dry-run", "--workers", "2", "--timeout", "7200.5", "--namespace", "ml",
            "--", *TRAIN]
    assert cli.main(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert schema.schema_errors(job) == []
    assert job["metadata"]["name"] == options.job_name("run-99")
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["annotations"][options.RUN_ID_ANNOTATION] == "run-99"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7201
    assert cli.main(argv) == 0 and yaml.safe_load(capsys.readouterr().out) == job  # idempotent


def test_owner_reference_to_the_launcher_pod(monkeypatch, caplog):
    for key in ("POD_NAME", "POD_UID", "KFP_POD_NAME", "KFP_POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_pod_owner("ml") is None  # not in a pod
    monkeypatch.setenv("KFP_POD_NAME", "run-abc-train-123")
    monkeypatch.setenv("KFP_POD_UID", "0b7e-uid")
    monkeypatch.setenv("POD_NAMESPACE", "ml")
    assert launcher_pod_owner("ml") == {
        "apiVersion": "v1", "kind": "Pod", "name": "run-abc-train-123", "uid": "0b7e-uid"}
    assert launcher_pod_owner("other") is None  # owners cannot cross namespaces
    assert "no ownerReference" in caplog.text
