"""Which curvature a module gets: a table from module type to the factory of its :class:`LayerHelper`.

The helper says how the layer's inputs and output gradients become the rows of its statistics, which accumulator
sums them and which block holds and inverts them (:mod:`kfac_tune.optim.capture`), so a layer type is one entry
here.  A module is looked up by its class, then by its base classes in method resolution order, so a subclass of
``nn.Linear`` gets the Linear entry unless it has its own; ``register_layer`` adds or replaces an entry (a user's
own module, or another block for a built-in type).  One rule comes before the table, as kfac-jax's tags do for
layers its graph matcher cannot tell apart: a Linear marked as shared over time steps
(:func:`~kfac_tune.optim.temporal.mark_time_shared`) gets the temporal block that ``KFAC(temporal=...)`` asks for.

A factory takes the module and returns its helper; it may raise :class:`UnsupportedLayer` with the reason a
configuration is not covered (a grouped convolution), or return None, and the layer takes the first-order
fallback, which ``KFAC.coverage`` reports.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

from torch import nn

from kfac_tune.optim.capture import (ConvHelper, ConvTransposeHelper, LayerHelper, LinearHelper, UnsupportedLayer,
                                    unsupported_reason)
from kfac_tune.optim.layers import EmbeddingHelper, NormHelper
from kfac_tune.optim.temporal import TemporalHelper, is_time_shared

LayerFactory = Callable[[nn.Module], Optional[LayerHelper]]
Factory = TypeVar("Factory", bound=LayerFactory)

_FACTORIES: dict[type, LayerFactory] = {}

# torch modules whose weights K-FAC cannot see, and the kfac_tune module that computes the same function visibly
ALTERNATIVES: dict[type, str] = {nn.GRU: "kfac_tune.nn.GRU", nn.LSTM: "kfac_tune.nn.LSTM"}


def register_layer(module_type: type, factory: Optional[Factory] = None) -> Callable[[Factory], Factory]:
    """Give modules of ``module_type`` (and of its subclasses without an entry of their own) the helper that
    ``factory(module)`` returns; replaces an earlier entry for the same type.

    ``register_layer(MyLinear, LinearHelper)``, or as a decorator ``@register_layer(MyLayer)`` on a
    :class:`LayerHelper` subclass or a function of the module.  Returns the factory (so the decorator keeps it).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer needs an nn.Module subclass, got {module_type!r}")

    def add(f: Factory) -> Factory:
        if not callable(f):
            raise TypeError(f"register_layer({module_type.__name__}, ...): the factory must be callable (a "
                            f"LayerHelper subclass or a function of the module), got {f!r}")
        _FACTORIES[module_type] = f
        return f

    if factory is not None:
        add(factory)
    return add


def registered_layers() -> dict[type, LayerFactory]:
    """A copy of the table: module type -> factory."""
    return dict(_FACTORIES)


def make_helper(module: nn.Module, temporal: str = "independent") -> Optional[LayerHelper]:
    """The helper of ``module``, or None when no entry covers its type (first-order fallback).

    Raises :class:`UnsupportedLayer` (with the reason) for a covered type in a configuration its block cannot
    handle.  ``temporal`` is the curvature model of a Linear marked as shared over time steps; others ignore it.
    """
    factory = next((_FACTORIES[t] for t in type(module).__mro__ if t in _FACTORIES), None)
    if factory is None:
        return None
    reason = unsupported_reason(module)
    if reason is not None:
        raise UnsupportedLayer(reason)
    if temporal != "independent" and isinstance(module, nn.Linear) and is_time_shared(module):
        return TemporalHelper(module, temporal)
    return factory(module)


register_layer(nn.Linear, LinearHelper)


@register_layer(nn.modules.linear.NonDynamicallyQuantizableLinear)
def _attention_output(module: nn.Module) -> LayerHelper:
    """``nn.MultiheadAttention.out_proj``: the attention applies its weight directly, never calling its forward,
    so no hook would see a statistic (the block would never be ready); say so instead of claiming curvature."""
    raise UnsupportedLayer("nn.MultiheadAttention's output projection, applied without calling its forward")


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, ConvHelper)
for _transposed in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_transposed, ConvTransposeHelper)
register_layer(nn.Embedding, EmbeddingHelper)
for _norm in (nn.LayerNorm, nn.modules.batchnorm._BatchNorm):
    register_layer(_norm, NormHelper)
