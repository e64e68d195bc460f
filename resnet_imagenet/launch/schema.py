"""Would the cluster take this job as is? The CRD's schema, strictly, and the webhook's rules.

Checked before anything is submitted, so a bad manifest is a one-line error on the launcher's
side instead of a job that the API server silently prunes (docs/launching.md). Every object in
the schema that lists its properties refuses any other key (``additionalProperties: false``),
unless the CRD itself preserves unknown fields there.

The TFJob schema is the one training-operator v1.9.0 installs (``kubeflow.org_tfjobs.yaml``),
shipped with the package; the webhook rules are those of its ``validator.tfjob.training-operator``:
a DNS-1035 job name, an image for every container, a container named ``tensorflow`` in every
replica, at most one Chief/Master.

The TrainJob and TrainingRuntime schemas are those Kubeflow Trainer v2.3.0 installs
(``manifests/base/crds``); :func:`trainjob_webhook_errors` checks what its CRD's CEL rules (which
a JSON-schema validator does not run) and the TrainJob webhook of the JobSet runtime refuse.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import jsonschema
import yaml

from resnet_imagenet.errors import UserError

CRD_FILE = "kubeflow.org_tfjobs.v1.9.0.yaml"
TRAINJOB_CRD_FILE = "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
TRAINING_RUNTIME_CRD_FILE = "trainer.kubeflow.org_trainingruntimes.v2.3.0.yaml"
TRAINER_NODE_CONTAINER = "node"  # the container Trainer v2 puts trainer.image/args/env into
DEFAULT_CONTAINER = "tensorflow"
CHIEF_TYPES = ("Chief", "Master")
DNS1035_MAX = 63
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def dns1035_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS-1035 label (what Services and TFJob names must be), or None."""
    if len(name) > DNS1035_MAX:
        return f"is {len(name)} characters long; at most {DNS1035_MAX} are allowed"
    if not _DNS1035.match(name):
        return (
            "must be lower-case letters, digits and '-', start with a letter and end with a "
            "letter or digit (DNS-1035)"
        )
    return None


def _strict(node):
    """A copy of a schema node in which listed properties are the only ones allowed."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(crd_file: str = CRD_FILE) -> dict:
    """The openAPIV3Schema of a packaged CRD's (only) served version, as the API server has it
    (default: TFJob v1)."""
    text = resources.files(__package__).joinpath("schemas", crd_file).read_text("utf-8")
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _validator(crd_file: str = CRD_FILE):
    return jsonschema.Draft4Validator(_strict(crd_schema(crd_file)))


def _path(error) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "(top level)"


def schema_errors(body: dict, crd_file: str = CRD_FILE) -> list[str]:
    """Every violation of the strict CRD schema (default: TFJob's), as ``path: message`` strings
    (empty: valid)."""
    errors = sorted(_validator(crd_file).iter_errors(body),
                    key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e)}: {e.message}" for e in errors]


def webhook_errors(body: dict) -> list[str]:
    """What training-operator v1.9's validating webhook would refuse, as strings (empty: valid)."""
    errors = []
    name = body.get("metadata", {}).get("name", "")
    problem = dns1035_problem(name)
    if problem:
        errors.append(f"metadata.name {name!r} {problem}")
    specs = body.get("spec", {}).get("tfReplicaSpecs") or {}
    if not specs:
        errors.append("spec.tfReplicaSpecs: must be required")
    for rtype, rspec in specs.items():
        containers = (((rspec or {}).get("template") or {}).get("spec") or {}).get("containers")
        path = f"spec.tfReplicaSpecs[{rtype}].template.spec.containers"
        if not containers:
            errors.append(f"{path}: must be specified")
            continue
        for index, container in enumerate(containers):
            if not container.get("image"):
                errors.append(f"{path}[{index}].image: must be required")
        if not any(c.get("name") == DEFAULT_CONTAINER for c in containers):
            errors.append(f"{path}: must have at least one container with name {DEFAULT_CONTAINER}")
    if sum(rtype in CHIEF_TYPES for rtype in specs) > 1:
        errors.append("spec.tfReplicaSpecs: must not have more than 1 Chief or Master role")
    return errors


def validate_tfjob(body: dict) -> dict:
    """Refuse (UserError, one line) a TFJob the API server or the operator would not take as is."""
    errors = schema_errors(body) + webhook_errors(body)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"the TFJob manifest is not valid: {errors[0]}{more}")
    return body


# A domain-prefixed path, as Trainer's webhook wants runtimePatches[].manager: "example.com/x".
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def trainjob_webhook_errors(body: dict, runtime_jobs: dict[str, set[str]]) -> list[str]:
    """What the API server's CEL rules and Trainer v2.3's TrainJob webhook would refuse.

    ``runtime_jobs`` maps each replicated job of the referenced runtime to its container names:
    a runtime patch may only name those, and may not set ``env`` on a ``node`` container
    (``spec.trainer.env`` is the way there).
    """
    errors = []
    name = body.get("metadata", {}).get("name", "")
    problem = dns1035_problem(name)
    if problem:
        errors.append(f"metadata.name {name!r} {problem}")
    spec = body.get("spec") or {}
    if not (spec.get("runtimeRef") or {}).get("name"):
        errors.append("spec.runtimeRef.name: must be required")
    nodes = (spec.get("trainer") or {}).get("numNodes")
    if nodes is not None and nodes < 1:
        errors.append(f"spec.trainer.numNodes: {nodes} must be at least 1")
    for index, patch in enumerate(spec.get("runtimePatches") or []):
        path = f"spec.runtimePatches[{index}]"
        host, _, rest = str(patch.get("manager", "")).partition("/")
        if not rest or len(host) > 253 or not _DNS1123_SUBDOMAIN.match(host):
            errors.append(f"{path}.manager {patch.get('manager')!r}: must be a domain-prefixed "
                          "path, e.g. example.com/launcher")
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {})
        for rjob in (template.get("spec") or {}).get("replicatedJobs") or []:
            containers = runtime_jobs.get(rjob.get("name"))
            if containers is None:
                errors.append(f"{path}: replicated job {rjob.get('name')!r} is not in the "
                              f"runtime (it has {', '.join(sorted(runtime_jobs))})")
                continue
            pod = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
            for container in (pod.get("spec") or {}).get("containers") or []:
                if container.get("name") not in containers:
                    errors.append(f"{path}: container {container.get('name')!r} is not in the "
                                  f"runtime's job {rjob['name']}")
                elif container.get("env") and container["name"] == TRAINER_NODE_CONTAINER:
                    errors.append(f"{path}: must not have envs for the {TRAINER_NODE_CONTAINER} "
                                  "container (use spec.trainer.env)")
    return errors


def validate_trainjob(body: dict, runtime_jobs: dict[str, set[str]]) -> dict:
    """Refuse (UserError, one line) a TrainJob the API server or Trainer v2 would not take."""
    errors = schema_errors(body, TRAINJOB_CRD_FILE) + trainjob_webhook_errors(body, runtime_jobs)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"the TrainJob manifest is not valid: {errors[0]}{more}")
    return body
