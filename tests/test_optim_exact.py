"""K-FAC's curvature against exact computations by autograd, in float64 on tiny networks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune import KFAC
from tests.optim_support import exact_kfac
from kfac_tune.optim import fisher, quadratic
from kfac_tune.optim.blocks import KroneckerBlock

LOSS_FN = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "bce": F.binary_cross_entropy_with_logits}


pytestmark = pytest.mark.usefixtures("float64_default")


def _one_step(model: nn.Module, opt: KFAC, x: torch.Tensor, target: torch.Tensor, loss: str) -> list[torch.Tensor]:
    """Run one closure step; return the parameter change."""
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = LOSS_FN[loss](model(x), target)
        out.backward()
        return out

    opt.step(closure)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _block(opt: KFAC, name: str) -> KroneckerBlock:
    return opt.layers[name][1]


def test_linear_factors_equal_hand_computed_moments() -> None:
    """A = E[a aᵀ] over all rows (batch × time, bias column appended); G = N Σ_rows g gᵀ (empirical Fisher)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    x = torch.randn(5, 2, 4)  # (batch, time, features): time steps are extra rows
    y = torch.randint(0, 3, (5, 2))
    # Gradient of the mean loss w.r.t. the logits, by autograd, before the optimizer is attached.
    z = layer(x).detach().requires_grad_(True)
    (dz,) = torch.autograd.grad(F.cross_entropy(z.reshape(-1, 3), y.reshape(-1)), [z])
    dz = dz.reshape(-1, 3)
    opt = exact_kfac(model, fisher="empirical", loss="cross_entropy")
    F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()
    rows = torch.cat([x.reshape(-1, 4), torch.ones(10, 1)], dim=1)
    A, G = _block(opt, "0").factors()
    torch.testing.assert_close(A, rows.T @ rows / 10)
    torch.testing.assert_close(G, 10 * dz.T @ dz)


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 0, 1, True), (2, 1, 1, False), (1, 2, 2, True)])
def test_conv2d_factors_equal_explicit_patches(stride: int, padding: int, dilation: int, bias: bool) -> None:
    """KFC factors from explicit per-location patches (loops, no unfold) and per-location output gradients."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 2, 7, 7)
    target = torch.randn_like(model(x))
    s = conv(x).detach().requires_grad_(True)
    (ds,) = torch.autograd.grad(F.mse_loss(s.flatten(1), target), [s])
    opt = exact_kfac(model, fisher="empirical", loss="mse")
    opt.zero_grad()
    F.mse_loss(model(x), target).backward()
    opt.step()

    n_loss = target.numel()
    xp = F.pad(x, (padding,) * 4)
    patches, grads = [], []
    for b in range(x.shape[0]):
        for i in range(s.shape[2]):
            for j in range(s.shape[3]):
                r, c = i * stride, j * stride
                patch = xp[b, :, r : r + dilation * 2 + 1 : dilation, c : c + dilation * 2 + 1 : dilation]
                vec = patch.reshape(-1)
                patches.append(torch.cat([vec, torch.ones(1)]) if bias else vec)
                grads.append(ds[b, :, i, j])
    a = torch.stack(patches)
    g = torch.stack(grads)
    A, G = _block(opt, "0").factors()
    torch.testing.assert_close(A, a.T @ a / a.shape[0])
    torch.testing.assert_close(G, n_loss * g.T @ g)


def _exact_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The GGN of the mean loss, ``Jᵀ (∇²_z h) J``, from the full Jacobian and the loss Hessian by autograd."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params))
    z = model(x).detach()
    J = torch.cat([j.reshape(z.numel(), -1) for j in jac], dim=1)  # (outputs, params)
    H = torch.autograd.functional.hessian(lambda out: LOSS_FN[loss](out, y), z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


def test_single_linear_layer_update_equals_exact_natural_gradient() -> None:
    """One Linear layer, MSE loss, exact Fisher, exact damping: the K-FAC step is −(GGN + λI)⁻¹ ∇h."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    damping = 1e-3
    ggn = _exact_ggn(model, x, y, "mse")
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=damping, damping_mode="exact")
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = model[0].weight.grad.reshape(-1).clone()
    (delta,) = _one_step(model, opt, x, y, "mse")
    expected = -torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0]), grad)
    torch.testing.assert_close(delta.reshape(-1), expected)


