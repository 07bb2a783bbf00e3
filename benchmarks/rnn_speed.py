"""Forward + backward time of kfac_tune.nn's unrolled LSTM/GRU against torch's fused modules.

    python benchmarks/rnn_speed.py [--device cpu|cuda] [--batch 32] [--steps 64] [--hidden 128] [--layers 1]

Prints one line per module: milliseconds per forward+backward for torch's module (cuDNN on a GPU, ATen's fused
CPU kernel otherwise) and the unrolled one, and their ratio: the price of letting K-FAC see the per-step products.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks._common import Stopwatch, median
from kfac_tune.nn import GRU, LSTM


def _time(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median seconds of one forward + backward."""
    def once() -> None:
        out = module(x)[0]
        out.sum().backward()

    for _ in range(3):
        once()
    times = []
    for _ in range(reps):
        with Stopwatch(x.device) as watch:
            once()
        times.append(watch.total)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.steps, args.input, device=device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} steps={args.steps} "
          f"input={args.input} hidden={args.hidden} layers={args.layers}")
    for ours_type, torch_type in ((LSTM, nn.LSTM), (GRU, nn.GRU)):
        reference = torch_type(args.input, args.hidden, args.layers, batch_first=True).to(device)
        ours = ours_type(args.input, args.hidden, args.layers, batch_first=True).to(device)
        ours.load_torch_weights(reference)
        fused, unrolled = _time(reference, x, args.reps), _time(ours, x, args.reps)
        print(f"{torch_type.__name__:5s} torch {1e3 * fused:8.2f} ms   unrolled {1e3 * unrolled:8.2f} ms   "
              f"ratio {unrolled / fused:5.2f}x")


if __name__ == "__main__":
    main()
