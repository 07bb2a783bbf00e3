"""Per-layer-type K-FAC math: how a layer's input becomes rows of ``a`` and its output gradient rows of ``g``.

Every supported layer is seen as a matrix product ``s = W a`` applied to many *rows* (examples, time steps, or
convolution locations).  A helper turns the layer's input into the ``a`` rows (with a trailing column of ones when
the layer has a trainable bias, so the bias is the last column of the weight matrix) and the gradient w.r.t. its
output into the ``g`` rows, and moves the gradient between the trainable parameters and one ``(d_out, d_in [+1])``
matrix.  Everything else in the optimizer is layer-agnostic: a helper also says which curvature block its layer
gets (:meth:`LayerHelper.make_block`) and which accumulator sums its statistics (:meth:`LayerHelper.statistics`),
so a layer whose Fisher block is not a dense ``A ⊗ G`` (embeddings, normalisation layers, weights shared over time,
grouped convolutions) plugs in here without touching the optimizer.  The other layer types live in
:mod:`kfac_tune.optim.layers`; :mod:`kfac_tune.optim.registry` says which module type gets which helper.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune.optim.blocks import GroupedKroneckerBlock, KroneckerBlock
from kfac_tune.optim.statistics import KroneckerStatistics, Statistics


class UnsupportedLayer(ValueError):
    """A registered layer type in a configuration its curvature block does not cover (the reason is the message):
    the layer takes the first-order fallback, and :attr:`KFAC.coverage` says why."""


class LayerHelper:
    """Base class: one instance per K-FAC-managed module.

    Frozen parts (``requires_grad=False``) are not part of the block: a frozen bias has no column of ones (with
    one, the weight would be preconditioned by the inverse of the *centred* input second moment, the Schur
    complement of the bias row, which is wrong for a bias that does not move), and a frozen weight leaves the bias
    alone, whose block is ``1 ⊗ G``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.has_weight = _trainable(getattr(module, "weight", None))
        self.has_bias = _trainable(getattr(module, "bias", None))
        if not (self.has_weight or self.has_bias):
            raise UnsupportedLayer("it has no trainable weight or bias")

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters the block covers, weight first."""
        return ([self.module.weight] if self.has_weight else []) + ([self.module.bias] if self.has_bias else [])

    @property
    def input_dim(self) -> int:
        """Columns of the weight matrix (the input features a weight row multiplies)."""
        raise NotImplementedError

    @property
    def a_dim(self) -> int:
        return self.input_dim * int(self.has_weight) + int(self.has_bias)

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
        """Input rows, ``(rows, a_dim)``: the input features of a trainable weight, a ones column for a trainable
        bias."""
        rows = self._input_rows(x)
        if not self.has_weight:
            rows = rows[:, :0]
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def _input_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def g_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows, ``(rows, g_dim)``."""
        raise NotImplementedError

    def g_moment(self, rows: Tensor) -> Tensor:
        """``Σ_rows g gᵀ`` of output-gradient rows."""
        return rows.T @ rows

    def weight_matrix(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor as the ``(g_dim, input_dim)`` matrix the block sees."""
        return w.reshape(w.shape[0], -1)

    def as_matrix(self, grads: list[Optional[Tensor]]) -> Tensor:
        """Gradients of :attr:`params` (a trainable weight's is required, a missing bias's is zero) as one
        ``(g_dim, a_dim)`` matrix, the bias as its last column."""
        columns = []
        if self.has_weight:
            assert grads[0] is not None
            columns.append(self.weight_matrix(grads[0]))
        if self.has_bias:
            b = grads[-1]
            if b is None:  # a bias the loss does not reach (only with a trainable weight: see KFAC's step)
                b = columns[0].new_zeros(self.g_dim)
            columns.append(b.reshape(-1, 1))
        return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]

    def split(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`as_matrix`: one tensor per parameter of :attr:`params`, shaped like it."""
        pieces = []
        if self.has_weight:
            weight = mat[:, :-1] if self.has_bias else mat
            pieces.append(self._unmatrix(weight, self.module.weight.shape))
        if self.has_bias:
            pieces.append(mat[:, -1].reshape(self.module.bias.shape))
        return pieces

    def _unmatrix(self, mat: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`weight_matrix`."""
        return mat.reshape(shape)

    def same_function(self, other: "LayerHelper") -> bool:
        """Whether ``other``'s module computes the same function of its input and parameters as this one's: then
        both uses of a shared weight can add their statistics to one block (as for a layer called twice)."""
        a, b = self.module, other.module
        return (type(self) is type(other) and type(a) is type(b) and a.extra_repr() == b.extra_repr()
                and [id(p) for p in self.params] == [id(p) for p in other.params])


def _trainable(p: Any) -> bool:
    return isinstance(p, Tensor) and p.requires_grad


class LinearHelper(LayerHelper):
    """``nn.Linear``: every leading index of the input (batch, time, ...) is a row."""

    @property
    def input_dim(self) -> int:
        return self.module.in_features

    def _input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])


class ConvHelper(LayerHelper):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` as in KFC (Grosse & Martens 2016): every output location is a
    row.

    The input rows are the receptive-field patches (:func:`conv_patches`: any stride, dilation, padding and
    padding mode, 'same' included), so ``A`` is the patch second moment averaged over examples and locations and
    ``G`` sums over locations; their Kronecker product equals KFC's ``Ω ⊗ Γ``.  A row's entries are ordered as
    the weight's ``(in_channels, *kernel)``.  A grouped convolution (depthwise included) is ``groups`` independent
    convolutions, each over its own input and output channels: one ``A_j ⊗ G_j`` per group
    (:class:`~kfac_tune.optim.blocks.GroupedKroneckerBlock`), the Fisher's blocks between groups left out as
    K-FAC leaves out those between layers.
    """

    module: nn.modules.conv._ConvNd

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        m = self.module
        self.groups = m.groups
        if m.groups != 1 and m.transposed:
            raise UnsupportedLayer(f"grouped transposed convolution (groups={m.groups})")
        self.pad = _pad_widths(m) if not m.transposed else ()
        self.pad_mode = "constant" if m.padding_mode == "zeros" else m.padding_mode

    @property
    def input_dim(self) -> int:
        m = self.module
        return m.in_channels // m.groups * math.prod(m.kernel_size)

    def make_block(self, device: torch.device, dtype: torch.dtype) -> Any:
        if self.groups == 1:
            return super().make_block(device, dtype)
        return GroupedKroneckerBlock(self.groups, self.a_dim, self.g_dim // self.groups, device, dtype)

    def a_moment(self, x: Tensor, used: int) -> tuple[Tensor, int]:
        """``Σ_rows a aᵀ``; per group, ``(groups, a_dim, a_dim)``, for a grouped convolution."""
        if self.groups == 1:
            return super().a_moment(x, used)
        patches = self._input_rows(x[:used])
        a = patches.reshape(patches.shape[0], self.groups, -1)
        if not self.has_weight:
            a = a[..., :0]
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return torch.einsum("rgi,rgj->gij", a, a), a.shape[0]

    def g_moment(self, rows: Tensor) -> Tensor:
        if self.groups == 1:
            return super().g_moment(rows)
        g = rows.reshape(rows.shape[0], self.groups, -1)
        return torch.einsum("rgi,rgj->gij", g, g)

    def _input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        return conv_patches(x, m.kernel_size, m.stride, m.dilation, self.pad, self.pad_mode)

    def g_rows(self, g: Tensor) -> Tensor:
        return g.movedim(1, -1).reshape(-1, g.shape[1])


class ConvTransposeHelper(ConvHelper):
    """``nn.ConvTranspose{1,2,3}d`` (groups=1): a transposed convolution is a convolution, so KFC applies as is.

    With stride ``s``, padding ``p``, dilation ``d`` and output padding ``o``, ``y = conv(u, W')`` where ``u`` is
    the input with ``s − 1`` zeros between neighbours, padded by ``d(k−1) − p`` on each side (cropped where that
    is negative) and ``o`` more on the right, and ``W'[o, i, k] = W[i, o, K−1−k]`` (the kernel flipped, in and out
    swapped); the rows are the patches of ``u`` under a unit-stride convolution.  A forward call given
    ``output_size`` may add output padding beyond the module's ``output_padding``; the extra output locations
    then have gradient rows but no patch rows (their input is zero padding, so ``A`` misses only zero rows).
    """

    module: nn.modules.conv._ConvTransposeNd

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        m = self.module
        spatial = zip(m.kernel_size, m.padding, m.dilation, m.output_padding)
        widths = [(d * (k - 1) - p, d * (k - 1) - p + o) for k, p, d, o in spatial]
        self.pad = tuple(w for pair in reversed(widths) for w in pair)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def _input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        upsampled = x.new_zeros(*x.shape[:2], *[(n - 1) * s + 1 for n, s in zip(x.shape[2:], m.stride)])
        upsampled[(..., *[slice(None, None, s) for s in m.stride])] = x
        return conv_patches(upsampled, m.kernel_size, (1,) * len(m.stride), m.dilation, self.pad)

    def weight_matrix(self, w: Tensor) -> Tensor:
        spatial = tuple(range(2, w.dim()))
        return w.flip(spatial).transpose(0, 1).reshape(w.shape[1], -1)

    def _unmatrix(self, mat: Tensor, shape: torch.Size) -> Tensor:
        spatial = tuple(range(2, len(shape)))
        return mat.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).flip(spatial)


def conv_patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                 pad: tuple[int, ...] = (), pad_mode: str = "constant") -> Tensor:
    """The receptive fields of a convolution over ``x`` ``(batch, channels, *spatial)``: one row per example and
    output location, ``(rows, channels · Π kernel)``, entries in the weight's ``(channels, *kernel)`` order.

    ``pad`` is in ``F.pad``'s order (last dimension first).  Each spatial dimension is unfolded in turn
    (``Tensor.unfold`` over the dilated window, then every ``dilation``-th entry), so one function serves 1, 2 and
    3 spatial dimensions.
    """
    if any(pad):
        x = F.pad(x, pad, mode=pad_mode)
    n = len(kernel)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # (batch, channels, *out, *kernel) -> (batch, *out, channels, *kernel)
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return x.reshape(-1, math.prod(x.shape[1 + n:]))


def _pad_widths(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """The convolution's padding in ``F.pad``'s order; 'same' is split as torch does (the extra one on the right)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * (2 * len(conv.kernel_size))
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        widths = [(t // 2, t - t // 2) for t in totals]
    else:
        widths = [(p, p) for p in conv.padding]
    return tuple(w for pair in reversed(widths) for w in pair)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why no layer type can give ``module`` a block, whatever its type (None when one may)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "its weight is parametrized (e.g. weight_norm)"
    return None
