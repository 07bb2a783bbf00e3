"""Curvature blocks: Kronecker factors, their moving averages, eigendecompositions and damped inverses.

One :class:`KroneckerBlock` per layer approximates that layer's Fisher block by ``A ⊗ G`` (A from the layer's
inputs, G from the gradients w.r.t. its outputs).  Factors are exponential moving averages with zero
initialisation and bias correction, so the first estimate is the first batch's statistic rather than a made-up
identity.  Inverses go through one eigendecomposition per factor, so a damping change (Levenberg–Marquardt) never
needs a new decomposition.

Damping modes (recipes record which one their ``damping`` means):

- ``"pi"``: factored Tikhonov damping (Martens & Grosse §6.3): ``(A + π√λ I) ⊗ (G + √λ/π I)`` with the trace-norm
  ``π² = (tr A / dim A) / (tr G / dim G)``.  Applied with two cached explicit inverses (2 matmuls per step), or
  through the eigenbases (4 matmuls, nothing formed) when the inverses would not live long enough to repay forming
  them: see :meth:`KroneckerBlock.precondition`.
- ``"exact"``: ``(A ⊗ G + λ I)⁻¹`` through the eigenbases of both factors: 4 matmuls per step.

Every block type (this one, :mod:`kfac_tune.optim.layers`' and :mod:`kfac_tune.optim.temporal`'s) offers the same
surface to the optimizer: ``update(estimates, decay)``, ``ready`` (a device boolean: every factor has statistics),
``has_statistics`` (a decomposition exists), ``precondition(grad_matrix, damping, mode)``, ``curvature_scale()``
(a device scalar: the mean eigenvalue of the block's curvature, the unit of the optimizer's relative damping), ``decomposition()`` /
``decomposition_shapes()`` / ``set_decomposition(*tensors)`` (what data parallelism broadcasts),
``decomposition_cost`` and ``state_dict`` / ``load_state_dict``.  :func:`decompose` batches the eigendecompositions
of Kronecker blocks; other blocks decompose themselves.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from kfac_tune.optim.callsite import KFACWarning, user_stacklevel

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
        # how many steps one damped inverse serves: uses since the decomposition or the damping last changed, and
        # the count the previous one reached (None until one has ended)
        self._uses, self._lifetime, self._damping_used = 0, None, float("nan")

    # -- statistics -------------------------------------------------------------------------------------------
    def update(self, estimates: dict[str, Tensor], decay: float) -> None:
        if "A" in estimates:
            self.update_A(estimates["A"], decay)
        if "G" in estimates:
            self.update_G(estimates["G"], decay)

    @property
    def ready(self) -> Tensor:
        return (self.A_weight > 0) & (self.G_weight > 0)

    @property
    def decomposition_cost(self) -> float:
        """Relative cost of a refresh: eigendecomposition grows as the cube of a factor's dimension."""
        return float(self.a_dim) ** 3 + float(self.g_dim) ** 3

    def decomposition_shapes(self) -> list[tuple[int, ...]]:
        return [(self.a_dim, self.a_dim), (self.a_dim,), (self.g_dim, self.g_dim), (self.g_dim,)]

    def decomposition(self) -> list[Tensor]:
        assert self.QA is not None and self.dA is not None and self.QG is not None and self.dG is not None
        return [self.QA, self.dA, self.QG, self.dG]

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
        # Row-major copies: ``eigh`` returns column-major eigenvectors, and the layout picks the BLAS kernel, so
        # a decomposition computed here and one received from another rank must be stored alike to give
        # bitwise the same preconditioned gradients.
        self.QA, self.dA = QA.contiguous(), dA.clamp_min(0)
        self.QG, self.dG = QG.contiguous(), dG.clamp_min(0)
        self._inverse_cache = None
        self._end_lifetime()

    # -- preconditioning --------------------------------------------------------------------------------------
    def curvature_scale(self) -> Tensor:
        """Mean eigenvalue of ``A ⊗ G`` (``tr A tr G / (dim A dim G)``): the unit of relative damping."""
        assert self.dA is not None and self.dG is not None
        return self.dA.mean() * self.dG.mean()

    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        """``(damped A ⊗ G)⁻¹`` applied to a ``(g_dim, a_dim)`` gradient matrix.

        ``pi`` has two routes to the same product. Forming the explicit inverses costs ``a³ + g³`` multiply-adds
        once, then ``ga(g+a)`` per step; going through the eigenbases costs ``2ga(g+a)`` per step and forms
        nothing. An inverse lives until the next decomposition or damping change, so the route is chosen by how
        long the previous one lived: on a layer much wider on one side (a 785→32 dense layer after a convolution,
        a classifier head) with inverses every step or Levenberg–Marquardt changing λ every few steps, forming
        cost more than it saved (measured: 24 of the Fashion-MNIST convnet recipe's 188 ms per step).
        """
        assert self.QA is not None and self.QG is not None and self.dA is not None and self.dG is not None
        m = grad.to(self.dtype)
        if mode == "exact":
            out = self.QG @ ((self.QG.T @ m @ self.QA) / (torch.outer(self.dG, self.dA) + damping)) @ self.QA.T
        elif self._forming_pays(damping):
            g_inv, a_inv = self._pi_inverses(damping)
            out = g_inv @ m @ a_inv
        else:
            damped_g, damped_a = self._pi_damped_eigenvalues(damping)
            out = self.QG @ ((self.QG.T @ m @ self.QA) / torch.outer(damped_g, damped_a)) @ self.QA.T
        return out.to(grad.dtype)

    def _forming_pays(self, damping: float) -> bool:
        """Count this use of the damped inverse; true when forming it explicitly is the cheaper route."""
        if damping != self._damping_used:
            self._end_lifetime()
            self._damping_used = damping
        self._uses += 1
        if self._lifetime is None:  # nothing measured yet
            return True
        a, g = self.a_dim, self.g_dim
        return self._lifetime * g * a * (g + a) >= a**3 + g**3

    def _end_lifetime(self) -> None:
        if self._uses:
            self._lifetime = self._uses
        self._uses = 0

    def _pi_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        cache = self._inverse_cache
        if cache is not None and cache[0] == damping and cache[1] == "pi":
            return cache[2], cache[3]
        assert self.QA is not None and self.QG is not None
        damped_g, damped_a = self._pi_damped_eigenvalues(damping)
        a_inv = (self.QA / damped_a) @ self.QA.T
        g_inv = (self.QG / damped_g) @ self.QG.T
        self._inverse_cache = (damping, "pi", g_inv, a_inv)
        return g_inv, a_inv

    def _pi_damped_eigenvalues(self, damping: float) -> tuple[Tensor, Tensor]:
        """Eigenvalues of ``G + √λ/π I`` and ``A + π√λ I``: what both π routes divide by."""
        assert self.dA is not None and self.dG is not None
        pi, root = pi_factor(self.dA, self.dG), damping**0.5
        return self.dG + root / pi, self.dA + pi * root

    # -- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the π route's use counts travel too: a resumed run must pick the same route (explicit inverses or the
        # eigenbasis), whose roundings differ at small λ
        return {**{k: getattr(self, k) for k in STATE_KEYS},
                "route": {"uses": self._uses, "lifetime": self._lifetime, "damping_used": self._damping_used}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in STATE_KEYS:
            value = state.get(k)
            setattr(self, k, None if value is None else value.to(device=self.A.device, dtype=self.dtype))
        self._inverse_cache = None
        route = state.get("route")
        if route is None:  # a checkpoint from before the route was saved
            self._end_lifetime()
        else:
            self._uses, self._lifetime, self._damping_used = route["uses"], route["lifetime"], route["damping_used"]


def pi_factor(dA: Tensor, dG: Tensor) -> Tensor:
    """The trace-norm π of factored Tikhonov damping, from the factors' eigenvalues (or diagonals; batched over
    leading dimensions).

    A zero factor (a layer whose inputs or gradients vanish) gets π = 1 instead of 0 or ∞.
    """
    mean_a, mean_g = dA.mean(-1), dG.mean(-1)  # one π per block of a batch of blocks
    ok = (mean_a > 0) & (mean_g > 0)
    return torch.where(ok, (mean_a / torch.where(ok, mean_g, 1.0)).sqrt(), torch.ones_like(mean_a))


def _ema(value: Tensor, weight: Tensor, new: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """One moving-average step that silently keeps the old value when the new statistic is not finite."""
    finite = torch.isfinite(new).all()
    value = torch.where(finite, torch.lerp(value, new, 1 - decay), value)  # lerp: one fused op for the blend
    weight = torch.where(finite, torch.lerp(weight, torch.ones_like(weight), 1 - decay), weight)
    return value, weight


def decompose(blocks: list[Any]) -> None:
    """Eigendecompose every factor of ``blocks``, batching the Kronecker factors that share a shape.

    A factor with non-finite entries, or one whose decomposition fails even in float64, keeps its previous
    decomposition (a warning says so) rather than poisoning the preconditioner.  Blocks of other types decompose
    themselves (``block.decompose()``) under the same rule.
    """
    for block in blocks:
        if not isinstance(block, KroneckerBlock):
            block.decompose()
    blocks = [b for b in blocks if isinstance(b, KroneckerBlock)]
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
                          "inverse", KFACWarning, stacklevel=user_stacklevel())
            continue
        block.set_decomposition(a[0], a[1], g[0], g[1])


def _safe_eigh(stack: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``eigh`` of symmetric matrices, retrying in float64 on the CPU when the first attempt fails.

    Failing includes returning NaN without an error: LAPACK's float32 ``syevd`` does that on some finite,
    rank-deficient factors (measured: the 785×785 input factor of the Fashion-MNIST convnet's dense layer, whose
    inputs have many all-zero features, at its second decomposition), and NaN eigenvectors would turn every later
    update of the layer into NaN whatever the damping.
    """
    sym = 0.5 * (stack + stack.transpose(-1, -2))
    for attempt in (lambda: sym, lambda: sym.double().cpu()):  # the float64 copy is made only when needed
        try:
            vals, vecs = torch.linalg.eigh(attempt())
        except RuntimeError:
            continue
        if bool(torch.isfinite(vals).all() & torch.isfinite(vecs).all()):
            return vals.to(stack), vecs.to(stack)
    return None, None


def eigh_or_warn(mats: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``(eigenvalues, eigenvectors)`` of symmetric matrices (batched), or None with a warning when they are not
    finite or cannot be decomposed: the caller then keeps its previous decomposition, as :func:`decompose` does."""
    vals, vecs = _safe_eigh(mats) if bool(torch.isfinite(mats).all()) else (None, None)
    if vals is None or vecs is None:
        warnings.warn("K-FAC: a factor was not finite or could not be decomposed; keeping its previous inverse",
                      KFACWarning, stacklevel=user_stacklevel())
        return None
    return vals, vecs


class MovingAverages:
    """Exponential moving averages with zero initialisation and bias correction, one weight per factor.

    A new estimate that is not finite is rejected (the average and its weight keep their values), as in
    :class:`KroneckerBlock`.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.values = {k: torch.zeros(shape, device=device, dtype=dtype) for k, shape in shapes.items()}
        self.weights = {k: torch.zeros((), device=device, dtype=dtype) for k in shapes}

    def update(self, estimates: dict[str, Tensor], decay: float) -> None:
        for key, new in estimates.items():
            self.values[key], self.weights[key] = _ema(self.values[key], self.weights[key], new.to(self.dtype),
                                                       decay)

    def ready(self) -> Tensor:
        """A device boolean: every factor has had at least one finite estimate."""
        return torch.stack([w > 0 for w in self.weights.values()]).all()

    def __getitem__(self, key: str) -> Tensor:
        """The bias-corrected average of ``key``."""
        return self.values[key] / self.weights[key].clamp_min(1e-30)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.values, **{f"{k}_weight": w for k, w in self.weights.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.values:
            self.values[k] = state[k].to(self.values[k])
            self.weights[k] = state[f"{k}_weight"].to(self.weights[k])


class FactorBlock:
    """Base of the block types beyond :class:`KroneckerBlock`: factors in :class:`MovingAverages`, a decomposition
    that is a list of tensors of fixed shapes (what data parallelism broadcasts and checkpoints store).

    Subclasses define ``_decompose() -> Optional[list[Tensor]]`` (None keeps the previous decomposition) and
    ``precondition``.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], decomposition_shapes: list[tuple[int, ...]],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.averages = MovingAverages(shapes, device, dtype)
        self.dtype = dtype
        self._shapes = decomposition_shapes
        self._decomposition: Optional[list[Tensor]] = None
        self._inverse_cache: Optional[tuple[float, Any]] = None

    def update(self, estimates: dict[str, Tensor], decay: float) -> None:
        self.averages.update(estimates, decay)

    @property
    def ready(self) -> Tensor:
        return self.averages.ready()

    @property
    def has_statistics(self) -> bool:
        return self._decomposition is not None

    @property
    def decomposition_cost(self) -> float:
        return float(sum(math.prod(s) for s in self._shapes))

    def decomposition_shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)

    def decomposition(self) -> list[Tensor]:
        assert self._decomposition is not None
        return self._decomposition

    def set_decomposition(self, *tensors: Tensor) -> None:
        self._decomposition = [t.contiguous() for t in tensors]
        self._inverse_cache = None

    def decompose(self) -> None:
        result = self._decompose()
        if result is not None:
            self.set_decomposition(*result)

    def _decompose(self) -> Optional[list[Tensor]]:
        raise NotImplementedError

    def _cached(self, damping: float, build: Any) -> Any:
        """``build(damping)``, recomputed only when the damping changes or a new decomposition arrives."""
        if self._inverse_cache is None or self._inverse_cache[0] != damping:
            self._inverse_cache = (damping, build(damping))
        return self._inverse_cache[1]

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.averages.state_dict(), "decomposition": self._decomposition}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averages.load_state_dict(state["averages"])
        stored = state["decomposition"]
        device = next(iter(self.averages.values.values())).device
        self._decomposition = None if stored is None else [t.to(device=device, dtype=self.dtype) for t in stored]
        self._inverse_cache = None


