"""K-FAC as a user meets it: both call forms, checkpoints, bad input, non-finite updates, adaptation, speed-up."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune import KFAC


def _mlp(seed: int = 0, inplace: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 10))


def _closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_closure_and_backward_forms_agree(digits) -> None:
    x, y = digits[0][:256], digits[1][:256]
    m1, m2 = _mlp(), _mlp()
    o1, o2 = KFAC(m1, lr=0.05, seed=0), KFAC(m2, lr=0.05, seed=0)
    for _ in range(5):
        o1.step(_closure(m1, o1, x, y))
        o2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


def test_state_dict_round_trip_resumes_exactly(digits, tmp_path) -> None:
    x, y = digits[0][:256], digits[1][:256]
    model = _mlp()
    opt = KFAC(model, lr=0.05, inv_update_freq=3, seed=1, adaptive_damping=True)
    for _ in range(4):
        opt.step(_closure(model, opt, x, y))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    for _ in range(6):
        opt.step(_closure(model, opt, x, y))

    restored = _mlp(seed=99)
    ropt = KFAC(restored, lr=0.05, inv_update_freq=3, seed=123, adaptive_damping=True)
    ckpt = torch.load(path, weights_only=False)
    restored.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    for _ in range(6):
        ropt.step(_closure(restored, ropt, x, y))
    for p, q in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(p, q)
    assert ropt.param_groups[0]["damping"] == opt.param_groups[0]["damping"]


def test_factors_unchanged_since_their_decomposition_are_not_decomposed_again(digits, monkeypatch) -> None:
    """Inverses every step but statistics every 4th: the eigenbases are recomputed only on the steps that brought
    new statistics, and training is bitwise what inverses every 4th step give (the same factors, the same bases)."""
    from kfac_tune.optim.blocks import KroneckerBlock

    x, y = digits[0][:256], digits[1][:256]
    decomposed_at: list[int] = []
    set_decomposition = KroneckerBlock.set_decomposition

    def counted(block: KroneckerBlock, *tensors: torch.Tensor) -> None:
        decomposed_at.append(opt._steps)
        set_decomposition(block, *tensors)

    monkeypatch.setattr(KroneckerBlock, "set_decomposition", counted)
    trained = {}
    for inv_update_freq in (1, 4):
        model = _mlp()
        opt = KFAC(model, lr=0.05, seed=0, inv_update_freq=inv_update_freq, cov_update_freq=4)
        for _ in range(10):
            opt.step(_closure(model, opt, x, y))
        trained[inv_update_freq] = [p.detach().clone() for p in model.parameters()]
        assert sorted(set(decomposed_at)) == [0, 4, 8] and len(decomposed_at) == 3 * len(opt.layers)
        decomposed_at.clear()
    assert all(torch.equal(a, b) for a, b in zip(trained[1], trained[4]))


def test_float64_factors_survive_a_checkpoint_of_a_float32_model(digits) -> None:
    model = _mlp()
    opt = KFAC(model, factor_dtype=torch.float64)
    opt.step(_closure(model, opt, digits[0][:64], digits[1][:64]))
    ropt = KFAC(_mlp(), factor_dtype=torch.float64)
    ropt.load_state_dict(opt.state_dict())
    block = next(iter(ropt.layers.values()))[1]
    assert block.A.dtype == torch.float64 and block.QA is not None and block.QA.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss="hinge"), "loss='hinge' is not supported"),
        (dict(fisher="sampled"), "fisher='sampled'"),
        (dict(damping=float("nan")), "damping must be a finite number > 0"),
        (dict(damping=float("inf")), "damping must be a finite number > 0"),
        (dict(lr=-1.0), "lr must be a finite number > 0"),
        (dict(inv_update_freq=-5), "inv_update_freq must be an integer >= 1"),
        (dict(cov_update_freq=0), "cov_update_freq must be an integer >= 1"),
        (dict(inv_update_freq=2.5), "inv_update_freq must be an integer >= 1"),
        (dict(momentum=1.0), "momentum must be in [0, 1)"),
        (dict(factor_decay=1.5), "factor_decay must be in [0, 1)"),
        (dict(kl_clip=0.0), "kl_clip must be a finite number > 0"),
        (dict(damping_mode="diag"), "damping_mode='diag'"),
        (dict(stat_fraction=0.0), "stat_fraction must be in (0, 1]"),
    ],
)
def test_bad_hyperparameters_get_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        KFAC(_mlp(), **kwargs)
    assert message in str(err.value)


def test_model_without_supported_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(nn.Sequential(nn.Linear(4, 4, bias=False), nn.PReLU(4)), exclude=[nn.Linear])
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), exclude=[nn.Embedding, nn.LayerNorm])
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(_mlp(), exclude=[nn.Linear])


def test_non_tensor_output_is_explained() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    model = TupleOut()
    KFAC(model)
    with pytest.raises(TypeError, match="output to be the tensor the loss is computed from"):
        model(torch.randn(4, 3))


def test_lm_damping_needs_a_closure(digits) -> None:
    model = _mlp()
    opt = KFAC(model, adaptive_damping=True, damping_adaptation_interval=1)
    F.cross_entropy(model(digits[0][:32]), digits[1][:32]).backward()
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()


def test_non_finite_update_is_skipped_and_damping_raised(digits) -> None:
    x, y = digits[0][:128], digits[1][:128]
    model = _mlp()
    opt = KFAC(model, lr=0.05, inv_update_freq=2)
    opt.step(_closure(model, opt, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")  # a corrupt input: NaN loss, NaN gradients, NaN statistics
    opt.step(_closure(model, opt, bad_x, y))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "a non-finite update must not touch the parameters"
    assert opt.skipped_steps == 1
    damping = opt.param_groups[0]["damping"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(_closure(model, opt, x, y))  # the next inverse refresh reports it
    assert any("skipped 1 non-finite update" in str(w.message) for w in caught)
    assert opt.param_groups[0]["damping"] == pytest.approx(damping * 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for _, block in opt.layers.values():
        A, G = block.factors()
        assert torch.isfinite(A).all() and torch.isfinite(G).all()


@pytest.mark.parametrize("rule, shrink", [("trust-region", 1 / 3), ("martens", 0.9)])
def test_levenberg_marquardt_shrinks_damping_when_the_model_is_exact(rule: str, shrink: float) -> None:
    """Least squares with the exact Fisher: the quadratic model is the objective, so ρ = 1 and λ shrinks, at each
    of the first interval's steps (both are evaluated): by 3 per evaluation (trust-region rule) or by ω = 0.9²
    per adaptation interval (Martens & Grosse's rule)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    opt = KFAC(model, lr=0.5, momentum=0.0, damping=1.0, fisher="exact", loss="mse", damping_mode="exact",
               adaptive_damping=True, damping_adaptation_interval=2, damping_adaptation_decay=0.9, inv_update_freq=1,
               damping_rule=rule)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert 0.75 < opt.last_rho <= 1.0 + 1e-4
    expected = shrink**2  # trust region: two evaluations of 1/3; M&G: one adaptation of ω = 0.9²
    assert opt.param_groups[0]["damping"] == pytest.approx(expected)


