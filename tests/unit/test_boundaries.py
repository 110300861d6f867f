"""Covers: the library never imports Prefect (it must run where Prefect is absent), and the
`dataclasses` backport that img2dataset drags in is not installed (it breaks Prefect's server)."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import thinkdiff


def test_library_imports_without_prefect():
    modules = sorted(m.name for m in pkgutil.walk_packages(thinkdiff.__path__, "thinkdiff.") if not m.name.endswith("__main__"))
    assert "thinkdiff.train.loop" in modules and "thinkdiff.cli" in modules
    code = (
        "import sys\n"
        "sys.modules['prefect'] = None  # any import of prefect now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_library_source_never_mentions_prefect_imports():
    root = Path(thinkdiff.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []


def test_stdlib_dataclasses_is_not_shadowed():
    spec = importlib.util.find_spec("dataclasses")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent == Path(sysconfig.get_paths()["stdlib"]), (
        f"dataclasses resolves to {spec.origin}: remove the backport with `pip uninstall -y dataclasses`"
    )


def test_mlflow_img2dataset_and_accelerate_each_enter_through_one_module():
    """DESIGN.md: each heavy dependency has one door, so upgrading it touches one file."""
    root = Path(thinkdiff.__file__).parent
    importers: dict[str, set[str]] = {"mlflow": set(), "img2dataset": set(), "accelerate": set()}
    for path in root.rglob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for top in {name.split(".")[0] for name in names} & importers.keys():
                importers[top].add(path.relative_to(root).as_posix())
        if "from img2dataset" in source:  # run in a subprocess, named in a code string
            importers["img2dataset"].add(path.relative_to(root).as_posix())
    assert importers == {"mlflow": {"registry.py"}, "img2dataset": {"data/corpus.py"}, "accelerate": {"train/engine.py"}}
