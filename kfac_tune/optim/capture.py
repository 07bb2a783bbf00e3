"""Per-layer-type K-FAC math: how a layer's input becomes rows of ``a`` and its output gradient rows of ``g``.

Every supported layer is seen as a matrix product ``s = W a`` applied to many *rows* (examples, time steps, or
convolution locations).  A helper turns the layer's input into the ``a`` rows (with a trailing column of ones when
the layer has a bias, so the bias is the last column of the weight matrix) and the gradient w.r.t. its output into
the ``g`` rows, and moves the gradient between the parameters and one ``(d_out, d_in [+1])`` matrix.  Everything
else in the optimizer is layer-agnostic: a helper also says which curvature block its layer gets
(:meth:`LayerHelper.make_block`) and which accumulator sums its statistics (:meth:`LayerHelper.statistics`), so a
layer whose Fisher block is not a dense ``A ⊗ G`` (embeddings, normalisation layers, weights shared over time) plugs
in here without touching the optimizer.  The other layer types live in :mod:`kfac_tune.optim.layers`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune.optim.blocks import KroneckerBlock
from kfac_tune.optim.statistics import KroneckerStatistics, Statistics


class LayerHelper:
    """Base class: one instance per K-FAC-managed module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None

    @property
    def params(self) -> list[nn.Parameter]:
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps

    @property
    def a_dim(self) -> int:
        raise NotImplementedError

    @property
    def g_dim(self) -> int:
        return self.module.weight.shape[0]

    def make_block(self, device: torch.device, dtype: torch.dtype) -> Any:
        """The curvature block of this layer (a dense ``A ⊗ G`` unless the layer type says otherwise)."""
        return KroneckerBlock(self.a_dim, self.g_dim, device, dtype)

    def statistics(self, dtype: torch.dtype) -> Statistics:
        """A fresh accumulator for one step's statistics of this layer."""
        return KroneckerStatistics(self, dtype)

    def a_moment(self, x: Tensor, used: int) -> tuple[Tensor, int]:
        """``(Σ_rows a aᵀ, rows)`` over the first ``used`` examples of the input ``x``."""
        a = self.a_rows(x[:used])
        return a.T @ a, a.shape[0]

    def a_rows(self, x: Tensor) -> Tensor:
        """Input rows, ``(rows, a_dim)``, with a ones column for the bias."""
        rows = self._input_rows(x)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def _input_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def g_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows, ``(rows, g_dim)``."""
        raise NotImplementedError

    def weight_matrix(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor as the ``(g_dim, a_dim [-1])`` matrix the block sees."""
        return w.reshape(w.shape[0], -1)

    def as_matrix(self, grads: list[Optional[Tensor]]) -> Tensor:
        """Gradients of :attr:`params` (the weight's is required, a missing bias's is zero) as one
        ``(g_dim, a_dim)`` matrix, the bias as its last column."""
        w = grads[0]
        assert w is not None
        mat = self.weight_matrix(w)
        if self.has_bias:
            b = grads[1] if grads[1] is not None else mat.new_zeros(mat.shape[0])
            mat = torch.cat([mat, b.reshape(-1, 1)], dim=1)
        return mat

    def split(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`as_matrix`: one tensor per parameter, shaped like it."""
        w = self.module.weight
        weight = mat[:, :-1] if self.has_bias else mat
        pieces = [self._unmatrix(weight, w.shape)]
        if self.has_bias:
            pieces.append(mat[:, -1].reshape(self.module.bias.shape))
        return pieces

    def _unmatrix(self, mat: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`weight_matrix`."""
        return mat.reshape(shape)


class LinearHelper(LayerHelper):
    """``nn.Linear``: every leading index of the input (batch, time, ...) is a row."""

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    def _input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` (groups=1) as in KFC (Grosse & Martens 2016): every output location is a row.

    The input rows are the receptive-field patches (``F.unfold``), so ``A`` is the patch second moment averaged
    over examples and locations and ``G`` sums over locations; their Kronecker product equals KFC's ``Ω ⊗ Γ``.
    """

    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        self.padding = _explicit_padding(module)

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels * math.prod(m.kernel_size) + int(self.has_bias)

    def _input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def g_rows(self, g: Tensor) -> Tensor:
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Integer padding for ``F.unfold``; string paddings are resolved the way ``nn.Conv2d`` does."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)  # type: ignore[return-value]
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return (total[0] // 2, total[1] // 2)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a Linear/Conv2d cannot get a Kronecker block (None when it can)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "its weight is parametrized (e.g. weight_norm)"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolutions are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported"
        if isinstance(module.padding, str) and module.padding == "same":
            if any((d * (k - 1)) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                return "asymmetric 'same' padding is not supported"
    return None