def _decomposed_block(a_dim: int, g_dim: int) -> KroneckerBlock:
    """A float64 block with random full-rank factors, decomposed."""
    from kfac_tune.optim.blocks import decompose

    block = KroneckerBlock(a_dim, g_dim, torch.device("cpu"), torch.float64)
    ra, rg = torch.randn(2 * a_dim + 10, a_dim), torch.randn(2 * g_dim + 10, g_dim)
    block.update_A(ra.T @ ra / len(ra), 0.9)
    block.update_G(rg.T @ rg, 0.9)
    decompose([block])
    return block


def _pi_solve(block: KroneckerBlock, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """torch.linalg.solve with (A + π√λ I) ⊗ (G + √λ/π I), from the block's factors."""
    A, G = block.factors()
    a_dim, g_dim = A.shape[0], G.shape[0]
    pi = math.sqrt((A.trace() / a_dim) / (G.trace() / g_dim))
    Ad = A + pi * math.sqrt(damping) * torch.eye(a_dim)
    Gd = G + math.sqrt(damping) / pi * torch.eye(g_dim)
    # vec() is column-major here: (A ⊗ G) vec(M) = vec(G M A).
    return torch.linalg.solve(torch.kron(Ad, Gd), grad.T.reshape(-1)).reshape(a_dim, g_dim).T


def test_pi_damping_equals_solve_on_the_damped_kronecker_product() -> None:
    """π-damped inverse == torch.linalg.solve with (A + π√λ I) ⊗ (G + √λ/π I); the exact mode likewise."""
    torch.manual_seed(3)
    a_dim, g_dim, damping = 4, 3, 0.05
    block = _decomposed_block(a_dim, g_dim)
    grad = torch.randn(g_dim, a_dim)
    torch.testing.assert_close(block.precondition(grad, damping, "pi"), _pi_solve(block, grad, damping))
    A, G = block.factors()
    exact = torch.linalg.solve(torch.kron(A, G) + damping * torch.eye(a_dim * g_dim), grad.T.reshape(-1))
    torch.testing.assert_close(block.precondition(grad, damping, "exact"), exact.reshape(a_dim, g_dim).T)


def test_pi_damping_takes_the_cheaper_route_for_how_long_an_inverse_lives() -> None:
    """On a layer much wider on one side, an inverse used once (λ changing every step) is not worth forming: the
    eigenbasis route is taken; one used for many steps is formed. Both routes equal the solve."""
    torch.manual_seed(4)
    wide = _decomposed_block(40, 3)  # forming: 40³ + 3³; per use the eigenbasis route costs 3·40·43 more
    grad = torch.randn(3, 40)
    for damping in (0.1, 0.2, 0.3):  # each λ used once
        torch.testing.assert_close(wide.precondition(grad, damping, "pi"), _pi_solve(wide, grad, damping))
    assert wide._inverse_cache is not None and wide._inverse_cache[0] == 0.1, "formed after one use per λ"
    for _ in range(20):  # λ = 0.4 serves 20 steps: forming repays itself from the next λ on
        torch.testing.assert_close(wide.precondition(grad, 0.4, "pi"), _pi_solve(wide, grad, 0.4))
    torch.testing.assert_close(wide.precondition(grad, 0.5, "pi"), _pi_solve(wide, grad, 0.5))
    assert wide._inverse_cache[0] == 0.5

    square = _decomposed_block(6, 6)  # forming costs what one use saves: always formed
    grad = torch.randn(6, 6)
    for damping in (0.1, 0.2):
        torch.testing.assert_close(square.precondition(grad, damping, "pi"), _pi_solve(square, grad, damping))
        assert square._inverse_cache[0] == damping


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_sampled_output_gradients_match_the_output_hessian(loss: str) -> None:
    """E[u uᵀ] = H_n, checked entrywise within 5 standard errors estimated from the draws themselves."""
    torch.manual_seed(4)
    z = torch.randn(1, 4)
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    n = fisher.loss_count(loss, z.expand(draws, 4))
    u = fisher.sample(loss, z.expand(draws, 4).contiguous(), gen) * n  # (draws, 4), undo the 1/N
    outer = u[:, :, None] * u[:, None, :]
    mean, sem = outer.mean(0), outer.std(0) / math.sqrt(draws)
    cols = fisher.exact_columns(loss, z)
    H = sum(c.reshape(-1, 1) @ c.reshape(1, -1) for c in cols) * fisher.loss_count(loss, z) ** 2
    assert torch.all((mean - H).abs() <= 5 * sem + 1e-12), (mean, H)


def test_true_fisher_factors_converge_to_the_exact_fisher() -> None:
    """The sampled G of the optimizer, averaged over many passes, equals the exact (type-2) G within 5 s.e."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))

    def g_factor(fisher_type: str, seed: int) -> torch.Tensor:
        opt = exact_kfac(model, fisher=fisher_type, seed=seed)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.close()
        model.zero_grad()
        return _block(opt, "0").factors()[1]

    with torch.no_grad():
        params = [p.clone() for p in model.parameters()]
    exact = g_factor("exact", 0)
    samples = []
    for seed in range(400):
        with torch.no_grad():  # undo the last step so every draw sees the same parameters
            for p, q in zip(model.parameters(), params):
                p.copy_(q)
        samples.append(g_factor("true", seed))
    stack = torch.stack(samples)
    mean, sem = stack.mean(0), stack.std(0) / math.sqrt(len(samples))
    assert torch.all((mean - exact).abs() <= 5 * sem + 1e-12)


def test_sampling_pass_leaves_gradients_untouched() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    F.cross_entropy(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt = exact_kfac(model, fisher="true", seed=0)
    F.cross_entropy(model(x), y).backward()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r)
    assert opt._passes == 1


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_inplace_activations_give_the_same_factors(fisher_type: str) -> None:
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))

    def factors(inplace: bool) -> list[torch.Tensor]:
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
        opt = exact_kfac(model, fisher=fisher_type, seed=0)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return [t for _, b in opt.layers.values() for t in b.factors()]

    for a, b in zip(factors(False), factors(True)):
        torch.testing.assert_close(a, b)


def test_adaptive_lr_takes_the_newton_step_on_least_squares() -> None:
    """Linear least squares: exact Fisher = Hessian, so the quadratic-model step lands on the minimiser."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 2))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=1e-8, min_damping=1e-10, damping_mode="exact",
                adaptive_lr=True)
    _one_step(model, opt, x, y, "mse")
    X = torch.cat([x, torch.ones(32, 1)], dim=1)
    best = torch.linalg.lstsq(X, y).solution
    minimum = F.mse_loss(X @ best, y)
    assert float(F.mse_loss(model(x), y)) == pytest.approx(float(minimum), rel=1e-6)


