"""`make pipeline-check`: compile the pipeline, put it through the checks a KFP backend makes on
upload and run creation (for each backend release the YAML is for), then one line per step.

    python pipeline_check.py [--params FILE.json] [compile_pipeline.py's flags]

The backend's checks run against that release's own protobuf schemas (kfp-pipeline-spec and
kfp-kubernetes of the same version, installed once per machine; see tools/kfp_upload_check.py
and tools/versions.env). Each step's line: name, image, CPU and memory (request/limit), GPUs,
retries, pod deadline, node placement. Exit status 0 when every check passes, 1 when one
fails (its ``error:`` line says which), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSIONS_ENV = os.path.join(ROOT, "tools", "versions.env")
UPLOAD_CHECK = os.path.join(ROOT, "tools", "kfp_upload_check.py")
SCHEMA_PACKAGES = ("kfp-pipeline-spec", "kfp-kubernetes")

# The run parameters of the README's "Run on a cluster" (its kfp.Client example; a test keeps
# the two equal), checked once per launcher backend: what a newcomer fills in the run form.
README_PARAMETERS = {
    "data_raw_uri": "gs://BUCKET/imagenet/raw",
    "data_tfrecord_uri": "gs://BUCKET/imagenet/tfrecords",
    "data_model_uri": "gs://BUCKET/resnet-imagenet/runs/resnet50-001",
    "data_export_uri": "gs://BUCKET/resnet-imagenet/export/resnet50-001",
    "train_gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
}
TRAIN_BACKENDS = ("tfjob", "trainjob")


class CheckFailed(Exception):
    pass


def kfp_versions() -> dict[str, str]:
    """``{"floor": "2.14.0", "latest": "2.17.0"}`` from tools/versions.env."""
    values = {}
    with open(VERSIONS_ENV) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return {"floor": values["KFP_FLOOR_VERSION"], "latest": values["KFP_LATEST_VERSION"]}


def backend_releases(kfp_backend: str) -> list[str]:
    """The releases a YAML compiled for ``kfp_backend`` (Options.kfp_backend) must pass."""
    versions = kfp_versions()
    if kfp_backend == "2.14":
        return [versions["floor"], versions["latest"]]
    return [versions["latest"]]


def cache_dir() -> str:
    return os.environ.get("RESNET_IMAGENET_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "resnet-imagenet"))


def schemas(version: str) -> str:
    """The folder with that release's schema packages, installed from PyPI the first time
    (to a temporary folder renamed when complete; one installer at a time per machine).

    Raises UserError when the cache folder cannot be written, CheckFailed when pip fails.
    """
    from resnet_imagenet.errors import UserError

    folder = os.path.join(cache_dir(), "kfp-schemas")
    target = os.path.join(folder, version)
    if os.path.isdir(target):
        return target
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "w")
    except OSError as exc:
        raise UserError(f"cannot write the cache folder {folder} ({exc.strerror}): make it "
                        "writable, or point RESNET_IMAGENET_CACHE at a folder you own") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(target):
            return target
        # Under the lock no install runs: a temporary folder is what a killed one left behind.
        for name in os.listdir(folder):
            if ".tmp." in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        partial = tempfile.mkdtemp(prefix=f"{version}.tmp.", dir=folder)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                 partial, *(f"{name}=={version}" for name in SCHEMA_PACKAGES)],
                capture_output=True, text=True, timeout=600)
            if result.returncode:
                raise CheckFailed(f"cannot install the KFP {version} schemas "
                                  f"({' '.join(SCHEMA_PACKAGES)} {version}) from PyPI: "
                                  f"{(result.stderr.strip().splitlines() or ['pip failed'])[-1]}")
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already when renamed
    return target


def upload_check(pipeline_yaml: str, version: str, params: dict) -> dict:
    """tools/kfp_upload_check.py for KFP ``version``; raises CheckFailed with its error."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(params, f)
    try:
        result = subprocess.run(
            [sys.executable, UPLOAD_CHECK, "--schemas", schemas(version), "--params", f.name,
             pipeline_yaml], capture_output=True, text=True, timeout=300)
    finally:
        os.remove(f.name)
    if result.returncode:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise CheckFailed(f"KFP {version}: {message.removeprefix('error: ') or 'failed'}")
    return json.loads(result.stdout)


def _duration(seconds) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _parameter(channel: str) -> str:
    """``pipelinechannel--step_node_selector`` -> ``step_node_selector``."""
    return channel.split("--")[-1]


def _in_dag_order(tasks: dict) -> list[str]:
    """Task keys with each one after the tasks it depends on (ties by name)."""
    done: list[str] = []
    while len(done) < len(tasks):
        ready = sorted(k for k, t in tasks.items() if k not in done
                       and all(d in done or d not in tasks for d in t.get("dependentTasks", [])))
        done.append(ready[0] if ready else sorted(set(tasks) - set(done))[0])
    return done


