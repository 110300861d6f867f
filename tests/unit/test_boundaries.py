"""Covers: the library never imports Prefect (it must run where Prefect is absent), Prefect tasks
are thin (one library call each, small return values, named after their function) and flows only
compose tasks and flows, the `dataclasses` backport that img2dataset drags in is not installed (it
breaks Prefect's server), and the installed dependencies are the tested ones pinned in conf/constraints.txt."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pkgutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import thinkdiff

REPO = Path(thinkdiff.__file__).resolve().parent.parent
CONSTRAINTS = REPO / "conf" / "constraints.txt"


def test_library_imports_without_prefect():
    modules = sorted(m.name for m in pkgutil.walk_packages(thinkdiff.__path__, "thinkdiff.")
                     if not m.name.endswith("__main__"))
    assert "thinkdiff.train.loop" in modules and "thinkdiff.cli" in modules
    code = (
        "import sys\n"
        "sys.modules['prefect'] = None  # any import of prefect now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') "
        "for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_library_source_never_mentions_prefect_imports():
    root = Path(thinkdiff.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []


def _decorated(module: ast.Module, decorator: str) -> list[tuple[ast.FunctionDef, str]]:
    """The functions decorated with `@decorator(name=...)`, with that name."""
    found = []
    for node in module.body:
        for deco in getattr(node, "decorator_list", []):
            if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == decorator:
                name = next(k.value.value for k in deco.keywords if k.arg == "name")
                found.append((node, name))
    return found


def test_tasks_are_thin_and_named_after_their_function():
    """Each task resolves the config and makes one call into the library; it reads no library
    constant (a file name, a layout), which the library's results carry instead, and returns strings."""
    small = {"str", "list[str]", "dict", "dict[str, str]"}
    tasks = 0
    for path in sorted((REPO / "tasks").glob("*.py")):
        module = ast.parse(path.read_text())
        imported = {alias.asname or alias.name for node in module.body if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("thinkdiff") for alias in node.names} - {"load_config"}
        for fn, name in _decorated(module, "task"):
            tasks += 1
            where = f"{path.name}:{fn.name}"
            expected = name.replace("-", "_") + "_task"
            assert fn.name == expected, f"{where}: the task {name!r} would be {expected}"
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and (
                isinstance(n.func, ast.Name) and n.func.id in imported
                or isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                and n.func.value.id in imported)]
            assert len(calls) == 1, f"{where}: {len(calls)} library calls"
            read = [n for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in imported and n is not calls[0].func]
            assert not read, f"{where} reads {ast.unparse(read[0])}: return it from the library call instead"
            assert ast.unparse(fn.returns) in small, f"{where} returns {ast.unparse(fn.returns)}"
    assert tasks >= 9


def test_flows_only_compose():
    """Flows call tasks and other flows; the library is reached through tasks only (flows/__init__.py's
    command line checks the config before a flow starts)."""
    flows = 0
    for path in sorted((REPO / "flows").glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = ast.parse(path.read_text())
        modules = {node.module for node in module.body if isinstance(node, ast.ImportFrom)}
        assert not {m for m in modules if m and m.startswith("thinkdiff")}, f"{path.name} imports the library"
        for fn, name in _decorated(module, "flow"):
            flows += 1
            assert name.replace("-", "_") + "_flow" == fn.name, f"{path.name}: the flow {name!r} is {fn.name}"
    assert flows == 5


def test_stdlib_dataclasses_is_not_shadowed():
    spec = importlib.util.find_spec("dataclasses")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent == Path(sysconfig.get_paths()["stdlib"]), (
        f"dataclasses resolves to {spec.origin}: remove the backport with `pip uninstall -y dataclasses`"
    )


def test_mlflow_img2dataset_and_accelerate_each_enter_through_one_module():
    """Each heavy dependency has one door, so upgrading it touches one file."""
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
    # aligner_pyfunc.py is the registered aligner's MLflow Model code, which MLflow itself runs to load it;
    # train/live.py runs MLflow's own system metrics monitor beside a live training run.
    assert importers == {"mlflow": {"registry.py", "aligner_pyfunc.py", "train/live.py"},
                         "img2dataset": {"data/corpus.py"}, "accelerate": {"train/engine.py"}}


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [req for req in map(Requirement, lines) if canonicalize_name(req.name) != "thinkdiff"]


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_dependency_inside_its_range_and_the_tests_run_on_them():
    """`make setup` installs with conf/constraints.txt, so CI tests the versions recorded there; a
    range edited in pyproject.toml without `make constraints` would install something untested."""
    pins = _constraint_pins()
    assert "torch" not in pins, "torch comes from the Makefile's TORCH (CPU here, CUDA for GPU users)"
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{CONSTRAINTS}: no pin for {req.name}; run `make constraints`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{CONSTRAINTS}: {req.name}=={pins[name]} is outside pyproject.toml's {req}; run `make constraints`"
        )
        installed = importlib.metadata.version(req.name)
        assert installed == pins[name], (
            f"{req.name} {installed} is installed but {CONSTRAINTS} pins {pins[name]}: "
            "`make setup` installs the pins, `make constraints` records an upgrade"
        )
