"""Muon for a whole model: ``torch.optim.Muon`` on the hidden matrices, ``torch.optim.AdamW`` on everything else.

Muon (Jordan et al. 2024) orthogonalises each weight matrix's momentum with a Newton–Schulz iteration, which is
only meaningful for the matrix of a hidden layer mapping one feature space to another; ``torch.optim.Muon`` accepts
2-D tensors only, and its documentation leaves the rest to a standard optimizer. The split (``RULE``):

* under Muon: every 2-D parameter of a hidden layer with both dimensions above 1 (linear layers, recurrent
  input and hidden-to-hidden matrices, weight-normalised directions);
* under AdamW: biases and norm gains/shifts (1-D), embeddings (a row is a token's vector, not a linear map), the
  output layer (the last layer, in registration order, that holds a matrix: its rows are per-class, Muon's
  authors keep it on AdamW), convolution filters (4-D; torch's Muon takes no flattening option, so they are not
  flattened), and 2-D tensors with a dimension of 1 (weight-norm gains, one-unit layers: vectors in disguise).

The rule is recorded in the recipe with each group's size (``parameter_groups``), so a reader knows what Muon ran on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfac_tune.optimizers import adam_arguments

RULE = ("muon: every 2-D weight of a hidden layer (both dimensions > 1); adamw: biases, norms, embeddings, "
        "convolutions, the output layer (the last layer holding a matrix) and any other parameter")
ADAMW_PREFIX = "adamw_"
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class Split:
    """The model's trainable parameters, by name, as the two optimizers take them."""

    muon: list[tuple[str, nn.Parameter]]
    adamw: list[tuple[str, nn.Parameter]]
    output_layer: str | None

    def describe(self) -> dict[str, Any]:
        """What a recipe records: the rule, the output layer found, and each group's tensor and element counts."""
        return {"rule": RULE, "output_layer": self.output_layer,
                **{group: {"tensors": len(named), "elements": sum(p.numel() for _, p in named)}
                   for group, named in (("muon", self.muon), ("adamw", self.adamw))}}


def split_parameters(model: nn.Module) -> Split:
    """Apply ``RULE`` to ``model`` (a ``DistributedDataParallel`` wrapper is looked through)."""
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # shared tensors listed once

    def matrix(name: str, p: nn.Parameter) -> bool:
        return p.ndim == 2 and min(p.shape) > 1 and not isinstance(model.get_submodule(_layer(name)), _EMBEDDINGS)

    matrices = [name for name, p in named if matrix(name, p)]
    output = _layer(matrices[-1]) if matrices else None
    muon = [(n, p) for n, p in named if n in matrices and _layer(n) != output]
    taken = {n for n, _ in muon}
    return Split(muon, [(n, p) for n, p in named if n not in taken], output)


def _layer(parameter_name: str) -> str:
    """The layer a parameter belongs to: ``dec.3.parametrizations.weight.original1`` -> ``dec.3``."""
    return parameter_name.rpartition(".")[0].split(".parametrizations.")[0]


class MuonWithAdamW:
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` over one model's split parameters, stepped as one optimizer.

    Offers what the training loop and a user's loop need: ``step(closure)``, ``zero_grad``, ``param_groups`` (Muon's
    then AdamW's), ``state_dict``/``load_state_dict``; ``parameter_groups`` says how the model was split.
    """

    def __init__(self, model: nn.Module, *, adamw: dict[str, Any], **muon: Any) -> None:
        self.split = split_parameters(model)
        self.parameter_groups = self.split.describe()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if self.split.muon:
            self.optimizers["muon"] = torch.optim.Muon([p for _, p in self.split.muon], **muon)
        if self.split.adamw:
            self.optimizers["adamw"] = torch.optim.AdamW([p for _, p in self.split.adamw], **adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_muon(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> MuonWithAdamW:
    """The catalog's ``muon``: flat ``adamw_*`` names configure the AdamW part (torch's AdamW defaults; the
    catalog's lr, 3e-4 as in torch's Muon example), the other names go to ``torch.optim.Muon``."""
    adamw = {name[len(ADAMW_PREFIX):]: arguments.pop(name) for name in list(arguments) if name.startswith(ADAMW_PREFIX)}
    return MuonWithAdamW(model, adamw=adam_arguments(adamw), **arguments)
