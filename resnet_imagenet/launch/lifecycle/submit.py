"""Submit a job or re-attach to it: :func:`submit`, and :func:`launcher_pod_owner`, the
ownerReference that lets Kubernetes delete the job with the launcher's pod."""

from __future__ import annotations

import os

from kubernetes.client.exceptions import ApiException

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch.lifecycle.client import (SERVICE_ACCOUNT_NAMESPACE_FILE,
                                                     ApiUnreachable, log, may_have_acted,
                                                     server_message, transient, webhook_denial)
from resnet_imagenet.launch.lifecycle.job import JobRun, Outage
from resnet_imagenet.launch.lifecycle.logs import report_failure
from resnet_imagenet.launch.options import RUN_ID_ANNOTATION, SPEC_HASH_ANNOTATION

WORKFLOW_GROUP, WORKFLOW_KIND = "argoproj.io", "Workflow"  # what runs a KFP v2 pipeline


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


class CreateFailed(Exception):
    """The create failed with transient errors (unreachable, 429, 5xx) for --api-outage-timeout.
    ``run.ours`` says whether one of the tries may have created the job all the same."""


def launcher_owner(run: JobRun) -> dict | None:
    """The ownerReference the job gets: the launcher pod's own owner when that is an Argo
    Workflow (a KFP step: the run's Workflow), else the launcher's pod, else None (not in a
    pod, or in another namespace).

    A KFP Retry deletes the failed step's pod and runs a new one; a job owned by that pod would
    be garbage-collected with it, and training would start over. Owned by the Workflow, the job
    outlives the retried pod (the retry re-attaches to it) and still goes with the run when the
    run is deleted.
    """
    pod_ref = launcher_pod_owner(run.namespace)
    if pod_ref is None:
        return None
    try:
        with run.api("get", "pods"):
            pod = run.core.read_namespaced_pod(pod_ref["name"], run.namespace,
                                               _request_timeout=run.request_timeout)
    except Exception as exc:  # the pod's reference is still an owner worth having
        log.warning("cannot read the launcher's pod %s (%s): the job is owned by that pod, so a "
                    "retry of the step that replaces the pod starts it over", pod_ref["name"],
                    server_message(exc))
        return pod_ref
    if pod.metadata.uid != pod_ref["uid"]:
        return pod_ref
    for ref in pod.metadata.owner_references or []:
        if ref.kind == WORKFLOW_KIND and (ref.api_version or "").startswith(WORKFLOW_GROUP + "/"):
            return {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name,
                    "uid": ref.uid}
    return pod_ref


def submit(run: JobRun, deadline: float | None = None) -> dict:
    """Create the run's job and return it; if the run's job exists already, re-attach to it
    (UserError if it has another spec); if it is being deleted, wait (up to ``deadline``) and
    create it anew. A refused create is a one-line UserError.

    A create that fails with a transient error is tried again (every poll interval, up to the
    run's API outage timeout, then :class:`CreateFailed`); after one that may have reached the
    server (no answer, or a 5xx) the job is first looked up by name, and adopted when it carries
    this run's spec hash (and run id): the lost answer's job is not created twice, nor left
    running unowned. A server that could not be connected to at all before it ever answered is
    the one-line error of :class:`~resnet_imagenet.launch.lifecycle.client.ApiUnreachable`
    (a wrong kubeconfig is likelier than an outage).
    """
    waiting_for_deletion = False
    outage = Outage(run, f"to create {run.what}")
    lost = False  # a try may have created the job although no success came back
    answered = False  # whether the API server has answered this launch at all
    while True:
        try:
            existing = run.get() if lost else None
            created = None
            if existing is None:
                created = _create(run, lost)
                if created is None:  # 409 AlreadyExists
                    existing = run.get()
        except Exception as exc:  # sorted by transient(): try again or give up
            answered = answered or isinstance(exc, ApiException)
            if not transient(exc):
                raise
            if isinstance(exc, ApiUnreachable) and not (answered or exc.request_sent):
                raise  # never connected: a wrong kubeconfig is likelier than an outage
            lost = lost or may_have_acted(exc)
            run.ours = "maybe" if lost else "no"
            if not outage.failed(exc):
                raise CreateFailed(
                    f"could not create {run.what}: the API server could not be reached for "
                    f"{outage.lasted()} (--api-outage-timeout {run.api_outage_timeout:g}s; "
                    f"last: {outage.last})") from None
            run.pause(deadline)
            continue
        outage.over()
        if created is not None:
            run.ours = "yes"
            log.info("created %s; follow it with: kubectl -n %s get %s %s", run.what,
                     run.namespace, run.backend.short, run.name)
            return created
        if existing is None:
            continue  # not there (deleted in between, or the lost create did not persist)
        if existing["metadata"].get("deletionTimestamp"):
            if not waiting_for_deletion:
                log.info("%s is being deleted; waiting to create it anew", run.what)
                waiting_for_deletion = True
            run.pause(deadline)
            continue
        attached = _attach(run, existing, lost)
        if attached is not None:
            return attached
        # A failed job of this run (a retried step): reported and deleted; create it anew.