def test_levenberg_marquardt_rejects_a_step_that_blows_up(digits) -> None:
    x, y = digits[0][:128], digits[1][:128]
    model = _mlp()
    # no trust region and no update-size guard: the blown-up step must reach Levenberg–Marquardt
    opt = KFAC(model, lr=1e6, momentum=0.0, adaptive_damping=True, damping_adaptation_interval=1, kl_clip=None,
               max_update_ratio=None)
    damping = opt.param_groups[0]["damping"]
    before = F.cross_entropy(model(x), y).item()
    opt.step(_closure(model, opt, x, y))
    after = F.cross_entropy(model(x), y).item()
    assert opt.param_groups[0]["damping"] == pytest.approx(damping * 2)  # the first miss in a row doubles λ
    assert opt.lm_rejected_steps == 1
    assert math.isfinite(after) and after < 10 * before + 10


def test_fallback_parameters_are_trained(digits) -> None:
    """Excluded (or unsupported) layers get the documented first-order update in the same step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
    opt = KFAC(model, lr=0.05, exclude=[nn.LayerNorm])
    assert set(opt.layers) == {"0", "3"}
    norm_before = model[1].weight.detach().clone()
    for _ in range(3):
        opt.step(_closure(model, opt, digits[0][:128], digits[1][:128]))
    assert not torch.equal(model[1].weight, norm_before)


def test_excluded_modules_fall_back(digits) -> None:
    model = _mlp()
    opt = KFAC(model, exclude=["2"])
    assert set(opt.layers) == {"0"}
    opt.step(_closure(model, opt, digits[0][:64], digits[1][:64]))


def test_statistics_follow_cov_update_freq_and_stat_fraction(digits) -> None:
    x, y = digits[0][:100], digits[1][:100]
    model = _mlp()
    opt = KFAC(model, cov_update_freq=2, stat_fraction=0.25, factor_decay=0.5, fisher="empirical")
    block = opt.layers["0"][1]
    opt.step(_closure(model, opt, x, y))
    rows = x[:25]
    torch.testing.assert_close(block.factors()[0][:64, :64], rows.T @ rows / 25)
    weight = block.A_weight.clone()
    opt.step(_closure(model, opt, x, y))  # step 1: no statistics
    assert torch.equal(block.A_weight, weight)
    opt.step(_closure(model, opt, x, y))  # step 2: statistics again
    assert not torch.equal(block.A_weight, weight)


def test_kl_clip_bounds_the_update(digits) -> None:
    x, y = digits[0][:128], digits[1][:128]

    def first_step_norm(kl_clip) -> float:
        model = _mlp()
        opt = KFAC(model, lr=10.0, kl_clip=kl_clip, seed=0, max_update_ratio=None)  # kl_clip alone
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        opt.step(_closure(model, opt, x, y))
        return float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before).norm())

    assert first_step_norm(1e-4) < 0.5 * first_step_norm(None)


def test_factors_stay_float32_for_a_bfloat16_model(digits) -> None:
    model = _mlp().to(torch.bfloat16)
    opt = KFAC(model, lr=0.05)
    x = digits[0][:64].to(torch.bfloat16)
    opt.step(_closure(model, opt, x, digits[1][:64]))
    block = opt.layers["0"][1]
    assert block.A.dtype == torch.float32 and block.QA is not None and block.QA.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_conv_model_trains(digits) -> None:
    torch.manual_seed(0)
    x, y = digits[0][:256].reshape(-1, 1, 8, 8), digits[1][:256]
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    opt = KFAC(model, lr=0.05, damping=0.1)
    losses = [float(opt.step(_closure(model, opt, x, y))) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def _digits_autoencoder() -> nn.Module:
    """64-32-16-4-16-32-64 sigmoid autoencoder: small, but deep enough for the curvature to matter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 16), nn.Sigmoid(), nn.Linear(16, 4),
                         nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 64))


