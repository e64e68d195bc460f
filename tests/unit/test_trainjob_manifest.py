"""The TrainJob manifest (Kubeflow Trainer v2): the runtime it references, the same flags as the
TFJob backend where they mean the same, valid for the CRD (strictly) and Trainer's webhook."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from kubernetes import client

from resnet_imagenet import cli
from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import options, schema, trainjob
from resnet_imagenet.training import strategy

TRAIN = ["--data-dir", "gs://bucket/tfrecords", "--model-dir", "gs://bucket/model",
         "--batch-size", "256"]


def build(**overrides) -> dict:
    values = {"name": "resnet50", "train_args": TRAIN, "workers": 4}
    values.update(overrides)
    return trainjob.build_trainjob(trainjob.TrainJobOptions(**values))


def patched_pod(job: dict, rjob: str = "node") -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    jobs = {j["name"]: j for j in patch["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"]}
    return jobs[rjob]["template"]["spec"]["template"]


def test_default_manifest_references_the_runtime_and_fills_the_trainer():
    job = build()
    assert schema.schema_errors(job, schema.TRAINJOB_CRD_FILE) == []
    assert schema.trainjob_webhook_errors(job, trainjob.RUNTIME_JOBS[trainjob.RUNTIME]) == []
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "TrainingRuntime",
                                         "name": "resnet-imagenet-tensorflow"}
    trainer = job["spec"]["trainer"]
    assert trainer["command"] + trainer["args"] == ["resnet-imagenet", "train", *TRAIN]
    assert trainer["numNodes"] == 4
    assert trainer["image"] == options.DEFAULT_IMAGE
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                           "limits": {"memory": "16Gi"}}
    # The one thing the pods cannot read off themselves, for TF_CONFIG.
    assert trainer["env"] == [{"name": strategy.NUM_NODES_ENV, "value": "4"}]
    pod = patched_pod(job)
    assert pod["spec"]["containers"] == [{"name": "node"}]  # no env here: the webhook refuses it
    assert "tolerations" not in pod["spec"] and "nodeSelector" not in pod["spec"]
    assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                    "sizeLimit": "2Gi"}}]
    assert "activeDeadlineSeconds" not in job["spec"]


def test_gpu_pool_settings_go_into_the_runtime_patch():
    job = build(gpus_per_worker=8, accelerator="nvidia-h100-80gb", service_account="trainer",
                node_selector={"pool": "a"}, tolerations=[{"key": "spot", "operator": "Exists"}],
                gcs_secret="gcp-key", pvc="imagenet:/data", env={"NCCL_DEBUG": "WARN"},
                shm_size="8Gi", active_deadline_seconds=7200)
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert env == {"NCCL_DEBUG": "WARN", "GOOGLE_APPLICATION_CREDENTIALS":
                   "/var/secrets/google/key.json", strategy.NUM_NODES_ENV: "4",
                   strategy.GPUS_ENV: "8"}  # fewer visible: the trainer stops
    spec = patched_pod(job)["spec"]
    assert spec["serviceAccountName"] == "trainer"
    assert spec["nodeSelector"] == {"pool": "a", "cloud.google.com/gke-accelerator":
                                    "nvidia-h100-80gb"}
    assert spec["tolerations"] == [{"key": "spot", "operator": "Exists"},
                                   {"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "8Gi"
    assert volumes["gcs-key"] == {"name": "gcs-key", "secret": {"secretName": "gcp-key"}}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "imagenet"}
    (container,) = spec["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/var/secrets/google",
                                                                  "/data"}


def test_evaluator_picks_the_runtime_with_the_evaluator_job_and_gives_it_the_dirs():
    job = build(evaluator=True, gpus_per_worker=1)
    assert job["spec"]["runtimeRef"]["name"] == "resnet-imagenet-tensorflow-evaluator"
    assert schema.trainjob_webhook_errors(
        job, trainjob.RUNTIME_JOBS[trainjob.RUNTIME_WITH_EVALUATOR]) == []
    (container,) = patched_pod(job, "evaluator")["spec"]["containers"]
    assert container["name"] == "evaluator"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {trainjob.DATA_DIR_ENV: "gs://bucket/tfrecords",
                   trainjob.MODEL_DIR_ENV: "gs://bucket/model"}
    # The same patch refused against the runtime without an evaluator job.
    assert "is not in the runtime" in schema.trainjob_webhook_errors(
        job, trainjob.RUNTIME_JOBS[trainjob.RUNTIME])[0]


@pytest.mark.parametrize("overrides, message", [
    ({"evaluator": True}, "--evaluator with --backend trainjob runs on one GPU"),
    ({"name": "r" * 54, "workers": 16}, f"--name '{'r' * 54}' is too long: JobSet names a pod "
                                        f"(its hostname) '{'r' * 54}-node-0-15'"),
    ({"name": "Resnet"}, "--name 'Resnet' must be lower-case"),
    ({"image": "trainer"}, "--image 'trainer' has no tag"),
])
def test_bad_options_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        build(**overrides)


def test_webhook_rules_catch_what_the_schema_cannot():
    job = build()
    broken = copy.deepcopy(job)
    patched_pod(broken)["spec"]["containers"][0]["env"] = [{"name": "X", "value": "1"}]
    broken["spec"]["runtimePatches"][0]["manager"] = "launcher"
    broken["metadata"]["name"] = "9lives"
    errors = schema.trainjob_webhook_errors(broken, trainjob.RUNTIME_JOBS[trainjob.RUNTIME])
    assert [e.split(":")[0].split(" ")[0] for e in errors] == [
        "metadata.name", "spec.runtimePatches[0].manager", "spec.runtimePatches[0]"]
    misplaced = copy.deepcopy(job)
    misplaced["spec"]["trainer"]["backoffLimit"] = 3  # no such field: the server would drop it
    assert schema.schema_errors(misplaced, schema.TRAINJOB_CRD_FILE) == [
        "spec.trainer: Additional properties are not allowed ('backoffLimit' was unexpected)"]


def test_spec_hash_follows_the_spec():
    one, same, other = build(), build(), build(workers=2)
    key = options.SPEC_HASH_ANNOTATION
    assert one["metadata"]["annotations"][key] == same["metadata"]["annotations"][key]
    assert one["metadata"]["annotations"][key] != other["metadata"]["annotations"][key]


def test_dry_run_prints_the_trainjob(capsys, monkeypatch):
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    argv = ["launch", "--backend", "trainjob", "--dry-run", "--workers", "2",
            "--gpus-per-worker", "1", "--namespace", "ml", "--run-id", "run-99",
            "--timeout", "7200.5", "--", *TRAIN]
    assert cli.main(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert schema.schema_errors(job, schema.TRAINJOB_CRD_FILE) == []
    assert job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == options.job_name("run-99")
    assert job["metadata"]["namespace"] == "ml"
    assert job["spec"]["activeDeadlineSeconds"] == 7201
    assert job["spec"]["trainer"]["numNodes"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--restart-policy", "OnFailure"], "--restart-policy OnFailure: with --backend trainjob the "
                                        "TrainingRuntime decides"),
    (["--backoff-limit", "1"], "--backoff-limit 1: with --backend trainjob"),
    (["--clean-pod-policy", "All"], "--clean-pod-policy All: with --backend trainjob"),
    (["--ttl-seconds-after-finished", "60"], "--ttl-seconds-after-finished 60: with --backend"),
])
def test_dry_run_refuses_a_runtime_owned_flag(capsys, flags, message):
    argv = ["launch", "--backend", "trainjob", "--dry-run", *flags, "--", *TRAIN]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: " + message)
    # The same flags are the TFJob's to take.
    assert cli.main(["launch", "--dry-run", *flags, "--", *TRAIN]) == 0


def test_trainjob_replicas_are_named_by_replicated_job_and_completion_index():
    labels = {trainjob.REPLICATED_JOB_LABEL: "node", trainjob.COMPLETION_INDEX_LABEL: "3"}
    pod = client.V1Pod(metadata=client.V1ObjectMeta(name="r-node-0-3-x7k2p", labels=labels))
    assert trainjob.BACKEND.replica_name(pod) == "node-3"
    assert trainjob.BACKEND.pod_selector("r") == "jobset.sigs.k8s.io/jobset-name=r"
    assert trainjob.BACKEND.progress({"jobsStatus": [
        {"name": "node", "active": 2, "ready": 1}]}) == "node active=2 ready=1 succeeded=0 failed=0"
