"""Dependencies point one way: client/ and server/ import common/, never each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_packages(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("common", {"client", "server", "simulations"}), ("client", {"server", "simulations"}),
     ("server", {"client", "simulations"})],
)
def test_import_direction(package: str, forbidden: set[str]) -> None:
    assert _imported_packages(package) & forbidden == set()


def test_no_unsafe_torch_load() -> None:
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func.value, "id", "") == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, path


def _importers(library: str) -> set[str]:
    """Every module of medsilo's packages that imports ``library`` (or one of its submodules)."""
    importers = set()
    for package in ("common", "client", "server", "simulations"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == library for n in names):
                    importers.add(path.relative_to(ROOT).as_posix())
    return importers


@pytest.mark.parametrize("library", ["pydicom", "highdicom"])
def test_only_client_dicom_imports_the_dicom_libraries(library: str) -> None:
    # Prepare / Execute: every module of medsilo's packages that imports the library
    importers = _importers(library)
    # Assert: one package (client/dicom/) imports it, and nothing outside that package does
    assert (ROOT / "client" / "dicom" / "__init__.py").is_file()
    assert importers and all(p.startswith("client/dicom/") for p in importers), importers


#: The synthetic patients and scanners of the simulated archives (simulations/synthetic_dicom.py).
_SYNTHETIC_NAMES = {"Identity", "Equipment", "image_dataset", "encode_stored"}


def _names(path: Path) -> set[str]:
    """Every name a module defines, imports or refers to (bare or through a ``...dicom`` module's attribute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and "dicom" in getattr(node.value, "id", ""):
            found.add(node.attr)  # dicom.Identity, synthetic_dicom.image_dataset (not torch's nn.Identity)
        elif isinstance(node, ast.ImportFrom):
            found |= {alias.name for alias in node.names}
    return found


def test_the_synthetic_dicom_writer_lives_with_the_simulations_not_in_the_hospital_node() -> None:
    # Prepare / Execute: the modules of the hospital node that mention a synthetic-archive name, and the
    # module that defines them
    in_client = {path.relative_to(ROOT).as_posix() for path in (ROOT / "client").rglob("*.py")
                 if _names(path) & _SYNTHETIC_NAMES}
    synthetic = ROOT / "simulations" / "synthetic_dicom.py"
    # Assert: fake patients and scanners are simulation tooling, which composes client/dicom's writer
    # without importing pydicom itself
    assert in_client == set()
    assert _names(synthetic) >= _SYNTHETIC_NAMES
    assert "simulations/synthetic_dicom.py" not in _importers("pydicom") | _importers("highdicom")


def test_a_site_imports_opacus_only_when_it_trains_with_dp() -> None:
    # Prepare: a fresh interpreter, as a deployed node's ClientApp process is
    code = ("import sys, client.site; before = 'opacus' in sys.modules; "
            "from client.dp import accounting as privacy; "
            "privacy.epsilon_spent(history=[(1.0, 0.1, 10)], delta=1e-5, accountant='rdp'); "
            "print(before, 'opacus' in sys.modules)")

    # Execute
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    # Assert: evaluation-only requests and runs without DP skip Opacus's import (about 0.7 s)
    assert out.split() == ["False", "True"]


def test_a_classification_site_never_imports_scikit_learn_or_scipy() -> None:
    # Prepare: a fresh interpreter that trains and validates one round, as a ClientApp process does
    code = ("import sys, numpy as np, client.site; from common.datasets import Task; "
            "from common.metrics import classification_metrics, score_histogram; "
            "y = np.array([0, 1, 1, 0]); p = np.array([0.2, 0.9, 0.4, 0.5]); "
            "classification_metrics(y, p, task=Task.BINARY); score_histogram(y, p); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")

    # Execute
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    # Assert: each deployed ClientApp process is spared their import (about 1.5 s)
    assert out.strip() == "[]"


def test_only_the_dp_package_imports_opacus() -> None:
    # Prepare / Execute: every module of medsilo's packages that imports Opacus
    importers = _importers("opacus")
    # Assert: the privacy-critical mechanism has one home (client/dp), which a reviewer can find
    assert importers and all(p.startswith("client/dp/") for p in importers), importers


def test_a_hospital_nodes_client_app_never_seeds_its_noise_from_the_run_config() -> None:
    # Prepare / Execute: the node's ClientApp builds its site client without a randomness argument
    source = (ROOT / "client" / "app.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and getattr(n.func, "id", "") == "SiteClient"]
    # Assert: the default (OS entropy) is the only randomness a deployed node has
    assert calls and all(not n.keywords and len(n.args) == 1 for n in calls)


def _common_import_graph() -> dict[str, set[str]]:
    """Which ``common`` modules each ``common`` module imports, anywhere in it (deferred imports too)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "common").glob("*.py"):
        name = path.stem
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "common":
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common."):
                edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names if a.name.startswith("common.")}
        graph[name] = {e for e in edges if (ROOT / "common" / f"{e}.py").is_file()} - {name}
    return graph


def test_common_modules_import_each_other_without_cycles() -> None:
    # Prepare
    graph = _common_import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    # Execute: depth-first search for a back edge
    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])

    # Assert: e.g. the run configuration, the dataset recipes and the models depend one way
    assert cycles == []
    assert {"models", "recipes"} & graph["config"] == set()
