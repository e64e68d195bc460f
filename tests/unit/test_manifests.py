"""The manifests a platform engineer applies: they render, validate and follow the policy.

Offline and fast: ``kubectl kustomize`` renders every kustomization (the overlays also with their
optional components switched on, as a user would), every rendered object is validated strictly
(unknown fields rejected) against the Kubernetes schemas bundled with ``kubernetes-validate``,
or against the training operator's TFJob CRD, and a policy runs over every workload: non-root,
resources, no host access or privilege, pinned images, no secret values, least-privilege RBAC.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from resnet_imagenet.launch import schema as tfjob_schema
from tests.support.manifests import MANIFESTS, RUN_AS_USER, kubectl
from tests.support.repo import ROOT

# Checked against an old and the newest Kubernetes that kubernetes-validate bundles schemas of
# (offline): a field removed or not yet there in either fails.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
OVERLAYS = ("gke-gpu", "generic")
OPTIONAL_COMPONENTS = ("data-service", "kubeflow-tensorboard", "trainer-v2")
NAMESPACE = "kubeflow-user-example-com"
LAUNCHER_RULES = {
    ("kubeflow.org", "tfjobs"): {"create", "get", "list", "patch", "delete"},
    ("", "pods"): {"get", "list"},
    ("", "pods/log"): {"get"},
    # Why replicas do not start: the operator's FailedCreatePod and other Warning events.
    ("", "events"): {"get", "list"},
    ("events.k8s.io", "events"): {"get", "list"},
}
# What the trainer-v2 component adds for `launch --backend trainjob`: its TrainJobs, nothing of
# the JobSets and Jobs Trainer's controllers make from them.
TRAINJOB_RULES = {("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "patch",
                                                          "delete"}}
TRAINER_RUNTIMES = {"resnet-imagenet-tensorflow": {"node"},
                    "resnet-imagenet-tensorflow-evaluator": {"node", "evaluator"}}
# The Kubeflow tensorboard controller's CRD (tensorboard.kubeflow.org/v1alpha1) has one spec
# field; written out here, strict like the rest.
TENSORBOARD_CR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "tensorboard.kubeflow.org/v1alpha1"},
        "kind": {"const": "Tensorboard"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["logspath"],
            "additionalProperties": False,
            "properties": {"logspath": {"type": "string"}},
        },
    },
}


def load_generate():
    """manifests/generate.py, the generator of the images component and the TFJob examples."""
    spec = importlib.util.spec_from_file_location("manifests_generate",
                                                  MANIFESTS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(directory: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert objects, f"{directory} renders no objects"
    return objects


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """name -> rendered objects, for the base, each overlay, and each overlay with options on.

    The options are switched on in a copy of the tree by uncommenting their lines in the
    overlay's kustomization.yaml, exactly the edit the comments there ask a user to make.
    """
    copy_root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy_root)
    renderings = {"base": render(MANIFESTS / "base")}
    for overlay in OVERLAYS:
        renderings[overlay] = render(MANIFESTS / "overlays" / overlay)
        kustomization = copy_root / "overlays" / overlay / "kustomization.yaml"
        text = kustomization.read_text()
        for component in OPTIONAL_COMPONENTS:
            line = f"  # - ../../components/{component}\n"
            assert line in text, f"{overlay}: the commented-out option {component} is missing"
            text = text.replace(line, f"  - ../../components/{component}\n")
        kustomization.write_text(text)
        renderings[f"{overlay}+options"] = render(kustomization.parent)
    return renderings


def tfjob_examples() -> list[Path]:
    return sorted(MANIFESTS.rglob("tfjob-example*.yaml"))


def load_examples() -> dict[str, list[dict]]:
    return {
        str(path.relative_to(ROOT)): [o for o in yaml.safe_load_all(path.read_text()) if o]
        for path in tfjob_examples()
    }


def all_objects(rendered) -> list[tuple[str, dict]]:
    """(where, object) for every rendered object and every standalone TFJob example."""
    found = [(name, obj) for name, objs in rendered.items() for obj in objs]
    found += [(name, obj) for name, objs in load_examples().items() for obj in objs]
    return found


def describe(where: str, obj: dict) -> str:
    return f"{where}: {obj['kind']}/{obj['metadata'].get('name')}"


# --- schemas ------------------------------------------------------------------------------


def validate_builtin(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def validate(obj: dict) -> None:
    """Raise with the offending path if the cluster's API server would not take ``obj`` as is."""
    if obj["apiVersion"] == "kubeflow.org/v1" and obj["kind"] == "TFJob":
        # The CRD's schema with unknown fields refused, and the operator's webhook rules: the
        # checks the launcher makes before it submits anything.
        errors = tfjob_schema.schema_errors(obj) + tfjob_schema.webhook_errors(obj)
        assert not errors, "; ".join(errors)
        # The CRD leaves metadata and pod-template metadata untyped: check them, and each
        # replica's pod template once more, against Kubernetes' own PodTemplate schema.
        for spec in obj["spec"]["tfReplicaSpecs"].values():
            validate_builtin({"apiVersion": "v1", "kind": "PodTemplate",
                              "metadata": obj["metadata"], "template": spec["template"]})
    elif obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1":
        # Trainer v2.3.0's CRD schema, strictly; the JobSet template's pod templates once more
        # against Kubernetes' own PodTemplate schema.
        errors = tfjob_schema.schema_errors(obj, tfjob_schema.TRAINING_RUNTIME_CRD_FILE)
        assert obj["kind"] == "TrainingRuntime" and not errors, "; ".join(errors)
        for job in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            validate_builtin({"apiVersion": "v1", "kind": "PodTemplate",
                              "metadata": obj["metadata"],
                              "template": job["template"]["spec"]["template"]})
    elif obj["apiVersion"] == "tensorboard.kubeflow.org/v1alpha1":
        jsonschema.validate(obj, TENSORBOARD_CR_SCHEMA)
        validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    else:
        validate_builtin(obj)


