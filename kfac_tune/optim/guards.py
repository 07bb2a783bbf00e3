"""The update's safety guards, decided on the device: an ordinary step never waits for the host.

Two guards look at every update (:class:`Guards`):

- **overflow**: an update that is non-finite, or larger than ``max_update_ratio`` × ‖θ‖ (each entry of θ counted as
  at least 1e-2 in RMS, so that weights initialised at zero can move), is not applied;
- **blow-up** (with ``step(closure)``): the loss after an update is known when the next closure returns it; above
  ``max(rejection_ratio × running mean of accepted losses, first loss)`` the update is undone and momentum
  restarts.  The second bound keeps late training, where a batch's loss can be several times the running mean by
  noise alone, free of false rejections; a non-finite loss rejects nothing (bad data gives one too: its non-finite
  update is skipped by the first guard).

Both are ``torch.where`` over device tensors, and both are counted on the device.  The host learns the counts
where the optimizer synchronises anyway (an inverse refresh, a Levenberg–Marquardt evaluation) and then raises λ
by ``damping_boost`` for what happened since its last look (:meth:`Guards.react`), with a warning.  Neither guard
fires where the curvature model is right: ``max_update_ratio`` (1e3 by default) is an overflow guard, not a gate,
and a blow-up is a loss several times larger than anything accepted before.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from kfac_tune.optim.callsite import KFACWarning, user_stacklevel


class Guards:
    """The two guards' device state and counters for one optimizer's parameters."""

    def __init__(self, params: list[Tensor], max_update_ratio: Optional[float], rejection_ratio: Optional[float],
                 damping_boost: Optional[float]) -> None:
        device = params[0].device
        self.max_update_ratio, self.rejection_ratio, self.damping_boost = (
            max_update_ratio, rejection_ratio, damping_boost)
        # every trainable parameter's share of ‖θ‖² that max_update_ratio counts at least: RMS 1e-2 per entry
        self._weight_floor = 1e-4 * sum(p.numel() for p in params)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.rejected = torch.zeros((), dtype=torch.long, device=device)
        self._seen = [0, 0]  # skipped, rejected: the counts the host has reacted to
        # running mean of accepted steps' losses, and the first loss seen (NaN: none yet)
        self.loss_reference = torch.full((), float("nan"), dtype=torch.float64, device=device)
        self.loss_initial = torch.full((), float("nan"), dtype=torch.float64, device=device)

    def judge_last_update(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]], loss: Tensor) -> Tensor:
        """The blow-up guard on the previous update, given the loss after it: undo it on the device where it blew
        up (parameters back, its momentum zeroed) and return the device boolean "kept", which the caller uses to
        drop this step's statistics and update where it is false."""
        value = loss.detach().to(torch.float64).reshape(())
        finite = torch.isfinite(value)
        deltas = [(p, state[p]["delta"]) for p in params if "delta" in state[p]]
        blown = torch.zeros((), dtype=torch.bool, device=value.device)
        if self.rejection_ratio is not None and deltas:
            # NaN bounds (nothing accepted yet) compare false: nothing is rejected before a reference exists
            bound = torch.maximum(self.rejection_ratio * self.loss_reference, self.loss_initial)
            blown = finite & (value > bound)
            for p, delta in deltas:
                p.sub_(torch.where(blown, delta, torch.zeros_like(delta)))
                state[p]["delta"] = torch.where(blown, torch.zeros_like(delta), delta)
            self.rejected += blown.long()
        accepted = finite & ~blown
        first = torch.isnan(self.loss_reference)
        self.loss_reference = torch.where(
            accepted, torch.where(first, value, 0.9 * self.loss_reference + 0.1 * value), self.loss_reference)
        self.loss_initial = torch.where(torch.isnan(self.loss_initial) & finite, value, self.loss_initial)
        return ~blown

    def apply(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]], update: list[Tensor]) -> list[Tensor]:
        """Add ``update`` unless the overflow guard stops it; return what was added (zeros where stopped), which is
        also each parameter's momentum for the next step."""
        total = torch.stack(torch._foreach_norm(update)).to(torch.float64).square().sum()
        ok = torch.isfinite(total)
        if self.max_update_ratio is not None:
            weights = torch.stack(torch._foreach_norm(params)).to(torch.float64).square().sum()
            ok &= total <= self.max_update_ratio ** 2 * (weights + self._weight_floor)
        self.skipped += (~ok).long()
        applied = [torch.where(ok, u, torch.zeros_like(u)) for u in update]
        for p, safe in zip(params, applied):
            p.add_(safe)
            state[p]["delta"] = safe
        return applied

    def react(self, group: dict[str, Any], max_damping: float) -> None:
        """Raise λ for the updates skipped or undone since the host last looked (one host synchronisation)."""
        skipped, rejected = torch.stack([self.skipped, self.rejected]).tolist()
        new_skips, new_rejections = skipped - self._seen[0], rejected - self._seen[1]
        self._seen = [skipped, rejected]
        why = []
        if new_skips:
            why.append(f"skipped {new_skips} non-finite update(s) (or update(s) that would have exploded the weights: "
                       "max_update_ratio)")
        if new_rejections:
            why.append(f"rejected {new_rejections} update(s) that raised the loss above rejection_ratio "
                       f"({self.rejection_ratio}) x its running mean")
        if why:
            new = min(group["damping"] * (self.damping_boost or 10.0), max_damping)
            warnings.warn(f"K-FAC {'; '.join(why)}; raising damping from {group['damping']:.3g} to {new:.3g}",
                          KFACWarning, stacklevel=user_stacklevel())
            group["damping"] = new

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped.clone(), "rejected": self.rejected.clone(), "seen": list(self._seen),
                "loss_reference": self.loss_reference.clone(), "loss_initial": self.loss_initial.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.skipped.device
        for key in ("skipped", "rejected", "loss_reference", "loss_initial"):
            setattr(self, key, state[key].to(device))
        self._seen = list(state["seen"])
