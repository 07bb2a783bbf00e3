"""Which of a model's parameters K-FAC gives curvature, which take the first-order fallback, and why.

:func:`find_layers` walks the model once: ``exclude`` entries are matched (an entry that matches nothing is an
error listing what exists: a silently ignored exclusion changes the optimizer without a word), every other module
is looked up in the layer registry (:mod:`kfac_tune.optim.registry`), and a parameter held by several modules (tied
weights) gets one block fed by every use when the uses compute the same function (tf-kfac's multi-use
registration: the statistics of each call are summed, as for one layer called twice), or an error naming the
modules otherwise.  The result, :class:`Coverage`, is what ``KFAC.coverage`` shows, in one line by ``str()``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from torch import nn

from kfac_tune.optim.callsite import KFACWarning, user_stacklevel
from kfac_tune.optim.capture import LayerHelper, UnsupportedLayer
from kfac_tune.optim.registry import ALTERNATIVES, make_helper

Exclude = Union[str, nn.Module, type]
SHOWN = 3  # parameter names shown per fallback reason in the summary


@dataclass
class Coverage:
    """``helpers``: layer name -> helper; ``uses``: layer name -> every module whose calls feed that layer's
    statistics (more than one for a tied weight); ``fallback``: parameter name -> why it takes the first-order
    update; ``curvature_numel``/``total_numel``: trainable entries with curvature / in all."""

    helpers: dict[str, LayerHelper] = field(default_factory=dict)
    uses: dict[str, list[nn.Module]] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    curvature_tensors: int = 0
    curvature_numel: int = 0
    total_numel: int = 0

    def __str__(self) -> str:
        share = math.floor(100.0 * self.curvature_numel / max(self.total_numel, 1))  # 100% only when it is all
        line = (f"KFAC: curvature for {len(self.helpers)} layer{'s' * (len(self.helpers) != 1)} "
                f"({self.curvature_tensors} tensors, {share}% of parameters)")
        return f"{line}; {self.fallback_text() or 'no first-order fallback'}"

    def fallback_text(self) -> str:
        """``first-order fallback for N tensors: names (reason); ...``, a few names per reason; empty for none."""
        if not self.fallback:
            return ""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.fallback.items():
            by_reason.setdefault(reason, []).append(name)
        parts = []
        for reason, names in by_reason.items():
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            parts.append(f"{', '.join(names[:SHOWN])}{more} ({reason})")
        return f"first-order fallback for {len(self.fallback)} tensors: {'; '.join(parts)}"


def find_layers(model: nn.Module, exclude: Union[None, Exclude, Iterable[Exclude]],
                temporal_of: Callable[[str], str]) -> Coverage:
    """The coverage of ``model``: see the module docstring.  ``temporal_of(name)`` is layer ``name``'s temporal
    model."""
    modules = dict(model.named_modules())
    excluded = excluded_names(modules, exclude)
    helpers: dict[str, LayerHelper] = {}
    reasons: dict[str, str] = {}
    for name, module in modules.items():
        if name in excluded:
            reasons[name] = "excluded"
            continue
        try:
            helper = make_helper(module, temporal_of(name))
        except UnsupportedLayer as why:
            reasons[name] = f"{type(module).__name__}: {why}"
            continue
        if helper is None:
            reasons[name] = f"{type(module).__name__}: no curvature block for its type"
        else:
            helpers[name] = helper
    coverage = Coverage()
    _group_uses(modules, helpers, reasons, coverage)
    covered = {id(p) for h in coverage.helpers.values() for p in h.params}
    owner = {id(p): name for name, m in modules.items() for p in m.parameters(recurse=False)}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        coverage.total_numel += p.numel()
        if id(p) in covered:
            coverage.curvature_tensors += 1
            coverage.curvature_numel += p.numel()
        else:
            holder = owner.get(id(p), "")
            coverage.fallback[pname] = reasons.get(holder, f"{type(modules[holder]).__name__}: not in its block")
    _suggest_alternatives(modules, excluded, covered)
    return coverage


def excluded_names(modules: dict[str, nn.Module], exclude: Union[None, Exclude, Iterable[Exclude]]
                   ) -> set[str]:
    """Names of the modules ``exclude`` covers.  An entry is a module name or a dotted prefix of names
    (``"encoder"`` covers ``"encoder.0"``), a class name (``"Conv2d"``), a module type or a module instance; one
    string, type or module alone is one entry, None none.  An entry that matches no module is refused with the list of
    what exists."""
    if exclude is None:
        return set()
    entries = [exclude] if isinstance(exclude, (str, type, nn.Module)) else list(exclude)
    names: set[str] = set()
    for entry in entries:
        matched = {name for name, module in modules.items() if _matches(entry, name, module)}
        if not matched:
            raise ValueError(f"KFAC: exclude entry {entry!r} matches no module of the model. An entry is a module "
                             "name or a dotted prefix of names ('encoder' covers 'encoder.0'), a class name "
                             f"('Linear'), a module type or a module instance; the model has {_listing(modules)}")
        names |= matched
    return names


def _matches(entry: Exclude, name: str, module: nn.Module) -> bool:
    if isinstance(entry, str):
        return name == entry or name.startswith(entry + ".") or type(module).__name__ == entry
    if isinstance(entry, type):
        return isinstance(module, entry)
    if isinstance(entry, nn.Module):
        return entry is module
    raise TypeError(f"KFAC: exclude entries are module names, class names, module types or modules; got "
                    f"{entry!r} ({type(entry).__name__})")


def _listing(modules: dict[str, nn.Module], limit: int = 30) -> str:
    shown = [f"{name!r} ({type(m).__name__})" for name, m in modules.items() if name][:limit]
    more = len(modules) - 1 - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "no submodules"


def _group_uses(modules: dict[str, nn.Module], helpers: dict[str, LayerHelper], reasons: dict[str, str],
                coverage: Coverage) -> None:
    """One layer per weight: modules that hold the same trainable parameter and compute the same function share
    the first one's layer; any other sharing is refused."""
    holders: dict[int, list[str]] = {}
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                holders.setdefault(id(p), []).append(name)
    joined: set[str] = set()
    for name, helper in helpers.items():
        if name in joined:
            continue
        sharers = sorted({n for p in helper.params for n in holders[id(p)]} - {name},
                         key=list(modules).index)
        for other in sharers:
            if other not in helpers or not helper.same_function(helpers[other]):
                raise ValueError(_tied_message(modules, helper, [name, *sharers], holders, reasons))
        coverage.helpers[name] = helper
        coverage.uses[name] = [helper.module] + [modules[n] for n in sharers]
        joined.update(sharers)


