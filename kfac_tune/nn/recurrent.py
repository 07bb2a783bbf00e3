"""``LSTM`` and ``GRU``: drop-in for ``nn.LSTM``/``nn.GRU`` (same arguments, shapes and equations), K-FAC-visible.

Supported: ``input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0`` and batched or
unbatched inputs with an optional initial state; ``forward`` returns ``output, (h_n, c_n)`` (LSTM) or
``output, h_n`` (GRU) shaped as torch's.  Not supported: ``bidirectional``, ``proj_size``, packed sequences.
Parameters are named ``layers.<k>.ih.weight`` etc.; :meth:`load_torch_weights` copies a torch module's.

Cost: the recurrence is a Python loop over time steps (one small matmul and a few element-wise kernels per step)
instead of one fused kernel; ``benchmarks/rnn_speed.py`` measures the slowdown against torch's own module.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune.optim.temporal import mark_time_shared

State = Union[Tensor, tuple[Tensor, Tensor]]


class _Layer(nn.Module):
    """One recurrent layer: ``ih`` maps the input, ``hh`` the previous hidden state, to ``gates × hidden`` units."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool) -> None:
        super().__init__()
        self.ih = mark_time_shared(nn.Linear(input_size, gates * hidden_size, bias=bias))
        self.hh = mark_time_shared(nn.Linear(hidden_size, gates * hidden_size, bias=bias))
        bound = hidden_size**-0.5  # torch's init for every recurrent weight and bias
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class _Recurrent(nn.Module):
    """The loop over layers and time shared by LSTM and GRU; subclasses define one time step."""

    GATES = 0
    TORCH_TYPE: type[nn.RNNBase] = nn.RNNBase

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1 or input_size < 1:
            raise ValueError("input_size, hidden_size and num_layers must be positive integers")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.layers = nn.ModuleList(
            _Layer(input_size if k == 0 else hidden_size, hidden_size, self.GATES, bias) for k in range(num_layers))

    def _run(self, x: Tensor, states: list[tuple[Tensor, ...]]) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """``x``: ``(batch, time, features)``; ``states``: per layer, the tensors the step carries."""
        finals = []
        for k, (layer, state) in enumerate(zip(self.layers, states)):
            projected = layer.ih(x)  # the whole sequence in one product
            outputs = []
            for t in range(x.shape[1]):
                state = self._step(projected[:, t], layer.hh(state[0]), state)
                outputs.append(state[0])
            x = torch.stack(outputs, dim=1)
            if self.dropout and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
            finals.append(state)
        return x, finals

    def _step(self, xi: Tensor, hh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _layout(self, input: Tensor) -> tuple[Tensor, bool]:
        """The input as ``(batch, time, features)`` and whether it came without a batch axis."""
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: expected a 2-D (unbatched) or 3-D input, got {input.dim()}-D")
        unbatched = input.dim() == 2
        if unbatched:
            return input.unsqueeze(0), True
        return (input if self.batch_first else input.transpose(0, 1)), False

    def _output(self, x: Tensor, unbatched: bool) -> Tensor:
        if unbatched:
            return x.squeeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def _initial(self, h: Optional[Tensor], x: Tensor, unbatched: bool) -> Tensor:
        """An initial state ``(layers, batch, hidden)`` (zeros when not given)."""
        if h is None:
            return x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        return h.unsqueeze(1) if unbatched else h

    @torch.no_grad()
    def load_torch_weights(self, module: nn.RNNBase) -> None:
        """Copy the parameters of a torch ``nn.LSTM``/``nn.GRU`` with the same configuration."""
        if not isinstance(module, self.TORCH_TYPE) or module.bidirectional or module.proj_size:
            raise ValueError(f"expected a unidirectional {self.TORCH_TYPE.__name__} without projections")
        if (module.input_size, module.hidden_size, module.num_layers, module.bias) != (
                self.input_size, self.hidden_size, self.num_layers, self.bias):
            raise ValueError("the torch module's input_size, hidden_size, num_layers or bias differ")
        for k, layer in enumerate(self.layers):
            for side in ("ih", "hh"):
                linear = getattr(layer, side)
                linear.weight.copy_(getattr(module, f"weight_{side}_l{k}"))
                if self.bias:
                    linear.bias.copy_(getattr(module, f"bias_{side}_l{k}"))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


class LSTM(_Recurrent):
    """``nn.LSTM``'s equations (gates ``i, f, g, o`` in torch's order)."""

    GATES = 4
    TORCH_TYPE = nn.LSTM

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, unbatched = self._layout(input)
        h0, c0 = (None, None) if hx is None else hx
        h0, c0 = self._initial(h0, x, unbatched), self._initial(c0, x, unbatched)
        out, finals = self._run(x, [(h0[k], c0[k]) for k in range(self.num_layers)])
        h_n, c_n = (torch.stack([s[i] for s in finals]) for i in (0, 1))
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._output(out, unbatched), (h_n, c_n)

    def _step(self, xi: Tensor, hh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        i, f, g, o = (xi + hh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class GRU(_Recurrent):
    """``nn.GRU``'s equations (gates ``r, z, n``; the reset gate multiplies ``W_hn h + b_hn``, as torch does)."""

    GATES = 3
    TORCH_TYPE = nn.GRU

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        x, unbatched = self._layout(input)
        h0 = self._initial(hx, x, unbatched)
        out, finals = self._run(x, [(h0[k],) for k in range(self.num_layers)])
        h_n = torch.stack([s[0] for s in finals])
        return self._output(out, unbatched), (h_n.squeeze(1) if unbatched else h_n)

    def _step(self, xi: Tensor, hh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        xr, xz, xn = xi.chunk(3, dim=-1)
        hr, hz, hn = hh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * state[0],)
