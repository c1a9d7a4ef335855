"""The layer rules (docs/design.md): engine never imports Ray; the direction is jobs -> actors -> engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_engine_never_imports_ray():
    offenders = {f: n for f, n in imported_modules("engine").items() if "ray" in n}
    assert not offenders, f"engine/ must stay Ray-free; these files import ray: {offenders}"


def test_engine_imports_only_engine_of_ours():
    offenders = {
        f: n & {"actors", "jobs", "benchmarks", "tests"}
        for f, n in imported_modules("engine").items()
        if n & {"actors", "jobs", "benchmarks", "tests"}
    }
    assert not offenders, offenders


def test_actors_never_import_jobs():
    offenders = {f: n for f, n in imported_modules("actors").items() if "jobs" in n}
    assert not offenders, offenders


def test_importing_all_of_engine_loads_no_ray():
    """Transitive check: importing every engine module leaves 'ray' out of sys.modules."""
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "engine").rglob("*.py")
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
