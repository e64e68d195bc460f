"""The two cluster backends as the control-plane contract tests see them: one object per backend
with what differs (the options class, the resource, how to find its pods, the container, what
the chief's log lines are prefixed with), so that one test serves both.

``tfjob``: training-operator v1.9 makes pods ``<job>-worker-<i>`` (container ``tensorflow``).
``trainjob``: Trainer v2 makes a JobSet of the same name, JobSet an Indexed Job
``<job>-node-0``, the Job controller pods ``<job>-node-0-<i>-<random>`` (container ``node``),
from the ``resnet-imagenet-tensorflow`` TrainingRuntime the manifests ship (applied into the
test's namespace by :meth:`Backend.prepare`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from kubernetes import client

from resnet_imagenet.launch import cluster, tfjob, trainjob

OVERLAY = "gke-gpu"
OVERLAY_NAMESPACE = "kubeflow-user-example-com"  # what the overlays set; replaced per test


@dataclass(frozen=True)
class Backend:
    name: str
    kind: cluster.JobKind
    options_class: type
    build: Callable[[object], dict]
    launch: Callable[..., int]
    pod_selector: str  # "{job}"-formatted: the job's worker pods
    container: str
    chief: str  # the chief's log prefix

    def __str__(self) -> str:
        return self.name

    def options(self, namespace: str, **overrides):
        values = {"name": "resnet-test", "namespace": namespace,
                  "train_args": ["--data-dir", "gs://bucket/tfrecords",
                                 "--model-dir", "gs://bucket/model"],
                  "workers": 2, "cpu": "1", "memory": "1Gi"}
        values.update(overrides)
        return self.options_class(**values)

    def selector(self, job: str) -> str:
        return self.pod_selector.format(job=job)

    def replica(self, pod) -> str:
        """``worker-1`` / ``node-1``: how the launcher names the pod's replica."""
        return self.kind.replica_name(pod)

    def get(self, api_client, namespace: str, name: str) -> dict | None:
        from kubernetes import client

        try:
            return client.CustomObjectsApi(api_client).get_namespaced_custom_object(
                self.kind.group, self.kind.version, namespace, self.kind.plural, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def prepare(self, plane, namespace: str) -> list[dict]:
        """What the backend needs in a fresh namespace before a job can run there; for
        ``trainjob`` JobSet and Trainer v2 on the plane, the TrainingRuntimes and the
        ServiceAccount they name. Returns the objects applied."""
        if self.name != "trainjob":
            return []
        from tests.support import trainer_v2

        trainer_v2.start(plane)
        # The runtimes, and the ServiceAccount their pods run as.
        wanted = {("TrainingRuntime", trainjob.RUNTIME),
                  ("TrainingRuntime", trainjob.RUNTIME_WITH_EVALUATOR),
                  ("ServiceAccount", "resnet-imagenet")}
        objects = [o for o in render_overlay(plane, namespace, with_trainer_v2=True)
                   if (o["kind"], o["metadata"]["name"]) in wanted]
        apply(plane, objects)
        return objects


def render_overlay(plane, namespace: str, overlay: str = OVERLAY,
                   with_trainer_v2: bool = False) -> list[dict]:
    """An overlay as ``kubectl kustomize`` renders it (optionally with the trainer-v2 component
    switched on, the edit its comment asks for), moved into ``namespace``."""
    from tests.support.cluster import REPO

    source = REPO / "manifests"
    with contextlib.ExitStack() as stack:
        if with_trainer_v2:
            import tempfile

            copy = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "manifests"
            shutil.copytree(source, copy)
            kustomization = copy / "overlays" / overlay / "kustomization.yaml"
            text = kustomization.read_text()
            line = "  # - ../../components/trainer-v2\n"
            assert line in text, f"{overlay}: the commented-out trainer-v2 option is missing"
            kustomization.write_text(text.replace(line, "  - ../../components/trainer-v2\n"))
            source = copy
        rendered = plane.kubectl("kustomize", str(source / "overlays" / overlay)).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for obj in objects:
        if obj["metadata"].get("namespace") == OVERLAY_NAMESPACE:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects") or []:
            if subject.get("namespace") == OVERLAY_NAMESPACE:
                subject["namespace"] = namespace
    return objects


def apply(plane, objects: list[dict]) -> None:
    plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(objects))


TFJOB = Backend(
    name="tfjob", kind=cluster.TFJOB, options_class=tfjob.TFJobOptions, build=tfjob.build_tfjob,
    launch=cluster.launch_tfjob, pod_selector=f"{tfjob.JOB_NAME_LABEL}={{job}}",
    container=tfjob.CONTAINER, chief="worker-0")
TRAINJOB = Backend(
    name="trainjob", kind=cluster.TRAINJOB, options_class=trainjob.TrainJobOptions,
    build=trainjob.build_trainjob, launch=cluster.launch_trainjob,
    pod_selector=(f"{trainjob.JOBSET_NAME_LABEL}={{job}},"
                  f"{trainjob.REPLICATED_JOB_LABEL}={trainjob.NODE}"),
    container=trainjob.NODE, chief="node-0")
BACKENDS = (TFJOB, TRAINJOB)


# --- helpers of the control-plane tests, for both backends ------------------------------

def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


def core(plane) -> client.CoreV1Api:
    return client.CoreV1Api(plane.admin())


def pods_of(plane, backend, namespace: str, job: str) -> list:
    return core(plane).list_namespaced_pod(namespace, label_selector=backend.selector(job)).items


def running_pods(plane, backend, namespace: str, job: str, count: int,
                 timeout: float = 60.0) -> list:
    """The job's worker pods once ``count`` of them run (kwok), in replica order."""
    def ready():
        running = [p for p in pods_of(plane, backend, namespace, job)
                   if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        if len(running) != count:
            return None
        return sorted(running, key=lambda p: int(backend.replica(p).rsplit("-", 1)[1]))
    return wait_until(ready, timeout, f"{count} running pods of {job}")


def finish(plane, namespace: str, pods: list, exit_code: int = 0, reason: str = "") -> None:
    """End the pods' containers, the chief last: once it has succeeded, the TFJob operator
    deletes the workers still running (cleanPodPolicy Running), which a later patch would miss."""
    for pod in reversed(pods):
        try:
            plane.finish_pod(namespace, pod.metadata.name, exit_code, reason)
        except client.ApiException as exc:
            if exc.status != 404:  # already cleaned up by the operator
                raise
