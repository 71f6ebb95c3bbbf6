"""The package's layers: a layer never imports one above it, and private names stay private.

The layers, lowest first: the base modules (errors, lru, limits, nodes), `store`, then `training`
and `run` side by side (neither imports the other), `optvis`, `execution`, `analysis`, and on
top the front ends (`server`, `cli`, `integrations`, `demo`).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tb_microscope"
BASE = {"errors", "lru", "limits", "nodes"}
FRONT = {"server", "cli", "integrations", "demo"}

# What each part may not import, by the first name under tb_microscope.
FORBIDDEN = {
    "base": {"store", "training", "run", "optvis", "execution", "analysis"} | FRONT,
    "store": {"training", "run", "optvis", "execution", "analysis"} | FRONT,
    "training": {"run", "optvis", "execution", "analysis"} | FRONT,
    "run": {"training", "optvis", "execution", "analysis"} | FRONT,
    "optvis": {"training", "execution", "analysis"} | FRONT,
    "execution": {"training", "analysis"} | FRONT,
    "analysis": {"training"} | FRONT,
    "server": {"training", "cli", "integrations", "demo"},
    "integrations": {"optvis", "execution", "analysis", "server", "cli", "demo"},
    "demo": {"optvis", "execution", "analysis", "server", "cli", "integrations"},
    "cli": {"server", "integrations"},
}


def part_of(module: str) -> str:
    """The layer of a dotted module name under tb_microscope ('' for the package itself)."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else ""
    return "base" if first in BASE else first


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from … import name` in the file, anywhere in it,
    relative imports resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.append((node.lineno, target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_are_where_the_table_says():
    parts = {part_of(module_name(p)) for p in SOURCES} - {""}
    assert parts == set(FORBIDDEN), "a new top-level module or package: give it a layer here"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path):
    here = part_of(module_name(path))
    wrong = []
    for line, target, name in imported_modules(path):
        if not target.startswith("tb_microscope"):
            continue
        # `from .. import limits` names a module of the package itself
        full = f"{target}.{name}" if target == "tb_microscope" else target
        if part_of(full) in FORBIDDEN.get(here, set()):
            wrong.append(f"line {line}: {target} {name}")
    assert not wrong, f"{path.relative_to(PACKAGE)} ({here}) imports from above: {wrong}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    private = [
        f"line {line}: {target}.{name}"
        for line, target, name in imported_modules(path)
        if target.startswith("tb_microscope") and name.startswith("_") and not name.startswith("__")
    ]
    assert not private, f"{path.relative_to(PACKAGE)} imports private names: {private}"


# A fresh interpreter per package: what importing it pulls in, lazy re-exports included.
PULLS_NOTHING_ABOVE = [
    "store",
    "store.mlflow",
    "store.remote",
    "training",
    "run",
    "optvis",
    "execution",
    "analysis",
]


@pytest.mark.parametrize("package", PULLS_NOTHING_ABOVE)
def test_importing_a_package_loads_no_layer_above_it(package):
    code = (
        "import json, sys\n"
        f"import tb_microscope.{package}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('tb_microscope.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    loaded = json.loads(out.splitlines()[-1])
    above = sorted(
        m for m in loaded if part_of(m) in FORBIDDEN[part_of(f"tb_microscope.{package}")]
    )
    assert not above, f"importing tb_microscope.{package} loads {above}"


def test_finding_runs_imports_no_torch():
    code = (
        "import sys\n"
        "from tb_microscope.store.paths import find_runs, plugin_dir\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "False"