def _tasks(spec: dict, component: dict, path=()):
    """(task key, task, the ParallelFor bounds around it) of every container task."""
    tasks = component.get("dag", {}).get("tasks", {})
    for key in _in_dag_order(tasks):
        task = tasks[key]
        child = spec["components"][task["componentRef"]["name"]]
        bounds = path
        if "parameterIterator" in task or "artifactIterator" in task:
            bounds = (*path, task.get("iteratorPolicy", {}).get("parallelismLimit", 0))
        if "dag" in child:
            yield from _tasks(spec, child, bounds)
        else:
            yield key, task, child, bounds


def step_lines(pipeline_doc: dict, kubernetes: dict) -> list[str]:
    """One line per step from the PipelineSpec and the checked Kubernetes executor configs."""
    executors = pipeline_doc["deploymentSpec"]["executors"]
    lines = []
    for key, task, component, bounds in _tasks(pipeline_doc, pipeline_doc["root"]):
        executor = component["executorLabel"]
        container = executors[executor]["container"]
        resources = container.get("resources", {})
        accelerator = resources.get("accelerator", {})
        gpus = accelerator.get("resourceCount") or accelerator.get("count") or 0
        config = kubernetes.get(executor, {})
        retry = task.get("retryPolicy")
        retries = (f"{retry['maxRetryCount']} (after {retry.get('backoffDuration', '0s')}, "
                   f"x{retry.get('backoffFactor', 2):g})" if retry else "none")
        deadline = config.get("activeDeadlineSeconds")
        selector = config.get("nodeSelector", {}).get("nodeSelectorJson", {})
        placement = (f"nodeSelector<-{_parameter(selector['componentInputParameter'])}"
                     if "componentInputParameter" in selector else "")
        tolerations = [_parameter(t["tolerationJson"]["componentInputParameter"])
                       for t in config.get("tolerations", []) if "tolerationJson" in t]
        if tolerations:
            placement += f",tolerations<-{'+'.join(tolerations)}"
        secrets = [s["mountPath"] for s in config.get("secretAsVolume", [])]
        loop = f" parallelism={bounds[-1] or 'unbounded'}" if bounds else ""
        lines.append(
            f"{task['taskInfo']['name']:<22} {container['image']}  "
            f"cpu={resources.get('resourceCpuRequest', '-')}/"
            f"{resources.get('resourceCpuLimit', '-')} "
            f"mem={resources.get('resourceMemoryRequest', '-')}/"
            f"{resources.get('resourceMemoryLimit', '-')} gpus={gpus} retries={retries} "
            f"deadline={_duration(deadline) if deadline else 'none'} "
            f"placement={placement or 'none'}"
            + (f" secret@{','.join(secrets)}" if secrets else "") + loop)
    return lines


def check(pipeline_yaml: str, kfp_backend: str, params_list: list[dict]) -> list[str]:
    """Every upload check for the YAML; returns the report lines, raises CheckFailed."""
    import yaml

    lines = []
    result = None
    for version in backend_releases(kfp_backend):
        for params in params_list:
            result = upload_check(pipeline_yaml, version, params)
            if not result["platform_spec"]:
                raise CheckFailed(f"KFP {version}: the YAML has no Kubernetes platform spec")
            lines.append(f"KFP {version}: accepted (train_backend="
                         f"{params.get('train_backend', 'tfjob')}); "
                         f"{len(result['kubernetes_executors'])} steps with Kubernetes settings")
    with open(pipeline_yaml) as f:
        pipeline_doc = next(d for d in yaml.safe_load_all(f) if d and "pipelineInfo" in d)
    config = result["pipeline_config"]
    deadline, ttl = (_duration(config[k]) if k in config else "none"
                     for k in ("activeDeadlineSeconds", "resourceTtlOnCompletion"))
    lines.append(f"pipeline {result['pipeline']!r} ({result['display_name']}): run deadline "
                 f"{deadline}, TTL after finish {ttl}")
    lines += step_lines(pipeline_doc, result["kubernetes_executors"])
    return lines


def main(argv: list[str] | None = None) -> int:
    import compile_pipeline
    from resnet_imagenet.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", metavar="FILE",
                        help="run parameters to check (a JSON object; default: the README's, "
                        "once per train_backend)")
    compile_pipeline.add_option_arguments(parser)
    args = parser.parse_args(argv)
    if args.params:
        try:
            with open(args.params) as f:
                params_list = [json.load(f)]
        except (OSError, ValueError) as exc:
            print(f"error: --params {args.params}: {exc}", file=sys.stderr)
            return 2
    else:
        params_list = [{**README_PARAMETERS, "train_backend": b} for b in TRAIN_BACKENDS]
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "pipeline.yaml")
        try:
            compile_pipeline.compile_pipeline(path, compile_pipeline.options_from(args))
            for line in check(path, args.kfp_backend, params_list):
                print(line)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except CheckFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
