"""The compiled pipeline through what a KFP backend checks on upload and run creation, with
the protobuf schemas of the oldest backend we support (KFP_FLOOR_VERSION) and the newest
(KFP_LATEST_VERSION), for the run parameters the README shows and both launcher backends;
and `make pipeline-check`'s report.

The schemas are the PyPI packages kfp-pipeline-spec and kfp-kubernetes of each release,
installed once per machine (pipeline_check.schemas, like tools/build.sh's Go tools).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

import compile_pipeline
import pipeline_check
from pipelines.resnet50_imagenet import Options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERSIONS = pipeline_check.kfp_versions()
FLOOR, LATEST = VERSIONS["floor"], VERSIONS["latest"]
README_RUNS = [{**pipeline_check.README_PARAMETERS, "train_backend": backend}
               for backend in ("tfjob", "trainjob")]


@pytest.fixture(scope="module")
def yamls(tmp_path_factory) -> dict[str, str]:
    """The default YAML (for 2.17.0+) and the one for 2.14.0-2.16.x with the bucket key."""
    work = tmp_path_factory.mktemp("backend")
    for version in (FLOOR, LATEST):
        pipeline_check.schemas(version)  # installed once per machine, then cached
    return {
        "2.17": compile_pipeline.compile_pipeline(str(work / "default.yaml")),
        "2.14": compile_pipeline.compile_pipeline(str(work / "for-2.14.yaml"), Options(
            kfp_backend="2.14", bucket_key_secret="resnet-imagenet-gcp-key")),
    }


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_the_checked_parameters_are_the_readmes():
    block = re.search(r"arguments=(\{.*?\n    \}),\n", readme(), re.S).group(1)
    assert ast.literal_eval(block) == pipeline_check.README_PARAMETERS


def test_the_readme_explains_every_parameter_of_the_run_form(yamls):
    """A newcomer fills in the form from the README's table: every parameter, its type."""
    with open(yamls["2.17"]) as f:
        inputs = next(iter(yaml.safe_load_all(f)))["root"]["inputDefinitions"]["parameters"]
    types = {"STRING": "string", "BOOLEAN": "boolean", "NUMBER_INTEGER": "integer",
             "STRUCT": "struct", "LIST": "list"}
    rows = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", readme(), re.M))
    assert rows == {name: types[p["parameterType"]] for name, p in inputs.items()}
    assert list(rows) == sorted(rows)  # in the order of the form


def test_the_versions_are_the_floor_and_the_newest_release():
    assert (FLOOR, LATEST) == ("2.14.0", "2.17.0")
    assert pipeline_check.backend_releases("2.14") == [FLOOR, LATEST]
    assert pipeline_check.backend_releases("2.17") == [LATEST]


@pytest.mark.parametrize("params", README_RUNS, ids=lambda p: p["train_backend"])
def test_the_default_yaml_is_accepted_by_the_newest_backend(yamls, params):
    result = pipeline_check.upload_check(yamls["2.17"], LATEST, params)
    assert result["pipeline"] == "resnet50-imagenet"
    assert result["display_name"] == "ResNet-50 on ImageNet"
    assert result["platform_spec"]
    assert set(result["pipeline_config"]) == {"activeDeadlineSeconds", "resourceTtlOnCompletion"}
    executors = result["kubernetes_executors"]
    assert len(executors) == 9
    assert all(int(config["activeDeadlineSeconds"]) > 0 for config in executors.values())


def test_the_floor_would_silently_drop_the_default_yamls_kubernetes_settings(yamls):
    """Why --kfp-backend 2.14 exists: 2.14.0's PipelineConfig has no activeDeadlineSeconds, its
    strict parse of the platform document fails, and the backend then ignores the document."""
    with pytest.raises(pipeline_check.CheckFailed) as info:
        pipeline_check.upload_check(yamls["2.17"], FLOOR, README_RUNS[0])
    message = str(info.value)
    assert message.startswith(f"KFP {FLOOR}: document 2 (the platform spec) does not parse")
    assert "silently ignore it" in message and "activeDeadlineSeconds" in message


@pytest.mark.parametrize("version", [FLOOR, LATEST])
@pytest.mark.parametrize("params", README_RUNS, ids=lambda p: p["train_backend"])
def test_the_2_14_yaml_is_accepted_from_the_floor_on(yamls, version, params):
    result = pipeline_check.upload_check(yamls["2.14"], version, params)
    assert result["pipeline_config"] == {}
    for name, config in result["kubernetes_executors"].items():
        # The bucket key and the step placement survive the floor's schema.
        assert config["secretAsVolume"][0]["mountPath"] == "/var/secrets/google", name
        assert config["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"], name
        assert config["tolerations"][0]["tolerationJson"]["componentInputParameter"], name


@pytest.mark.parametrize("params, expected", [
    ({k: v for k, v in README_RUNS[0].items() if k != "data_raw_uri"},
     "parameter data_raw_uri is not optional, yet has neither default value nor user "
     "provided value"),
    ({**README_RUNS[0], "train_workers": "4"},
     "input parameter train_workers requires type number, but the value '4' is a string"),
    ({**README_RUNS[0], "workers": 4}, "unrecognized input parameter(s): workers"),
])
def test_run_parameters_are_checked_like_the_api_server(yamls, params, expected):
    with pytest.raises(pipeline_check.CheckFailed) as info:
        pipeline_check.upload_check(yamls["2.17"], LATEST, params)
    assert str(info.value) == f"KFP {LATEST}: {expected}"


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline_check.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_pipeline_check_prints_one_line_per_step():
    """`make pipeline-check` for 2.14.0-2.16.x: both releases, both launcher backends."""
    result = run_check("--kfp-backend", "2.14", "--convert-parallelism", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [f"KFP {v}: accepted (train_backend={b}); 9 steps with Kubernetes "
                         "settings" for v in (FLOOR, LATEST) for b in ("tfjob", "trainjob")]
    assert lines[4] == ("pipeline 'resnet50-imagenet' (ResNet-50 on ImageNet): run deadline "
                        "none, TTL after finish none")
    steps = {line.split("  ")[0].strip(): line for line in lines[5:]}
    assert list(steps) == ["validate parameters", "dataset ready?", "convert shards",
                           "finalize dataset", "use existing dataset", "train", "evaluate",
                           "export SavedModel", "training report"]
    for name, line in steps.items():
        assert " gpus=0 " in line, name
        assert "resnet-imagenet-launcher:" in line, name
        assert "placement=nodeSelector<-step_node_selector,tolerations<-step_tolerations" in line
    assert re.search(r"cpu=8/8 mem=8Gi/16Gi gpus=0 retries=3 \(after 15s, x2\) deadline=12h "
                     r".* parallelism=4$", steps["convert shards"])
    assert "retries=none deadline=337h" in steps["train"]  # 14 days + 1 hour
    assert "retries=none deadline=30m" in steps["validate parameters"]
    assert "cpu=4/8 mem=8Gi/16Gi gpus=0 retries=3 (after 30s, x2) deadline=2h" in \
        steps["export SavedModel"]


def test_pipeline_check_fails_on_a_refused_run(tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"data_raw_uri": "gs://b/raw"}))
    result = run_check("--params", str(params))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"error: KFP {LATEST}: parameter data_export_uri is not optional, "
                             "yet has neither default value nor user provided value\n")
    assert run_check("--params", str(tmp_path / "missing.json")).returncode == 2
