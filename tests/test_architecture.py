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
    # Assert
    assert importers == {"client/dicom.py"}


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
