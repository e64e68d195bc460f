"""The compiled pipeline: a valid KFP PipelineSpec with the steps in DAG order, the reference
recipe as defaults, Kubernetes settings from kfp-kubernetes, and no GPU in any step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

import compile_pipeline
from components import images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[pipeline_spec_pb2.PipelineSpec, dict, dict]:
    path = str(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    assert compile_pipeline.compile_pipeline(path) == path
    with open(path) as f:
        pipeline_doc, platform_doc = yaml.safe_load_all(f)
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    return spec, pipeline_doc, json_format.MessageToDict(platform)


def dag_of(spec, component: str):
    return spec.root.dag if component == "root" else spec.components[component].dag


def tasks_under(spec, component: str) -> set[str]:
    """Every executor task name inside a DAG component, nested DAGs included."""
    names = set()
    for name, task in dag_of(spec, component).tasks.items():
        child = task.component_ref.name
        if spec.components[child].WhichOneof("implementation") == "dag":
            names |= tasks_under(spec, child)
        else:
            names.add(name)
    return names


def root_task_holding(spec, name: str) -> str:
    for root_name, task in spec.root.dag.tasks.items():
        if root_name == name or (
                spec.components[task.component_ref.name].WhichOneof("implementation") == "dag"
                and name in tasks_under(spec, task.component_ref.name)):
            return root_name
    raise AssertionError(f"no task {name} in the pipeline")


def upstream(spec, root_name: str) -> set[str]:
    """All root-level tasks that ``root_name`` waits for, transitively."""
    seen: set[str] = set()
    todo = list(spec.root.dag.tasks[root_name].dependent_tasks)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += spec.root.dag.tasks[name].dependent_tasks
    return seen


def test_the_four_steps_run_in_dag_order(compiled):
    spec, _, _ = compiled
    assert spec.pipeline_info.name == "resnet50-imagenet"
    convert = root_task_holding(spec, "convert-shards")
    assert convert != "convert-shards", "conversion runs inside the condition, not always"
    assert root_task_holding(spec, "finalize-dataset") == convert
    assert convert in upstream(spec, "train")
    assert {"train", convert} <= upstream(spec, "evaluate")
    assert {"evaluate", "train", convert} <= upstream(spec, "export-saved-model")
    assert {"validate-parameters", "dataset-ready"} <= upstream(spec, convert)
    assert "validate-parameters" in upstream(spec, "dataset-ready")
    assert upstream(spec, "validate-parameters") == set()


def test_conversion_is_a_parallel_for_skipped_when_the_dataset_exists(compiled):
    spec, _, _ = compiled
    branches = spec.components[spec.root.dag.tasks[root_task_holding(
        spec, "convert-shards")].component_ref.name].dag.tasks
    conditions = {name: task.trigger_policy.condition for name, task in branches.items()}
    convert_branch = next(n for n in branches
                          if "convert-shards" in tasks_under(spec, branches[n].component_ref.name))
    assert conditions[convert_branch] == (
        "inputs.parameter_values['pipelinechannel--dataset-ready-Output'] == false")
    reuse_branch = next(n for n in branches if n != convert_branch)
    assert tasks_under(spec, branches[reuse_branch].component_ref.name) == {"use-existing-dataset"}
    loop = next(task for task in dag_of(spec, branches[convert_branch].component_ref.name)
                .tasks.values() if task.WhichOneof("iterator"))
    assert loop.parameter_iterator.items.input_parameter == (
        "pipelinechannel--validate-parameters-Output")
    convert = dag_of(spec, loop.component_ref.name).tasks["convert-shards"]
    assert convert.retry_policy.max_retry_count == 3


def test_defaults_are_the_reference_recipe(compiled):
    spec, _, _ = compiled
    params = spec.root.input_definitions.parameters
    defaults = {name: json_format.MessageToDict(p.default_value) for name, p in params.items()
                if p.HasField("default_value")}
    assert defaults["backend"] == "tfjob"
    assert {k: int(defaults[k]) for k in ("workers", "gpus_per_worker", "batch_size",
                                          "train_steps", "resnet_size", "image_size",
                                          "train_shards", "validation_shards")} == {
        "workers": 4, "gpus_per_worker": 1, "batch_size": 256, "train_steps": 500_000,
        "resnet_size": 50, "image_size": 224, "train_shards": 1024, "validation_shards": 128}
    assert defaults["trainer_image"] == images.TRAINER_IMAGE
    for required in ("raw_uri", "tfrecord_uri", "model_uri", "export_uri"):
        assert not params[required].is_optional and required not in defaults


def test_no_step_requests_a_gpu(compiled):
    spec, doc, platform = compiled
    executors = doc["deploymentSpec"]["executors"]
    assert len(executors) == 9
    for name, executor in executors.items():
        container = executor["container"]
        resources = container["resources"]
        assert "accelerator" not in resources, name
        assert set(resources) <= {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit",
                                  "resourceCpuRequest", "resourceCpuLimit",
                                  "resourceMemoryRequest", "resourceMemoryLimit"}, name
        assert resources["resourceCpuLimit"] and resources["resourceMemoryLimit"], name
        assert container["image"] == images.LAUNCHER_IMAGE, name
        assert "nvidia" not in yaml.safe_dump(container), name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, config in k8s.items():
        assert "nvidia" not in yaml.safe_dump(config), name


def test_kubernetes_platform_config(compiled):
    _, doc, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(doc["deploymentSpec"]["executors"])
    for name, config in k8s.items():
        assert config["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
            "step_node_selector"), name
        assert config["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith(
            "step_tolerations"), name
    env = {e["name"]: e["fieldPath"] for e in k8s["exec-train"]["fieldPathAsEnv"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_UID": "metadata.uid"}


def test_steps_need_no_pip_install_at_run_time(compiled):
    _, doc, _ = compiled
    for name, executor in doc["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, name
        assert "kfp.dsl.executor_main" in command, name


def test_every_step_is_uncached(compiled):
    spec, _, _ = compiled
    for component in ["root", *spec.components]:
        if component == "root" or spec.components[component].WhichOneof("implementation") == "dag":
            for name, task in dag_of(spec, component).tasks.items():
                if spec.components[task.component_ref.name].WhichOneof("implementation") != "dag":
                    assert not task.caching_options.enable_cache, name


def test_versions_file_and_environment_choose_the_images(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_IMAGENET_REGISTRY", raising=False)
    monkeypatch.delenv("RESNET_IMAGENET_TAG", raising=False)
    versions = tmp_path / "versions.env"
    versions.write_text("# comment\nREGISTRY=registry.example.com/ml\nTAG=2.0.1\n"
                        "TF_VERSION=2.21.0\n")
    assert images.image("trainer", versions) == (
        "registry.example.com/ml/resnet-imagenet-trainer:2.0.1")
    assert images.image("launcher", tmp_path / "missing.env") == (
        "ghcr.io/example/resnet-imagenet-launcher:0.1.0")
    monkeypatch.setenv("RESNET_IMAGENET_TAG", "3.0.0")
    assert images.image("launcher", versions) == (
        "registry.example.com/ml/resnet-imagenet-launcher:3.0.0")


def test_repository_versions_file_is_the_source(monkeypatch):
    monkeypatch.delenv("RESNET_IMAGENET_REGISTRY", raising=False)
    monkeypatch.delenv("RESNET_IMAGENET_TAG", raising=False)
    values = images.read_versions(images.VERSIONS_ENV)
    assert images.image("trainer") == (
        f"{values['REGISTRY']}/resnet-imagenet-trainer:{values['TAG']}")


def test_compile_script_with_registry_override(tmp_path):
    output = tmp_path / "out.yaml"
    env = {**os.environ, "RESNET_IMAGENET_REGISTRY": "eu.gcr.io/proj", "RESNET_IMAGENET_TAG": "9.9"}
    result = subprocess.run([sys.executable, "compile_pipeline.py", "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {output}"
    text = output.read_text()
    assert "image: eu.gcr.io/proj/resnet-imagenet-launcher:9.9" in text
    assert "eu.gcr.io/proj/resnet-imagenet-trainer:9.9" in text
    assert "ghcr.io/example" not in text
