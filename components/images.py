"""The container images of the pipeline, from ``images/versions.env`` (the one place for them).

Every KFP step runs in the launcher image (a slim CPU image with this package and
tensorflow-cpu); the TFJob it creates runs the trainer image. Both are
``$REGISTRY/resnet-imagenet-<name>:$TAG``. Resolution at compile time, in order:
``RESNET_IMAGENET_REGISTRY`` / ``RESNET_IMAGENET_TAG`` from the environment, then
``images/versions.env`` of this checkout, then the defaults below (when this module is used
outside a checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

VERSIONS_ENV = Path(__file__).resolve().parent.parent / "images" / "versions.env"
DEFAULTS = {"REGISTRY": "ghcr.io/example", "TAG": "0.1.0"}
ENV_OVERRIDES = {"REGISTRY": "RESNET_IMAGENET_REGISTRY", "TAG": "RESNET_IMAGENET_TAG"}


def read_versions(path: Path = VERSIONS_ENV) -> dict[str, str]:
    """``KEY=VALUE`` lines of a versions file; comments and blank lines are skipped."""
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def coordinates(path: Path = VERSIONS_ENV) -> dict[str, str]:
    """``{"REGISTRY": ..., "TAG": ...}`` after environment overrides and the versions file."""
    found = {**DEFAULTS, **{k: v for k, v in read_versions(path).items() if k in DEFAULTS}}
    for key, env in ENV_OVERRIDES.items():
        if os.environ.get(env):
            found[key] = os.environ[env]
    return found


def image(name: str, path: Path = VERSIONS_ENV) -> str:
    """``REGISTRY/resnet-imagenet-<name>:TAG`` for ``name`` in {"launcher", "trainer"}."""
    coords = coordinates(path)
    return f"{coords['REGISTRY'].rstrip('/')}/resnet-imagenet-{name}:{coords['TAG']}"


LAUNCHER_IMAGE = image("launcher")
TRAINER_IMAGE = image("trainer")
