"""Curvature of weights shared over time steps: K-FAC for recurrent layers (Martens, Ba & Johnson 2018).

A Linear applied at every step of a sequence, ``s_t = W a_t`` for ``t = 1..T``, has ``DW = Σ_t g_t a_tᵀ``; with
``w_t = vec(g_t a_tᵀ)``, temporal homogeneity and the K-FAC independence of ``a`` and ``g``, the lag-``d``
covariance is ``V_d = A_d ⊗ G_d``.  Three models of the correlation across time (``KFAC(temporal=...)``):

- ``"independent"`` (default): ``V_d = 0`` for ``d ≠ 0``.  This is what accumulating the statistics over the
  layer's calls already gives, for any Linear; a time-shared layer then gets a plain Kronecker block.
- ``"option1"``: a chain-structured linear Gaussian graphical model ``w_t = Ψ w_{t-1} + ε_t`` with
  ``Ψ = V₁ V₀⁻¹`` and ``V₁`` assumed symmetric: in the whitened basis ``Ψ̂ = V₀^{-1/2} V₁ V₀^{-1/2} = U diag(ψ) Uᵀ``
  and ``F̂⁻¹ = U diag(γ(ψ)) Uᵀ`` with ``γ(x) = 1 / E_T[η_T(x)]``,
  ``η_T(x) = (T(1−x²) − 2x(1−x^T)) / (1−x)²`` (which needs the distribution of ``T``, tracked per layer).
- ``"option2"``: the ``T → ∞`` limit, ``F̂⁻¹ = (1/E[T]) (I − Ψ̂)(I − Ψ̂ᵀΨ̂)⁻¹(I − Ψ̂ᵀ)``.

Scale convention (fixed, tested).  ``A = A₀`` is the mean of ``a aᵀ`` over all ``(sequence, step)`` rows and
``G = N Σ_rows g gᵀ`` (:mod:`kfac_tune.optim.fisher`), i.e. ``G = (B·E[T]/N) G₀`` with ``G₀ = E[u_t u_tᵀ]`` the
talk's per-step factor (``u`` the per-sequence loss gradient).  The Fisher of the optimizer's objective
``h = (1/N) Σ`` (torch's ``reduction="mean"``) is ``(B/N) E_T[F_T]``, so the talk's independence result
``F = E[T] (A₀ ⊗ G₀)`` (per sequence) becomes exactly ``A ⊗ G`` here: for a language model (``N = B·T`` token
terms) ``G = G₀``; for a loss on the last step only (``N = B``) ``G = T·G₀``.  In the same units
Option 2 is ``F⁻¹ = V₀^{-1/2} (I − Ψ̂)(I − Ψ̂ᵀΨ̂)⁻¹(I − Ψ̂ᵀ) V₀^{-1/2}`` with ``V₀ = A ⊗ G`` (``E[T]`` cancels) and
Option 1 is ``F⁻¹ = V₀^{-1/2} U diag(E[T] / E_T[η_T(ψ)]) Uᵀ V₀^{-1/2}``.  ``A₁ = E[a_{t+1} a_tᵀ]`` is the mean
over the ``(T−1)`` lag-one pairs of each sequence (the talk normalises by ``T``; the pair mean is the unbiased
estimate of a stationary chain's ``V₁``) and ``G₁`` is on ``G``'s scale, ``N Σ_pairs g_{t+1} g_tᵀ · rows/pairs``.

Damping is factored Tikhonov on ``V₀`` (``A + π√λ I``, ``G + √λ/π I``, as ``damping_mode="pi"``), applied before
whitening, so a larger λ also shrinks the estimated temporal correlation; ``damping_mode="exact"`` has no
counterpart here.  Estimated correlations are clipped: ``|ψ| ≤`` :data:`MAX_CORRELATION` (Option 1) and the
singular values of ``Ψ̂`` likewise (Option 2), the stationarity the model assumes.

Which calls form a sequence: the calls of a marked layer (:func:`mark_time_shared`) within one forward pass are
consecutive time steps, in call order.  A call with a 2-D input ``(batch, features)`` is one step; a 3-D input
``(batch, time, features)`` (batch first) is that many steps, so an input-to-hidden map can be applied to the
whole sequence in one matrix product.  Sequence lengths may vary from pass to pass (up to :data:`MAX_LENGTH`);
within a pass all sequences have the same length (padding counts as steps).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kfac_tune.optim.blocks import FactorBlock, eigh_or_warn, pi_factor
from kfac_tune.optim.capture import LinearHelper
from kfac_tune.optim.statistics import Statistics

TEMPORAL_MODES = ("independent", "option1", "option2")
TIME_SHARED = "kfac_time_shared"
MAX_LENGTH = 1024
MAX_CORRELATION = 0.99


def mark_time_shared(layer: nn.Linear) -> nn.Linear:
    """Declare that ``layer`` is applied at every time step of a sequence (see the module docstring)."""
    setattr(layer, TIME_SHARED, True)
    return layer


def is_time_shared(module: nn.Module) -> bool:
    return bool(getattr(module, TIME_SHARED, False))


class TemporalHelper(LinearHelper):
    """A time-shared Linear under Option 1 or Option 2."""

    def __init__(self, module: nn.Linear, mode: str) -> None:
        super().__init__(module)
        self.mode = mode

    def make_block(self, device: torch.device, dtype: torch.dtype) -> "TemporalBlock":
        return TemporalBlock(self.a_dim, self.g_dim, self.mode, device, dtype)

    def statistics(self, dtype: torch.dtype) -> Statistics:
        return TemporalStatistics(self, dtype)

    def steps(self, t: Tensor) -> Tensor:
        """A call's input or output gradient as ``(batch, steps, features)``."""
        if t.dim() == 2:
            return t.unsqueeze(1)
        if t.dim() == 3:
            return t
        raise ValueError(f"a time-shared Linear takes (batch, features) or (batch, time, features), got shape "
                         f"{tuple(t.shape)}")


