"""The output side of the Fisher: what the loss says about the network's output ``z``.

Conventions (one, fixed and tested).  The objective is ``h = (1/N) Σ_n ℓ_n`` -- the torch functional named by
``loss`` with its default ``reduction="mean"`` -- where ``N`` (:func:`loss_count`) is the number of terms it
averages: rows of logits for cross-entropy (classes on the last dimension), elements for MSE and BCE.  ``H_n`` is the
Hessian of ``ℓ_n`` w.r.t. its output row.  Every vector returned here is on the scale of ``h``: backpropagating it
through the network gives per-layer gradients ``g`` with ``G = N Σ_rows g gᵀ`` (the estimator in ``blocks``), so
that ``E[G] ⊗ A`` is K-FAC's approximation of the Fisher/GGN of ``h`` itself.

- ``sample``: one Monte-Carlo draw per term (the true Fisher): ``(1/N) u`` with ``E[u uᵀ] = H_n``.
- ``exact_columns``: a square-root factorisation of ``H_n`` (``Σ_c u_c u_cᵀ = H_n``): the exact (type-2) Fisher,
  one backward pass per column; for small output dimensions and for tests.
- ``quadratic_forms``: ``(1/N) Σ_n v_i,nᵀ H_n v_j,n`` for every pair of a few output-space directions, for the
  quadratic model of automatic step sizes.

Precision: everything is computed in float32 or the output's dtype when it is wider (:func:`wide`), so a float64
model with ``factor_dtype=torch.float64`` is float64 end to end, and half-precision outputs are not.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LOSSES = ("cross_entropy", "mse", "bce")


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(
            f"loss={loss!r} is not supported: expected one of {', '.join(LOSSES)} "
            "(the torch functional F.cross_entropy, F.mse_loss or F.binary_cross_entropy_with_logits "
            "with reduction='mean', applied to the model's output)"
        )


def wide(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64): the output-side curvature's precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def loss_count(loss: str, z: Tensor) -> int:
    """``N``: how many terms the mean-reduced loss averages over."""
    if loss == "cross_entropy":
        return z.numel() // z.shape[-1]
    return z.numel()


def sample(loss: str, z: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """A gradient of ``h`` w.r.t. ``z`` for targets drawn from the model's own predictive distribution."""
    z = z.detach()
    n = loss_count(loss, z)
    if loss == "cross_entropy":
        p = torch.softmax(wide(z), dim=-1)
        flat = p.reshape(-1, p.shape[-1])
        drawn = torch.multinomial(_drawable(flat), 1, generator=generator).squeeze(1)
        u = flat.clone()
        u[torch.arange(flat.shape[0], device=z.device), drawn] -= 1.0
        u = u.reshape(p.shape)
    elif loss == "mse":
        # F.mse_loss is the NLL of a Gaussian with variance 1/2 per element: Fisher 2, so u ~ N(0, 2).
        u = torch.randn(z.shape, device=z.device, dtype=wide(z).dtype, generator=generator) * math.sqrt(2.0)
    else:
        p = torch.sigmoid(wide(z))
        u = p - torch.bernoulli(_drawable(p), generator=generator)
    return (u / n).to(z.dtype)


def _drawable(p: Tensor) -> Tensor:
    """Probabilities safe to sample from: a non-finite output (a diverging model) must not crash the draw.

    The statistic built from it is still non-finite, and the factor update rejects it.
    """
    return torch.nan_to_num(p, nan=1.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def exact_columns(loss: str, z: Tensor) -> list[Tensor]:
    """Columns ``u_c / N`` of a square root of every ``H_n``, each shaped like ``z``."""
    z = z.detach()
    n = loss_count(loss, z)
    width = z.shape[-1]
    eye = torch.eye(width, device=z.device, dtype=wide(z).dtype)
    if loss == "cross_entropy":
        # H = diag(p) - p pᵀ = M Mᵀ with M = diag(√p) - p √pᵀ, column c: √p_c (e_c - p).
        p = torch.softmax(wide(z), dim=-1)
        cols = [p[..., c : c + 1].sqrt() * (eye[c] - p) for c in range(width)]
    elif loss == "mse":
        cols = [math.sqrt(2.0) * eye[c].expand(z.shape) for c in range(width)]
    else:
        p = torch.sigmoid(wide(z))
        cols = [(p * (1 - p)).sqrt() * eye[c] for c in range(width)]
    return [(c / n).to(z.dtype) for c in cols]


def quadratic_forms(loss: str, z: Tensor, vs: Tensor) -> Tensor:
    """The matrix ``Q[i, j] = (1/N) Σ_n v_i,nᵀ H_n v_j,n`` for output-space directions ``vs`` (stacked on the first
    dimension, each shaped like ``z``; e.g. ``J Δ`` and ``J δ_prev``), in one pass: ``H_n``'s factors (the softmax,
    the sigmoid's slope) are computed once, and every pair is one row of a small matrix product."""
    z, vs = wide(z.detach()), wide(vs)
    n, k = loss_count(loss, z), len(vs)
    flat = vs.reshape(k, -1)
    if loss == "cross_entropy":  # H_n = diag(p) - p pᵀ per row
        p = torch.softmax(z, dim=-1)
        projected = (p * vs).sum(-1).reshape(k, -1)  # p_nᵀ v_i,n for every row n
        total = (flat * p.reshape(1, -1)) @ flat.T - projected @ projected.T
    elif loss == "mse":  # H_n = 2
        total = 2.0 * flat @ flat.T
    else:  # bce: H_n = p (1 - p), elementwise
        p = torch.sigmoid(z)
        total = (flat * (p * (1 - p)).reshape(1, -1)) @ flat.T
    return total / n