class _SelfAttention(nn.Module):
    """Tokens → self-attention (``F.scaled_dot_product_attention``, whose fused kernels have no forward-mode
    derivative) → mean over tokens → classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.out(self.attention(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("network", ["mlp", "self-attention"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_quadratic_model_curvature_is_the_ggn_of_the_first_examples(fraction: float, network: str,
                                                                    float64_default: None) -> None:
    """``dᵢᵀ C dⱼ`` of the automatic modes equals the GGN of the mean loss over the batch's first
    ``ceil(fraction · B)`` examples, built from the full Jacobian (autograd) and the softmax Hessian; ``gᵀdᵢ`` uses
    the whole batch's gradient. The attention network checks that its forward-mode products are available and
    exact (``quadratic._jvps`` selects the math attention kernel)."""
    torch.manual_seed(11)
    if network == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(12, 5)
    else:
        model, x = _SelfAttention(), torch.randn(12, 4, 5)
    y = torch.randint(0, 3, (12,))
    opt = exact_kfac(model, loss="cross_entropy", adaptive_lr=True, adaptive_momentum=True, stat_fraction=fraction)
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    dirs = [[torch.randn_like(p) for p in params] for _ in range(2)]
    qm = opt._quadratic_model(params, grads, dirs, weight_decay=0.0)

    used = math.ceil(fraction * len(x))
    names = [name for name, _ in model.named_parameters()]
    out_of = lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x[:used],))  # noqa: E731
    jacobians = torch.autograd.functional.jacobian(out_of, tuple(p.detach() for p in params))
    jd = [sum((j.flatten(2) @ d.flatten()) for j, d in zip(jacobians, direction)) for direction in dirs]
    probs = torch.softmax(model(x[:used]), dim=-1).detach()
    hessians = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    for i in range(2):
        for j in range(2):
            exact = torch.einsum("nc,ncd,nd->", jd[i], hessians, jd[j]) / used
            assert qm.curv[i][j] == pytest.approx(float(exact), rel=1e-10)  # float64 model: float64 end to end
        assert qm.grad_dots[i] == pytest.approx(float(sum((g * d).sum() for g, d in zip(grads, dirs[i]))),
                                                rel=1e-10)
    opt.close()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_float64_output_curvature_matches_autograd_to_1e10(loss: str) -> None:
    """A float64 output gets float64 curvature: the exact columns' ``Σ u uᵀ`` and the quadratic form equal the
    loss Hessian by autograd to ~1e-10, and the sampled vectors are float64 (float32 would stop at ~1e-7)."""
    torch.manual_seed(12)
    z = torch.randn(5, 4)
    target = torch.randint(0, 4, (5,)) if loss == "cross_entropy" else torch.rand(5, 4)
    H = torch.autograd.functional.hessian(lambda out: LOSS_FN[loss](out, target), z).reshape(20, 20)
    cols = fisher.exact_columns(loss, z)
    assert all(c.dtype == torch.float64 for c in cols)
    n = fisher.loss_count(loss, z)
    # the columns are on the scale of h (Σ_c u_c u_cᵀ = H_n / N²) and serve every row at once: keep the
    # within-row blocks, H being block-diagonal over the rows
    from_columns = n * sum(c.reshape(-1, 1) @ c.reshape(1, -1) for c in cols)
    from_columns = from_columns * torch.block_diag(*[torch.ones(4, 4)] * 5)
    torch.testing.assert_close(from_columns, H, rtol=1e-10, atol=1e-12)
    vs = torch.randn(3, 5, 4)
    expected = vs.reshape(3, -1) @ H @ vs.reshape(3, -1).T  # every pair of the three directions
    torch.testing.assert_close(fisher.quadratic_forms(loss, z, vs), expected, rtol=1e-10, atol=1e-12)
    assert fisher.sample(loss, z, torch.Generator().manual_seed(0)).dtype == torch.float64


def test_float64_exact_fisher_step_matches_autograd_to_1e10() -> None:
    """Cross-entropy (an output Hessian that depends on the softmax), exact Fisher, exact damping, float64 factors,
    one example (so that ``A ⊗ G`` is the GGN itself): the step is −(GGN + λI)⁻¹ ∇h by autograd to ~1e-10."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4, bias=False))
    x, y = torch.randn(1, 3), torch.randint(0, 4, (1,))
    damping = 1e-3
    ggn = _exact_ggn(model, x, y, "cross_entropy")
    opt = exact_kfac(model, fisher="exact", loss="cross_entropy", damping=damping, damping_mode="exact")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = model[0].weight.grad.reshape(-1).clone()
    (delta,) = _one_step(model, opt, x, y, "cross_entropy")
    expected = -torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0]), grad)
    torch.testing.assert_close(delta.reshape(-1), expected, rtol=1e-10, atol=1e-12)


