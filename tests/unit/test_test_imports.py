"""Test modules share code only through ``tests/support/`` and ``conftest.py``.

A test module that imports another runs that module's imports (and collects its fixtures) as
a side effect, and hides shared helpers in a file nobody looks in for them.
"""

from __future__ import annotations

from tests.support.imports import imported_modules
from tests.support.repo import ROOT


def forbidden(name: str) -> bool:
    """A module of the test tree other than the support package and the conftest files."""
    parts = name.split(".")
    return parts[0] == "tests" and parts[1:2] != ["support"] and "conftest" not in parts


def test_no_test_module_imports_another():
    offences = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        offences += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                     for line, name in imported_modules(path.read_text(), module)
                     if forbidden(name)]
    assert not offences, ("move shared helpers to tests/support/ or a conftest.py:\n"
                          + "\n".join(offences))


def test_every_kind_of_import_is_seen():
    source = ("from __future__ import annotations\n"
              "import os\n"
              "import tests.unit.test_a\n"
              "from tests.integration.test_b import helper\n"
              "from tests.unit import test_c\n"
              "from .test_d import fixture\n"
              "from ..e2e import test_e\n"
              "from tests.support.images import picture\n"
              "from tests import conftest\n"
              "from tests.e2e.conftest import cluster\n"
              "pytest_plugins = ['tests.unit.test_f', 'tests.support.gcs']\n")
    names = [name for _, name in imported_modules(source, "tests.unit.test_example")]
    assert [n for n in names if forbidden(n)] == [
        "tests.unit.test_a", "tests.integration.test_b.helper", "tests.unit.test_c",
        "tests.unit.test_d.fixture", "tests.e2e.test_e", "tests.unit.test_f"]
    assert {"__future__.annotations", "os", "tests.support.images.picture", "tests.conftest",
            "tests.e2e.conftest.cluster", "tests.support.gcs"} <= set(names)
