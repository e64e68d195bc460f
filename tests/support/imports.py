"""What a Python source imports, read from its syntax tree (nothing is imported)."""

from __future__ import annotations

import ast


def imported_modules(source: str, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``source``, sorted.

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` (b may be a module or a
    name in it). Relative imports are resolved against ``module``, the dotted name of the
    source's own module, and left out without it. ``importlib.import_module('x')``,
    ``import_module('x')`` and ``__import__('x')`` with a literal name count, as do the names
    in a ``pytest_plugins`` assignment.
    """
    package = module.rsplit(".", 1)[0] if module else None
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative to the package of ``module``, up level - 1
                if package is None:
                    continue
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("__import__", "import_module"))):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets):
            found += [(node.lineno, value.value) for value in ast.walk(node.value)
                      if isinstance(value, ast.Constant) and isinstance(value.value, str)]
    return sorted(found)
