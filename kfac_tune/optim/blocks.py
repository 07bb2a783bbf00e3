"""Curvature blocks: Kronecker factors, their moving averages, eigendecompositions and damped inverses.

One :class:`KroneckerBlock` per layer approximates that layer's Fisher block by ``A ⊗ G`` (A from the layer's
inputs, G from the gradients w.r.t. its outputs).  Factors are exponential moving averages with zero
initialisation and bias correction, so the first estimate is the first batch's statistic rather than a made-up
identity.  Inverses go through one eigendecomposition per factor, so a damping change (Levenberg–Marquardt) never
needs a new decomposition.

Damping modes (recipes record which one their ``damping`` means):

- ``"pi"``: factored Tikhonov damping (Martens & Grosse §6.3): ``(A + π√λ I) ⊗ (G + √λ/π I)`` with the trace-norm
  ``π² = (tr A / dim A) / (tr G / dim G)``.  Applied with two cached explicit inverses: 2 matmuls per step.
- ``"exact"``: ``(A ⊗ G + λ I)⁻¹`` through the eigenbases of both factors: 4 matmuls per step.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

DAMPING_MODES = ("pi", "exact")
STATE_KEYS = ("A", "A_weight", "G", "G_weight", "QA", "dA", "QG", "dG")


class KroneckerBlock:
    """The ``A ⊗ G`` approximation of one layer's Fisher block."""

    def __init__(self, a_dim: int, g_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.a_dim, self.g_dim, self.dtype = a_dim, g_dim, dtype
        zeros = lambda n: torch.zeros(n, n, device=device, dtype=dtype)  # noqa: E731
        self.A, self.G = zeros(a_dim), zeros(g_dim)
        self.A_weight = torch.zeros((), device=device, dtype=dtype)
        self.G_weight = torch.zeros((), device=device, dtype=dtype)
        self.QA: Optional[Tensor] = None
        self.dA: Optional[Tensor] = None
        self.QG: Optional[Tensor] = None
        self.dG: Optional[Tensor] = None
        self._inverse_cache: Optional[tuple[float, str, Tensor, Tensor]] = None

    # -- statistics -------------------------------------------------------------------------------------------
    def update_A(self, new: Tensor, decay: float) -> None:
        self.A, self.A_weight = _ema(self.A, self.A_weight, new.to(self.dtype), decay)

    def update_G(self, new: Tensor, decay: float) -> None:
        self.G, self.G_weight = _ema(self.G, self.G_weight, new.to(self.dtype), decay)

    @property
    def has_statistics(self) -> bool:
        return self.QA is not None

    def factors(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected factor estimates."""
        return self.A / self.A_weight.clamp_min(1e-30), self.G / self.G_weight.clamp_min(1e-30)

    def set_decomposition(self, QA: Tensor, dA: Tensor, QG: Tensor, dG: Tensor) -> None:
        self.QA, self.dA, self.QG, self.dG = QA, dA.clamp_min(0), QG, dG.clamp_min(0)
        self._inverse_cache = None

    # -- preconditioning --------------------------------------------------------------------------------------
    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        """``(damped A ⊗ G)⁻¹`` applied to a ``(g_dim, a_dim)`` gradient matrix."""
        assert self.QA is not None and self.QG is not None and self.dA is not None and self.dG is not None
        m = grad.to(self.dtype)
        if mode == "exact":
            inner = self.QG.T @ m @ self.QA
            inner = inner / (torch.outer(self.dG, self.dA) + damping)
            out = self.QG @ inner @ self.QA.T
        else:
            g_inv, a_inv = self._pi_inverses(damping)
            out = g_inv @ m @ a_inv
        return out.to(grad.dtype)

    def _pi_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        cache = self._inverse_cache
        if cache is not None and cache[0] == damping and cache[1] == "pi":
            return cache[2], cache[3]
        assert self.QA is not None and self.QG is not None and self.dA is not None and self.dG is not None
        mean_a = self.dA.sum() / self.a_dim
        mean_g = self.dG.sum() / self.g_dim
        # A zero factor (a layer whose inputs or gradients vanish) gets π = 1 instead of 0 or ∞.
        ok = (mean_a > 0) & (mean_g > 0)
        pi = torch.where(ok, (mean_a / torch.where(ok, mean_g, 1.0)).sqrt(), torch.ones_like(mean_a))
        root = damping**0.5
        a_inv = (self.QA / (self.dA + pi * root)) @ self.QA.T
        g_inv = (self.QG / (self.dG + root / pi)) @ self.QG.T
        self._inverse_cache = (damping, "pi", g_inv, a_inv)
        return g_inv, a_inv

    def quadratic_form(self, v: Tensor) -> Tensor:
        """``vec(v)ᵀ (A ⊗ G) vec(v)`` for a ``(g_dim, a_dim)`` matrix: the block's share of δᵀF̂δ."""
        A, G = self.factors()
        v = v.to(self.dtype)
        return (v * (G @ v @ A)).sum()

    # -- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Optional[Tensor]]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Optional[Tensor]]) -> None:
        for k in STATE_KEYS:
            value = state.get(k)
            setattr(self, k, None if value is None else value.to(device=self.A.device, dtype=self.dtype))
        self._inverse_cache = None


def _ema(value: Tensor, weight: Tensor, new: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """One moving-average step that silently keeps the old value when the new statistic is not finite."""
    finite = torch.isfinite(new).all()
    value = torch.where(finite, decay * value + (1 - decay) * new, value)
    weight = torch.where(finite, decay * weight + (1 - decay), weight)
    return value, weight


def decompose(blocks: list[KroneckerBlock]) -> None:
    """Eigendecompose every factor of ``blocks``, batching the factors that share a shape.

    A factor with non-finite entries, or one whose decomposition fails even in float64, keeps its previous
    decomposition (a warning says so) rather than poisoning the preconditioner.
    """
    jobs: dict[tuple[int, torch.dtype, torch.device], list[tuple[KroneckerBlock, str, Tensor]]] = {}
    for block in blocks:
        A, G = block.factors()
        for name, mat in (("A", A), ("G", G)):
            jobs.setdefault((mat.shape[0], mat.dtype, mat.device), []).append((block, name, mat))
    results: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for group in jobs.values():
        stack = torch.stack([mat for _, _, mat in group])
        finite = torch.isfinite(stack).flatten(1).all(dim=1).tolist()
        eigvals, eigvecs = _safe_eigh(torch.where(torch.isfinite(stack), stack, 0.0))
        for i, (block, name, _) in enumerate(group):
            if finite[i] and eigvals is not None:
                results[(id(block), name)] = (eigvecs[i], eigvals[i])
    for block in blocks:
        a = results.get((id(block), "A"))
        g = results.get((id(block), "G"))
        if a is None or g is None:
            warnings.warn("K-FAC: a factor was not finite or could not be decomposed; keeping its previous "
                          "inverse", RuntimeWarning, stacklevel=3)
            continue
        block.set_decomposition(a[0], a[1], g[0], g[1])


def _safe_eigh(stack: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``eigh`` of symmetric matrices, retrying in float64 on the CPU when the first attempt fails."""
    sym = 0.5 * (stack + stack.transpose(-1, -2))
    try:
        return torch.linalg.eigh(sym)
    except RuntimeError:
        try:
            vals, vecs = torch.linalg.eigh(sym.double().cpu())
            return vals.to(stack), vecs.to(stack)
        except RuntimeError:
            return None, None