def test_generated_manifests_are_up_to_date():
    """The TFJob examples are exactly what the launcher builds today (its ``--dry-run``), and
    the images component exactly what images/versions.env says."""
    generate = load_generate()
    for path, text in generate.expected().items():
        assert path.exists() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run `python manifests/generate.py`")


def test_tfjob_examples_match_their_place():
    """The base example leaves the namespace to `kubectl -n`; an overlay's example uses the
    overlay's namespace and its way to GPUs and to the bucket."""
    examples = {path: obj for path, (obj,) in load_examples().items()}
    assert set(examples) == {"manifests/base/tfjob-example.yaml"} | {
        f"manifests/overlays/{o}/tfjob-example.yaml" for o in OVERLAYS}
    for path, job in examples.items():
        (worker,) = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        pod = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
        if "/base/" in path:
            assert "namespace" not in job["metadata"]
            continue
        assert job["metadata"]["namespace"] == NAMESPACE, path
        assert pod["serviceAccountName"] == "resnet-imagenet"
        if "/gke-gpu/" in path:
            assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                pod["tolerations"]
            assert not any("secret" in v for v in pod["volumes"])
        else:
            secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
            assert secrets == ["resnet-imagenet-gcp-key"]
            assert "nodeSelector" not in pod


def test_every_kustomization_is_rendered():
    """No kustomization escapes the checks below: each is the base, an overlay, or a
    component that the overlays list (always, or as an option)."""
    for path in MANIFESTS.rglob("kustomization.yaml"):
        directory = path.parent.relative_to(MANIFESTS).as_posix()
        kind = yaml.safe_load(path.read_text())["kind"]
        if kind == "Component":
            assert directory in ["components/images"] + [
                f"components/{c}" for c in OPTIONAL_COMPONENTS
            ], f"{directory}: a component no overlay uses"
        else:
            assert directory in ["base"] + [f"overlays/{o}" for o in OVERLAYS], \
                f"{directory}: a kustomization this test does not render"


