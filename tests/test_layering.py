"""The import structure of docs/design.md, enforced: the layer table, no import cycle, and validating a config
imports no torch.

Imports are read from the source (``ast``), so every ``import`` counts, at module level or inside a function, and
so does every ``"kfac_tune.module:attribute"`` string (the catalog's builders, the zoo's, resolved on first use) and
every ``importlib.import_module("kfac_tune...")``: a reference that loads a module later is a dependency all the
same.

* Layers: no module imports from a layer above its own. An import inside a function may reach upwards only where
  ``LAZY_UPWARD`` lists it, each with its reason, so the few hand-overs stay visible. The optimizer core
  (``optim/``, ``nn/``) is the bottom layer: it imports nothing from the rest of ``kfac_tune``.
* Cycles: the module graph (every import above, lazy ones and reference strings included) has no strongly
  connected component of more than one module, so each module can be read, tested and moved knowing only what is
  below it.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kfac_tune"

# Bottom up; a module may import from its own layer and the ones below (docs/design.md, "Layers"). A name stands
# for the module and everything under it; the longest listed prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer", ("kfac_tune.optim", "kfac_tune.nn")),
    ("foundation", ("kfac_tune.version", "kfac_tune.catalog", "kfac_tune.record", "kfac_tune.text",
                    "kfac_tune.secrets", "kfac_tune.files", "kfac_tune.filelock", "kfac_tune.processes",
                    "kfac_tune.stores", "kfac_tune.launch", "kfac_tune.zoo", "kfac_tune.zoo._args",
                    "kfac_tune.zoo.specs")),
    ("config", ("kfac_tune.config", "kfac_tune.config_reader", "kfac_tune.settings")),
    ("recipes", ("kfac_tune.recipes",)),
    ("models", ("kfac_tune.zoo.models", "kfac_tune.zoo.data", "kfac_tune.optimizers", "kfac_tune.muon",
                "kfac_tune.lion", "kfac_tune.userdata", "kfac_tune.augment", "kfac_tune.batches")),
    ("training", ("kfac_tune.training", "kfac_tune.problem")),
    ("tracking", ("kfac_tune.tracking",)),
    ("search", ("kfac_tune.search", "kfac_tune.compare", "kfac_tune.train_run")),
    ("interface", ("kfac_tune.cli", "kfac_tune.display", "kfac_tune.api", "kfac_tune")),  # kfac_tune: the face
]
ROOT = "kfac_tune"  # the package's __init__, listed by its own name alone (as a prefix it would hold everything)

LAZY_UPWARD = {
    ("kfac_tune.catalog", "kfac_tune.optimizers"): "the catalog names each optimizer's builder, imported to build it",
    ("kfac_tune.catalog", "kfac_tune.muon"): "the catalog names Muon's builder, imported to build it",
    ("kfac_tune.zoo.specs", "kfac_tune.zoo.models"): "the zoo's registry names each architecture's builder",
    ("kfac_tune.zoo.specs", "kfac_tune.zoo.data"): "the zoo's registry names each data set's loader",
    ("kfac_tune.search", "kfac_tune.api"): "the package is callable as the Python API's search",
    ("kfac_tune.recipes", "kfac_tune.zoo.models"): "a recipe checked against a model compares architecture signatures",
}
REFERENCE = re.compile(r"(kfac_tune(?:\.\w+)*):\w+(?:\.\w+)*")  # "module:attribute", resolved on first use


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module``."""
    best, index = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            within = module == prefix or (prefix != ROOT and module.startswith(prefix + "."))
            if within and len(prefix) > len(best):
                best, index = prefix, i
    assert index >= 0, f"{module} is in no layer of tests/test_layering.py (and docs/design.md): place it"
    return index


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported kfac_tune module, at module level?) for every import in the file, and for every
    ``"module:attribute"`` reference string (never at module level: it is resolved when used)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and REFERENCE.fullmatch(node.value):
            found.append((REFERENCE.fullmatch(node.value).group(1), False))  # type: ignore[union-attr]
            continue
        if _imports_by_name(node):  # importlib.import_module("kfac_tune.zoo")
            found.append((node.args[0].value, False))  # type: ignore[attr-defined]
            continue
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


def _imports_by_name(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return called == "import_module" and str(node.args[0].value).startswith("kfac_tune")


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
            where = "at module level" if module_level else "lazily (inside a function, or a reference string)"
            violations.append(f"{module} ({LAYERS[own][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]}) "
                              f"{where}")
    assert not violations, "\n".join(violations)


def test_the_optimizer_imports_nothing_of_the_tool() -> None:
    """``optim/`` and ``nn/`` are a library of their own: no import, lazy or not, and no reference reaches the
    rest of kfac_tune (recipes, the catalog, the search), so the optimizer can be read, tested and lifted out alone."""
    def in_core(module: str) -> bool:
        return any(module == core or module.startswith(core + ".") for core in ("kfac_tune.optim", "kfac_tune.nn"))

    outside = [f"{module_name(path)} -> {imported}"
               for path in sorted(PACKAGE.rglob("*.py")) if in_core(module_name(path))
               for imported, _ in imports(path) if not in_core(imported)]
    assert not outside, "\n".join(outside)


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


def module_graph() -> dict[str, set[str]]:
    """Every kfac_tune module -> the kfac_tune modules it imports or references, lazily or not."""
    return {module_name(path): {imported for imported, _ in imports(path)} for path in PACKAGE.rglob("*.py")}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively): each is a
    set of modules that reach one another, so none of them can be understood, or imported, without the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in graph:
                    continue
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    graph = module_graph()
    found = cycles(graph)
    assert not found, "\n".join(
        " <-> ".join(component) + ": " + "; ".join(f"{a} -> {', '.join(sorted(graph[a] & set(component)))}"
                                                   for a in component)
        for component in found)


def test_the_cycle_check_sees_a_lazy_loop_and_a_reference_string(tmp_path: Path) -> None:
    """The checker is not vacuous: a loop closed by an import inside a function, or by a "module:attribute"
    string, is found; a chain is not."""
    probe = tmp_path / "probe.py"
    probe.write_text('import importlib\nBUILDER = "kfac_tune.optimizers:build_adam"\n\ndef f():\n'
                     '    import kfac_tune.catalog\n    return importlib.import_module("kfac_tune.zoo")\n')
    assert sorted(imports(probe)) == [("kfac_tune.catalog", False), ("kfac_tune.optimizers", False),
                                      ("kfac_tune.zoo", False)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({**module_graph(), "kfac_tune.optim.fisher": {"kfac_tune.recipes"}})  # optim reaching the tool


def test_validating_a_config_imports_no_torch() -> None:
    code = ("import sys; from kfac_tune.config import load_config; load_config('examples/digits_mlp.yaml'); "
            "heavy = sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