def _tied_message(modules: dict[str, nn.Module], helper: LayerHelper, names: list[str],
                  holders: dict[int, list[str]], reasons: dict[str, str]) -> str:
    shared = next(p for p in helper.params if len(holders[id(p)]) > 1)
    users = ", ".join(f"{n!r} ({type(modules[n]).__name__}"
                      + (f", {reasons[n]}" if n in reasons else "") + ")" for n in names)
    return (f"KFAC: a parameter of shape {list(shared.shape)} is shared by the modules {users}. K-FAC can give "
            "a shared weight one block fed by all its uses only when the modules are of the same type and "
            "configuration and share all their trainable parameters (a tied embedding and output layer, or one "
            "use excluded, would precondition the summed gradient with one use's curvature). Pass "
            f"exclude={names!r} to train it with the first-order fallback, or untie the weight.")


def _suggest_alternatives(modules: dict[str, nn.Module], excluded: set[str], covered: set[int]) -> None:
    """Warn about a module left without curvature that has a K-FAC-visible twin (torch's GRU/LSTM)."""
    for name, module in modules.items():
        twin = next((alt for t, alt in ALTERNATIVES.items() if isinstance(module, t)), None)
        trainable = [p for p in module.parameters() if p.requires_grad and id(p) not in covered]
        if twin is None or name in excluded or not trainable:
            continue
        warnings.warn(f"K-FAC: {name!r} is a torch {type(module).__name__}, whose fused kernel hides its weights "
                      f"from K-FAC: they take the first-order fallback. {twin} computes the same function with "
                      "weights K-FAC can see (its load_torch_weights copies these); or pass "
                      f"exclude=[{name!r}] to silence this.", KFACWarning, stacklevel=user_stacklevel())
