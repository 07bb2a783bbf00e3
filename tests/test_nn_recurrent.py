"""kfac_tune.nn's LSTM and GRU against torch's modules with the same weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_tune import KFAC
from kfac_tune.nn import GRU, LSTM
from kfac_tune.optim.temporal import is_time_shared

PAIRS = [(LSTM, nn.LSTM), (GRU, nn.GRU)]


def _pair(ours_type, torch_type, **kw):
    torch.manual_seed(0)
    reference = torch_type(3, 5, **kw).double()
    ours = ours_type(3, 5, **kw).double()
    ours.load_torch_weights(reference)
    return ours, reference


def _assert_same_outputs(a, b) -> None:
    torch.testing.assert_close(a[0], b[0])
    states_a = a[1] if isinstance(a[1], tuple) else (a[1],)
    states_b = b[1] if isinstance(b[1], tuple) else (b[1],)
    for x, y in zip(states_a, states_b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("ours_type,torch_type", PAIRS)
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "batch_first": True}, {"bias": False, "num_layers": 2}])
def test_matches_torch_forward_and_gradients(ours_type, torch_type, kw) -> None:
    ours, reference = _pair(ours_type, torch_type, **kw)
    x = torch.randn(4, 2, 3, dtype=torch.float64)  # (time, batch) or (batch, time)
    out, ref = ours(x), reference(x)
    _assert_same_outputs(out, ref)
    (out[0].sum() + out[0].pow(2).mean()).backward()
    (ref[0].sum() + ref[0].pow(2).mean()).backward()
    for k in range(ours.num_layers):
        layer = ours.layers[k]
        torch.testing.assert_close(layer.ih.weight.grad, getattr(reference, f"weight_ih_l{k}").grad)
        torch.testing.assert_close(layer.hh.weight.grad, getattr(reference, f"weight_hh_l{k}").grad)
        if ours.bias:
            torch.testing.assert_close(layer.hh.bias.grad, getattr(reference, f"bias_hh_l{k}").grad)


@pytest.mark.parametrize("ours_type,torch_type", PAIRS)
def test_initial_state_and_unbatched_input(ours_type, torch_type) -> None:
    ours, reference = _pair(ours_type, torch_type, num_layers=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, 5, dtype=torch.float64)
    state = (h0, torch.randn_like(h0)) if ours_type is LSTM else h0
    _assert_same_outputs(ours(x, state), reference(x, state))
    single = x[:, 0]
    single_state = (h0[:, 0], state[1][:, 0]) if ours_type is LSTM else h0[:, 0]
    _assert_same_outputs(ours(single, single_state), reference(single, single_state))


def test_dropout_only_between_layers_and_only_in_training() -> None:
    ours, reference = _pair(LSTM, nn.LSTM, num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ours.eval()
    reference.eval()
    _assert_same_outputs(ours(x), reference(x))
    ours.train()
    assert not torch.allclose(ours(x)[0], reference(x)[0])


def test_weights_are_marked_time_shared_and_get_curvature() -> None:
    model = LSTM(3, 4, num_layers=2)
    assert all(is_time_shared(m) for m in model.modules() if isinstance(m, nn.Linear))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = model, nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0])

    opt = KFAC(Head(), temporal="option2")
    assert {n for n in opt.layers} == {"rnn.layers.0.ih", "rnn.layers.0.hh", "rnn.layers.1.ih",
                                       "rnn.layers.1.hh", "out"}


def test_load_torch_weights_rejects_a_different_configuration() -> None:
    with pytest.raises(ValueError, match="differ"):
        LSTM(3, 5).load_torch_weights(nn.LSTM(3, 6))
    with pytest.raises(ValueError, match="unidirectional"):
        LSTM(3, 5).load_torch_weights(nn.GRU(3, 5))