class GroupedKroneckerBlock(FactorBlock):
    """``groups`` independent ``A_j ⊗ G_j`` blocks (a grouped convolution): factors ``(groups, a, a)`` and
    ``(groups, g, g)``, batched eigendecompositions, each group damped as a :class:`KroneckerBlock` is (its own π).
    The gradient matrix is ``(groups · g, a)``: group ``j``'s output channels are rows ``j·g … (j+1)·g − 1``."""

    def __init__(self, groups: int, a_dim: int, g_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__({"A": (groups, a_dim, a_dim), "G": (groups, g_dim, g_dim)},
                         [(groups, a_dim, a_dim), (groups, a_dim), (groups, g_dim, g_dim), (groups, g_dim)],
                         device, dtype)
        self.groups, self.a_dim, self.g_dim = groups, a_dim, g_dim

    @property
    def decomposition_cost(self) -> float:
        return self.groups * (float(self.a_dim) ** 3 + float(self.g_dim) ** 3)

    def _decompose(self) -> Optional[list[Tensor]]:
        a, g = eigh_or_warn(self.averages["A"]), eigh_or_warn(self.averages["G"])
        if a is None or g is None:
            return None
        return [a[1], a[0].clamp_min(0), g[1], g[0].clamp_min(0)]

    def curvature_scale(self) -> Tensor:
        _, dA, _, dG = self.decomposition()
        return (dA.mean(-1) * dG.mean(-1)).mean()

    def precondition(self, grad: Tensor, damping: float, mode: str) -> Tensor:
        QA, dA, QG, dG = self.decomposition()
        m = grad.to(self.dtype).reshape(self.groups, self.g_dim, self.a_dim)
        if mode == "exact":
            scale = dG.unsqueeze(-1) * dA.unsqueeze(-2) + damping
        else:
            pi, root = pi_factor(dA, dG).unsqueeze(-1), damping**0.5
            scale = (dG + root / pi).unsqueeze(-1) * (dA + pi * root).unsqueeze(-2)
        inner = (QG.transpose(1, 2) @ m @ QA) / scale
        return (QG @ inner @ QA.transpose(1, 2)).reshape(grad.shape).to(grad.dtype)
