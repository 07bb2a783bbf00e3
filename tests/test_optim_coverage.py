"""Which layers K-FAC covers: the layer registry, ``exclude``, tied weights, the coverage summary and its warning,
and the constructor's argument checks."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_tune
import kfac_tune.nn
from kfac_tune import KFAC, KFACWarning
from kfac_tune.optim import registry
from kfac_tune.optim.capture import LinearHelper
from tests.optim_support import exact_kfac


class Affine(nn.Module):
    """A user's own layer: ``x Wᵀ + b`` with its own parameters (not an ``nn.Linear``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.in_features = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries a test adds are gone after it."""
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))


def test_a_registered_user_layer_gets_an_exact_block(clean_registry: None, float64_default: None) -> None:
    """One ``register_layer`` entry gives a user's module a Kronecker block (exported as kfac_tune.register_layer,
    usable as a decorator); on least squares its exact-Fisher step lands on the minimiser, as nn.Linear's does."""
    model = nn.Sequential(Affine(4, 2))
    assert "0" not in KFAC(nn.Sequential(Affine(4, 2), nn.Linear(2, 2))).layers  # unknown type: fallback

    @kfac_tune.register_layer(Affine)
    class AffineHelper(LinearHelper):
        pass

    assert registry.registered_layers()[Affine] is AffineHelper
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=1e-10, min_damping=1e-12, damping_mode="exact",
                     adaptive_lr=True)
    assert isinstance(opt.layers["0"][0], AffineHelper)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    X = torch.cat([x, torch.ones(32, 1)], dim=1)
    minimum = F.mse_loss(X @ torch.linalg.lstsq(X, y).solution, y)
    assert float(F.mse_loss(model(x), y).detach()) == pytest.approx(float(minimum), rel=1e-6)


def test_a_registered_entry_wins_over_the_base_class_and_refuses_non_modules(clean_registry: None) -> None:
    class NoCurvatureLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(3, 3), NoCurvatureLinear(3, 2))
    assert set(KFAC(model).layers) == {"0", "1"}  # a subclass gets its base's entry
    kfac_tune.register_layer(NoCurvatureLinear, lambda module: None)
    opt = KFAC(model)
    assert set(opt.layers) == {"0"}
    assert "NoCurvatureLinear: no curvature block for its type" in str(opt.coverage)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        kfac_tune.register_layer(int, LinearHelper)


def _named(**children: nn.Module) -> nn.Module:
    model = nn.Module()
    for name, child in children.items():
        model.add_module(name, child)
    return model


def test_exclude_given_one_string_means_that_name() -> None:
    """A string is one entry (it was iterated character by character, so nothing was excluded)."""
    model = _named(encoder=nn.Linear(3, 4), head=nn.Linear(4, 2))
    assert set(KFAC(model, exclude="head").layers) == {"encoder"}
    assert set(KFAC(model, exclude=None).layers) == {"encoder", "head"}
    assert set(KFAC(_named(a=nn.Linear(3, 3), b=nn.Conv1d(3, 3, 1)), exclude="Conv1d").layers) == {"a"}


def test_an_exclude_entry_that_matches_nothing_is_refused_listing_the_modules() -> None:
    model = _named(fc1=nn.Linear(3, 4), fc2=nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        KFAC(model, exclude=["fc"])
    message = str(err.value)
    assert "exclude entry 'fc' matches no module" in message and "'fc1' (Linear)" in message
    assert "'fc2' (Linear)" in message
    with pytest.raises(ValueError, match="matches no module"):
        KFAC(model, exclude=[nn.Conv2d])
    with pytest.raises(ValueError, match="matches no module"):
        KFAC(model, exclude=[nn.Linear(3, 4)])  # a module that is not the model's


def test_exclude_by_class_name_prefix_instance_and_type() -> None:
    model = _named(block=nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), head=nn.Linear(3, 2))
    assert set(KFAC(model, exclude="block").layers) == {"head"}  # a prefix covers the submodules
    assert set(KFAC(model, exclude=[model.head]).layers) == {"block.0", "block.1"}
    assert set(KFAC(model, exclude=["block.1"]).layers) == {"block.0", "head"}
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(model, exclude="Linear")


class TiedTwice(nn.Module):
    """``tanh(W x)`` then ``W`` again through a second module that holds the same parameters."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_a_weight_shared_by_two_modules_gets_one_block_fed_by_both_uses(float64_default: None) -> None:
    """Two nn.Linear holding one weight and bias: one block whose statistics sum over both uses, exactly those of
    one module called twice (tf-kfac's multi-use registration), whichever module is registered first; before,
    one use's block was computed and discarded depending on registration order."""
    torch.manual_seed(1)
    x, y = torch.randn(9, 3), torch.randint(0, 3, (9,))

    def run(tied: bool, swap: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(2)
        first = nn.Linear(3, 3)
        second = nn.Linear(3, 3)
        second.weight, second.bias = first.weight, first.bias
        model = TiedTwice(first, second if tied else first)
        if swap:  # the second use registered first
            model = TiedTwice(first, second)
            model._modules = dict(reversed(list(model._modules.items())))
        opt = exact_kfac(model, fisher="exact", loss="cross_entropy")
        assert len(opt.layers) == 1
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _, block = next(iter(opt.layers.values()))
        return list(block.factors()), first.weight.detach().clone()

    once_twice, tied, swapped = run(False, False), run(True, False), run(True, True)
    for reference, other in ((once_twice, tied), (once_twice, swapped)):
        for a, b in zip(reference[0], other[0]):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(reference[1], other[1])
    # the factors are both uses' statistics: A's rows are x and tanh(W x) together (W as initialised in run)
    torch.manual_seed(2)
    first = nn.Linear(3, 3)
    rows = torch.cat([x, torch.tanh(first(x)).detach()])
    rows = torch.cat([rows, torch.ones(len(rows), 1)], dim=1)
    torch.testing.assert_close(once_twice[0][0], rows.T @ rows / len(rows))


def test_tied_weights_of_different_layer_types_are_refused_naming_both() -> None:
    """A tied embedding and output layer: their blocks have transposed structures (no one Kronecker block covers
    both uses), so K-FAC refuses, naming the modules and the exclude that trains the weight first-order."""
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.embed(tokens)))

    model = TiedLM()
    with pytest.raises(ValueError) as err:
        KFAC(nn.Sequential(model, nn.Flatten()))
    message = str(err.value)
    assert "'0.embed' (Embedding)" in message and "'0.out' (Linear)" in message
    assert "exclude=['0.embed', '0.out']" in message
    with pytest.raises(ValueError, match="shared by the modules"):  # one use excluded: still one use's curvature
        KFAC(model, exclude=["out"])
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(model, exclude=["embed", "out"])


