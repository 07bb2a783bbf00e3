"""The local quadratic model of Martens & Grosse (2015) §6.5 and §7.

``M(δ) = gᵀδ + ½ δᵀ (C + λ I) δ`` with ``C`` the exact Fisher/GGN of the mini-batch objective, evaluated through
Jacobian-vector products of the network (never forming ``C``).  Used for

- automatic learning rate and momentum: minimise ``M`` over ``δ = α Δ + μ δ_prev`` (a 2×2 solve);
- Levenberg–Marquardt damping: ``ρ = (h(θ+δ) − h(θ)) / M(δ)`` decides whether λ grows or shrinks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfac_tune.optim import fisher


class ForwardModeUnsupported(RuntimeError):
    """The model has an operation without a forward-mode derivative, so its Jacobian-vector products (and the
    automatic modes that need them) are out of reach."""


@dataclass
class QuadraticModel:
    """Inner products of the candidate directions, as float64 device tensors (the 2×2 solve stays on the device, as
    kfac-jax's does: an automatic step reads nothing back to the host); ``dirs[0]`` is Δ, ``dirs[1]`` (optional)
    is δ_prev."""

    grad_dots: Tensor  # gᵀ d_i, shape (n,)
    curv: Tensor  # d_iᵀ C d_j, shape (n, n)
    sq: Tensor  # d_iᵀ D d_j (the damping term; D = I for absolute damping), shape (n, n)

    def solve(self, damping: float, fixed: dict[int, float]) -> Tensor:
        """Coefficients minimising ``M`` over the span of the directions (a device tensor of shape (n,));
        ``fixed`` pins some of them.  A direction without positive curvature gets 0; with two free directions
        that are (nearly) parallel, the step along Δ alone."""
        n = self.grad_dots.shape[0]
        q = self.curv + damping * self.sq
        g = self.grad_dots
        zero = torch.zeros((), dtype=g.dtype, device=g.device)

        def along(i: int, rhs: Tensor) -> Tensor:  # the 1-D minimiser along d_i
            return torch.where(q[i, i] > 0, rhs / q[i, i], zero)

        free = [i for i in range(n) if i not in fixed]
        coeffs = [zero + fixed[i] if i in fixed else zero for i in range(n)]
        if len(free) == 1:
            i = free[0]
            coeffs[i] = along(i, -(g[i] + sum((q[i, j] * coeffs[j] for j in fixed), zero)))
        elif len(free) == 2:
            det = q[0, 0] * q[1, 1] - q[0, 1] * q[1, 0]
            parallel = det <= 1e-12 * torch.clamp(q[0, 0] * q[1, 1], min=1e-30)
            safe = torch.where(parallel, torch.ones_like(det), det)
            coeffs[0] = torch.where(parallel, along(0, -g[0]), (-g[0] * q[1, 1] + q[0, 1] * g[1]) / safe)
            coeffs[1] = torch.where(parallel, zero, (-g[1] * q[0, 0] + q[1, 0] * g[0]) / safe)
        return torch.stack(coeffs)

    def change(self, coeffs: Tensor, damping: float = 0.0) -> Tensor:
        """``M(Σ c_i d_i)``: the change of the objective the model predicts (a device scalar)."""
        c = coeffs.to(self.grad_dots.dtype)
        n = c.shape[0]
        q = self.curv[:n, :n] + damping * self.sq[:n, :n]
        return c @ self.grad_dots[:n] + 0.5 * c @ q @ c


def build(
    model: nn.Module,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    loss: str,
    params: list[nn.Parameter],
    grads: list[Tensor],
    directions: list[list[Tensor]],
    weight_decay: float,
    average: Optional[Callable[[list[Tensor]], None]] = None,
    damping_weights: Optional[list[float]] = None,
) -> QuadraticModel:
    """Evaluate ``gᵀd``, ``dᵀCd`` and ``dᵀDd`` for each direction (one forward-mode pass per direction).

    ``C`` is the GGN of the mean loss over ``inputs``, which may be the first examples of the batch only: an
    unbiased estimate of the whole batch's ``C`` at a fraction of the cost (``gᵀd`` uses the whole batch's
    gradient).  ``weight_decay`` η enters as the L2 term of the objective: ``C + η I``.  Under data parallelism ``average``
    (in place, over the ranks) turns this rank's ``dᵀCd`` into the combined batch's; ``gᵀd`` and ``dᵀd`` need
    nothing, the gradients and directions being the same on every rank already.  ``damping_weights`` (one per
    parameter) make the damping term ``λ dᵀDd`` with ``D`` diagonal: relative damping damps each layer in units of
    its own curvature scale; None is ``D = I``.
    """
    output, jvps = _jvps(model, inputs, params, directions)
    grad_dots, sq, weighted = _inner_products(grads, directions, damping_weights)
    curv = fisher.quadratic_forms(loss, output, jvps)
    if average is not None:
        average([curv])
    curv = curv + weight_decay * sq
    if weighted is not None:
        sq = weighted
    return QuadraticModel(grad_dots.double(), curv.double(), sq.double())


def _inner_products(grads: list[Tensor], directions: list[list[Tensor]], damping_weights: Optional[list[float]]
                    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``gᵀd_i``, ``d_iᵀd_j`` and, with ``damping_weights``, ``Σ_l w_l d_i,lᵀd_j,l``, one parameter at a time: the
    directions' slices of a parameter form a small matrix ``D`` whose ``D g`` and ``D Dᵀ`` give every pair at once
    (two matrix products a parameter instead of one product and one sum per pair), and only one parameter's
    copy is alive at a time. In float32, or the parameters' dtype when wider (``fisher.wide``)."""
    grad_dots: Tensor | float = 0.0
    sq: Tensor | float = 0.0
    weighted: Tensor | float = 0.0
    for index, grad in enumerate(grads):
        slices = torch.stack([fisher.wide(d[index]).reshape(-1) for d in directions])
        gram = slices @ slices.T
        grad_dots = grad_dots + slices @ fisher.wide(grad).reshape(-1).to(slices.dtype)
        sq = sq + gram
        if damping_weights is not None:
            weighted = weighted + damping_weights[index] * gram
    return grad_dots, sq, weighted if damping_weights is not None else None  # type: ignore[return-value]


