"""The two cluster backends as the control-plane contract tests see them: one object per backend
with what differs (the options class, the resource, how to find its pods, the container, what
the chief's log lines are prefixed with), so that one test serves both; and the helpers the
control-plane tests share (the launcher in a thread, pods, RBAC questions, overlays).

``tfjob``: training-operator v1.9 makes pods ``<job>-worker-<i>`` (container ``tensorflow``).
``trainjob``: Trainer v2 makes a JobSet of the same name, JobSet an Indexed Job
``<job>-node-0``, the Job controller pods ``<job>-node-0-<i>-<random>`` (container ``node``),
from the ``resnet-imagenet-tensorflow`` TrainingRuntime the manifests ship (applied into the
test's namespace by :meth:`Backend.prepare`).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client

from resnet_imagenet.launch import lifecycle, tfjob, trainjob
from resnet_imagenet.launch.backend import ClusterBackend

OVERLAY = "gke-gpu"
OVERLAY_NAMESPACE = "kubeflow-user-example-com"  # what the overlays set; replaced per test


@dataclass(frozen=True)
class Backend:
    cluster: ClusterBackend  # the library's backend
    options_class: type
    pod_selector: str  # "{job}"-formatted: the job's worker pods
    container: str
    chief: str  # the chief's log prefix

    @property
    def name(self) -> str:
        return self.cluster.name

    def __str__(self) -> str:
        return self.name

    def build(self, opts) -> dict:
        return self.cluster.manifest(opts)

    def launch(self, opts, **kwargs) -> int:
        return lifecycle.launch(self.cluster, opts, **kwargs)

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
        return self.cluster.replica_name(pod)

    def get(self, api_client, namespace: str, name: str) -> dict | None:
        try:
            return self.cluster.get(client.CustomObjectsApi(api_client), namespace, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def prepare(self, plane, namespace: str, without: frozenset[str] = frozenset()) -> list[dict]:
        """What the backend needs in a fresh namespace before a job can run there; for
        ``trainjob`` JobSet and Trainer v2 on the plane, the TrainingRuntimes and the
        ServiceAccount they name, less the objects named in ``without``. Returns the objects
        applied."""
        if self.name != "trainjob":
            return []
        from tests.support import trainer_v2

        trainer_v2.start(plane)
        # The runtimes, and the ServiceAccount their pods run as.
        wanted = {("TrainingRuntime", trainjob.RUNTIME),
                  ("TrainingRuntime", trainjob.RUNTIME_WITH_EVALUATOR),
                  ("ServiceAccount", "resnet-imagenet")}
        wanted = {(kind, name) for kind, name in wanted if name not in without}
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


def apply_overlay(plane, overlay: str, namespace: str) -> list[dict]:
    """``kubectl apply --server-side`` of an overlay, rendered by kubectl's kustomize, into
    ``namespace`` instead of the overlay's placeholder namespace; the objects applied."""
    objects = render_overlay(plane, namespace, overlay)
    apply(plane, objects)
    return objects


TFJOB = Backend(
    cluster=tfjob.BACKEND, options_class=tfjob.TFJobOptions,
    pod_selector=f"{tfjob.JOB_NAME_LABEL}={{job}}", container=tfjob.CONTAINER, chief="worker-0")
TRAINJOB = Backend(
    cluster=trainjob.BACKEND, options_class=trainjob.TrainJobOptions,
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


@contextlib.contextmanager
def launching(backend: Backend, api_client, opts, poll_interval: float = 0.1, **kwargs):
    """The launcher in a thread, as in its pod; the test plays the kubelet's outcomes. Yields
    the launch's future and the StringIO its chief's log goes to."""
    output = io.StringIO()
    kwargs.setdefault("timeout", 90)  # a failing test ends instead of waiting forever
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(backend.launch, opts, api_client=api_client,
                             poll_interval=poll_interval, output=output, **kwargs)
        yield future, output


def gone(plane, backend: Backend, namespace: str, name: str) -> bool:
    """The job and its pods are gone."""
    return backend.get(plane.admin(), namespace, name) is None and not pods_of(
        plane, backend, namespace, name)


def custom(plane) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(plane.admin())


def can_i(plane, namespace: str, *args: str) -> str:
    """``kubectl auth can-i ARGS`` as the overlays' ServiceAccount of ``namespace``: yes/no."""
    done = plane.kubectl("auth", "can-i",
                         f"--as=system:serviceaccount:{namespace}:resnet-imagenet", *args,
                         check=False)
    return done.stdout.strip()
