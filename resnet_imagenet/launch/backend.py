"""The interface every cluster backend implements: :class:`ClusterBackend`.

A backend is one kind of custom resource that runs the training replicas (a TFJob of
training-operator v1, a TrainJob of Kubeflow Trainer v2). It says how to write the job's manifest,
how to read its status, how to find its pods, and how its job is created, read and deleted on the
API server. :mod:`resnet_imagenet.launch.lifecycle` submits, follows and cleans up any job through
this interface only; it never imports a backend's module. Backends::

    from resnet_imagenet.launch import tfjob, trainjob
    tfjob.BACKEND, trainjob.BACKEND          # ClusterBackend instances
    body = tfjob.BACKEND.manifest(tfjob.TFJobOptions(name=..., train_args=[...]))
"""

from __future__ import annotations

import abc
from typing import ClassVar

import yaml

from resnet_imagenet.launch.options import ClusterOptions


def condition(job: dict, ctype: str) -> dict | None:
    """The job's status condition of type ``ctype`` when it is True, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


class ClusterBackend(abc.ABC):
    """One kind of training job on Kubernetes, as the launcher's lifecycle sees it.

    Subclasses set the class attributes and implement the abstract methods; the API calls on the
    job (create, get, patch, delete) are the same for every custom resource and live here.
    """

    name: ClassVar[str]  # the --backend value: "tfjob"
    group: ClassVar[str]  # the custom resource: "kubeflow.org", "v1", "tfjobs", "TFJob"
    version: ClassVar[str]
    plural: ClassVar[str]
    kind: ClassVar[str]
    installer: ClassVar[str]  # what provides the CRD and its controller, with the version
    rbac_manifest: ClassVar[str]  # the file with the Role that grants the launcher's rights
    rbac_hint: ClassVar[str]  # how a 403 message says to apply it
    containers: ClassVar[tuple[str, ...]]  # the training containers: logs streamed and quoted
    chief_prefix: ClassVar[str]  # how the chief's streamed log lines are prefixed: "worker-0"
    # How a deletion reaches the pods. Foreground: the job stays until the garbage collector has
    # removed its pods (and Background where the operator would fight that; see trainjob.py).
    propagation_policy: ClassVar[str] = "Foreground"

    @property
    def resource(self) -> str:
        """``tfjobs.kubeflow.org``: what RBAC and ``kubectl api-resources`` call it."""
        return f"{self.plural}.{self.group}"

    @property
    def short(self) -> str:
        """What kubectl calls it: ``kubectl get tfjob NAME``."""
        return self.kind.lower()

    # -- the manifest --

    @abc.abstractmethod
    def manifest(self, opts: ClusterOptions) -> dict:
        """The job for ``opts`` (this backend's options class), validated: UserError if the
        options or the manifest would be refused."""

    def manifest_yaml(self, opts: ClusterOptions) -> str:
        """:meth:`manifest` as YAML for ``kubectl apply -f -``."""
        return yaml.safe_dump(self.manifest(opts), sort_keys=False, default_flow_style=False)

    def refusal_hint(self, message: str, namespace: str) -> str:
        """What to add (``"; ..."``) to the API server's ``message`` refusing a create, when this
        backend knows what fixes it; else ``""``."""
        return ""

    # The reason of the Warning event the controller records on the job at each replica
    # restart, when the launcher must count them (lifecycle.restarts); None: the job's own
    # policy bounds its restarts.
    restart_reason = None  # str | None; optional, unlike the annotated attributes above

    # -- the job's status --

    @abc.abstractmethod
    def succeeded(self, job: dict) -> bool:
        """Whether the job has ended in success."""

    @abc.abstractmethod
    def failure(self, job: dict) -> dict | None:
        """The condition saying the job has failed (``reason``, ``message``), or None."""

    def finished(self, job: dict) -> bool:
        return self.succeeded(job) or self.failure(job) is not None

    @abc.abstractmethod
    def progress(self, status: dict) -> str | None:
        """The job's replica counts from its ``status`` (``Worker active=2 ...``), or None."""

    # -- the job's pods --

    @abc.abstractmethod
    def pod_selector(self, name: str) -> str:
        """The label selector of all the pods of job ``name``."""

    @abc.abstractmethod
    def chief_pod(self, core, namespace: str, name: str, request_timeout):
        """The chief's pod of job ``name`` (a ``V1Pod``) read with ``core`` (a ``CoreV1Api``),
        or None while there is none; an ApiException 404 means none too."""

    @abc.abstractmethod
    def replica_name(self, pod) -> str:
        """The pod's replica, as log lines are prefixed: ``worker-1``."""

    # -- the job on the API server (``custom``: a ``CustomObjectsApi``) --

    def create(self, custom, namespace: str, body: dict, **kwargs) -> dict:
        """Create the job; unknown fields are refused (an older CRD), not dropped."""
        return custom.create_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, body, field_validation="Strict",
            **kwargs)

    def get(self, custom, namespace: str, name: str, **kwargs) -> dict:
        return custom.get_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, name, **kwargs)

    def patch(self, custom, namespace: str, name: str, patch: dict, **kwargs) -> dict:
        return custom.patch_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, name, patch, **kwargs)

    def delete(self, custom, namespace: str, name: str, **kwargs) -> None:
        """Ask for the job's deletion with :attr:`propagation_policy`; the lifecycle then waits
        until neither the job nor a pod of :meth:`pod_selector` is left."""
        custom.delete_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, name,
            body={"propagationPolicy": self.propagation_policy}, **kwargs)
