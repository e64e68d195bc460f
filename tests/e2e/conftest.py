import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KUBECONFIG"):
        return
    skip = pytest.mark.skip(reason="e2e: needs a real cluster; set KUBECONFIG to run")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