def test_coverage_summary_names_the_fallback_and_warns_about_torch_recurrent_layers(caplog) -> None:
    """One line says what gets curvature and what falls back (logged at INFO: quiet by default); a torch GRU,
    whose weights K-FAC cannot see, gets a KFACWarning naming the drop-in that it can."""
    class GRUClassifier(nn.Module):
        def __init__(self, recurrent: nn.Module) -> None:
            super().__init__()
            self.rnn, self.head = recurrent, nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch_gru = GRUClassifier(nn.GRU(4, 8, batch_first=True))
    with caplog.at_level(logging.INFO, logger="kfac_tune.optim"), pytest.warns(KFACWarning) as warned:
        opt = KFAC(torch_gru)
    summary = str(opt.coverage)
    assert summary.startswith("KFAC: curvature for 1 layer (2 tensors, ")
    assert "first-order fallback for 4 tensors: rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 and 1 more " \
           "(GRU: no curvature block for its type)" in summary
    assert set(opt.coverage.fallback) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}
    assert summary in caplog.text
    assert len(warned) == 1 and "'rnn' is a torch GRU" in str(warned[0].message)
    assert "kfac_tune.nn.GRU" in str(warned[0].message)
    assert warned[0].filename == __file__  # points at the user's line

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        visible = KFAC(GRUClassifier(kfac_tune.nn.GRU(4, 8, batch_first=True)))
        KFAC(torch_gru, exclude="rnn")  # an exclusion says the user knows
    assert str(visible.coverage) == "KFAC: curvature for 3 layers (6 tensors, 100% of parameters); no first-order " \
                                    "fallback"


@pytest.mark.parametrize("kwargs,message", [
    (dict(factor_decay=None), "factor_decay must be in [0, 1), got None (NoneType)"),
    (dict(momentum="0.9"), "momentum must be in [0, 1), got '0.9'"),
    (dict(lr="0.1"), "lr must be a finite number > 0, got '0.1'"),
    (dict(weight_decay="0.1"), "weight_decay must be a finite number >= 0, got '0.1' (str)"),
    (dict(inv_update_freq=None), "inv_update_freq must be an integer >= 1"),
    (dict(max_damping=None), "max_damping must be a finite number > 0, got None"),
    (dict(lr=1e308), "lr=1e+308 is too large to be used"),
    (dict(lr=1e160), "lr=1e+160 is too large to be used"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        KFAC(nn.Linear(3, 2), **kwargs)
    assert message in str(err.value)


def test_numpy_scalars_are_accepted_as_plain_numbers() -> None:
    opt = KFAC(nn.Linear(3, 2), inv_update_freq=np.int64(5), cov_update_freq=np.int32(2), lr=np.float32(0.5),
               damping=np.float64(1e-2))
    group = opt.param_groups[0]
    assert group["inv_update_freq"] == 5 and type(group["inv_update_freq"]) is int
    assert type(group["lr"]) is float and type(group["cov_update_freq"]) is int


def test_one_logit_under_the_default_cross_entropy_asks_for_the_loss() -> None:
    """``loss`` defaults to cross-entropy (documented); a regression model that forgot to name its loss has one
    output per row, where cross-entropy has no curvature: its first forward pass says which loss to name."""
    model = nn.Sequential(nn.Linear(3, 1))
    KFAC(model)
    with pytest.raises(ValueError, match="loss='mse'"):
        model(torch.randn(4, 3))
    regression = nn.Sequential(nn.Linear(3, 1))
    KFAC(regression, loss="mse")
    assert regression(torch.randn(4, 3)).shape == (4, 1)


def test_a_layer_without_a_block_for_its_configuration_falls_back_with_the_reason() -> None:
    model = nn.Sequential(nn.ConvTranspose1d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5))  # materialise the lazy layer
    opt = KFAC(model)
    assert set(opt.layers) == {"2"}
    assert opt.coverage.fallback == {"0.weight": "ConvTranspose1d: grouped transposed convolution (groups=2)",
                                     "0.bias": "ConvTranspose1d: grouped transposed convolution (groups=2)"}


def test_attention_output_projection_is_reported_as_fallback_not_as_curvature() -> None:
    """nn.MultiheadAttention uses out_proj's weight without calling out_proj, so no statistic ever reaches a block:
    the summary says the projection falls back, instead of counting it among the layers with curvature."""
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    opt = KFAC(Attend())
    assert set(opt.layers) == {"head"}
    reason = opt.coverage.fallback["attention.out_proj.weight"]
    assert "output projection, applied without calling its forward" in reason
    assert opt.coverage.fallback["attention.in_proj_weight"] == "MultiheadAttention: no curvature block for its type"
