"""The compiled pipeline: a valid KFP PipelineSpec with the steps in DAG order, the reference
recipe as defaults, Kubernetes settings from kfp-kubernetes, and no GPU in any step; a run form
that reads in order, deadlines, retries, the ParallelFor bound and the bucket key option."""

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
from pipelines.resnet50_imagenet import Options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_with(tmp_path_factory, options=None):
    path = str(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    assert compile_pipeline.compile_pipeline(path, options) == path
    with open(path) as f:
        pipeline_doc, platform_doc = yaml.safe_load_all(f)
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    return spec, pipeline_doc, json_format.MessageToDict(platform)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[pipeline_spec_pb2.PipelineSpec, dict, dict]:
    return compile_with(tmp_path_factory)


@pytest.fixture(scope="module")
def compiled_for_2_14_with_key(tmp_path_factory):
    return compile_with(tmp_path_factory, Options(
        kfp_backend="2.14", convert_parallelism=3, bucket_key_secret="resnet-imagenet-gcp-key",
        convert_deadline=5 * 3600, train_timeout_max=2 * 86400))


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
    # Bounded fan-out: at most 8 conversion pods at once.
    assert loop.iterator_policy.parallelism_limit == 8


def test_defaults_are_the_reference_recipe(compiled):
    spec, _, _ = compiled
    params = spec.root.input_definitions.parameters
    defaults = {name: json_format.MessageToDict(p.default_value) for name, p in params.items()
                if p.HasField("default_value")}
    assert defaults["train_backend"] == "tfjob"
    names = ("train_workers", "train_gpus_per_worker", "train_batch_size", "train_steps",
             "model_resnet_depth", "model_image_size", "tfrecord_shards_train",
             "tfrecord_shards_validation", "train_timeout_seconds")
    assert {k: int(defaults[k]) for k in names} == {
        "train_workers": 4, "train_gpus_per_worker": 1, "train_batch_size": 256,
        "train_steps": 500_000, "model_resnet_depth": 50, "model_image_size": 224,
        "tfrecord_shards_train": 1024, "tfrecord_shards_validation": 128,
        "train_timeout_seconds": 7 * 86400}
    assert defaults["train_image"] == images.TRAINER_IMAGE
    for required in ("data_raw_uri", "data_tfrecord_uri", "data_model_uri", "data_export_uri"):
        assert not params[required].is_optional and required not in defaults


def test_the_run_form_reads_in_order(compiled):
    """The KFP UI lists `name - type` alphabetically: the four URIs (the only required
    parameters) come first and together, every other name carries its group as a prefix."""
    spec, _, _ = compiled
    params = spec.root.input_definitions.parameters
    form = sorted(params)
    assert form[:4] == ["data_export_uri", "data_model_uri", "data_raw_uri",
                        "data_tfrecord_uri"]
    assert {n for n, p in params.items() if not p.HasField("default_value")} == set(form[:4])
    groups = [name.split("_", 1)[0] for name in form]
    assert groups == sorted(groups), "a group is split up in the form"
    assert set(groups) == {"data", "export", "model", "step", "tfrecord", "train"}
    # One toleration format for both pools: lists of Kubernetes toleration objects.
    assert params["step_tolerations"].parameter_type == params["train_gpu_tolerations"] \
        .parameter_type == pipeline_spec_pb2.ParameterType.LIST
    assert spec.pipeline_info.display_name == "ResNet-50 on ImageNet"


def test_no_two_outputs_share_a_name_and_training_figures_are_metrics(compiled):
    """Each name is one artifact: the steps' outputs differ, and a pipeline output carries the
    name of the step output it forwards (before, the pipeline's `metrics` was the evaluation's
    JSON while the evaluation's `metrics` was its Metrics artifact)."""
    spec, _, _ = compiled
    producers: dict[str, set] = {}
    for name, component in spec.components.items():
        if component.WhichOneof("implementation") != "dag":
            for output in component.output_definitions.artifacts:
                producers.setdefault(output, set()).add(name)
    # Only the two branches of the dataset's dsl.OneOf make the same artifact.
    assert {k: v for k, v in producers.items() if len(v) > 1} == {
        "dataset": {"comp-finalize-dataset", "comp-use-existing-dataset"}}
    seen = {k: min(v) for k, v in producers.items()}
    assert "metrics" not in seen
    for name, selected in spec.root.dag.outputs.artifacts.items():
        (selector,) = selected.artifact_selectors
        assert selector.output_artifact_key == name
    assert seen["training_metrics"] == "comp-train"
    assert seen["evaluation_metrics"] == "comp-evaluate"
    train_outputs = spec.components["comp-train"].output_definitions.artifacts
    assert train_outputs["training_metrics"].artifact_type.schema_title == "system.Metrics"
    assert set(spec.root.output_definitions.artifacts) == {
        "training_metrics", "evaluation_details", "report"}


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
        assert "secretAsVolume" not in config, name  # the bucket key is off by default
    env = {e["name"]: e["fieldPath"] for e in k8s["exec-train"]["fieldPathAsEnv"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_UID": "metadata.uid"}
    assert not any("env" in e["container"] for e in doc["deploymentSpec"]["executors"].values())


HOUR, DAY = 3600, 86400
DEADLINES = {  # executor -> pod deadline with the default options
    "exec-validate-parameters": HOUR // 2, "exec-dataset-ready": HOUR // 2,
    "exec-convert-shards": 12 * HOUR, "exec-finalize-dataset": HOUR // 2,
    "exec-use-existing-dataset": HOUR // 2, "exec-train": 14 * DAY + HOUR,
    "exec-evaluate": 6 * HOUR, "exec-export-saved-model": 2 * HOUR,
    "exec-training-report": HOUR // 2,
}


def test_every_step_and_the_run_have_a_deadline_and_the_run_a_ttl(compiled):
    _, _, platform = compiled
    kubernetes = platform["platforms"]["kubernetes"]
    executors = kubernetes["deploymentSpec"]["executors"]
    assert {name: int(c["activeDeadlineSeconds"]) for name, c in executors.items()} == DEADLINES
    config = kubernetes["pipelineConfig"]
    # The longest training (14 days) + 1 h for the launcher to delete the job + the longest
    # path of the other steps with one retry each (conversion in two waves).
    others = 2 * (HOUR // 2) + 4 * 12 * HOUR + 2 * (HOUR // 2) + 2 * 6 * HOUR + 2 * 2 * HOUR
    assert config == {"activeDeadlineSeconds": 14 * DAY + HOUR + others,
                      "resourceTtlOnCompletion": 7 * DAY}


def test_idempotent_steps_retry_with_backoff_and_train_does_not(compiled):
    spec, _, _ = compiled
    policies = {}
    for component in ["root", *spec.components]:
        if component == "root" or spec.components[component].WhichOneof("implementation") == "dag":
            for name, task in dag_of(spec, component).tasks.items():
                if spec.components[task.component_ref.name].WhichOneof("implementation") != "dag":
                    policies[name] = task.retry_policy
    assert {n for n, p in policies.items() if p.max_retry_count} == {
        "dataset-ready", "convert-shards", "finalize-dataset", "use-existing-dataset",
        "evaluate", "export-saved-model", "training-report"}
    for name in ("evaluate", "export-saved-model", "training-report", "finalize-dataset"):
        policy = policies[name]
        assert (policy.max_retry_count, policy.backoff_duration.seconds,
                policy.backoff_factor, policy.backoff_max_duration.seconds) == (3, 30, 2.0, 3600)
    assert policies["convert-shards"].backoff_duration.seconds == 15


def test_options_for_backend_2_14_with_the_bucket_key(compiled_for_2_14_with_key):
    """--kfp-backend 2.14: no PipelineConfig; the compile-time options reach the YAML; the
    bucket key Secret is mounted into every step and handed to the training job."""
    spec, doc, platform = compiled_for_2_14_with_key
    kubernetes = platform["platforms"]["kubernetes"]
    assert "pipelineConfig" not in kubernetes
    executors = kubernetes["deploymentSpec"]["executors"]
    assert int(executors["exec-convert-shards"]["activeDeadlineSeconds"]) == 5 * HOUR
    assert int(executors["exec-train"]["activeDeadlineSeconds"]) == 2 * DAY + HOUR
    for name, config in executors.items():
        (secret,) = config["secretAsVolume"]
        assert secret["secretNameParameter"]["runtimeValue"]["constant"] == \
            "resnet-imagenet-gcp-key", name
        assert secret["mountPath"] == "/var/secrets/google", name
        env = doc["deploymentSpec"]["executors"][name]["container"]["env"]
        assert env == [{"name": "GOOGLE_APPLICATION_CREDENTIALS",
                        "value": "/var/secrets/google/key.json"}], name
    train_inputs = spec.root.dag.tasks["train"].inputs.parameters
    assert train_inputs["gcs_secret"].runtime_value.constant.string_value == \
        "resnet-imagenet-gcp-key"
    validate_inputs = spec.root.dag.tasks["validate-parameters"].inputs.parameters
    assert validate_inputs["train_timeout_max_seconds"].runtime_value.constant.number_value \
        == 2 * DAY
    loop = next(task for c in spec.components.values() if c.WhichOneof("implementation") == "dag"
                for task in c.dag.tasks.values() if task.WhichOneof("iterator"))
    assert loop.iterator_policy.parallelism_limit == 3


def test_bad_compile_options_are_one_line_errors(tmp_path, capsys):
    output = tmp_path / "out.yaml"
    assert compile_pipeline.main(["--output", str(output), "--convert-parallelism", "0"]) == 2
    assert capsys.readouterr().err == "error: --convert-parallelism 0 must be at least 1\n"
    assert compile_pipeline.main(["--output", str(output), "--export-deadline", "30"]) == 2
    assert "--export-deadline 30 s is too short" in capsys.readouterr().err
    assert not output.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        compile_pipeline.main(["--output", str(output), "--convert-deadline", "12 hours"])
    assert "'12 hours' is not a duration" in capsys.readouterr().err
    assert compile_pipeline.duration("12h") == 12 * HOUR
    assert compile_pipeline.duration("14d") == 14 * DAY


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
    result = subprocess.run([sys.executable, "compile_pipeline.py", "--output", str(output),
                             "--kfp-backend", "2.14"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {output}"
    text = output.read_text()
    assert "image: eu.gcr.io/proj/resnet-imagenet-launcher:9.9" in text
    assert "eu.gcr.io/proj/resnet-imagenet-trainer:9.9" in text
    assert "ghcr.io/example" not in text
    assert "pipelineConfig" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml"]  # no temporary left
