"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest

from tests.support.backends import BACKENDS


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request, control_plane, kube_namespace):
    """Each cluster backend (tests.support.backends), with what it needs in the test's namespace
    (Trainer v2: its runtimes)."""
    request.param.prepare(control_plane, kube_namespace)
    return request.param
