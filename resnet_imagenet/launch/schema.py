"""Would the cluster take this TFJob as is? The CRD's schema, strictly, and the webhook's rules.

Checked before anything is submitted, so a bad manifest is a one-line error on the launcher's
side instead of a TFJob that the API server silently changes. The API server *prunes* fields its
structural schema does not know: that is how the old launcher's ``spec.backoffLimit`` and
``spec.activeDeadlineSeconds`` (they belong under ``spec.runPolicy``) vanished without a word.
Here every object in the schema that lists its properties refuses any other key
(``additionalProperties: false``), unless the CRD itself preserves unknown fields there.

The schema is the one training-operator v1.9.0 installs (``kubeflow.org_tfjobs.yaml``), shipped
with the package; the webhook rules are those of its ``validator.tfjob.training-operator``:
a DNS-1035 job name, an image for every container, a container named ``tensorflow`` in every
replica, at most one Chief/Master.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import jsonschema
import yaml

from resnet_imagenet.errors import UserError

CRD_FILE = "kubeflow.org_tfjobs.v1.9.0.yaml"
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


@functools.lru_cache(maxsize=1)
def crd_schema() -> dict:
    """The openAPIV3Schema of TFJob v1 from the packaged CRD, as the API server has it."""
    text = resources.files(__package__).joinpath("schemas", CRD_FILE).read_text("utf-8")
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=1)
def _validator():
    return jsonschema.Draft4Validator(_strict(crd_schema()))


def _path(error) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "(top level)"


def schema_errors(body: dict) -> list[str]:
    """Every violation of the strict CRD schema, as ``path: message`` strings (empty: valid)."""
    errors = sorted(_validator().iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
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
