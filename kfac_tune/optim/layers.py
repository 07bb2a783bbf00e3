"""Layer types beyond ``Linear`` and convolutions (:mod:`kfac_tune.optim.registry` maps module types to them).

- ``nn.Embedding``: the input rows are one-hot, so ``A = E[a aᵀ]`` is *exactly* diagonal: the token frequencies.
  The block is ``diag(A) ⊗ G`` (:class:`DiagonalInputBlock`), stored and inverted in ``O(vocab + d³)``: a
  vocabulary-sized dense factor would be both wasteful and no more accurate.
- ``nn.LayerNorm`` and batch norm: ``y = γ ⊙ x̂ + β`` gives unit ``c`` the gradient
  ``(Σ_rows g_c x̂_c, Σ_rows g_c)`` per example, so each unit gets its own exact 2×2 Fisher block (1×1 without a
  bias, or with γ or β frozen) estimated from per-example gradients (:class:`UnitwiseBlock`, "unit-wise" as in ASDL, the diagonal
  scale-and-shift block of kfac-jax with the γ/β correlation kept).  An example is index 0 of the input; its
  positions (time steps, pixels) are summed, as the per-example gradient does.  With ``fisher="exact"`` this is
  the exact GGN block when each example has one loss term; under batch-norm training the coupling of examples
  through the batch statistics is ignored, as in every K-FAC implementation.

Damping of these blocks: ``diag(A) ⊗ G`` follows ``damping_mode`` like a Kronecker block; a unit-wise block is a
full (tiny) block, so both modes add ``λ I`` to it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune.optim.blocks import FactorBlock, eigh_or_warn, pi_factor
from kfac_tune.optim.capture import LayerHelper, UnsupportedLayer
from kfac_tune.optim.statistics import Statistics

NormLayer = Union[nn.LayerNorm, nn.modules.batchnorm._BatchNorm]


# ------------------------------------------------------------------------------------------------ embedding
class EmbeddingHelper(LayerHelper):
    """``nn.Embedding`` as ``s = Wᵀ a`` with one-hot ``a``: the block's matrix is the transposed table."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if self.module.sparse:
            raise UnsupportedLayer("sparse gradients (sparse=True)")

    @property
    def a_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    def make_block(self, device: torch.device, dtype: torch.dtype) -> "DiagonalInputBlock":
        return DiagonalInputBlock(self.a_dim, self.g_dim, device, dtype)

    def a_moment(self, x: Tensor, used: int) -> tuple[Tensor, int]:
        """Token counts: the diagonal of ``Σ a aᵀ`` for one-hot rows."""
        tokens = x[:used].reshape(-1)
        return torch.bincount(tokens, minlength=self.a_dim).to(torch.float64), tokens.numel()

    def g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.T

    def _unmatrix(self, mat: Tensor, shape: torch.Size) -> Tensor:
        return mat.T.reshape(shape)


