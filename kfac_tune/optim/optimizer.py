"""The public K-FAC optimizer.

``KFAC(model, ...)`` finds the model's supported layers (``nn.Linear``, convolutions, ``nn.Embedding``,
``nn.LayerNorm``, batch norm, and whatever :func:`~kfac_tune.optim.registry.register_layer` adds;
:mod:`kfac_tune.optim.coverage`), hooks them to collect curvature statistics, and on ``step()`` replaces their
gradient by the damped natural gradient ``(F̂ + λI)⁻¹ ∇h``.  Every other trainable parameter (unsupported or excluded modules) takes the plain gradient in the same update, so it is
trained by the same momentum/step-size rule: the documented first-order fallback.  ``opt.coverage`` says which
parameters get which (one line by ``str()``, also logged at INFO level by the ``kfac_tune.optim`` logger).

Safe by default (each default below is a constructor argument, recorded by recipes; ``kl_clip=None`` plus
:attr:`KFAC.LEGACY` is the optimizer before these defaults, ``benchmarks/robustness.py`` compares the two):

- a trust region: ``kl_clip=1e-3`` bounds the fixed-``lr`` step's ``α² Δᵀ(F̂+λ)Δ`` (tf-kfac's norm constraint,
  kfac-pytorch's default);
- an update-size guard: an update with ``‖δ‖ > max_update_ratio · ‖θ‖`` (1.0) is treated like a non-finite one:
  not applied (decided on the device), and λ grows;
- with ``step(closure)``, the loss after each update is looked at when the next closure returns it: above
  ``max(rejection_ratio × running mean, first loss)`` the update is undone (Martens & Grosse §6.5 reject steps on
  adaptation steps only; here any step, at no extra forward pass, one step late);
- every skipped or rejected step multiplies λ by ``damping_boost`` (10) at once, and so does Levenberg–Marquardt
  when ρ < 0, instead of 1/ω ≈ 1.29 per adaptation, which needed dozens of adaptations to recover from a λ₀ orders
  of magnitude too small;
- ``damping_scale="relative"`` (opt-in) expresses λ in units of each block's curvature scale (the mean eigenvalue
  of A⊗G; π-damping then adds √λ·mean(A) and √λ·mean(G) to the factors), so one value means the same at any loss
  scale.  The default stays ``"absolute"``: with the mean-reduced loss convention absolute damping already means the
  same at any batch size, and relative damping shrinks with the curvature as a classifier grows confident, which
  let the steps grow large in parameter space on the digits MLP (measured; see ``benchmarks/RESULTS.md``).

Hot path: with a fixed learning rate and no closure the step performs no host synchronisation: damping, π, KL-clip and the
non-finite guard all stay on the device.  Only inverse refreshes (every ``inv_update_freq`` steps), Levenberg–
Marquardt adaptation and the automatic learning rate/momentum (which need scalars from the quadratic model)
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
import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kfac_tune.optim import blocks as blocks_mod
from kfac_tune.optim import fisher, quadratic
from kfac_tune.optim.distributed import DataParallel, resolve_group, unwrap
from kfac_tune.optim.blocks import DAMPING_MODES
from kfac_tune.optim.callsite import KFACWarning, user_stacklevel
from kfac_tune.optim.capture import LayerHelper
from kfac_tune.optim.coverage import Exclude, find_layers
from kfac_tune.optim.statistics import Statistics
from kfac_tune.optim.temporal import TEMPORAL_MODES
from kfac_tune.optim.profiling import PhaseTimer

FISHER_TYPES = ("true", "empirical", "exact")


class KFAC(torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) for a PyTorch model.

    Args:
        model: the network; its output must be the tensor the loss is computed from.  A
            ``DistributedDataParallel`` model is unwrapped: layer names, ``exclude`` and checkpoints are those of
            its ``.module``.
        lr: step size α (ignored when ``adaptive_lr``; then it is chosen each step by the quadratic model).
        damping: Tikhonov damping λ added to the curvature (see ``damping_mode`` and ``damping_scale``).
        momentum: μ in ``δ = α Δ + μ δ_prev`` (ignored when ``adaptive_momentum``).
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
            (KL-clipping, as tf-kfac's norm constraint and kfac-pytorch's ``kl_clip``; 1e-3 is their default).  The
            automatic modes ignore it, as kfac-jax does: their quadratic model already sizes the step.  None: off.
        damping_mode: ``"pi"`` (factored Tikhonov) or ``"exact"`` (eigenbasis); see :mod:`kfac_tune.optim.blocks`.
        adaptive_damping: Levenberg–Marquardt adaptation of λ every ``damping_adaptation_interval`` steps; needs
            ``step(closure)``.  On those steps an update that increases the batch loss is rejected (undone).
        adaptive_lr, adaptive_momentum: choose α and/or μ each step by minimising the exact quadratic model.
        damping_scale: ``"absolute"`` (λ as given) or ``"relative"`` (λ times each block's mean eigenvalue of
            A⊗G, in the preconditioner and in the quadratic model's damping term).
        damping_boost: factor λ is multiplied by at once after a skipped or rejected update (None: the legacy rule,
            ×10 at the next inverse refresh for non-finite updates, LM's 1/ω for rejected ones).
        max_update_ratio: skip an update larger than this times the weights' norm (every entry counted as at
            least 1e-2 in RMS); None: off.
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

    # The tunable hyperparameters; their defaults are the constructor's signature (``KFAC.defaults()``), the single
    # truth that the search's default point and recipes read.
    HYPERPARAMETERS = (
        "lr",
        "damping",
        "momentum",
        "factor_decay",
        "inv_update_freq",
        "cov_update_freq",
        "weight_decay",
        "kl_clip",
    )

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
        kl_clip = resolve_kl_clip(kl_clip, loss)
        # with lr, momentum and the adaptation flags left unset, step(closure) runs the automatic mode and a step
        # without a closure the fixed-lr one (decided at the first step: _resolve_mode)
        self._mode_unset = _mode_is_unset(lr, momentum, adaptive_damping, adaptive_lr, adaptive_momentum)
        self._mode_by_default = False  # the automatic mode was chosen by step(closure), not asked for
        defaults = dict(
            lr=FIXED_LR if lr is None else lr,
            damping=damping,
            momentum=FIXED_MOMENTUM if momentum is None else momentum,
            factor_decay=factor_decay,
            inv_update_freq=inv_update_freq,
            cov_update_freq=cov_update_freq,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
        )
        defaults = _validate(defaults, min_damping=min_damping, max_damping=max_damping)
        fisher_check(loss, fisher, damping_mode, stat_fraction, damping_adaptation_interval,
                     damping_adaptation_decay)
        if damping_rule not in quadratic.DAMPING_RULES:
            raise ValueError(f"KFAC: damping_rule={damping_rule!r}: expected one of "
                             f"{', '.join(quadratic.DAMPING_RULES)}")
        _validate_safety(damping_scale, damping_boost, max_update_ratio, rejection_ratio)
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
        self.damping_scale, self.damping_boost = damping_scale, damping_boost
        self.max_update_ratio, self.rejection_ratio = max_update_ratio, rejection_ratio
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
        self._skipped = torch.zeros((), dtype=torch.long, device=device)
        self._skipped_seen = 0
        self.rejected_steps = 0
        self.lm_rejected_steps = 0
        self._loss_reference: Optional[float] = None  # running mean of accepted steps' losses (rejection_ratio)
        self._loss_initial: Optional[float] = None  # the first loss seen: a loss above it means divergence
        self._scales: dict[str, float] = {}  # curvature scale of each block's decomposition (relative damping)
        self._stale: set[str] = set()  # layers whose factors changed since their last decomposition
        # every trainable parameter's share of ‖θ‖² that max_update_ratio counts at least: RMS 1e-2 per entry
        self._weight_floor = 1e-4 * sum(p.numel() for p in params)
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

    # Everything that decides what a given ``damping`` or ``lr`` means: recipes store all of it, because values do
    # not transfer across conventions (damping mode, Fisher type, adaptation rules).
    CONVENTIONS = (
        "loss",
        "fisher",
        "temporal",
        "damping_mode",
        "adaptive_damping",
        "adaptive_lr",
        "adaptive_momentum",
        "damping_adaptation_interval",
        "damping_adaptation_decay",
        "damping_rule",
        "min_damping",
        "max_damping",
        "stat_fraction",
        "damping_scale",
        "damping_boost",
        "max_update_ratio",
        "rejection_ratio",
    )

    # What the conventions added after recipe format 1 was first written meant before they existed: arguments
    # stored without them (a recipe, a trial) are completed with these, not with today's defaults, so that they
    # still reproduce.  ``KFAC(model, **LEGACY)`` with kl_clip=None is the optimizer before the safe defaults.
    LEGACY = {
        "damping_scale": "absolute",
        "damping_boost": None,
        "max_update_ratio": None,
        "rejection_ratio": None,
        "damping_rule": "martens",
    }

    # ---------------------------------------------------------------------------------------- stored arguments
    @classmethod
    def complete_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` with every hyperparameter and convention filled in from the constructor's defaults, the
        loss-dependent ``kl_clip="auto"`` resolved for the loss they name (a store holds what ran)."""
        complete = {**cls.defaults(), **arguments}
        complete["kl_clip"] = resolve_kl_clip(complete["kl_clip"], arguments.get("loss", complete["loss"]))
        # stores describe runs with step(closure) (the tool's loop, a recipe's): unset, that is the automatic mode
        automatic = _mode_is_unset(*(complete[k] for k in ("lr", "momentum", "adaptive_damping", "adaptive_lr",
                                                            "adaptive_momentum")))
        for flag in ("adaptive_damping", "adaptive_lr", "adaptive_momentum"):
            complete[flag] = automatic if complete[flag] is None else complete[flag]
        complete["lr"] = FIXED_LR if complete["lr"] is None else complete["lr"]
        complete["momentum"] = FIXED_MOMENTUM if complete["momentum"] is None else complete["momentum"]
        return complete

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every hyperparameter and convention with its default: the constructor's signature is the only truth."""
        import inspect

        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name in cls.HYPERPARAMETERS + cls.CONVENTIONS}

    @classmethod
    def stored_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments read back from a store (a recipe): complete ones written before a convention in
        :attr:`LEGACY` existed get its old meaning pinned, so that they reproduce what was run."""
        arguments = dict(arguments)
        # complete_arguments writes every hyperparameter and convention; a complete store that lacks a convention
        # was written before that convention existed, and gets what it meant then
        if set(cls.HYPERPARAMETERS) <= set(arguments):
            arguments = {**{k: v for k, v in cls.LEGACY.items() if k not in arguments}, **arguments}
        return arguments

    def close(self) -> None:
        """Detach the optimizer's hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # rejected_steps (an attribute): updates undone because the loss after them blew up (rejection_ratio);
    # lm_rejected_steps: updates the Levenberg–Marquardt trust region undid (ρ ≤ 0 on its adaptation steps, the
    # rule working as meant: one evaluation each)

    @property
    def skipped_steps(self) -> int:
        """Updates that were not applied because they were not finite or would have exploded the weights
        (``max_update_ratio``); synchronises."""
        return int(self._skipped.item())

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
        checked = loss is not None and not (self.damping_boost is None and self.rejection_ratio is None)
        with self.timer.phase("statistics"):
            self._statistics_pass()
            # the loss travels with the statistics (one all_reduce under data parallelism), before they are folded
            new, mean_loss = self._shared_statistics(loss if checked else None)
        if mean_loss is not None and self._reject_last_update(group, mean_loss):
            self._steps += 1  # this step's statistics, taken where the rejected update led, are dropped
            return loss
        with self.timer.phase("statistics"):
            self._fold_statistics(new, group["factor_decay"])
        with self.timer.phase("inverses"):
            self._refresh_inverses(group)

        params = [p for p in group["params"] if p.grad is not None]
        if params:
            wd = group["weight_decay"]
            grads = [p.grad + wd * p if wd else p.grad for p in params]
            with self.timer.phase("precondition"):
                direction = self._natural_direction(params, grads, group["damping"], wd)
            with self.timer.phase("update"):
                self._update(group, params, grads, direction, closure, loss)
        self._steps += 1
        return loss

    def _resolve_mode(self, closure: bool) -> None:
        """At the first step of an optimizer whose mode was left unset: the automatic mode (Levenberg–Marquardt
        damping, quadratic-model lr and momentum) when called with a closure, the fixed-lr mode otherwise."""
        self.adaptive_damping = self.adaptive_lr = self.adaptive_momentum = closure
        self._mode_unset = False
        self._mode_by_default = closure

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], direction: list[Tensor],
                closure: Optional[Callable[[], Tensor]], loss: Optional[Tensor]) -> None:
        """δ = α Δ + μ δ_prev with α, μ fixed (and KL-clipped) or from the quadratic model; then LM damping."""
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
                return self._update(group, params, grads, direction, closure, loss)
            alpha, mu = coeffs[0], (coeffs[1] if has_prev else 0.0)
        else:
            alpha = group["lr"] * self._kl_scale(group, grads, direction)
            mu = group["momentum"] if has_prev else 0.0
        # one fused call per operation over all parameters rather than two tensor ops per parameter
        update = torch._foreach_mul(direction, alpha)
        if mu:
            torch._foreach_add_(update, prev, alpha=float(mu))
        applied = self._apply(params, update)
        if self.adaptive_damping and self._adaptation_due():
            self._adapt_damping(group, closure, loss, params, grads, applied, quad, (alpha, mu), has_prev)

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

    def _shared_statistics(self, loss: Optional[Tensor]) -> tuple[dict[str, dict[str, Tensor]], Optional[float]]:
        """This step's statistics and the closure's loss, averaged over the ranks in one call."""
        new = {name: stats.estimates(self._passes) for name, stats in self._pending.items()}
        self._pending, self._passes, self._outputs = {}, 0, []
        # in the factors' dtype, so that it shares their flat buffer (one all_reduce, not one per dtype)
        mean = None if loss is None else loss.detach().to(self.factor_dtype).reshape(1).clone()
        if self.data_parallel is not None:
            tensors = [t for estimates in new.values() for t in estimates.values()]
            if tensors or mean is not None:
                self.data_parallel.average(tensors + ([mean] if mean is not None else []))
        return new, None if mean is None else float(mean)

    def _fold_statistics(self, new: dict[str, dict[str, Tensor]], decay: float) -> None:
        """Fold this step's (averaged) statistics into the moving averages."""
        for name, estimates in new.items():
            self.layers[name][1].update(estimates, decay)
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
        if due or ready:  # skipped updates raise λ at every refresh, whether or not anything was decomposed
            self._react_to_skips(group)

    # ------------------------------------------------------------------------------------------------ safety
    def _raise_damping(self, group: dict[str, Any], why: str) -> None:
        """λ × ``damping_boost`` (×10 for the legacy rule), with a warning that says why."""
        new = min(group["damping"] * (self.damping_boost or 10.0), self.max_damping)
        warnings.warn(f"K-FAC {why}; raising damping from {group['damping']:.3g} to {new:.3g}", KFACWarning,
                      stacklevel=user_stacklevel())
        group["damping"] = new

    def _react_to_skips(self, group: dict[str, Any]) -> None:
        """Raise λ for the updates skipped since the last look (one host synchronisation)."""
        skipped = int(self._skipped.item())
        if skipped > self._skipped_seen:
            self._raise_damping(group, f"skipped {skipped - self._skipped_seen} non-finite update(s) (or update(s) "
                                       "that would have exploded the weights: max_update_ratio)")
            self._skipped_seen = skipped

    def _reject_last_update(self, group: dict[str, Any], value: float) -> bool:
        """With a closure, look at the previous update as soon as the loss after it is known: True when it is
        rejected (undone; this step's gradient, taken where it led, is then not used).

        The loss is this batch's, the reference a running mean of the losses after accepted updates; the bound is
        ``max(rejection_ratio × reference, first loss)``: a step that multiplied the loss *and* left the model worse
        than where training started.  The second condition keeps late training, where a batch's loss can be
        several times the running mean by noise alone, free of false rejections.  A non-finite loss rejects nothing (bad data gives one too): its non-finite update is
        skipped.  Skipped updates raise λ here rather than at the next inverse refresh.  The legacy rule
        (``damping_boost`` and ``rejection_ratio`` None) looks only at refreshes and Levenberg–Marquardt steps.
        """
        self._react_to_skips(group)
        reference = self._loss_reference
        deltas = [self.state[p].get("delta") for p in group["params"]]
        if (self.rejection_ratio is not None and reference is not None and any(d is not None for d in deltas)
                and math.isfinite(value) and value > max(self.rejection_ratio * reference, self._loss_initial)):
            for p, delta in zip(group["params"], deltas):
                if delta is not None:
                    p.sub_(delta)
                    del self.state[p]["delta"]
            self.rejected_steps += 1
            self._raise_damping(group, f"rejected an update that raised the loss to {value:.3g} (running mean "
                                       f"{reference:.3g}, rejection_ratio {self.rejection_ratio})")
            return True
        if math.isfinite(value):
            self._loss_reference = value if reference is None else 0.9 * reference + 0.1 * value
            if self._loss_initial is None:
                self._loss_initial = value
        return False

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
    ) -> tuple[quadratic.QuadraticModel, list[float]]:
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

    def _apply(self, params: list[Tensor], update: list[Tensor]) -> list[Tensor]:
        """Add the update unless any entry is non-finite or ‖δ‖ > ``max_update_ratio`` ‖θ‖ (decided on the device,
        no synchronisation); return what was added, which is also the momentum for the next step.

        ‖θ‖² counts every entry as at least 1e-2 in RMS, so that weights initialised at zero can move.
        """
        total = torch.stack(torch._foreach_norm(update)).to(torch.float64).square().sum()
        finite = torch.isfinite(total)
        if self.max_update_ratio is not None:
            weights = torch.stack(torch._foreach_norm(params)).to(torch.float64).square().sum()
            finite &= total <= self.max_update_ratio ** 2 * (weights + self._weight_floor)
        self._skipped += (~finite).long()
        applied = [torch.where(finite, u, torch.zeros_like(u)) for u in update]
        for p, safe in zip(params, applied):
            p.add_(safe)
            self.state[p]["delta"] = safe
        return applied

    def _adapt_damping(self, group: dict[str, Any], closure: Optional[Callable[[], Tensor]],
                       loss: Optional[Tensor], params: list[Tensor], grads: list[Tensor], update: list[Tensor],
                       quad: Optional[quadratic.QuadraticModel], coeffs: tuple[Any, float], has_prev: bool) -> None:
        """Levenberg–Marquardt: compare the loss change the update achieved with the one the model predicted.

        ``update`` is what ``_apply`` actually added (zeros for a skipped non-finite update), so undoing it can
        never write a non-finite value into the parameters.
        """
        if closure is None or loss is None:
            raise RuntimeError("KFAC(adaptive_damping=True) needs step(closure): the damping rule re-evaluates "
                               "the loss after the update")
        if quad is None:
            quad = self._quadratic_model(params, grads, [update], group["weight_decay"])
            predicted = quad.change([1.0])
        else:
            predicted = quad.change([float(coeffs[0]), float(coeffs[1])] if has_prev else [float(coeffs[0])])
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
        new_loss, old_loss = self._mean_over_ranks(evaluated, loss)
        wd = group["weight_decay"]
        l2 = 0.0
        if wd:
            l2 = 0.5 * wd * sum(float((p.float() ** 2).sum() - ((p - u).float() ** 2).sum())
                                for p, u in zip(params, update))
        actual = new_loss - old_loss + l2
        rho = actual / predicted if predicted < 0 else float("nan")
        rejected = not math.isfinite(new_loss) or actual > 0
        if rejected:
            # The update made this batch's objective worse (or non-finite): reject it. Parameters go back,
            # momentum restarts, and the damping grows below (at once by damping_boost).
            for p, u in zip(params, update):
                p.sub_(u)
                self.state[p].pop("delta", None)
            self.lm_rejected_steps += 1
        if self.damping_rule == "trust-region":
            group["damping"], self._lm_failures = quadratic.trust_region_damping(
                group["damping"], rho if not rejected else float("nan"), self._lm_failures,
                self.damping_adaptation_interval, self.min_damping, self.max_damping)
        else:
            group["damping"] = quadratic.new_damping(
                group["damping"], rho, self.damping_adaptation_decay, self.damping_adaptation_interval,
                self.min_damping, self.max_damping, boost=self.damping_boost if rejected else None)
        self.last_rho = rho

    def _mean_over_ranks(self, *values: Union[Tensor, float]) -> list[float]:
        """Scalars (losses) averaged over the ranks: the combined batch's values, the same on every rank."""
        stacked = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._skipped.device)
        if self.data_parallel is not None:
            self.data_parallel.average([stacked])
        return stacked.tolist()

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = {
            "steps": self._steps,
            "skipped": self._skipped.clone(),
            "skipped_seen": self._skipped_seen,
            "lm_failures": self._lm_failures,
            "loss_reference": self._loss_reference,
            "loss_initial": self._loss_initial,
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
        self._skipped = extra["skipped"].to(self._skipped.device)
        self._skipped_seen = extra["skipped_seen"]
        self._lm_failures = extra.get("lm_failures", 0)
        self._loss_reference = extra.get("loss_reference")
        self._loss_initial = extra.get("loss_initial")
        if extra["generator"] is not None and self._generator is not None:
            self._generator.set_state(extra["generator"])
        for name, (_, block) in self.layers.items():
            block.load_state_dict(extra["blocks"][name])
        self._stale = set(self.layers)  # as the run that saved it may have been: a repeat decomposition is the same


KL_CLIP = 1e-3  # tf-kfac's and kfac-pytorch's default bound, in nats
FIXED_LR, FIXED_MOMENTUM = 0.01, 0.9  # the fixed-lr mode's step size and momentum when not given


def _mode_is_unset(lr: Optional[float], momentum: Optional[float], *flags: Optional[bool]) -> bool:
    """True when nothing chose the mode: no lr, no momentum, and every adaptation flag unset (None)."""
    return lr is None and momentum is None and all(flag is None for flag in flags)


def resolve_kl_clip(kl_clip: Union[float, str, None], loss: str) -> Optional[float]:
    """``"auto"``: KL-clipping at 1e-3 nats for the losses whose KL is unit-free (a categorical or Bernoulli output
    distribution: ``cross_entropy``, ``bce``), off for ``mse``.  The "KL" of a unit-variance Gaussian is in the
    targets' squared units, so no single bound means the same on every regression, and a Gauss-Newton step has a
    KL of half the loss: 1e-3 shrank it 4,000x on targets of scale 100 (measured, issue 24), while the bound never
    fired on the MSE workloads it was meant to guard (the digits autoencoder: identical runs with and without)."""
    if kl_clip == "auto":
        return None if loss == "mse" else KL_CLIP
    if isinstance(kl_clip, str):
        raise ValueError(f"KFAC: kl_clip={kl_clip!r}: expected a number > 0, None (off) or 'auto'")
    return kl_clip


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


# what each hyperparameter must be: (integer?, test, wording of the test)
_POSITIVE = (False, lambda v: v > 0, "a finite number > 0")
_FRACTION = (False, lambda v: 0 <= v < 1, "in [0, 1)")
_STEPS = (True, lambda v: v >= 1, "an integer >= 1 (a number of steps)")
_RULES = {
    "lr": _POSITIVE, "damping": _POSITIVE, "min_damping": _POSITIVE, "max_damping": _POSITIVE,
    "momentum": _FRACTION, "factor_decay": _FRACTION,
    "inv_update_freq": _STEPS, "cov_update_freq": _STEPS,
    "weight_decay": (False, lambda v: v >= 0, "a finite number >= 0"),
    "kl_clip": (False, lambda v: v > 0, "a finite number > 0 (or None: off)"),
}


def _validate(h: dict[str, Any], *, min_damping: float, max_damping: float) -> dict[str, Any]:
    """Reject hyperparameters that would make K-FAC silently misbehave, each error naming its argument; return
    them as plain Python numbers (numpy scalars are accepted: a search or a config reader may hand them over)."""
    def check(name: str, value: Any) -> Any:
        integer, test, wording = _RULES[name]
        if value is None and name == "kl_clip":
            return None
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"KFAC: {name} must be {wording}, got {value!r} ({type(value).__name__})")
        value = int(value) if integer else float(value)
        if not (math.isfinite(value) and test(value)):
            raise ValueError(f"KFAC: {name} must be {wording}, got {value!r}")
        return value

    h = {name: check(name, value) for name, value in h.items()}
    min_damping, max_damping = check("min_damping", min_damping), check("max_damping", max_damping)
    if not math.isfinite(h["lr"] * h["lr"]):
        # the trust region squares lr: beyond ~1.3e154 that overflows a float (OverflowError at the first step)
        raise ValueError(f"KFAC: lr={h['lr']!r} is too large to be used (its square overflows a float); "
                         "a learning rate that large would skip every update anyway")
    if not (min_damping <= h["damping"] <= max_damping):
        raise ValueError(f"KFAC: damping {h['damping']!r} is outside [min_damping, max_damping] = "
                         f"[{min_damping}, {max_damping}]")
    return h