def _lag_one(x: Tensor) -> Tensor:
    """``Σ_b Σ_t x_{b,t+1} x_{b,t}ᵀ`` for ``x`` of shape ``(batch, steps, features)``."""
    return torch.einsum("bti,btj->ij", x[:, 1:], x[:, :-1])


class TemporalStatistics(Statistics):
    """Sums of ``a aᵀ``, ``a_{t+1} a_tᵀ``, ``g gᵀ``, ``g_{t+1} g_tᵀ`` and the histogram of sequence lengths."""

    def __init__(self, helper: TemporalHelper, dtype: torch.dtype) -> None:
        self.helper, self.dtype = helper, dtype
        self.sums: dict[str, Tensor] = {}
        self.counts = {"rows": 0, "pairs": 0, "g_rows": 0, "g_pairs": 0}
        self.lengths: dict[int, int] = {}
        self._previous: Optional[Tensor] = None  # the last step's input rows of the current sequence
        self._steps = self._sequences = 0
        self._grads: list[tuple[int, Tensor, float]] = []

    def _add(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add_input(self, x: Tensor, used: int, call: int) -> None:
        seq = self.helper.steps(x[:used])
        batch, steps = seq.shape[:2]
        a = self.helper.a_rows(seq.reshape(batch * steps, -1)).to(self.dtype).reshape(batch, steps, -1)
        flat = a.reshape(batch * steps, -1)
        self._add("A", flat.T @ flat)
        self.counts["rows"] += batch * steps
        chain = a if self._previous is None else torch.cat([self._previous.unsqueeze(1), a], dim=1)
        if chain.shape[1] > 1:
            self._add("A1", _lag_one(chain))
            self.counts["pairs"] += batch * (chain.shape[1] - 1)
        self._previous = a[:, -1]
        self._steps += steps
        self._sequences = batch

    def add_output_grad(self, g: Tensor, scale: float, call: int) -> None:
        self._grads.append((call, g, scale))

    def end_backward(self) -> None:
        """Put this stream's gradients back in time order (backward delivers them last step first) and sum."""
        if not self._grads:
            return
        ordered = sorted(self._grads, key=lambda item: item[0])
        scale = ordered[0][2]
        g = torch.cat([self.helper.steps(item[1]) for item in ordered], dim=1).to(self.dtype)
        self._grads = []
        batch, steps = g.shape[:2]
        flat = g.reshape(batch * steps, -1)
        self._add("G", (flat.T @ flat) * scale)
        self.counts["g_rows"] += batch * steps
        if steps > 1:
            self._add("G1", _lag_one(g) * scale)
            self.counts["g_pairs"] += batch * (steps - 1)

    def end_pass(self) -> None:
        self.end_backward()
        if self._steps:
            if self._steps > MAX_LENGTH:
                raise ValueError(f"K-FAC: a sequence of {self._steps} steps is longer than "
                                 f"kfac_tune.optim.temporal.MAX_LENGTH = {MAX_LENGTH}")
            self.lengths[self._steps] = self.lengths.get(self._steps, 0) + self._sequences
        self._previous, self._steps, self._sequences = None, 0, 0

    def estimates(self, passes: int) -> dict[str, Tensor]:
        self.end_pass()
        out: dict[str, Tensor] = {}
        if "A" in self.sums:
            A = self.sums["A"]
            out["A"] = A / self.counts["rows"]
            pairs = self.counts["pairs"]
            out["A1"] = self.sums["A1"] / pairs if pairs else torch.zeros_like(A)
            hist = torch.zeros(MAX_LENGTH, dtype=self.dtype, device=A.device)
            for length, sequences in self.lengths.items():
                hist[length - 1] = sequences
            out["lengths"] = hist / hist.sum()
        if "G" in self.sums and passes:
            G = self.sums["G"]
            out["G"] = G / passes
            pairs = self.counts["g_pairs"]
            out["G1"] = self.sums["G1"] / passes * (self.counts["g_rows"] / pairs) if pairs else torch.zeros_like(G)
        return out


class TemporalBlock(FactorBlock):
    """Option 1 / Option 2 curvature of a time-shared Linear.

    The decomposition is the eigenbases of ``A`` and ``G`` plus the lag-one factors and the length distribution
    they were refreshed with; the damped operator is rebuilt from it whenever λ changes (a few ``d × d`` products
    and two small eigendecompositions, independent of ``T``).
    """

    def __init__(self, a_dim: int, g_dim: int, mode: str, device: torch.device, dtype: torch.dtype) -> None:
        if mode not in ("option1", "option2"):
            raise ValueError(f"temporal mode {mode!r}: expected 'option1' or 'option2'")
        factors = {"A": (a_dim, a_dim), "A1": (a_dim, a_dim), "G": (g_dim, g_dim), "G1": (g_dim, g_dim),
                   "lengths": (MAX_LENGTH,)}
        shapes = [(a_dim, a_dim), (a_dim,), (g_dim, g_dim), (g_dim,), (a_dim, a_dim), (g_dim, g_dim), (MAX_LENGTH,)]
        super().__init__(factors, shapes, device, dtype)
        self.a_dim, self.g_dim, self.mode = a_dim, g_dim, mode

    @property
    def decomposition_cost(self) -> float:
        return 2.0 * (float(self.a_dim) ** 3 + float(self.g_dim) ** 3)

    def _decompose(self) -> Optional[list[Tensor]]:
        avg = self.averages
        a, g = eigh_or_warn(avg["A"]), eigh_or_warn(avg["G"])
        lag = [avg["A1"], avg["G1"], avg["lengths"]]
        if a is None or g is None or not all(bool(torch.isfinite(t).all()) for t in lag):
            return None
        return [a[1], a[0].clamp_min(0), g[1], g[0].clamp_min(0), *lag]

    def curvature_scale(self) -> Tensor:
        """Mean eigenvalue of ``V₀ = A ⊗ G``: relative damping is relative to the same factors it damps."""
        _, dA, _, dG, *_ = self.decomposition()
        return dA.mean() * dG.mean()

    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        apply = self._cached(damping, self._operator)
        return apply(grad.to(self.dtype)).to(grad.dtype)

    def _operator(self, damping: float) -> Any:
        """``M ↦ F⁻¹ M`` for the damped factors: whitening by ``V₀^{-1/2}``, then Option 1 or 2."""
        QA, dA, QG, dG, A1, G1, lengths = self.decomposition()
        pi, root = pi_factor(dA, dG), math.sqrt(damping)
        # L = LA ⊗ LG with LA = QA diag(dA + π√λ)^{1/2}: V₀ = L Lᵀ, F⁻¹ = L⁻ᵀ F̂⁻¹ L⁻¹.  WA = LA⁻ᵀ, WG = LG⁻ᵀ.
        WA = QA * (dA + pi * root).rsqrt()
        WG = QG * (dG + root / pi).rsqrt()
        A1w, G1w = WA.T @ A1 @ WA, WG.T @ G1 @ WG  # Ψ̂ = A1w ⊗ G1w acts as X ↦ G1w X A1wᵀ
        if self.mode == "option1":
            return _option1(WA, WG, A1w, G1w, lengths)
        return _option2(WA, WG, A1w, G1w)


def _option1(WA: Tensor, WG: Tensor, A1w: Tensor, G1w: Tensor, lengths: Tensor) -> Any:
    """Symmetric ``Ψ̂ = sym(A1w) ⊗ sym(G1w)``: one eigenbasis, a coefficient ``E[T]/E_T[η_T(ψ)]`` per pair."""
    alpha, UA = torch.linalg.eigh(0.5 * (A1w + A1w.T))
    beta, UG = torch.linalg.eigh(0.5 * (G1w + G1w.T))
    psi = torch.outer(beta, alpha).clamp(-MAX_CORRELATION, MAX_CORRELATION)
    p = lengths.clamp_min(0) / lengths.clamp_min(0).sum()
    coef = expected_length(p) / expected_eta(psi, p)
    PA, PG = WA @ UA, WG @ UG
    return lambda m: PG @ ((PG.T @ m @ PA) * coef) @ PA.T


def _option2(WA: Tensor, WG: Tensor, A1w: Tensor, G1w: Tensor) -> Any:
    """``(I − Ψ̂)(I − Ψ̂ᵀΨ̂)⁻¹(I − Ψ̂ᵀ)`` in the whitened basis; ``Ψ̂ᵀΨ̂ = A1wᵀA1w ⊗ G1wᵀG1w``."""
    sA, EA = torch.linalg.eigh(A1w.T @ A1w)
    sG, EG = torch.linalg.eigh(G1w.T @ G1w)
    inv_middle = 1.0 / (1.0 - torch.outer(sG.clamp_min(0), sA.clamp_min(0)).clamp(max=MAX_CORRELATION**2))

    def apply(m: Tensor) -> Tensor:
        x = WG.T @ m @ WA
        x = x - G1w.T @ x @ A1w  # (I − Ψ̂ᵀ)
        x = EG @ ((EG.T @ x @ EA) * inv_middle) @ EA.T
        x = x - G1w @ x @ A1w.T  # (I − Ψ̂)
        return WG @ x @ WA.T

    return apply


def expected_length(p: Tensor) -> Tensor:
    """``E[T]`` for ``p[T-1] = P(T)``."""
    return (p * torch.arange(1, p.numel() + 1, dtype=p.dtype, device=p.device)).sum()


def expected_eta(x: Tensor, p: Tensor) -> Tensor:
    """``E_T[η_T(x)]``, ``η_T(x) = Σ_{t,s=1}^T x^{|t−s|} = (T(1−x²) − 2x(1−x^T)) / (1−x)²``, for ``|x| < 1``.

    Evaluated in float64 over the lengths that occur (the closed form loses digits as ``x → 1``, which the clip
    at :data:`MAX_CORRELATION` keeps far away).
    """
    support = torch.nonzero(p > 0).squeeze(1)
    T = (support + 1).to(torch.float64)
    weights = p[support].to(torch.float64)
    x64 = x.to(torch.float64).unsqueeze(-1)
    eta = (T * (1 - x64**2) - 2 * x64 * (1 - x64**T)) / (1 - x64) ** 2
    return (eta * weights).sum(-1).to(x.dtype)