def _load_forward_decompositions() -> None:
    """Load torch's forward-mode decompositions without the ``FutureWarning: torch.jit.script is deprecated`` their
    loading raises: the first ``make_dual`` in a process imports ``torch._decomp.decompositions_for_jvp``, which
    compiles them with ``torch.jit.script``; torch deprecates its own call and a user can do nothing about it.
    Filtered for that import alone (every other warning stays as it was); later imports are cached and silent."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def _jvps(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], params: list[nn.Parameter],
          directions: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """The model output and ``J d`` for each parameter direction ``d`` (stacked on a new first dimension).

    By forward-mode autograd on dual tensors (``torch.autograd.forward_ad``), one forward pass per direction, all
    in one dual level: the same forward derivatives as ``torch.func.jvp``, without its functorch transform, which
    on small networks cost more than the products themselves (two directions of the digits MLP: 0.43 against 0.94
    ms; vmap of ``jvp`` over the two directions 0.69 ms; ``vmap`` cannot batch ``make_dual``)."""
    _load_forward_decompositions()
    names = {id(p): name for name, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    primals = [p.detach() for p in params]
    buffers = dict(model.named_buffers())
    args, kwargs = inputs
    output, tangents = None, []
    # The fused attention kernels (flash, memory-efficient) have no forward-mode derivative; the math kernel
    # computes the same attention from differentiable primitives, so attention models get the automatic modes too.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level():
        for direction in directions:
            duals = {key: forward_ad.make_dual(p, t.to(p.dtype)) for key, p, t in zip(keys, primals, direction)}
            # Buffers are copies, so that batch-norm's running statistics are not updated by these passes.
            copies = {name: b.clone() for name, b in buffers.items()}
            try:
                out = functional_call(model, {**duals, **copies}, args, kwargs, strict=False)
            except RuntimeError as error:  # NotImplementedError included: an operation without a forward derivative
                # The same forward pass has just run in training, so what fails here is forward mode: say which
                # mode needs it and what works instead, keeping torch's own first line (it names the operation).
                raise ForwardModeUnsupported(
                    "KFAC: the automatic modes (adaptive_lr, adaptive_momentum, adaptive_damping) compute the "
                    "model's Jacobian-vector products by forward-mode autograd (torch.autograd.forward_ad), which "
                    f"this model does not support: {str(error).splitlines()[0]} Train it with the fixed-lr mode "
                    "(the defaults)") from error
            primal, tangent = forward_ad.unpack_dual(out)
            if tangent is None:  # the output does not depend on the parameters along this direction
                tangent = torch.zeros_like(primal)
            output = primal if output is None else output
            tangents.append(tangent)
    return output.detach(), torch.stack(tangents).detach()


DAMPING_RULES = ("trust-region", "martens")


def new_damping(
    damping: float, rho: float, decay: float, interval: int, lower: float, upper: float,
    boost: Optional[float] = None,
) -> float:
    """Martens & Grosse's Levenberg–Marquardt rule (``damping_rule="martens"``): shrink λ by ω = decay^interval
    when ρ > 3/4, grow it by 1/ω when ρ < 1/4.

    With ``boost``, a step that made the objective worse (ρ < 0, or not finite) multiplies λ by ``boost`` at once:
    the quadratic model was not trusted even in sign, and growing λ by 1/ω ≈ 1.3 per adaptation would take
    dozens of adaptations to reach a λ that is orders of magnitude larger (M&G §6.5 start at λ = 150).
    """
    omega = decay**interval
    if boost is not None and (not math.isfinite(rho) or rho < 0):
        damping = damping * boost
    elif not math.isfinite(rho) or rho < 0.25:
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    return min(max(damping, lower), upper)


def trust_region_damping(damping: float, rho: float, failures: int, lower: float, upper: float
                         ) -> tuple[float, int]:
    """The trust-region rule (``damping_rule="trust-region"``, the default): Nielsen's smooth Levenberg–Marquardt
    update, judged by ρ alone, once per evaluation (raising it to the interval's power drove λ to its floor on
    mini-batches within a few evaluations, and the blow-up guard then had to undo steps: measured, issue 24).

    ρ > 0: λ × max(1/3, 1 − (2ρ − 1)³): down by up to 3x per evaluation when the model predicted the change
    (ρ ≥ 1 gives the full 3x, ρ = ½ leaves λ alone, ρ → 0 doubles it), so a λ₀ orders of magnitude too large
    is gone within a few evaluations instead of the ~dozens that M&G's ω = 0.95⁵ per adaptation needs.
    ρ ≤ 0 or not finite (the step made the objective worse; it is undone): λ × 2^(failures+1), doubling again for
    each failure in a row, so a miss costs a few evaluations, not a permanent tenfold λ.  Returns λ and the new
    count of failures in a row.  (Nielsen 1999; Madsen, Nielsen & Tingleff, *Methods for non-linear least squares
    problems*, §3.2.)
    """
    if math.isfinite(rho) and rho > 0:
        factor = max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        failures = 0
    else:
        failures += 1
        factor = 2.0 ** failures
    return min(max(damping * factor, lower), upper), failures