class DiagonalInputBlock(FactorBlock):
    """``diag(A) ⊗ G``: decomposition ``(dA, QG, dG)``; the A side needs no eigendecomposition."""

    def __init__(self, a_dim: int, g_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__({"A": (a_dim,), "G": (g_dim, g_dim)}, [(a_dim,), (g_dim, g_dim), (g_dim,)], device, dtype)
        self.a_dim, self.g_dim = a_dim, g_dim

    @property
    def decomposition_cost(self) -> float:
        return float(self.g_dim) ** 3

    def _decompose(self) -> Optional[list[Tensor]]:
        A, G = self.averages["A"], self.averages["G"]
        eig = eigh_or_warn(G)
        if eig is None or not bool(torch.isfinite(A).all()):
            return None
        return [A.clamp_min(0), eig[1], eig[0].clamp_min(0)]

    def curvature_scale(self) -> Tensor:
        dA, _, dG = self.decomposition()
        return dA.mean() * dG.mean()

    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        dA, QG, dG = self.decomposition()
        m = grad.to(self.dtype)
        if mode == "exact":
            out = QG @ ((QG.T @ m) / (torch.outer(dG, dA) + damping))
        else:
            g_inv, a_inv = self._cached(damping, self._pi_inverses)
            out = (g_inv @ m) * a_inv
        return out.to(grad.dtype)

    def _pi_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        dA, QG, dG = self.decomposition()
        pi, root = pi_factor(dA, dG), damping**0.5
        return (QG / (dG + root / pi)) @ QG.T, 1.0 / (dA + pi * root)


# ------------------------------------------------------------------------------------------ normalisation
class NormHelper(LayerHelper):
    """``nn.LayerNorm`` / ``nn.BatchNorm{1,2,3}d``: unit ``c``'s parameters ``(γ_c, β_c)`` are row ``c`` of an
    ``(units, 1 [+1])`` matrix."""

    module: NormLayer

    @property
    def units(self) -> int:
        return (self.module.weight if self.module.weight is not None else self.module.bias).numel()

    @property
    def a_dim(self) -> int:
        return int(self.has_weight) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.units

    def make_block(self, device: torch.device, dtype: torch.dtype) -> "UnitwiseBlock":
        return UnitwiseBlock(self.units, self.a_dim, device, dtype)

    def statistics(self, dtype: torch.dtype) -> Statistics:
        return UnitwiseStatistics(self, dtype)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.reshape(-1, 1)

    def normalized(self, x: Tensor) -> Tensor:
        """``x̂``, computed from the whole input as the layer does (batch statistics need every example)."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        batch_stats = m.training or m.running_mean is None
        return F.batch_norm(x, None if batch_stats else m.running_mean, None if batch_stats else m.running_var,
                            training=batch_stats, eps=m.eps)

    def unit_rows(self, t: Tensor) -> Tensor:
        """``(examples, positions, units)``: the unit axis last, everything but the example axis as positions."""
        if not isinstance(self.module, nn.LayerNorm):
            t = t.movedim(1, -1)
        return t.reshape(t.shape[0], -1, self.units)


class UnitwiseStatistics(Statistics):
    """``F_c = N Σ_examples v_c v_cᵀ`` with ``v_c = (Σ_pos g_c x̂_c, Σ_pos g_c)``, the per-example gradient of unit
    ``c``'s trainable parameters (on ``fisher``'s scale, like ``G``).  ``x̂`` is kept from the forward pass until
    the gradients of the same call arrive."""

    def __init__(self, helper: NormHelper, dtype: torch.dtype) -> None:
        self.helper, self.dtype = helper, dtype
        self.inputs: dict[int, Tensor] = {}
        self.F_sum: Optional[Tensor] = None

    def add_input(self, x: Tensor, used: int, call: int) -> None:
        if self.helper.has_weight:
            self.inputs[call] = self.helper.unit_rows(self.helper.normalized(x)[:used]).to(self.dtype)

    def add_output_grad(self, g: Tensor, scale: float, call: int) -> None:
        rows = self.helper.unit_rows(g).to(self.dtype)
        columns = [(rows * self.inputs[call]).sum(1)] if self.helper.has_weight else []
        if self.helper.has_bias:
            columns.append(rows.sum(1))
        v = torch.stack(columns, dim=-1)  # (examples, units, 1 [+1])
        f = torch.einsum("nck,ncl->ckl", v, v) * scale
        self.F_sum = f if self.F_sum is None else self.F_sum + f

    def end_pass(self) -> None:
        self.inputs = {}

    def estimates(self, passes: int) -> dict[str, Tensor]:
        return {"F": self.F_sum / passes} if self.F_sum is not None and passes else {}


class UnitwiseBlock(FactorBlock):
    """One small full Fisher block per unit, ``(units, k, k)``, inverted through a batched eigendecomposition."""

    def __init__(self, units: int, k: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__({"F": (units, k, k)}, [(units, k, k), (units, k)], device, dtype)

    def _decompose(self) -> Optional[list[Tensor]]:
        eig = eigh_or_warn(self.averages["F"])
        return None if eig is None else [eig[1], eig[0].clamp_min(0)]

    def curvature_scale(self) -> Tensor:
        return self.decomposition()[1].mean()

    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        Q, d = self.decomposition()
        m = grad.to(self.dtype).unsqueeze(-1)
        inner = (Q.transpose(1, 2) @ m) / (d.unsqueeze(-1) + damping)
        return (Q @ inner).squeeze(-1).to(grad.dtype)
