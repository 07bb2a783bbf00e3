"""The public K-FAC optimizer.

``KFAC(model, ...)`` finds the model's supported layers (``nn.Linear``, convolutions, ``nn.Embedding``,
``nn.LayerNorm``, batch norm, and whatever :func:`~kfac_tune.optim.registry.register_layer` adds;
:mod:`kfac_tune.optim.coverage`), hooks them to collect curvature statistics, and on ``step()`` replaces their
gradient by the damped natural gradient ``(F̂ + λI)⁻¹ ∇h``.  Every other trainable parameter (unsupported or excluded modules) takes the plain gradient in the same update, so it is
trained by the same momentum/step-size rule: the documented first-order fallback.  ``opt.coverage`` says which
parameters get which (one line by ``str()``, also logged at INFO level by the ``kfac_tune.optim`` logger).

The mode: left unset (no ``lr``, ``momentum`` or ``adaptive_*``), ``step(closure)`` runs Martens & Grosse's
automatic mode (Levenberg–Marquardt damping, α and μ from the exact quadratic model) and ``step()`` the fixed-lr
one.  Safe where the curvature model is wrong, and out of the way where it is right (each default is a constructor
argument that recipes record; :mod:`kfac_tune.optim.arguments` says what stores written before a convention meant):

- the trust region of the automatic mode (``damping_rule="trust-region"``; :func:`quadratic.trust_region_damping`):
  a step is judged by its reduction ratio ρ, never by its size; a miss is undone and costs one evaluation;
- ``kl_clip="auto"``: the fixed-lr step's ``α² Δᵀ(F̂+λ)Δ`` ≤ 1e-3 nats for classification losses, off for ``mse``
  (whose "KL" is in the targets' units);
- the overflow and blow-up guards (:mod:`kfac_tune.optim.guards`), decided on the device;
- ``damping_scale="relative"`` (opt-in) expresses λ in units of each block's curvature scale (the mean eigenvalue
  of A⊗G), so one value means the same at any loss scale.  The default stays ``"absolute"``: with the mean-reduced
  loss convention absolute damping already means the same at any batch size, and relative damping shrinks with the
  curvature as a classifier grows confident (measured; see ``benchmarks/RESULTS.md``).

Hot path (GPU-first): between inverse refreshes a fixed-lr step reads nothing back from the device, with or
without a closure, and an automatic step reads once (the guards' counters); the 2×2 solve of the quadratic model
stays on the device.  Inverse refreshes (every ``inv_update_freq`` steps) and Levenberg–Marquardt evaluations
synchronise.

Data parallelism (:mod:`kfac_tune.optim.distributed`): when ``torch.distributed`` is initialised (or a
``process_group`` is given) the factor statistics, the quadratic-model curvature and the Levenberg–Marquardt losses
are averaged over the ranks and the eigendecompositions are spread across them, so every rank takes the step that
single-process K-FAC would take on the combined batch.  Gradients are not K-FAC's business: DDP averages them (pass
the DDP-wrapped model or its ``.module``), or call :func:`~kfac_tune.optim.distributed.average_gradients` after
``backward()`` with a plain process group.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kfac_tune.optim import blocks as blocks_mod
from kfac_tune.optim import arguments, fisher, quadratic
from kfac_tune.optim.distributed import DataParallel, resolve_group, unwrap
from kfac_tune.optim.callsite import KFACWarning, user_stacklevel
from kfac_tune.optim.capture import LayerHelper
from kfac_tune.optim.guards import Guards
from kfac_tune.optim.coverage import Exclude, find_layers
from kfac_tune.optim.statistics import Statistics
from kfac_tune.optim.temporal import TEMPORAL_MODES
from kfac_tune.optim.profiling import PhaseTimer

class KFAC(torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) for a PyTorch model.

    Args:
        model: the network; its output must be the tensor the loss is computed from.  A
            ``DistributedDataParallel`` model is unwrapped: layer names, ``exclude`` and checkpoints are those of
            its ``.module``.
        lr: step size α (ignored when ``adaptive_lr``; then it is chosen each step by the quadratic model).  None
            (with ``momentum`` and the ``adaptive_*`` flags also unset): the mode follows the call, automatic under
            ``step(closure)``, fixed-lr with α = 0.01, μ = 0.9 under ``step()``.
        damping: Tikhonov damping λ added to the curvature (see ``damping_mode`` and ``damping_scale``).
        momentum: μ in ``δ = α Δ + μ δ_prev`` (ignored when ``adaptive_momentum``; None: see ``lr``).
        factor_decay: EMA decay of the Kronecker factors, applied once per factor update.
        inv_update_freq: steps between eigendecompositions of the factors (amortised inverses).
        cov_update_freq: steps between factor updates; other steps skip the statistics entirely.
        loss: ``"cross_entropy"`` | ``"mse"`` | ``"bce"``: the torch functional (``reduction="mean"``) whose Fisher
            is approximated; see :mod:`kfac_tune.optim.fisher` for the exact convention.  The default is the
            classification case, cross-entropy over the last dimension; a regression or reconstruction model must
            name its loss (an output with one logit per row under cross-entropy is an error at the first forward
            pass; other mismatches cannot be seen from the output and give the wrong curvature).
        fisher: ``"true"`` (targets sampled from the model, the default), ``"empirical"`` (the real gradients) or
            ``"exact"`` (one backward pass per output dimension; small outputs only).
        weight_decay: L2 coefficient η, added to the gradient, the damping and the quadratic model.
        kl_clip: trust region of the fixed-``lr`` step: the update is scaled so that ``α² Δᵀ (F̂ + λ) Δ ≤ kl_clip``
            (KL-clipping, as tf-kfac's norm constraint and kfac-pytorch's ``kl_clip``).  ``"auto"``: 1e-3 nats
            (their default) for ``cross_entropy`` and ``bce``, off for ``mse`` (see
            :func:`~kfac_tune.optim.arguments.resolve_kl_clip`).  The automatic modes ignore it, as kfac-jax does:
            their quadratic model already sizes the step.  None: off.
        damping_mode: ``"pi"`` (factored Tikhonov) or ``"exact"`` (eigenbasis); see :mod:`kfac_tune.optim.blocks`.
        adaptive_damping: Levenberg–Marquardt adaptation of λ every ``damping_adaptation_interval`` steps (and, with
            the trust-region rule, every step of the first interval and after a miss); needs ``step(closure)``,
            checked at the first step.  On those steps an update that increases the batch loss is undone.
        adaptive_lr, adaptive_momentum: choose α and/or μ each step by minimising the exact quadratic model.  None
            (all three): see ``lr``.
        damping_rule: ``"trust-region"`` (Nielsen's rule on ρ, :func:`~kfac_tune.optim.quadratic.trust_region_damping`)
            or ``"martens"`` (M&G's thresholds and ω = decay^interval, what recipes written before it ran).
        damping_scale: ``"absolute"`` (λ as given) or ``"relative"`` (λ times each block's mean eigenvalue of
            A⊗G, in the preconditioner and in the quadratic model's damping term).
        damping_boost: factor λ is multiplied by where the host next looks (an inverse refresh, an automatic step)
            after a skipped or blown-up update, and by M&G's rule on a bad Levenberg–Marquardt step (None: the
            legacy ×10 for non-finite updates, LM's 1/ω for rejected ones).
        max_update_ratio: an overflow guard: skip an update larger than this times the weights' norm (every entry
            counted as at least 1e-2 in RMS); 1e3 by default, far beyond a Gauss-Newton step; None: off.
        rejection_ratio: with ``step(closure)``, undo the previous update when the loss after it exceeds this times
            the running mean of accepted losses and the first loss; None: off (rejections on LM steps only).
        stat_fraction: share of each batch (its first examples) used for curvature estimates: the factor statistics
            and, in the automatic modes, the quadratic model's exact curvature products.  With the true or exact
            Fisher, a fraction < 1 runs the statistics as a separate forward and sampled backward pass over those
            examples alone (Martens & Grosse use 1/8), so their cost shrinks with the fraction; so does the cost of
            the quadratic model's Jacobian-vector products.
        exclude: modules that get the first-order fallback: names or dotted prefixes of names (``"encoder"``
            covers ``"encoder.0"``), class names (``"Conv2d"``), module types or module instances; one of these
            alone or a list.  An entry that matches no module is an error listing the model's modules.
        temporal: curvature model of Linear layers marked as shared over time steps (``kfac_tune.nn``'s LSTM and
            GRU mark theirs): ``"independent"``, ``"option1"`` or ``"option2"`` (Martens et al. 2018; see
            :mod:`kfac_tune.optim.temporal`), or a mapping from module names (or prefixes) to those, unlisted
            layers being independent.  Option 1 and 2 need ``damping_mode="pi"``.
        factor_dtype: dtype of factors and inverses (float32 by default whatever the model's dtype; float64 for
            tests or ill-conditioned problems).
        seed: seeds the sampling of true-Fisher targets (reproducible, checkpointed); rank ``r`` of a process
            group uses ``seed + r`` so that the ranks draw independent targets.
        profile: time each phase (statistics, inverses, precondition, update) into ``self.timer.totals``;
            synchronises the device, so leave it off outside benchmarks.
        process_group: the ranks that train this model data-parallel; None: the default group when
            ``torch.distributed`` is initialised, else single-process.  ``self.data_parallel.assignment`` says which
            rank decomposes which layer (greedy LPT) and may be replaced by another
            :class:`~kfac_tune.optim.distributed.WorkAssignment`.
    """

    # what the constructor's arguments mean, stored and checked: optim/arguments.py
    HYPERPARAMETERS = arguments.HYPERPARAMETERS
    CONVENTIONS = arguments.CONVENTIONS
    LEGACY = arguments.LEGACY

    def __init__(
        self,
        model: nn.Module,
        lr: Optional[float] = None,
        damping: float = 1e-3,
        momentum: Optional[float] = None,
        factor_decay: float = 0.95,
        inv_update_freq: int = 10,
        cov_update_freq: int = 1,
        loss: str = "cross_entropy",
        fisher: str = "true",
        weight_decay: float = 0.0,
        kl_clip: Union[float, str, None] = "auto",
        damping_mode: str = "pi",
        damping_scale: str = "absolute",
        adaptive_damping: Optional[bool] = None,
        adaptive_lr: Optional[bool] = None,
        adaptive_momentum: Optional[bool] = None,
        damping_adaptation_interval: int = 5,
        damping_adaptation_decay: float = 0.95,
        damping_rule: str = "trust-region",
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        damping_boost: Optional[float] = 10.0,
        max_update_ratio: Optional[float] = 1e3,
        rejection_ratio: Optional[float] = 4.0,
        stat_fraction: float = 1.0,
        exclude: Union[None, Exclude, Iterable[Exclude]] = (),
        temporal: Union[str, Mapping[str, str]] = "independent",
        factor_dtype: torch.dtype = torch.float32,
        seed: Optional[int] = None,
        profile: bool = False,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC needs the model (an nn.Module), got {type(model).__name__}")
        kl_clip = arguments.resolve_kl_clip(kl_clip, loss)
        # with lr, momentum and the adaptation flags left unset, step(closure) runs the automatic mode and a step
        # without a closure the fixed-lr one (decided at the first step: _resolve_mode)
        self._mode_unset = arguments.mode_is_unset(lr, momentum, adaptive_damping, adaptive_lr, adaptive_momentum)
        self._mode_by_default = False  # the automatic mode was chosen by step(closure), not asked for
        defaults = dict(
            lr=arguments.FIXED_LR if lr is None else lr,
            damping=damping,
            momentum=arguments.FIXED_MOMENTUM if momentum is None else momentum,
            factor_decay=factor_decay,
            inv_update_freq=inv_update_freq,
            cov_update_freq=cov_update_freq,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
        )
        defaults = arguments.validate(defaults, min_damping=min_damping, max_damping=max_damping)
        arguments.fisher_check(loss, fisher, damping_mode, stat_fraction, damping_adaptation_interval,
                     damping_adaptation_decay)
        if damping_rule not in quadratic.DAMPING_RULES:
            raise ValueError(f"KFAC: damping_rule={damping_rule!r}: expected one of "
                             f"{', '.join(quadratic.DAMPING_RULES)}")
        arguments.validate_safety(damping_scale, damping_boost, max_update_ratio, rejection_ratio)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("KFAC: the model has no trainable parameters")
        super().__init__(params, defaults)

        model = unwrap(model)
        self.model = model
        self.loss, self.fisher, self.damping_mode = loss, fisher, damping_mode
        self.adaptive_damping, self.adaptive_lr, self.adaptive_momentum = (
            bool(adaptive_damping), bool(adaptive_lr), bool(adaptive_momentum))
        self.damping_adaptation_interval = damping_adaptation_interval
        self.damping_adaptation_decay = damping_adaptation_decay
        self.damping_rule = damping_rule
        self._lm_failures = 0  # Levenberg–Marquardt evaluations in a row whose step made the objective worse
        self.min_damping, self.max_damping = min_damping, max_damping
        self.damping_scale = damping_scale
        self.stat_fraction = stat_fraction
        self.factor_dtype = factor_dtype

        coverage = find_layers(model, exclude, lambda name: _temporal_mode(temporal, name))
        self.layers: dict[str, tuple[LayerHelper, Any]] = {
            name: (helper, helper.make_block(helper.params[0].device, factor_dtype))
            for name, helper in coverage.helpers.items()}
        if not self.layers:
            raise ValueError(
                "KFAC: the model has no supported layer outside `exclude` (nn.Linear, nn.Conv1d/2d/3d, "
                "nn.ConvTranspose1d/2d/3d, nn.Embedding, nn.LayerNorm, batch norm, or a type given to "
                f"kfac_tune.register_layer): {coverage.fallback_text() or 'no trainable parameter'}. Use a "
                "first-order optimizer for it, or un-exclude a layer")
        self.coverage = coverage
        logging.getLogger(__name__).info("%s", coverage)
        if damping_mode != "pi" and any(getattr(h, "mode", "independent") != "independent"
                                        for h, _ in self.layers.values()):
            raise ValueError("KFAC: temporal='option1'/'option2' damps the factors of V₀ (damping_mode='pi'); "
                             f"damping_mode={damping_mode!r} has no counterpart for them")
        group = resolve_group(process_group)
        self.data_parallel: Optional[DataParallel] = None if group is None else DataParallel(
            group, {name: block.decomposition_cost for name, (_, block) in self.layers.items()})

        self._steps = 0
        device = params[0].device
        self.guards = Guards(params, max_update_ratio, rejection_ratio, damping_boost)
        self.lm_rejected_steps = 0
        self._scales: dict[str, float] = {}  # curvature scale of each block's decomposition (relative damping)
        self._stale: set[str] = set()  # layers whose factors changed since their last decomposition
        self._generator: Optional[torch.Generator] = None
        if seed is not None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed + (self.data_parallel.rank if self.data_parallel else 0))
        self._hooks_enabled = True
        self._capturing = False
        self._in_sampled_pass = False
        self._pending: dict[str, Statistics] = {}
        self._passes = 0
        self._outputs: list[tuple[str, Tensor, int, int]] = []
        # the last batch's inputs, cut to its first stat_fraction: what the quadratic model's curvature sees
        self._last_inputs: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None
        self._model_output: Optional[Tensor] = None
        self._statistics_on_subset = stat_fraction < 1 and fisher != "empirical"
        self._subset_inputs: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None
        self._in_statistics_pass = False
        self._loss_count = 1
        self.timer = PhaseTimer(profile, device)
        self._handles = [
            model.register_forward_pre_hook(self._on_model_input, with_kwargs=True),
            model.register_forward_hook(self._on_model_output),
        ]
        for name, uses in coverage.uses.items():  # several modules for a tied weight: their statistics add up
            self._handles.extend(module.register_forward_hook(self._layer_hook(name)) for module in uses)
        self._layer_of = {id(p): name for name, (helper, _) in self.layers.items() for p in helper.params
                          if p is not None}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every hyperparameter and convention with its default (the constructor's signature)."""
        return arguments.defaults(cls.__init__)

    @classmethod
    def complete_arguments(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` with every hyperparameter and convention filled in, as a store keeps them."""
        return arguments.complete_arguments(cls.__init__, given)

    @staticmethod
    def stored_arguments(stored: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments read back from a store, older conventions pinned to what they meant."""
        return arguments.stored_arguments(stored)

    def close(self) -> None:
        """Detach the optimizer's hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # lm_rejected_steps (an attribute): updates the Levenberg–Marquardt trust region undid (ρ ≤ 0 on its steps,
    # the rule working as meant: one evaluation each)

    @property
    def skipped_steps(self) -> int:
        """Updates not applied because they were not finite or would have exploded the weights
        (``max_update_ratio``); synchronises."""
        return int(self.guards.skipped.item())

    @property
    def max_update_ratio(self) -> Optional[float]:
        """The overflow guard's bound (``optim/guards.py`` holds it)."""
        return self.guards.max_update_ratio

    @property
    def rejection_ratio(self) -> Optional[float]:
        """The blow-up guard's bound (``optim/guards.py`` holds it)."""
        return self.guards.rejection_ratio

    @property
    def damping_boost(self) -> Optional[float]:
        """λ's factor where a guard acted (``optim/guards.py`` holds it)."""
        return self.guards.damping_boost

    @property
    def rejected_steps(self) -> int:
        """Updates undone because the loss after them blew up (``rejection_ratio``); synchronises."""
        return int(self.guards.rejected.item())

    # ----------------------------------------------------------------------------------------------- capture
    def _on_model_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (self._hooks_enabled and torch.is_grad_enabled()):
            self._capturing = False
            return None
        statistics_step = self._steps % self.param_groups[0]["cov_update_freq"] == 0
        for stats in self._pending.values():
            stats.end_pass()
        for_quadratic_model = (self.adaptive_lr or self.adaptive_momentum or self.adaptive_damping
                               ) and not self._in_statistics_pass
        for_statistics_pass = statistics_step and self._statistics_on_subset and not self._in_statistics_pass
        if for_quadratic_model or for_statistics_pass:
            # Both curvature estimates use the batch's first examples: cut them once.
            first = _first_examples(args, kwargs, self.stat_fraction) if self.stat_fraction < 1 else (args, kwargs)
        if for_quadratic_model:
            self._last_inputs = first
        if for_statistics_pass:
            # The statistics come from a separate pass over the first examples (in step()), so that the
            # sampled backward pass costs a fraction of the batch rather than all of it.
            self._subset_inputs = first
            self._capturing = False
        else:
            self._capturing = statistics_step
        return None

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (self._hooks_enabled and torch.is_grad_enabled()):
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"KFAC needs the model's output to be the tensor the loss is computed from; got "
                f"{type(output).__name__}. Wrap the model so that forward() returns that tensor."
            )
        if self.loss == "cross_entropy" and output.dim() > 0 and output.shape[-1] == 1:
            raise ValueError(
                f"KFAC(loss='cross_entropy', the default) sees an output of shape {tuple(output.shape)}: one logit "
                "per row, over which cross-entropy is 0 and has no curvature. Name the loss you minimise: "
                "loss='mse' (F.mse_loss, regression) or loss='bce' (F.binary_cross_entropy_with_logits, one logit "
                "per binary label)."
            )
        if self._capturing and output.requires_grad:
            self._loss_count = fisher.loss_count(self.loss, output)
            # The output is held by the optimizer (not by its own hook, which would make a reference cycle that
            # keeps every step's graph alive until the garbage collector runs) and released by the hook.
            self._model_output = output
            output.register_hook(self._on_output_grad)
        return None

    def _layer_hook(self, name: str) -> Callable[..., Optional[Tensor]]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Optional[Tensor]:
            if not (self._capturing and self._hooks_enabled and torch.is_grad_enabled()):
                return None
            if not output.requires_grad:
                return None
            with self.timer.phase("statistics"):
                x = args[0].detach()
                batch = x.shape[0]
                fraction = 1.0 if self._in_statistics_pass else self.stat_fraction
                used = max(1, math.ceil(fraction * batch))
                call = len(self._outputs)
                with torch.autocast(device_type=x.device.type, enabled=False):
                    self._statistics(name).add_input(x, used, call)
                self._outputs.append((name, output, used, batch))
                if self.fisher == "empirical":
                    output.register_hook(lambda g: self._add_G(name, g, used, batch, call))
                # The layer's consumers get a copy, so an in-place op after the layer (ReLU(inplace=True)) cannot
                # rewrite the tensor whose gradient the statistics need.
                return output.clone()

        return hook

    def _on_output_grad(self, grad: Optional[Tensor]) -> None:
        """First thing in the real backward: count the pass and, for the true/exact Fisher, run the extra pass.

        The extra pass differentiates the output w.r.t. the captured layer outputs only, so no weight gradient is
        computed and ``.grad`` is untouched.
        """
        if self._in_sampled_pass or not self._hooks_enabled:
            return
        self._passes += 1
        outputs, self._outputs = self._outputs, []
        z, self._model_output = self._model_output, None
        if self.fisher == "empirical" or not outputs or z is None:
            return
        self._in_sampled_pass = True
        try:
            with self.timer.phase("statistics"):
                self._sampled_pass(z, outputs)
        finally:
            self._in_sampled_pass = False

    def _sampled_pass(self, z: Tensor, outputs: list[tuple[str, Tensor, int, int]]) -> None:
        if self.fisher == "true":
            vectors = [fisher.sample(self.loss, z, self._generator)]
        else:
            vectors = fisher.exact_columns(self.loss, z)
        targets = [s for _, s, _, _ in outputs]
        for v in vectors:
            grads = torch.autograd.grad(z, targets, grad_outputs=v, retain_graph=True, allow_unused=True)
            for call, ((name, _, used, batch), g) in enumerate(zip(outputs, grads)):
                if g is not None:
                    self._add_G(name, g, used, batch, call)
            for stats in self._pending.values():
                stats.end_backward()

    def _statistics(self, name: str) -> Statistics:
        """This step's accumulator of layer ``name``, created on first use."""
        if name not in self._pending:
            self._pending[name] = self.layers[name][0].statistics(self.factor_dtype)
        return self._pending[name]

    def _add_G(self, name: str, g: Tensor, used: int, batch: int, call: int) -> None:
        with self.timer.phase("statistics"), torch.autocast(device_type=g.device.type, enabled=False):
            self._statistics(name).add_output_grad(g[:used].detach(), self._loss_count * batch / used, call)

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:  # type: ignore[override]
        """One K-FAC update; with ``closure`` it first evaluates the loss and gradients (and may re-evaluate
        the loss for Levenberg–Marquardt damping)."""
        if self._mode_unset:
            self._resolve_mode(closure is not None)
        if closure is None and self.adaptive_damping:
            raise RuntimeError("KFAC(adaptive_damping=True) needs step(closure): the damping rule re-evaluates "
                               "the loss after the update (the automatic mode: adaptive_damping, adaptive_lr, "
                               "adaptive_momentum); without a closure, use the fixed-lr mode")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        checked = loss is not None and self.guards.rejection_ratio is not None
        with self.timer.phase("statistics"):
            self._statistics_pass()
            # the loss travels with the statistics (one all_reduce under data parallelism), before they are folded
            new, mean_loss = self._shared_statistics(loss if checked else None)
        # kept: a device boolean, false when the previous update blew the loss up and was undone; this step's
        # statistics and update, taken where it led, are then dropped (decided on the device, no host sync)
        kept = None if mean_loss is None else self.guards.judge_last_update(group["params"], self.state, mean_loss)
        with self.timer.phase("statistics"):
            self._fold_statistics(new, group["factor_decay"], kept)
        with self.timer.phase("inverses"):
            self._refresh_inverses(group)
        if self.adaptive_lr or self.adaptive_momentum or self.adaptive_damping:
            # the automatic modes spend their one host read per step here: a skipped or undone update raises λ
            # before the next step is sized (the fixed-lr mode reads nothing and reacts at inverse refreshes)
            self.guards.react(group, self.max_damping)

        params = [p for p in group["params"] if p.grad is not None]
        if params:
            wd = group["weight_decay"]
            grads = [p.grad + wd * p if wd else p.grad for p in params]
            with self.timer.phase("precondition"):
                direction = self._natural_direction(params, grads, group["damping"], wd)
            with self.timer.phase("update"):
                self._update(group, params, grads, direction, closure, loss, kept)
        self._steps += 1
        return loss

    def _resolve_mode(self, closure: bool) -> None:
        """At the first step of an optimizer whose mode was left unset: the automatic mode (Levenberg–Marquardt
        damping, quadratic-model lr and momentum) when called with a closure, the fixed-lr mode otherwise."""
        self.adaptive_damping = self.adaptive_lr = self.adaptive_momentum = closure
        self._mode_unset = False
        self._mode_by_default = closure

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], direction: list[Tensor],
                closure: Optional[Callable[[], Tensor]], loss: Optional[Tensor], kept: Optional[Tensor]) -> None:
        """δ = α Δ + μ δ_prev with α, μ fixed (and KL-clipped) or from the quadratic model (both device scalars in
        the automatic mode: nothing is read back); then Levenberg–Marquardt damping on its steps."""
        prev = [self.state[p].get("delta") for p in params]
        has_prev = all(d is not None for d in prev)
        quad = None
        if self.adaptive_lr or self.adaptive_momentum:
            try:
                quad, coeffs = self._solve_step(group, params, grads, direction, prev if has_prev else None)
            except quadratic.ForwardModeUnsupported as error:
                if not self._mode_by_default:
                    raise
                # the user asked for no mode: the one that needs only the backward pass trains this model
                warnings.warn(f"{error}. KFAC(model) was given no mode, so it continues in the fixed-lr mode "
                              f"(lr {group['lr']}, momentum {group['momentum']})", KFACWarning,
                              stacklevel=user_stacklevel())
                self.adaptive_damping = self.adaptive_lr = self.adaptive_momentum = False
                self._mode_by_default = False
                return self._update(group, params, grads, direction, closure, loss, kept)
            dtype = direction[0].dtype
            alpha = coeffs[0].to(dtype)
            mu = coeffs[1].to(dtype) if has_prev else None
        else:
            coeffs = None
            alpha = group["lr"] * self._kl_scale(group, grads, direction)
            mu = group["momentum"] if has_prev and group["momentum"] else None
        if kept is not None:  # no update where the previous one was undone (its momentum is zero already)
            alpha = alpha * kept
        # one fused call per operation over all parameters rather than two tensor ops per parameter
        update = torch._foreach_mul(direction, alpha)
        if mu is not None:
            torch._foreach_add_(update, torch._foreach_mul(prev, mu))
        applied = self.guards.apply(params, self.state, update)
        if self.adaptive_damping and self._adaptation_due():
            self._adapt_damping(group, closure, loss, params, grads, applied, quad, coeffs, kept)

    def _adaptation_due(self) -> bool:
        """Levenberg–Marquardt looks at every ``damping_adaptation_interval``-th step, and at every step while the
        trust region has not found its scale: the first interval (λ₀ is a guess; an unchecked first step from
        fresh factors multiplied a convnet's loss 100x) and after a step it undid, until one succeeds.  A miss
        then costs one evaluation, not a run of unchecked steps at a λ known to be too small."""
        steps = self._steps + 1
        if steps % self.damping_adaptation_interval == 0:
            return True
        # Martens & Grosse's schedule (damping_rule="martens", what stored recipes ran) looks at the interval only
        return self.damping_rule == "trust-region" and (steps <= self.damping_adaptation_interval
                                                        or self._lm_failures > 0)

    def _statistics_pass(self) -> None:
        """Forward the recorded first examples of the batch and run the sampled backward pass on them alone.

        Buffers are copies, so batch-norm running statistics see only the real forward pass.
        """
        if self._subset_inputs is None:
            return
        (args, kwargs), self._subset_inputs = self._subset_inputs, None
        params = dict(self.model.named_parameters())
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        self._in_statistics_pass = True
        try:
            with torch.enable_grad():
                torch.func.functional_call(self.model, {**params, **buffers}, args, kwargs, strict=False)
                self._on_output_grad(None)
        finally:
            self._in_statistics_pass = False

    def _shared_statistics(self, loss: Optional[Tensor]) -> tuple[dict[str, dict[str, Tensor]], Optional[Tensor]]:
        """This step's statistics and the closure's loss, averaged over the ranks in one call."""
        new = {name: stats.estimates(self._passes) for name, stats in self._pending.items()}
        self._pending, self._passes, self._outputs = {}, 0, []
        # in the factors' dtype, so that it shares their flat buffer (one all_reduce, not one per dtype)
        mean = None if loss is None else loss.detach().to(self.factor_dtype).reshape(1).clone()
        if self.data_parallel is not None:
            tensors = [t for estimates in new.values() for t in estimates.values()]
            if tensors or mean is not None:
                self.data_parallel.average(tensors + ([mean] if mean is not None else []))
        return new, mean

    def _fold_statistics(self, new: dict[str, dict[str, Tensor]], decay: float, kept: Optional[Tensor]) -> None:
        """Fold this step's (averaged) statistics into the moving averages; where ``kept`` is false (the step
        after an undone update) a decay of 1 leaves them as they were."""
        decay_used: Union[float, Tensor] = decay if kept is None else torch.where(kept, decay, 1.0)
        for name, estimates in new.items():
            self.layers[name][1].update(estimates, decay_used)
            if estimates:
                self._stale.add(name)

    def _refresh_inverses(self, group: dict[str, Any]) -> None:
        """Eigendecompose the factors every ``inv_update_freq`` steps, and as soon as a new layer has statistics.

        Factors that have not changed since their last decomposition are not decomposed again: with statistics
        rarer than inverses (``cov_update_freq`` > ``inv_update_freq``, which a search samples freely) most
        refreshes would recompute the same eigenbases.
        """
        due = self._steps % group["inv_update_freq"] == 0
        candidates = {name: b for name, (_, b) in self.layers.items()
                      if (due and name in self._stale) or not b.has_statistics}
        ready: dict[str, Any] = {}
        if candidates:
            is_ready = torch.stack([b.ready for b in candidates.values()]).tolist()  # one host sync
            ready = {name: b for (name, b), ok in zip(candidates.items(), is_ready) if ok}
        if ready:
            if self.data_parallel is None:
                blocks_mod.decompose(list(ready.values()))
            else:
                self.data_parallel.decompose(ready)
            for name in ready:
                self._scales.pop(name, None)
            self._stale.difference_update(ready)
        if due or ready:  # skipped and undone updates raise λ at every refresh, decomposed or not
            self.guards.react(group, self.max_damping)

    # ------------------------------------------------------------------------------------------------ damping
    def _curvature_scales(self) -> dict[str, float]:
        """Each decomposed block's curvature scale (mean eigenvalue), computed once per decomposition."""
        missing = [name for name, (_, b) in self.layers.items() if b.has_statistics and name not in self._scales]
        if missing:
            values = torch.stack([self.layers[n][1].curvature_scale().to(torch.float64) for n in missing]).tolist()
            for name, value in zip(missing, values):
                # a block whose curvature vanished is damped in absolute units
                self._scales[name] = value if math.isfinite(value) and value > 0 else 1.0
        return self._scales

    def _damping_weights(self, params: list[Tensor]) -> Optional[list[float]]:
        """The quadratic model's damping term per parameter: relative damping weighs each layer's ‖δ‖² by its
        curvature scale (the fallback parameters by the mean scale); absolute damping is ``λ‖δ‖²`` (None)."""
        if self.damping_scale != "relative":
            return None
        scales = self._curvature_scales()
        default = sum(scales.values()) / len(scales) if scales else 1.0
        return [scales.get(self._layer_of.get(id(p), ""), default) for p in params]

    def _natural_direction(self, params: list[Tensor], grads: list[Tensor], damping: float,
                           weight_decay: float) -> list[Tensor]:
        """Δ = −(F̂ + λD + ηI)⁻¹ g for K-FAC layers and −g for the fallback parameters (D: each block's curvature
        scale for relative damping, I for absolute)."""
        index = {id(p): i for i, p in enumerate(params)}
        direction = [-g for g in grads]
        scales = self._curvature_scales() if self.damping_scale == "relative" else {}
        for name, (helper, block) in self.layers.items():
            idx = [index.get(id(p)) for p in helper.params]
            if idx[0] is None or not block.has_statistics:
                continue
            mat = helper.as_matrix([grads[i] if i is not None else None for i in idx])
            block_damping = damping * scales.get(name, 1.0) + weight_decay
            pieces = helper.split(block.precondition(mat, block_damping, self.damping_mode))
            for i, piece in zip(idx, pieces):
                if i is not None:
                    direction[i] = -piece
        return direction

    def _kl_scale(self, group: dict[str, Any], grads: list[Tensor], direction: list[Tensor]) -> Any:
        """KL-clipping (norm constraint): a device scalar ≤ 1, or 1.0 when off."""
        if group["kl_clip"] is None:
            return 1.0
        products = torch._foreach_mul(direction, grads)
        vg = -torch.stack([fisher.wide(t).sum() for t in products]).sum() * group["lr"] ** 2
        return torch.clamp(torch.sqrt(group["kl_clip"] / vg.abs().clamp_min(1e-30)), max=1.0)

    def _solve_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], direction: list[Tensor],
        prev: Optional[list[Tensor]],
    ) -> tuple[quadratic.QuadraticModel, Tensor]:
        dirs = [direction] + ([prev] if prev is not None else [])
        qm = self._quadratic_model(params, grads, dirs, group["weight_decay"])
        fixed: dict[int, float] = {}
        if not self.adaptive_lr:
            fixed[0] = group["lr"]
        if prev is not None and not self.adaptive_momentum:
            fixed[1] = group["momentum"]
        return qm, qm.solve(group["damping"], fixed)

    def _quadratic_model(self, params: list[Tensor], grads: list[Tensor], dirs: list[list[Tensor]],
                         weight_decay: float) -> quadratic.QuadraticModel:
        if self._last_inputs is None:
            raise RuntimeError("KFAC: the automatic step size and damping need a forward pass of the model "
                               "with gradients enabled before step()")
        self._hooks_enabled = False
        try:
            return quadratic.build(self.model, self._last_inputs, self.loss, params, grads, dirs, weight_decay,
                                   average=None if self.data_parallel is None else self.data_parallel.average,
                                   damping_weights=self._damping_weights(params))
        finally:
            self._hooks_enabled = True

    def _adapt_damping(self, group: dict[str, Any], closure: Optional[Callable[[], Tensor]],
                       loss: Optional[Tensor], params: list[Tensor], grads: list[Tensor], update: list[Tensor],
                       quad: Optional[quadratic.QuadraticModel], coeffs: Optional[Tensor],
                       kept: Optional[Tensor]) -> None:
        """Levenberg–Marquardt: compare the loss change the update achieved with the one the model predicted.

        ``update`` is what the guards actually added (zeros for a skipped update), so undoing it can never write a
        non-finite value into the parameters.  The step's scalars come to the host in one read.
        """
        if closure is None or loss is None:
            raise RuntimeError("KFAC(adaptive_damping=True) needs step(closure): the damping rule re-evaluates "
                               "the loss after the update")
        if quad is None:
            quad = self._quadratic_model(params, grads, [update], group["weight_decay"])
            coeffs = torch.ones(1, dtype=torch.float64, device=update[0].device)
        predicted = quad.change(coeffs)
        # the re-evaluation is a measurement, not a training pass: batch-norm running statistics are put back
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self._hooks_enabled = False
        try:
            with torch.enable_grad():
                evaluated = closure()
        finally:
            self._hooks_enabled = True
            for b, saved in buffers:
                b.copy_(saved)
        wd = group["weight_decay"]
        l2 = torch.zeros((), dtype=torch.float64, device=predicted.device)
        if wd:
            l2 = 0.5 * wd * sum((p.double().square().sum() - (p - u).double().square().sum()
                                 for p, u in zip(params, update)), l2)
        applied = torch.ones((), dtype=torch.float64, device=predicted.device) if kept is None else kept.double()
        new_loss, old_loss = self._mean_over_ranks(evaluated, loss)  # the losses of the combined batch
        predicted, l2, applied = torch.stack([predicted, l2, applied]).tolist()
        if not applied:  # this step only dropped an update the blow-up guard undid: nothing to judge
            return
        actual = new_loss - old_loss + l2
        rho = actual / predicted if predicted < 0 else float("nan")
        rejected = not math.isfinite(new_loss) or actual > 0
        if rejected:
            # The update made this batch's objective worse (or non-finite): reject it. Parameters go back,
            # momentum restarts, and the damping grows below.
            for p, u in zip(params, update):
                p.sub_(u)
                self.state[p].pop("delta", None)
            self.lm_rejected_steps += 1
        if self.damping_rule == "trust-region":
            group["damping"], self._lm_failures = quadratic.trust_region_damping(
                group["damping"], rho if not rejected else float("nan"), self._lm_failures,
                self.min_damping, self.max_damping)
        else:
            group["damping"] = quadratic.new_damping(
                group["damping"], rho, self.damping_adaptation_decay, self.damping_adaptation_interval,
                self.min_damping, self.max_damping, boost=self.guards.damping_boost if rejected else None)
        self.last_rho = rho

    def _mean_over_ranks(self, *values: Union[Tensor, float]) -> list[float]:
        """Scalars (losses) averaged over the ranks: the combined batch's values, the same on every rank."""
        device = self.guards.skipped.device
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        if self.data_parallel is not None:
            self.data_parallel.average([stacked])
        return stacked.tolist()

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = {
            "steps": self._steps,
            "guards": self.guards.state_dict(),
            "lm_failures": self._lm_failures,
            "generator": None if self._generator is None else self._generator.get_state(),
            "blocks": {name: block.state_dict() for name, (_, block) in self.layers.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfac", None)
        if extra is not None:  # check before loading anything: a half-loaded optimizer fails only at its next step
            _check_same_layers(self.layers, extra["blocks"])
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self._steps = extra["steps"]
        self.guards.load_state_dict(extra["guards"])
        self._lm_failures = extra.get("lm_failures", 0)
        if extra["generator"] is not None and self._generator is not None:
            self._generator.set_state(extra["generator"])
        for name, (_, block) in self.layers.items():
            block.load_state_dict(extra["blocks"][name])
        self._stale = set(self.layers)  # as the run that saved it may have been: a repeat decomposition is the same


def _check_same_layers(layers: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``saved`` (a state dict's blocks) holds the same layers with the same factor
    shapes as ``layers``: a state saved for another architecture must fail at load, naming the difference."""
    if set(layers) != set(saved):
        missing, extra = sorted(set(layers) - set(saved)), sorted(set(saved) - set(layers))
        raise ValueError(f"KFAC state was saved for another model: layers missing from it {missing}, layers the "
                         f"model lacks {extra}")
    for name, (_, block) in layers.items():
        ours, theirs = _tensor_shapes(block.state_dict()), _tensor_shapes(saved[name])
        for key in ours.keys() & theirs.keys():
            if ours[key] != theirs[key]:
                raise ValueError(f"KFAC state was saved for another model: layer {name!r} factor {key} has shape "
                                 f"{list(theirs[key])} in the state, {list(ours[key])} in this model")


def _tensor_shapes(state: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``path -> shape`` of every tensor in a nested block state (dicts, lists, tensors, None)."""
    if isinstance(state, Tensor):
        return {prefix or "(tensor)": tuple(state.shape)}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in items:
        shapes.update(_tensor_shapes(value, f"{prefix}.{key}" if prefix else str(key)))
    return shapes


def _first_examples(args: tuple[Any, ...], kwargs: dict[str, Any], fraction: float
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's inputs cut to their first ``ceil(fraction × batch)`` examples (tensors' first dimension)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim() > 0]
    if not tensors:
        return args, kwargs
    used = max(1, math.ceil(fraction * tensors[0].shape[0]))
    cut = lambda a: a[:used].detach() if isinstance(a, Tensor) and a.dim() > 0 else a  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _temporal_mode(temporal: Union[str, Mapping[str, str]], name: str) -> str:
    """The temporal model of layer ``name``: the global one, or the longest matching name/prefix in the mapping."""
    if isinstance(temporal, str):
        modes = {"": temporal}
    else:
        modes = dict(temporal)
    for mode in modes.values():
        if mode not in TEMPORAL_MODES:
            raise ValueError(f"KFAC: temporal={mode!r}: expected one of {', '.join(TEMPORAL_MODES)}")
    matches = [key for key in modes if key in ("", name) or name.startswith(key + ".")]
    return modes[max(matches, key=len)] if matches else "independent"


