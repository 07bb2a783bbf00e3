"""Curvature of embeddings and normalisation layers against exact computations, in float64 on tiny networks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune import KFAC
from tests.optim_support import exact_kfac
from kfac_tune.optim.layers import DiagonalInputBlock, UnitwiseBlock


pytestmark = pytest.mark.usefixtures("float64_default")


def _exact_ggn(model: nn.Module, x: torch.Tensor, loss_fn) -> torch.Tensor:
    """``Jᵀ (∇²_z h) J`` over all parameters (in ``named_parameters`` order), by autograd."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    jac = torch.autograd.functional.jacobian(f, params)
    z = model(x).detach()
    J = torch.cat([j.reshape(z.numel(), -1) for j in jac], dim=1)
    H = torch.autograd.functional.hessian(loss_fn, z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


def _param_slices(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def test_supported_layers_get_curvature_by_default_and_exclude_still_wins() -> None:
    model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(3),
                          nn.Flatten(), nn.Linear(12, 2))
    opt = KFAC(model)
    assert set(opt.layers) == {"0", "1", "2", "3", "5"}
    assert isinstance(opt.layers["0"][1], DiagonalInputBlock)
    assert isinstance(opt.layers["1"][1], UnitwiseBlock) and isinstance(opt.layers["3"][1], UnitwiseBlock)
    assert set(KFAC(model, exclude=["0", nn.LayerNorm, nn.BatchNorm1d]).layers) == {"2", "5"}
    assert "1" not in KFAC(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False))).layers


def test_embedding_factors_are_token_frequencies_and_output_gradient_moments() -> None:
    """A = diag(token counts / rows): the exact E[a aᵀ] of one-hot rows; G = N Σ_rows g gᵀ (empirical)."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3)
    model = nn.Sequential(emb, nn.Linear(3, 4))
    x, y = torch.randint(0, 6, (5, 2)), torch.randint(0, 4, (5, 2))
    s = emb(x).detach().requires_grad_(True)
    (ds,) = torch.autograd.grad(F.cross_entropy(model[1](s).reshape(-1, 4), y.reshape(-1)), [s])
    opt = exact_kfac(model, fisher="empirical")
    F.cross_entropy(model(x).reshape(-1, 4), y.reshape(-1)).backward()
    opt.step()
    onehot = F.one_hot(x.reshape(-1), 6).double()
    A, G = opt.layers["0"][1].averages["A"], opt.layers["0"][1].averages["G"]
    torch.testing.assert_close(torch.diag(A), onehot.T @ onehot / 10)
    g = ds.reshape(-1, 3)
    torch.testing.assert_close(G, 10 * g.T @ g)


def test_embedding_update_equals_exact_natural_gradient() -> None:
    """An embedding read by an MSE loss: G is constant, so diag(A) ⊗ G is the exact GGN; the step solves it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(5, 3))
    x, y = torch.randint(0, 5, (9,)), torch.randn(9, 3)
    damping = 1e-3
    ggn = _exact_ggn(model, x, lambda z: F.mse_loss(z, y))
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=damping, damping_mode="exact")
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = model[0].weight.grad.reshape(-1).clone()
    before = model[0].weight.detach().clone()
    opt.step()
    expected = -torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0]), grad)
    torch.testing.assert_close((model[0].weight.detach() - before).reshape(-1), expected)


def test_embedding_pi_damping_equals_solve_on_the_damped_kronecker_product() -> None:
    block = DiagonalInputBlock(4, 3, torch.device("cpu"), torch.float64)
    rows = torch.randn(10, 3)
    block.update({"A": torch.tensor([0.5, 0.3, 0.2, 0.0]), "G": rows.T @ rows}, 0.9)
    block.decompose()
    A, G = torch.diag(block.averages["A"]), block.averages["G"]
    damping = 0.04
    pi = ((A.trace() / 4) / (G.trace() / 3)).sqrt()
    Ad, Gd = A + pi * damping**0.5 * torch.eye(4), G + damping**0.5 / pi * torch.eye(3)
    grad = torch.randn(3, 4)
    expected = torch.linalg.solve(torch.kron(Ad, Gd), grad.T.reshape(-1)).reshape(4, 3).T
    torch.testing.assert_close(block.precondition(grad, damping, "pi"), expected)


def _norm_case(kind: str) -> tuple[nn.Module, torch.Tensor, str]:
    torch.manual_seed(2)
    if kind == "layernorm":
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(6, 3), "1"
    if kind == "layernorm_no_bias":
        return (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, bias=False), nn.Tanh(), nn.Linear(4, 3)),
                torch.randn(6, 3), "1")
    if kind == "batchnorm1d":
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(6, 3), "1"
    if kind.startswith("layernorm_frozen_"):  # a fine-tuning set-up: γ or β frozen
        model, x, name = _norm_case("layernorm")
        getattr(model[1], kind.rsplit("_", 1)[1]).requires_grad_(False)
        return model, x, name
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    return model, torch.randn(6, 1, 5, 5), "1"


@pytest.mark.parametrize("kind", ["layernorm", "layernorm_no_bias", "batchnorm1d", "batchnorm2d",
                                  "layernorm_frozen_weight", "layernorm_frozen_bias"])
def test_unitwise_blocks_equal_the_exact_ggn_blocks(kind: str) -> None:
    """Exact Fisher, one loss term per example: unit c's block is the (γ_c, β_c) block of the exact GGN, or the
    1×1 block of the one that is trainable."""
    model, x, name = _norm_case(kind)
    y = torch.randint(0, 3, (x.shape[0],))
    ggn = _exact_ggn(model, x, lambda z: F.cross_entropy(z, y))
    opt = exact_kfac(model, fisher="exact")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    where = _param_slices(model)
    norm = getattr(model, name)
    index = [where[f"{name}.{p}"] for p in ("weight", "bias")
             if getattr(norm, p) is not None and getattr(norm, p).requires_grad]
    block = opt.layers[name][1].averages["F"]
    for c in range(norm.weight.numel()):
        idx = torch.tensor([s.start + c for s in index])
        torch.testing.assert_close(block[c], ggn[idx][:, idx])


def test_unitwise_update_is_the_damped_block_solve() -> None:
    model, x, name = _norm_case("layernorm")
    y = torch.randint(0, 3, (x.shape[0],))
    damping = 0.01
    opt = exact_kfac(model, fisher="exact", damping=damping)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gw, gb = model[1].weight.grad.clone(), model[1].bias.grad.clone()
    before = [model[1].weight.detach().clone(), model[1].bias.detach().clone()]
    opt.step()
    Fc = opt.layers[name][1].averages["F"]
    expected = -torch.linalg.solve(Fc + damping * torch.eye(2), torch.stack([gw, gb], -1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model[1].weight.detach() - before[0], expected[:, 0])
    torch.testing.assert_close(model[1].bias.detach() - before[1], expected[:, 1])


def test_checkpoint_round_trip_with_every_block_type(tmp_path) -> None:
    def build(seed: int) -> tuple[nn.Module, KFAC]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 3))
        return model, exact_kfac(model, lr=0.1, seed=0, inv_update_freq=2)

    x, y = torch.randint(0, 7, (8, 3)), torch.randint(0, 3, (8,))

    def run(model: nn.Module, opt: KFAC, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt = build(0)
    run(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    run(model, opt, 3)
    restored, ropt = build(5)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    restored.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    run(restored, ropt, 3)
    for p, q in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(p, q)
