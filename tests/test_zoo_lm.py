"""The language-model workload: the offline text corpus, the lstm_lm architecture, and a run of the training loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kfac_tune import KFAC
from kfac_tune.config import load_config
from kfac_tune.training import train
from kfac_tune.zoo import build_model, load_dataset


def test_pydoc_text_windows_are_next_character_targets() -> None:
    data = load_dataset("pydoc_text", seq_len=16, train_size=50, test_size=10)
    assert data.train_x.shape == (50, 16) and data.train_y.shape == (50, 16) and data.test_x.shape == (10, 16)
    x, y = data.train_x.long(), data.train_y
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # consecutive windows
    assert int(x.max()) < data.num_classes and data.input_shape == (16,)
    assert "pydoc_data.topics" in data.source
    again = load_dataset("pydoc_text", seq_len=16, train_size=50, test_size=10)
    assert torch.equal(again.train_x, data.train_x)


def test_pydoc_text_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("pydoc_text", test_fraction=1.5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lstm_lm_gives_per_position_logits_and_every_layer_gets_curvature(cell: str) -> None:
    model = build_model("lstm_lm", input_shape=(12,), num_classes=30, embedding=8, hidden=16, cell=cell)
    x = torch.randint(0, 30, (4, 12)).float()
    assert model(x).shape == (4, 12, 30)
    opt = KFAC(model, temporal="option2")
    assert set(opt.layers) == {"embed", "rnn.layers.0.ih", "rnn.layers.0.hh", "decoder"}
    loss = F.cross_entropy(model(x).flatten(0, 1), x.long().roll(-1, 1).flatten())
    loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="sequence length"):
        build_model("lstm_lm", input_shape=(1, 8, 8), num_classes=30)


def test_the_training_loop_trains_the_language_model(tmp_path) -> None:
    path = tmp_path / "lm.yaml"
    path.write_text("""
model: {name: lstm_lm, kwargs: {embedding: 8, hidden: 16}}
data: {name: pydoc_text, kwargs: {seq_len: 16}, batch_size: 16, train_size: 64, test_size: 16}
training: {steps: 8, eval_every: 4, metric: eval_loss, threads: 1}
optimizer: {name: kfac, options: {temporal: option2}}
""")
    result = train(load_config(path), {"lr": 0.1, "damping": 0.1})
    losses = [point["eval_loss"] for point in result.curves]
    assert len(losses) == 2 and losses[-1] < losses[0] < 5.0
