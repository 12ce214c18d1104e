"""Every third-party module that tidal imports at module level belongs to a distribution that
pyproject.toml declares for running Tidal (its dependencies, or a runtime extra such as `gpu` or
`cluster`): a package listed only under `test` is missing for a user who ran `pip install .`
(httpx was, and `tidal router` failed to import)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("gpu", "cluster")


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in RUNTIME_EXTRAS:
        names |= {_name(r) for r in project["optional-dependencies"].get(extra, [])}
    return names


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported outside any function and outside try/except ImportError."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Try):
                guarded = any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers
                )
                if not guarded:
                    visit(node.body)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                    visit(node.orelse)

    visit(tree.body)
    return found


def test_every_module_level_import_is_a_declared_runtime_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for path in sorted((ROOT / "tidal").rglob("*.py")):
        for module in _module_level_imports(path):
            if module in sys.stdlib_module_names or module == "tidal":
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not dists & declared:
                missing.setdefault(f"{module} ({', '.join(sorted(dists))})", []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported by tidal but not a declared runtime dependency: {missing}"
