"""The automatic modes' quadratic model (``kfac_tune.optim.quadratic.build``: two Jacobian-vector products and the
inner products of M&G §7), this checkout's against another revision's, timed interleaved in one process.

Workloads: the networks of the shipped automatic-mode recipes, at the number of examples their ``stat_fraction``
gives the quadratic model (the digits MLP, 65 of 512; the digits autoencoder, 154 of 1024; the Fashion-MNIST
autoencoder, 70 of 500). The other revision's ``quadratic.py`` and ``fisher.py`` are read with ``git show`` and
loaded as modules of their own; the two take the same inputs in alternating order, ``--reps`` rounds of ``--calls``
calls each, and the median per-call time of each is reported with their ratio (this / base, < 1: faster).

    PYTHONPATH=. python benchmarks/quadratic_model.py --base HEAD~1
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from benchmarks._common import format_table, machine_line, median
from kfac_tune.optim import quadratic

WORKLOADS = {  # name: (layer widths, activation, loss, examples in the quadratic model)
    "digits_mlp": ((64, 64, 64, 10), nn.ReLU, "cross_entropy", 65),
    "digits_autoencoder": ((64, 32, 16, 4, 16, 32, 64), nn.Sigmoid, "mse", 154),
    "fashion_mnist_autoencoder": ((784, 128, 32, 8, 32, 128, 784), nn.Sigmoid, "bce", 70),
}


def revision_module(revision: str, folder: Path) -> ModuleType:
    """``quadratic`` as it is at ``revision``, importing that revision's ``fisher`` (its own output-side forms)."""
    modules = {}
    for name in ("fisher", "quadratic"):
        source = subprocess.run(["git", "show", f"{revision}:kfac_tune/optim/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        path = folder / f"base_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"base_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        modules[name] = module
    modules["quadratic"].fisher = modules["fisher"]
    return modules["quadratic"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1", help="the git revision to compare against")
    parser.add_argument("--reps", type=int, default=7, help="rounds, alternating which version goes first")
    parser.add_argument("--calls", type=int, default=100, help="calls per version per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        base = revision_module(args.base, Path(folder))
        rows = []
        for name, (widths, activation, loss, examples) in WORKLOADS.items():
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(fan_in, fan_out), activation()]
            model = nn.Sequential(*layers[:-1])
            params = list(model.parameters())
            grads = [torch.randn_like(p) for p in params]
            directions = [[torch.randn_like(p) for p in params] for _ in range(2)]  # Δ and δ_prev
            inputs = ((torch.randn(examples, widths[0]),), {})
            times: dict[str, list[float]] = {"this": [], "base": []}
            for rep in range(args.reps):
                order = [("this", quadratic), ("base", base)]
                for label, module in order if rep % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        module.build(model, inputs, loss, params, grads, directions, 0.0)
                    times[label].append((time.perf_counter() - start) / args.calls * 1e3)
            this, then = median(times["this"]), median(times["base"])
            rows.append([name, examples, f"{then:.2f}", f"{this:.2f}", f"{this / then:.2f}"])
    print(machine_line(torch.device("cpu")))
    print(f"quadratic.build, this checkout against {args.base}: median ms per call over {args.reps} rounds")
    print(format_table(["workload", "examples", f"{args.base} ms", "this ms", "ratio"], rows))


if __name__ == "__main__":
    main()