DAMPING_SCALES = ("relative", "absolute")


def _validate_safety(damping_scale: str, boost: Optional[float], max_update_ratio: Optional[float],
                     rejection_ratio: Optional[float]) -> None:
    if damping_scale not in DAMPING_SCALES:
        raise ValueError(f"KFAC: damping_scale={damping_scale!r}: expected one of {', '.join(DAMPING_SCALES)}")
    for name, value, low in (("damping_boost", boost, 1), ("max_update_ratio", max_update_ratio, 0),
                             ("rejection_ratio", rejection_ratio, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= low):
            raise ValueError(f"KFAC: {name} must be None (off) or a finite number > {low}, got {value!r}")


def fisher_check(loss: str, fisher_type: str, damping_mode: str, stat_fraction: float, interval: int,
                 decay: float) -> None:
    fisher.check_loss(loss)
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"KFAC: fisher={fisher_type!r} is not supported: expected one of {', '.join(FISHER_TYPES)}")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"KFAC: damping_mode={damping_mode!r}: expected one of {', '.join(DAMPING_MODES)}")
    if not (0 < stat_fraction <= 1):
        raise ValueError(f"KFAC: stat_fraction must be in (0, 1], got {stat_fraction!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"KFAC: damping_adaptation_interval must be an integer >= 1, got {interval!r}")
    if not (0 < decay < 1):
        raise ValueError(f"KFAC: damping_adaptation_decay must be in (0, 1), got {decay!r}")