def _steps_to_target(make_opt, x: torch.Tensor, target: float, budget: int) -> int:
    model = _digits_autoencoder()
    opt = make_opt(model)
    for step in range(1, budget + 1):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), x)
            loss.backward()
            return loss

        loss = float(opt.step(closure))
        if not math.isfinite(loss):
            return budget + 1
        if loss <= target:
            return step
    return budget + 1


def test_kfac_needs_far_fewer_iterations_than_tuned_adam(digits) -> None:
    """Full-batch digits autoencoder: iterations to a reconstruction MSE of 0.03, Adam at its best of 4 rates.

    K-FAC runs as in Martens & Grosse: Levenberg–Marquardt damping and quadratic-model learning rate and
    momentum, so no learning rate is tuned for it at all.
    """
    x = digits[0]
    target, budget = 0.03, 800
    adam = min(
        _steps_to_target(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr), x, target, budget)
        for lr in (3e-3, 1e-2, 3e-2, 1e-1)
    )
    kfac = _steps_to_target(
        lambda m: KFAC(m, loss="mse", damping=1e-2, adaptive_damping=True, adaptive_lr=True,
                       adaptive_momentum=True, seed=0),
        x, target, budget)
    assert adam <= budget, "the baseline must reach the target for the ratio to mean anything"
    assert kfac * 3 <= adam, f"K-FAC {kfac} iterations vs Adam {adam}"


def test_subset_statistics_pass_equals_statistics_of_the_subset(digits) -> None:
    """stat_fraction with the sampled/exact Fisher: a separate pass over the first examples gives exactly the
    factors of a batch made of those examples, and batch-norm running statistics see only the real pass."""
    x, y = digits[0][:64], digits[1][:64]

    def factors(batch_x: torch.Tensor, batch_y: torch.Tensor, fraction: float) -> tuple[list, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))
        opt = KFAC(model, fisher="exact", stat_fraction=fraction, factor_dtype=torch.float64)
        opt.step(_closure(model, opt, batch_x, batch_y))
        model.train()
        return [t for name in ("0", "3") for t in opt.layers[name][1].factors()], model[1].running_mean

    subset, running = factors(x, y, 0.25)
    alone, _ = factors(x[:16], y[:16], 1.0)
    for a, b in zip(subset, alone):
        torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16))
    reference(x)
    torch.testing.assert_close(running, reference[1].running_mean)