def test_every_object_validates_strictly(rendered):
    checked = set()
    for where, obj in all_objects(rendered):
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{describe(where, obj)}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{describe(where, obj)}: {exc.message}")
        checked.add(obj["kind"])
    assert {"Deployment", "Service", "Role", "RoleBinding", "TFJob", "Tensorboard",
            "TrainingRuntime"} <= checked


def test_strict_validation_rejects_a_misplaced_field(rendered):
    """The checks above would catch the old launcher's bug (runPolicy fields under spec) and a
    misspelt field in a built-in kind, instead of the API server dropping them silently."""
    (example,) = load_examples()["manifests/base/tfjob-example.yaml"]
    broken = copy.deepcopy(example)
    broken["spec"]["backoffLimit"] = 3
    with pytest.raises(AssertionError, match="backoffLimit"):
        validate(broken)
    deployment = copy.deepcopy(by_kind(rendered["generic"], "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


# --- policy -------------------------------------------------------------------------------


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(where: str, obj: dict) -> list[tuple[str, dict]]:
    """(label, pod spec) of every pod a workload object creates."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(describe(where, obj), obj["spec"]["template"]["spec"])]
    if obj["kind"] == "TFJob":
        return [(f"{describe(where, obj)} {replica}", spec["template"]["spec"])
                for replica, spec in obj["spec"]["tfReplicaSpecs"].items()]
    if obj["kind"] == "TrainingRuntime":
        return [(f"{describe(where, obj)} {job['name']}",
                 job["template"]["spec"]["template"]["spec"])
                for job in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def workloads(rendered) -> list[tuple[str, dict]]:
    found = [spec for where, obj in all_objects(rendered) for spec in pod_specs(where, obj)]
    assert len(found) >= 4
    return found


def test_workloads_run_as_non_root(rendered):
    for label, spec in workloads(rendered):
        pod = spec.get("securityContext", {})
        for container in spec["containers"] + spec.get("initContainers", []):
            context = {**pod, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{label}: runAsNonRoot is not set"
            # The images' own user, whose home directory and files the process then owns.
            assert context.get("runAsUser") == RUN_AS_USER, f"{label}: runAsUser"
            assert context.get("privileged") is not True, f"{label}: privileged"
            assert context.get("allowPrivilegeEscalation") is False, \
                f"{label}: allowPrivilegeEscalation must be false"
            added = context.get("capabilities", {}).get("add", [])
            assert not added, f"{label}: adds capabilities {added}"


def test_workloads_set_resources(rendered):
    """Requests for the scheduler and a memory limit for every container; limits >= requests."""
    for label, spec in workloads(rendered):
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            name = f"{label} container {container['name']}"
            assert {"cpu", "memory"} <= set(requests), f"{name}: no cpu/memory requests"
            assert "memory" in limits, f"{name}: no memory limit"
            for key, limit in limits.items():
                if key in requests:
                    assert parse_quantity(limit) >= parse_quantity(requests[key]), \
                        f"{name}: {key} limit {limit} below its request {requests[key]}"


def test_no_host_access(rendered):
    for label, spec in workloads(rendered):
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert spec.get(key) is not True, f"{label}: {key}"
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{label}: hostPath volume {volume['name']}"
        for container in spec["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, f"{label}: hostPort"


def test_long_running_pods_are_hardened(rendered):
    """Deployments (TensorBoard, tf.data service): read-only root, no capabilities, the
    runtime's seccomp profile, probes, and no Kubernetes API token they would never use."""
    deployments = [(where, d) for where, d in all_objects(rendered) if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for _, d in deployments} >= {
        "resnet-imagenet-tensorboard", "resnet-imagenet-data-dispatcher",
        "resnet-imagenet-data-worker"}
    for where, deployment in deployments:
        label = describe(where, deployment)
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert spec["automountServiceAccountToken"] is False, label
        mounts = {}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, label
            assert context["capabilities"]["drop"] == ["ALL"], label
            assert {"livenessProbe", "readinessProbe"} <= set(container), f"{label}: probes"
            mounts.update({m["mountPath"]: m["name"] for m in container["volumeMounts"]})
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{label}: /tmp must be a writable emptyDir"


def images_in(objects: list[dict]) -> list[str]:
    found = []
    for obj in objects:
        for _, spec in pod_specs("", obj):
            found += [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]
    return found


def test_images_are_pinned(rendered):
    """Overlays and examples run exactly the images `make images push` builds, never `latest`;
    the base names placeholders only, so it cannot run unpinned by accident."""
    generate = load_generate()
    versions = generate.read_versions(generate.VERSIONS_ENV)
    built = {generate.image(name, versions) for name in (generate.TRAINER, generate.LAUNCHER)}
    assert set(images_in(rendered["base"])) <= {generate.TRAINER, generate.LAUNCHER}
    pinned = [image for name, objs in rendered.items() if name != "base"
              for image in images_in(objs)]
    pinned += [image for objs in load_examples().values() for image in images_in(objs)]
    assert pinned
    for image in pinned:
        assert image in built, f"{image} is not one of the images built from images/: {built}"
        assert not image.endswith(":latest") and "@" not in image


SECRET_MARKERS = re.compile(
    r"BEGIN [A-Z ]*PRIVATE KEY|\"private_key\"|private_key_id|AKIA[0-9A-Z]{16}|"
    r"\b(password|token|secret_?key)\s*[:=]\s*\S+",
    re.IGNORECASE,
)


def test_no_secret_values_in_the_repository(rendered):
    """Credentials are referenced (a Secret's name, a Workload Identity annotation), never
    stored: no Secret objects with data, nothing that looks like a key in manifests or images."""
    for where, obj in all_objects(rendered):
        if obj["kind"] == "Secret":
            assert not obj.get("data") and not obj.get("stringData"), describe(where, obj)
    for path in list(MANIFESTS.rglob("*")) + list((ROOT / "images").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            match = SECRET_MARKERS.search(path.read_text())
            assert match is None, f"{path.relative_to(ROOT)}: {match.group(0)!r}"


# --- what each piece is for ---------------------------------------------------------------


def one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_rbac_is_least_privilege_and_namespaced(rendered):
    for name, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Namespace"}, name
        for role in by_kind(objects, "Role"):
            granted = {}
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{name}: wildcard {field} in {rule}"
                assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted.setdefault((group, resource), set()).update(rule["verbs"])
            expected = LAUNCHER_RULES | (TRAINJOB_RULES if "+options" in name else {})
            assert granted == expected, f"{name}: {role['metadata']['name']}"
        binding = one(objects, "RoleBinding", "resnet-imagenet-launcher")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "resnet-imagenet-launcher"}
        subjects = {(s["name"], s.get("namespace")) for s in binding["subjects"]}
        if name == "base":
            continue
        # default-editor (multi-user KFP) has no namespace: RBAC reads that as the binding's.
        assert subjects == {("resnet-imagenet", NAMESPACE), ("default-editor", None),
                            ("pipeline-runner", "kubeflow")}, name


def test_overlays_put_everything_in_one_namespace_under_one_label(rendered):
    """One namespace per overlay, and one label that selects everything this project applied
    (`kubectl get all -l app.kubernetes.io/part-of=resnet-imagenet`)."""
    for name, objects in rendered.items():
        for obj in objects:
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "resnet-imagenet", \
                describe(name, obj)
            assert obj["metadata"].get("namespace") == (None if name == "base" else NAMESPACE), \
                describe(name, obj)


def tensorboard_logdir(objects: list[dict]) -> str:
    (config,) = [o for o in by_kind(objects, "ConfigMap")
                 if o["metadata"]["name"].startswith("resnet-imagenet-tensorboard")]
    return config["data"]["logdir"]


def test_tensorboard_serves_the_configured_logdir(rendered):
    for name, objects in rendered.items():
        deployment = one(objects, "Deployment", "resnet-imagenet-tensorboard")
        service = one(objects, "Service", "resnet-imagenet-tensorboard")
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["tensorboard"]
        assert "--logdir=$(LOGDIR)" in container["args"]
        (logdir,) = [e for e in container["env"] if e["name"] == "LOGDIR"]
        ref = logdir["valueFrom"]["configMapKeyRef"]
        (config,) = [c for c in by_kind(objects, "ConfigMap")
                     if c["metadata"]["name"] == ref["name"]]
        assert config["data"][ref["key"]].startswith("gs://"), name
        (port,) = container["ports"]
        assert port == {"name": "http", "containerPort": 6006, "protocol": "TCP"}
        assert "--port=6006" in container["args"]
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["ports"][0]["port"] == 6006
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        selector = service["spec"]["selector"].items()
        assert selector <= pod["metadata"]["labels"].items(), f"{name}: service selects no pod"
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            pod["metadata"]["labels"].items()


def test_kubeflow_tensorboard_reads_the_same_logdir(rendered):
    for overlay in OVERLAYS:
        objects = rendered[f"{overlay}+options"]
        resource = one(objects, "Tensorboard", "resnet-imagenet")
        assert resource["spec"]["logspath"] == tensorboard_logdir(objects)


def test_gke_overlay_uses_workload_identity(rendered):
    account = one(rendered["gke-gpu"], "ServiceAccount", "resnet-imagenet")
    assert re.fullmatch(r"[a-z][-a-z0-9]*@[-a-zA-Z0-9_]+\.iam\.gserviceaccount\.com",
                        account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"])
    for name in ("gke-gpu", "gke-gpu+options"):
        for deployment in by_kind(rendered[name], "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            assert spec["serviceAccountName"] == "resnet-imagenet"
            assert not any(v.get("secret") for v in spec["volumes"]), "no key on GKE"


def test_generic_overlay_mounts_the_key_secret_where_storage_is_read(rendered):
    """TensorBoard and the tf.data workers read the bucket; the dispatcher never does."""
    readers = {"resnet-imagenet-tensorboard", "resnet-imagenet-data-worker"}
    for name in ("generic", "generic+options"):
        for deployment in by_kind(rendered[name], "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"]
                       if "secret" in v}
            (container,) = spec["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if deployment["metadata"]["name"] not in readers:
                assert not secrets and "GOOGLE_APPLICATION_CREDENTIALS" not in env
                continue
            assert secrets == {"gcp-key": "resnet-imagenet-gcp-key"}, name
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "gcp-key"]
            assert mount["readOnly"] is True
            assert env["GOOGLE_APPLICATION_CREDENTIALS"] == mount["mountPath"] + "/key.json"


def test_data_service_addresses_line_up(rendered):
    for overlay in OVERLAYS:
        objects = rendered[f"{overlay}+options"]
        service = one(objects, "Service", "resnet-imagenet-data-dispatcher")
        dispatcher = one(objects, "Deployment", "resnet-imagenet-data-dispatcher")
        worker = one(objects, "Deployment", "resnet-imagenet-data-worker")
        assert service["spec"]["selector"].items() <= \
            dispatcher["spec"]["template"]["metadata"]["labels"].items()
        (dispatcher_port,) = dispatcher["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert service["spec"]["ports"][0]["port"] == dispatcher_port["containerPort"]
        assert f"--port={dispatcher_port['containerPort']}" in \
            dispatcher["spec"]["template"]["spec"]["containers"][0]["args"]
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        (worker_port,) = container["ports"]
        assert f"--dispatcher-address={service['metadata']['name']}:" \
               f"{service['spec']['ports'][0]['port']}" in container["args"]
        assert f"--worker-address=$(POD_IP):{worker_port['containerPort']}" in container["args"]
        assert f"--port={worker_port['containerPort']}" in container["args"]
        (program,) = [v for v in worker["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "program"]
        (config,) = [c for c in by_kind(objects, "ConfigMap")
                     if c["metadata"]["name"] == program["configMap"]["name"]]
        source = (MANIFESTS / "components" / "data-service" / "data_service.py").read_text()
        assert config["data"]["data_service.py"] == source


DATA_SERVICE = MANIFESTS / "components" / "data-service" / "data_service.py"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_service_worker_refuses_missing_addresses():
    result = subprocess.run(
        [sys.executable, str(DATA_SERVICE), "worker", "--port=5051"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--dispatcher-address and --worker-address" in result.stderr.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_data_service_program_serves_a_dataset(tmp_path):
    """The program the Deployments run, with the flags they pass: a dispatcher and a worker,
    each its own process as in the pods, serve a pipeline that a trainer-side client hands
    them, and every element arrives once."""
    import tensorflow as tf

    dispatcher, worker = free_port(), free_port()
    servers = [
        subprocess.Popen([sys.executable, str(DATA_SERVICE), "dispatcher", f"--port={dispatcher}",
                          f"--work-dir={tmp_path / 'journal'}"]),
        subprocess.Popen([sys.executable, str(DATA_SERVICE), "worker", f"--port={worker}",
                          f"--dispatcher-address=127.0.0.1:{dispatcher}",
                          f"--worker-address=127.0.0.1:{worker}"]),
    ]
    try:
        dataset = tf.data.Dataset.range(50).map(lambda x: x * x).apply(
            tf.data.experimental.service.distribute(
                "distributed_epoch", f"grpc://127.0.0.1:{dispatcher}", job_name="test"))
        assert sorted(int(x) for x in dataset.as_numpy_iterator()) == [x * x for x in range(50)]
        assert all(server.poll() is None for server in servers), "a server exited"
        assert any((tmp_path / "journal").iterdir()), "the dispatcher keeps no journal"
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


def test_trainer_v2_runtimes_are_what_the_launcher_references(rendered):
    """The trainjob backend's TrainJobs name these runtimes, patch only the jobs and containers
    they have, and the trainer builds TF_CONFIG from the env the node container gets."""
    from resnet_imagenet.launch import trainjob
    from resnet_imagenet.training import strategy

    for overlay in OVERLAYS:
        objects = rendered[f"{overlay}+options"]
        runtimes = {r["metadata"]["name"]: r for r in by_kind(objects, "TrainingRuntime")}
        assert set(runtimes) == set(TRAINER_RUNTIMES) == set(trainjob.RUNTIME_JOBS)
        for name, runtime in runtimes.items():
            assert runtime["metadata"]["namespace"] == NAMESPACE  # namespaced: least privilege
            spec = runtime["spec"]
            assert set(spec["mlPolicy"]) == {"numNodes"}, "PlainML: no framework policy"
            jobs = {j["name"]: j for j in spec["template"]["spec"]["replicatedJobs"]}
            assert {job: {c["name"] for c in j["template"]["spec"]["template"]["spec"][
                "containers"]} for job, j in jobs.items()} == trainjob.RUNTIME_JOBS[name]
            node = jobs["node"]
            assert node["template"]["metadata"]["labels"][
                "trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
            pod = node["template"]["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == "resnet-imagenet"
            (container,) = pod["containers"]
            assert container["ports"] == [{"name": "tf-port", "containerPort": strategy.PORT}]
            env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
            assert env == {
                strategy.JOBSET_NAME_ENV: "metadata.labels['jobset.sigs.k8s.io/jobset-name']",
                strategy.REPLICATED_JOB_ENV:
                    "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']",
                strategy.JOB_INDEX_ENV: "metadata.labels['jobset.sigs.k8s.io/job-index']",
            }
            if "evaluator" in jobs:
                (evaluator,) = jobs["evaluator"]["template"]["spec"]["template"]["spec"][
                    "containers"]
                assert f"$({trainjob.DATA_DIR_ENV})" in evaluator["args"]
                assert f"$({trainjob.MODEL_DIR_ENV})" in evaluator["args"]
