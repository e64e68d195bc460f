"""Submit a job or re-attach to it: :func:`submit`, and :func:`launcher_pod_owner`, the
ownerReference that lets Kubernetes delete the job with the launcher's pod."""

from __future__ import annotations

import os

from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.lifecycle.client import (SERVICE_ACCOUNT_NAMESPACE_FILE,
                                                     ApiUnreachable, log, server_message,
                                                     webhook_denial)
from resnet_imagenet.launch.lifecycle.job import JobRun
from resnet_imagenet.launch.options import SPEC_HASH_ANNOTATION


def launcher_pod_owner(namespace: str) -> dict | None:
    """An ownerReference to the pod this launcher runs in (downward API env), or None.

    ``POD_NAME``/``POD_UID`` (or KFP v2's ``KFP_POD_NAME``/``KFP_POD_UID``) name it. The owner must
    live in the job's namespace, as Kubernetes does not allow owners across namespaces.
    ``blockOwnerDeletion`` stays unset: setting it needs the right to update the pod's finalizers.
    """
    name = os.environ.get("POD_NAME") or os.environ.get("KFP_POD_NAME")
    uid = os.environ.get("POD_UID") or os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    pod_namespace = os.environ.get("POD_NAMESPACE")
    if pod_namespace is None and os.path.exists(SERVICE_ACCOUNT_NAMESPACE_FILE):
        with open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
            pod_namespace = f.read().strip()
    if pod_namespace and pod_namespace != namespace:
        log.warning("the launcher pod is in namespace %s and the job in %s: no ownerReference, "
                    "so only the launcher itself can clean the job up", pod_namespace, namespace)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def submit(run: JobRun, deadline: float | None = None) -> dict:
    """Create the run's job and return it; if the run's job exists already, re-attach to it
    (UserError if it has another spec); if it is being deleted, wait (up to ``deadline``) and
    create it anew. A refused create is a one-line UserError."""
    waiting_for_deletion = False
    while True:
        run.ours = "maybe"
        try:
            with run.api("create"):
                try:
                    created = run.backend.create(run.custom, run.namespace, run.body,
                                                 _request_timeout=run.request_timeout)
                except ApiException as exc:
                    run.ours = "no"  # the server answered: nothing was created
                    if exc.status in (400, 404, 422) or webhook_denial(exc):
                        raise _refused(run, exc) from None
                    if exc.status != 409:
                        raise
                    created = None
        except ApiUnreachable as exc:
            run.ours = "maybe" if exc.request_sent else "no"
            raise
        if created is not None:
            run.ours = "yes"
            log.info("created %s; follow it with: kubectl -n %s get %s %s", run.what,
                     run.namespace, run.backend.short, run.name)
            return created
        existing = run.get()
        if existing is None:
            continue  # deleted in between: create it again
        if existing["metadata"].get("deletionTimestamp"):
            if not waiting_for_deletion:
                log.info("%s is being deleted; waiting to create it anew", run.what)
                waiting_for_deletion = True
            run.pause(deadline)
            continue
        return _attach(run, existing)


def _refused(run: JobRun, exc: ApiException) -> UserError:
    """One line for a create the API server refused: no such resource (the CRD is not
    installed, or the namespace does not exist), or an invalid object (an older CRD, a
    webhook or a CEL rule)."""
    backend = run.backend
    message = server_message(exc)
    if exc.status == 404:
        return UserError(
            f"cannot create {run.what}: {message}; check that the cluster has "
            f"{backend.resource} from {backend.installer} (kubectl api-resources | grep "
            f"{backend.plural}) and that namespace '{run.namespace}' exists")
    if "unknown field" in message:
        hint = (f"; this launcher writes {backend.kind}s for {backend.installer}, the "
                "cluster's CRD is older: upgrade it, or use the other --backend")
    else:
        hint = backend.refusal_hint(message, run.namespace)
    return UserError(f"the API server refused {run.what}: {' '.join(message.split())}{hint}")


def _attach(run: JobRun, existing: dict) -> dict:
    """Adopt ``existing``, the job of this run, when its spec hash is ours; add our owner."""
    ours = run.body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    theirs = (existing["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if theirs != ours:
        raise UserError(
            f"a {run.what} already exists with a different spec (spec hash {theirs} "
            f"here, {ours} wanted): delete it (kubectl -n {run.namespace} delete "
            f"{run.backend.short} {run.name}) or launch under another --name/--run-id"
        )
    run.ours = "yes"
    log.info("re-attached to the existing %s of this run (created %s)", run.what,
             existing["metadata"].get("creationTimestamp", "earlier"))
    owners = existing["metadata"].get("ownerReferences") or []
    mine = run.body["metadata"].get("ownerReferences") or []
    missing = [ref for ref in mine if ref["uid"] not in {o.get("uid") for o in owners}]
    if missing:
        # Adding, not replacing: the garbage collector deletes the job only once every
        # owner is gone, so the earlier launcher pod's reference does no harm.
        with run.api("patch"):
            existing = run.backend.patch(
                run.custom, run.namespace, run.name,
                {"metadata": {"ownerReferences": owners + missing}},
                _request_timeout=run.request_timeout)
    return existing