def test_levenberg_marquardt_never_writes_a_skipped_update_into_the_parameters(digits) -> None:
    """A non-finite update is not applied; rejecting it on a damping-adaptation step must not subtract it either."""
    x, y = digits[0][:128], digits[1][:128]
    model = _mlp()
    opt = KFAC(model, lr=0.05, adaptive_damping=True, damping_adaptation_interval=1)
    opt.step(_closure(model, opt, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    opt.step(_closure(model, opt, bad_x, y))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


class _Square(torch.autograd.Function):
    """A custom operation written the classic way (``forward(ctx, x)``, no ``setup_context``, no ``jvp``):
    reverse-mode autograd runs it, ``torch.func`` transforms refuse it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _WithCustomOperation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_Square.apply(torch.tanh(self.hidden(x))))


def test_a_model_without_forward_derivatives_gets_a_clear_error_in_the_automatic_modes_only(digits) -> None:
    """The automatic modes need the model's Jacobian-vector products by forward-mode autograd. A model one of whose
    operations lacks them gets an error that names the modes, keeps torch's reason and points to the fixed-lr mode,
    which (as every first-order optimizer) needs only the backward pass and trains the same model."""
    x, y = digits[0][:256], digits[1][:256]
    model = _WithCustomOperation()
    automatic = KFAC(model, loss="cross_entropy", adaptive_lr=True, adaptive_momentum=True, adaptive_damping=True)
    with pytest.raises(RuntimeError,
                       match=r"automatic modes .* forward-mode autograd .* implement the jvp .* fixed-lr mode"):
        automatic.step(_closure(model, automatic, x, y))
    automatic.close()

    model = _WithCustomOperation()
    fixed = KFAC(model, loss="cross_entropy", lr=0.01)
    first = float(fixed.step(_closure(model, fixed, x, y)))
    for _ in range(30):
        last = float(fixed.step(_closure(model, fixed, x, y)))
    assert last < 0.7 * first and fixed.skipped_steps == 0


def test_a_model_without_forward_derivatives_continues_in_the_fixed_lr_mode_when_no_mode_was_asked_for(digits
                                                                                                    ) -> None:
    """KFAC(model) under step(closure) picks the automatic mode by itself; on a model whose operations lack forward
    derivatives it says so once (KFACWarning) and continues in the fixed-lr mode, which trains the model."""
    from kfac_tune import KFACWarning

    x, y = digits[0][:256], digits[1][:256]
    model = _WithCustomOperation()
    opt = KFAC(model, loss="cross_entropy")
    with pytest.warns(KFACWarning, match="continues in the fixed-lr mode"):
        first = float(opt.step(_closure(model, opt, x, y)))
    assert not (opt.adaptive_lr or opt.adaptive_momentum or opt.adaptive_damping)
    for _ in range(30):
        last = float(opt.step(_closure(model, opt, x, y)))
    assert last < 0.7 * first and opt.skipped_steps == 0


@pytest.mark.parametrize("closure_form", [True, False])
def test_the_mode_left_unset_follows_the_call(digits, closure_form: bool) -> None:
    """No lr, momentum or adaptive_* given: step(closure) runs the automatic mode, step() the fixed-lr one (lr 0.01,
    momentum 0.9); giving lr asks for the fixed-lr mode even under step(closure)."""
    x, y = digits[0][:128], digits[1][:128]
    model = _mlp()
    opt = KFAC(model, loss="cross_entropy")
    closure = _closure(model, opt, x, y)
    if closure_form:
        opt.step(closure)
    else:
        closure()
        opt.step()
    assert opt.adaptive_lr == opt.adaptive_momentum == opt.adaptive_damping == closure_form
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (0.01, 0.9)
    given = KFAC(_mlp(), loss="cross_entropy", lr=0.05)
    given.step(_closure(given.model, given, x, y))
    assert not given.adaptive_lr and given.param_groups[0]["lr"] == 0.05


def test_adaptive_damping_without_a_closure_errs_before_any_update(digits) -> None:
    """The Levenberg–Marquardt rule re-evaluates the loss, so it needs step(closure): asked for and stepped without
    one, K-FAC says so at the first step, before anything is applied (it used to apply four updates and raise at the
    fifth)."""
    x, y = digits[0][:128], digits[1][:128]
    model = _mlp()
    opt = KFAC(model, loss="cross_entropy", adaptive_damping=True)
    before = [p.detach().clone() for p in model.parameters()]
    _closure(model, opt, x, y)()
    with pytest.raises(RuntimeError, match=r"adaptive_damping=True\) needs step\(closure\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
