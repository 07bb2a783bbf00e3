"""The import layering of docs/design.md, enforced: no module imports from a layer above its own, and validating a
config imports no torch.

Imports are read from the source (``ast``), so every ``import`` counts, at module level or inside a function. An
import inside a function may reach upwards only where ``LAZY_UPWARD`` lists it, each with its reason: those are
the few places where a lower layer hands over to a higher one on demand (``KFAC.from_recipe``, a recipe measuring
its trial on the test split), and the list keeps them visible.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kfac_tune"

# Bottom up; a module may import from its own layer and the ones below (docs/design.md, "Layers").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("kfac_tune", "kfac_tune.catalog", "kfac_tune.record", "kfac_tune.text", "kfac_tune.secrets",
                    "kfac_tune.files", "kfac_tune.filelock", "kfac_tune.processes", "kfac_tune.stores",
                    "kfac_tune.launch", "kfac_tune.zoo", "kfac_tune.zoo._args", "kfac_tune.zoo.specs")),
    ("config", ("kfac_tune.config", "kfac_tune.config_reader", "kfac_tune.settings")),
    ("recipes", ("kfac_tune.recipes",)),
    ("optimizer", ("kfac_tune.optim", "kfac_tune.nn")),
    ("models", ("kfac_tune.zoo.models", "kfac_tune.zoo.data", "kfac_tune.optimizers", "kfac_tune.muon",
                "kfac_tune.userdata", "kfac_tune.augment", "kfac_tune.batches")),
    ("training", ("kfac_tune.training", "kfac_tune.problem")),
    ("tracking", ("kfac_tune.tracking",)),
    ("search", ("kfac_tune.search", "kfac_tune.compare", "kfac_tune.train_run")),
    ("interface", ("kfac_tune.cli", "kfac_tune.display", "kfac_tune.api")),
]

LAZY_UPWARD = {
    ("kfac_tune", "kfac_tune.optim"): "the package's public names (KFAC, ...) load on first use",
    ("kfac_tune", "kfac_tune.recipes"): "the package's public names (load_recipe) load on first use",
    ("kfac_tune", "kfac_tune.optimizers"): "the package's public names (optimizer_from_recipe) load on first use",
    ("kfac_tune", "kfac_tune.search"): "the package's public names (search, the Python API) load on first use",
    ("kfac_tune", "kfac_tune.api"): "the package's public names (train, the Python API) load on first use",
    ("kfac_tune.search", "kfac_tune.api"): "the package is callable as the Python API's search",
    ("kfac_tune.recipes", "kfac_tune.optim"): "a K-FAC recipe completes its arguments with KFAC's defaults",
    ("kfac_tune.recipes", "kfac_tune.search.selection"): "exporting a trial measures it once on the test split",
    ("kfac_tune.recipes", "kfac_tune.zoo.models"): "a recipe checked against a model compares architecture signatures",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module``."""
    best, index = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index >= 0, f"{module} is in no layer of tests/test_layering.py (and docs/design.md): place it"
    return index


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported kfac_tune module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import module`` imports the module; ``from module import name``, the module
            names = [f"{node.module}.{alias.name}" if _is_module(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name.split(".")[0] == "kfac_tune"]
    return found


def _is_module(name: str) -> bool:
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_module_imports_from_a_layer_above_it() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        for imported, module_level in imports(path):
            if layer_of(imported) <= own:
                continue
            if not module_level and any(module == low and (imported == high or imported.startswith(high + "."))
                                        for low, high in LAZY_UPWARD):
                continue
            where = "module level" if module_level else "inside a function"
            violations.append(f"{module} ({LAYERS[own][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]}) "
                              f"at {where}")
    assert not violations, "\n".join(violations)


def test_every_lazy_exception_is_still_needed() -> None:
    """An entry of LAZY_UPWARD that no import uses any more is removed, so the list stays the true one."""
    used = set()
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        for imported, _ in imports(path):
            used |= {(low, high) for low, high in LAZY_UPWARD
                     if module == low and (imported == high or imported.startswith(high + "."))}
    assert set(LAZY_UPWARD) == used, set(LAZY_UPWARD) - used


def test_the_layering_test_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker is not vacuous: an upward import in a throwaway file is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from kfac_tune.search.prepare import prepare_search\n")
    assert imports(probe) == [("kfac_tune.search.prepare", False)]
    assert layer_of("kfac_tune.search.prepare") > layer_of("kfac_tune.config")


def test_validating_a_config_imports_no_torch() -> None:
    code = ("import sys; from kfac_tune.config import load_config; load_config('examples/digits_mlp.yaml'); "
            "heavy = sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