def _create(run: JobRun, lost: bool) -> dict | None:
    """One create request: the job created, or None when it exists already (409). ``lost``:
    an earlier try may have created it, so it stays "maybe ours" whatever this one gets."""
    run.ours = "maybe"
    with run.api("create"):
        try:
            return run.backend.create(run.custom, run.namespace, run.body,
                                      _request_timeout=run.request_timeout)
        except ApiException as exc:
            if not lost and not transient(exc):
                run.ours = "no"  # the server answered: nothing was created
            if exc.status in (400, 404, 422) or webhook_denial(exc):
                raise _refused(run, exc) from None
            if exc.status != 409:
                raise
            return None


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


def _attach(run: JobRun, existing: dict, lost: bool = False) -> dict | None:
    """Adopt ``existing``, the job of this run, when its spec hash (and run id, where both have
    one) are ours; add our owner. ``lost``: a create of ours whose answer was lost may have made
    it. A job of this run that has failed is reported and deleted instead (None: create it
    anew)."""
    mine = run.body["metadata"]["annotations"]
    annotations = existing["metadata"].get("annotations") or {}
    ours, theirs = mine[SPEC_HASH_ANNOTATION], annotations.get(SPEC_HASH_ANNOTATION)
    run_id, their_run = mine.get(RUN_ID_ANNOTATION), annotations.get(RUN_ID_ANNOTATION)
    if theirs == ours and run_id and their_run and their_run != run_id:
        run.ours = "no"
        raise UserError(
            f"a {run.what} already exists from another run (run id {their_run} there, "
            f"{run_id} here): delete it (kubectl -n {run.namespace} delete "
            f"{run.backend.short} {run.name}) or launch under another --name")
    if theirs != ours:
        run.ours = "no"  # someone else's: a create of ours cannot have made it
        raise UserError(
            f"a {run.what} already exists with a different spec (spec hash {theirs} "
            f"here, {ours} wanted): delete it (kubectl -n {run.namespace} delete "
            f"{run.backend.short} {run.name}) or launch under another --name/--run-id"
        )
    run.ours = "yes"
    failure = run.backend.failure(existing)
    if failure is not None and not lost:
        # A retry of the step (KFP's Retry, a restarted launcher) means another try: the
        # failed job is reported here, then replaced; training resumes from its checkpoint.
        log.warning("%s of this run failed earlier (%s: %s); its failed replicas follow, then "
                    "it is deleted and created anew (training resumes from its last checkpoint)",
                    run.what, failure.get("reason", ""), failure.get("message", ""))
        report_failure(run, existing)
        if not run.delete():
            raise UserError(f"{run.what} of this run failed earlier and could not be deleted: "
                            f"delete it with kubectl -n {run.namespace} delete "
                            f"{run.backend.short} {run.name}, then retry")
        return None
    if lost:
        log.info("adopted %s: the create whose answer was lost had made it (created %s)",
                 run.what, existing["metadata"].get("creationTimestamp", "earlier"))
    else:
        log.info("re-attached to the existing %s of this run (created %s)", run.what,
                 existing["metadata"].get("creationTimestamp", "earlier"))
    owners = existing["metadata"].get("ownerReferences") or []
    refs = run.body["metadata"].get("ownerReferences") or []
    missing = [ref for ref in refs if ref["uid"] not in {o.get("uid") for o in owners}]
    if missing:
        # Adding, not replacing: the garbage collector deletes the job only once every
        # owner is gone, so the earlier launcher pod's reference does no harm.
        with run.api("patch"):
            existing = run.backend.patch(
                run.custom, run.namespace, run.name,
                {"metadata": {"ownerReferences": owners + missing}},
                _request_timeout=run.request_timeout)
    return existing