def test_relative_damping_damps_each_block_by_its_mean_eigenvalue() -> None:
    """``damping_scale="relative"``: the step is −(A⊗G + λ·s·I)⁻¹ g with s = tr A tr G / (dim A dim G) computed by
    hand from the factors (exact damping, checked by solve), and the quadratic model's damping term is
    ``Σ_layers s_l ‖d_l‖²``."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    damping = 0.05
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=damping, damping_mode="exact",
                     damping_scale="relative")
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    deltas = dict(zip([n for n, _ in model.named_parameters()], _one_step(model, opt, x, y, "mse")))
    scales = {}
    for name in ("0", "2"):
        A, G = _block(opt, name).factors()
        scale = float(A.trace() / A.shape[0] * G.trace() / G.shape[0])
        scales[name] = scale
        g = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], dim=1)  # (g_dim, a_dim)
        vec = g.T.reshape(-1)
        solved = torch.linalg.solve(torch.kron(A, G) + damping * scale * torch.eye(vec.numel()), vec)
        expected = -solved.reshape(A.shape[0], G.shape[0]).T
        got = torch.cat([deltas[f"{name}.weight"], deltas[f"{name}.bias"][:, None]], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    dirs = [[torch.randn_like(p) for p in params]]
    weights = opt._damping_weights(params)
    qm = quadratic.build(model, ((x,), {}), "mse", params, [torch.zeros_like(p) for p in params], dirs, 0.0,
                         damping_weights=weights)
    weighted = sum(scales[n.split(".")[0]] * float((d * d).sum()) for (n, _), d in zip(model.named_parameters(),
                                                                                        dirs[0]))
    assert qm.sq[0][0] == pytest.approx(weighted, rel=1e-10)
    opt.close()


def _conv(dims: int, transposed: bool = False, **kw) -> nn.Module:
    if transposed:
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims](**kw)
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](**kw)


@pytest.mark.parametrize("dims,options", [
    (1, dict(stride=2, padding=1, dilation=1)),
    (1, dict(stride=1, padding="same", dilation=2, padding_mode="reflect")),
    (2, dict(stride=1, padding="same", dilation=1)),  # kernel 2: asymmetric 'same' (once refused)
    (2, dict(stride=1, padding=1, dilation=1, padding_mode="circular")),
    (3, dict(stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2))),
    (3, dict(stride=1, padding=1, dilation=1, bias=False, padding_mode="replicate")),
    (1, dict(transposed=True, stride=2, padding=1, dilation=1, output_padding=1)),
    (1, dict(transposed=True, stride=1, padding=3, dilation=1)),  # padding beyond d(k-1): the input is cropped
    (2, dict(transposed=True, stride=(2, 1), padding=(0, 1), dilation=(1, 2))),
    (3, dict(transposed=True, stride=2, padding=1, dilation=1, output_padding=(1, 0, 1), bias=False)),
])
def test_convolution_rows_reproduce_the_autograd_weight_gradient(dims: int, options: dict) -> None:
    """KFC's rows for Conv1d/2d/3d and ConvTranspose1d/2d/3d: Σ_rows g aᵀ (patches of the padded -- for a
    transposed convolution the zero-upsampled -- input, gradients per output location) is the gradient autograd
    gives the weight (and bias), for strides, dilations, paddings and padding modes."""
    torch.manual_seed(20)
    kernel = 2 if options.get("padding") == "same" and dims == 2 else 3
    conv = _conv(dims, in_channels=2, out_channels=3, kernel_size=kernel, **options)
    x = torch.randn(2, 2, *[6] * dims)
    model = nn.Sequential(conv, nn.Flatten())
    opt = exact_kfac(model, fisher="empirical", loss="mse")
    helper = opt.layers["0"][0]
    s = conv(x)
    target = torch.randn_like(s)
    F.mse_loss(s, target).backward()
    s = conv(x).detach().requires_grad_(True)
    (ds,) = torch.autograd.grad(F.mse_loss(s, target), [s])
    rows_a, rows_g = helper.a_rows(x), helper.g_rows(ds)
    expected = helper.as_matrix([p.grad for p in helper.params])
    torch.testing.assert_close(rows_g.T @ rows_a, expected)
    assert helper.a_dim == 2 * kernel**dims + int(conv.bias is not None)
    opt.close()


@pytest.mark.parametrize("dims,transposed,groups", [(1, False, 1), (2, False, 1), (3, False, 1), (1, True, 1),
                                                    (2, True, 1), (3, True, 1), (2, False, 2), (1, False, 4)])
@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_convolution_step_at_one_location_is_the_exact_natural_gradient(dims: int, transposed: bool, groups: int,
                                                                         frozen: str) -> None:
    """A kernel that covers the input has one output location: each example is a Linear on its flattened input,
    and with MSE (constant output Hessian) K-FAC's A ⊗ G is the exact GGN over a batch of examples. A transposed
    convolution of a one-location input is exact likewise (each output location sees the input through its own
    kernel offset, the others being zero padding); so is a grouped (or depthwise) one, whose groups reach disjoint
    outputs (the GGN has no blocks between them under MSE). The step is −(GGN + λI)⁻¹ ∇h over the trainable
    parameters, with a frozen bias (no ones column) or a frozen weight (a bias-only block) too."""
    torch.manual_seed(21)
    channels = 4 if groups > 1 else 2
    conv = _conv(dims, transposed, in_channels=channels, out_channels=channels if groups > 1 else 3, kernel_size=2,
                 stride=2 if transposed else 1, groups=groups)
    model = nn.Sequential(conv, nn.Flatten())
    if frozen is not None:
        getattr(conv, frozen).requires_grad_(False)
    x = torch.randn(7, channels, *[1 if transposed else 2] * dims)
    y = torch.randn_like(model(x))
    damping = 1e-4
    ggn = _trainable_ggn(model, x, y, "mse")
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=damping, damping_mode="exact")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(opt.layers) == 1 and not opt.coverage.fallback
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    delta = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).reshape(-1) for n in names])
    expected = -torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0]), grad)
    torch.testing.assert_close(delta, expected)


def _trainable_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``Jᵀ (∇²_z h) J`` over the trainable parameters only, in ``named_parameters`` order."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**named, **dict(zip(names, ps))}, (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(named[n] for n in names))
    z = model(x).detach()
    J = torch.cat([j.reshape(z.numel(), -1) for j in jac], dim=1)
    H = torch.autograd.functional.hessian(lambda out: LOSS_FN[loss](out, y), z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_one_newton_step_on_a_linear_layer_with_a_frozen_part_reaches_the_minimum(frozen: str) -> None:
    """Least squares through one Linear whose bias (weight) is frozen: exact Fisher = Hessian, so one step of size
    1 with tiny damping lands on the minimiser over the trainable part. With the bias column kept for a frozen bias
    the step preconditioned by the centred input covariance and was 46x too long (issue 23)."""
    torch.manual_seed(22)
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.bias.fill_(3.0)
    getattr(layer, frozen).requires_grad_(False)
    model = nn.Sequential(layer)
    x, y = torch.randn(32, 4) + 1.0, torch.randn(32, 2)  # inputs with a mean: centred ≠ uncentred moments
    opt = exact_kfac(model, fisher="exact", loss="mse", damping=1e-10, min_damping=1e-12, damping_mode="exact")
    _one_step(model, opt, x, y, "mse")
    if frozen == "bias":
        best = torch.linalg.lstsq(x, y - layer.bias.detach()).solution
        minimum = F.mse_loss(x @ best + layer.bias.detach(), y)
    else:
        minimum = F.mse_loss((y - x @ layer.weight.detach().T).mean(0) + x @ layer.weight.detach().T, y)
    assert float(F.mse_loss(model(x), y).detach()) == pytest.approx(float(minimum), rel=1e-8)


@pytest.mark.parametrize("options", [dict(groups=2, stride=2, padding=1), dict(groups=4, padding="same", dilation=2)])
def test_grouped_convolution_rows_reproduce_the_autograd_weight_gradient_per_group(options: dict) -> None:
    """Each group's rows (its input channels' patches, its output channels' gradients) give autograd's gradient
    of that group's slice of the weight (and bias); the block holds one A_j ⊗ G_j per group."""
    from kfac_tune.optim.blocks import GroupedKroneckerBlock

    torch.manual_seed(23)
    conv = nn.Conv2d(4, 8, kernel_size=3, **options)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 4, 6, 6)
    opt = exact_kfac(model, fisher="empirical", loss="mse")
    helper, block = opt.layers["0"]
    groups = options["groups"]
    assert isinstance(block, GroupedKroneckerBlock) and block.averages["A"].shape == (groups, 4 // groups * 9 + 1,
                                                                                       4 // groups * 9 + 1)
    target = torch.randn_like(conv(x))
    F.mse_loss(conv(x), target).backward()
    s = conv(x).detach().requires_grad_(True)
    (ds,) = torch.autograd.grad(F.mse_loss(s, target), [s])
    expected = helper.as_matrix([p.grad for p in helper.params]).reshape(groups, 8 // groups, -1)
    patches = helper._input_rows(x).reshape(-1, groups, 4 // groups * 9)
    a = torch.cat([patches, torch.ones(patches.shape[0], groups, 1)], dim=2)
    g = helper.g_rows(ds).reshape(-1, groups, 8 // groups)
    torch.testing.assert_close(torch.einsum("rgo,rga->goa", g, a), expected)
    opt.close()


def test_grouped_block_preconditions_each_group_as_its_own_kronecker_block() -> None:
    """π and exact damping of a grouped block equal, group by group, those of a Kronecker block with the same
    factors (itself checked against a solve above)."""
    from kfac_tune.optim.blocks import GroupedKroneckerBlock

    torch.manual_seed(24)
    singles = [_decomposed_block(5, 3) for _ in range(2)]
    grouped = GroupedKroneckerBlock(2, 5, 3, torch.device("cpu"), torch.float64)
    factors = [b.factors() for b in singles]
    grouped.update({"A": torch.stack([f[0] for f in factors]), "G": torch.stack([f[1] for f in factors])}, 0.0)
    grouped.decompose()
    grad = torch.randn(6, 5)
    for mode in ("pi", "exact"):
        expected = torch.cat([b.precondition(grad[3 * j: 3 * (j + 1)], 0.05, mode) for j, b in enumerate(singles)])
        torch.testing.assert_close(grouped.precondition(grad, 0.05, mode), expected)
    scale = sum(float(b.curvature_scale()) for b in singles) / 2
    assert float(grouped.curvature_scale()) == pytest.approx(scale, rel=1e-10)
