"""ExactNewton (exact stochastic Newton, reconstructed): the per-sample Hessian block against
torch.autograd.functional.hessian (Kronecker form, eigenvalues, closed-form direction against a dense solve
of |H| + ρI), the minibatch average, the loss conventions, convergence against Adam, protocol, state dicts,
non-finite handling and unsupported models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv.optim.exact_newton as en
from fastcurv.optim import ExactNewton
from tests.optim.test_newton_cg import _autoencoder_run, _one_thread, _params

DT = torch.float64

@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: one intra-op thread (see ``_one_thread``)."""
    with _one_thread():
        yield


def _net(kind: str = "smooth", seed: int = 0, out_act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "smooth":
        mods = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Sigmoid(), nn.Softplus(), nn.Linear(5, 3)]
    else:
        mods = [nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3)]
    if out_act is not None:
        mods.append(out_act)
    return nn.Sequential(*mods).to(DT)


def _lins(m: nn.Sequential) -> list[nn.Linear]:
    return [x for x in m if isinstance(x, nn.Linear)]


def _targets(loss: str, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if loss == "ce":
        return torch.randint(0, 3, (n,), generator=g)
    if loss == "bce":
        return torch.rand(n, 3, generator=g, dtype=DT)
    return torch.randn(n, 3, generator=g, dtype=DT)


def _per_sample_loss(loss: str):
    return {
        "ce": F.cross_entropy,
        "bce": lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0],
        "mse": lambda z, t: 0.5 * (z - t).pow(2).sum() / z.shape[0],
    }[loss]


def _dense_block(m: nn.Sequential, lin_index: int, x, y, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense Hessian and gradient of loss_fn(m(x), y) w.r.t. W̄ = [W | b] of one layer (row-major flatten)."""
    names = {mod: n for n, mod in m.named_modules()}
    lin = _lins(m)[lin_index]
    pre = names[lin]
    wb0 = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)

    def f(wb: torch.Tensor) -> torch.Tensor:
        ps = {f"{pre}.weight": wb[:, :-1], f"{pre}.bias": wb[:, -1]}
        return loss_fn(torch.func.functional_call(m, ps, (x,)), y)

    Hd = torch.autograd.functional.hessian(f, wb0)
    n = wb0.numel()
    wb = wb0.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(wb), wb)
    return Hd.reshape(n, n), g


CASES = [("ce", "smooth", None), ("bce", "smooth", None), ("mse", "smooth", None), ("mse", "smooth", "tanh"),
         ("ce", "relu", None)]


@pytest.mark.parametrize("loss,kind,out", CASES)
def test_single_sample_hessian_block_is_the_kronecker_product(loss, kind, out):
    """∂²ℓ/∂vec(W̄)² = kron(ā āᵀ, B) in column-major vec order = kron(B, ā āᵀ) in row-major (PyTorch)
    order,
    to 1e-12, for every layer; its eigenvalues are ‖ā‖² λ_i(B) and (d_a − 1)·d_out zeros."""
    m = _net(kind, out_act=nn.Tanh() if out == "tanh" else None)
    x = torch.randn(1, 3, dtype=DT)
    y = _targets(loss, 1)
    opt = ExactNewton(m, loss)
    fac = opt.hessian_factors(batch=(x, y))
    for l, f in enumerate(fac):
        Hd, gd = _dense_block(m, l, x, y, _per_sample_loss(loss))
        a, g, B = f["a"][0], f["g"][0], f["B"][0]
        d_out, d_a = B.shape[0], a.shape[0]
        scale = Hd.abs().max()
        assert torch.allclose(Hd, torch.kron(B, torch.outer(a, a)), atol=1e-12 * max(1.0, scale), rtol=0)
        # column-major vec: index j*d_out + i  <->  row-major i*d_a + j
        perm = torch.arange(d_out * d_a).view(d_out, d_a).T.reshape(-1)
        assert torch.allclose(Hd[perm][:, perm], torch.kron(torch.outer(a, a), B), atol=1e-12 * max(1.0, scale), rtol=0)
        assert torch.allclose(gd, torch.outer(g, a), atol=1e-13, rtol=0)
        ev = torch.linalg.eigvalsh(Hd)
        zeros = torch.zeros((d_a - 1) * d_out, dtype=DT)
        want = torch.sort(torch.cat([a.dot(a) * torch.linalg.eigvalsh(B), zeros])).values
        assert torch.allclose(ev, want, atol=1e-12 * max(1.0, scale), rtol=0)
        assert fac[l]["a"][0, -1] == 1.0  # the homogeneous coordinate


@pytest.mark.parametrize("rho", [0.3, 1e-2, 0.0])
@pytest.mark.parametrize("loss,kind,out", CASES[:4])
def test_closed_form_direction_equals_the_dense_absolute_hessian_solve(loss, kind, out, rho):
    """One sample, lr = 1: each layer moves by −(|H| + ρI)^{-1} vec(g āᵀ) with |H| from eigh of the dense
    block; ρ = 0 is the pseudo-inverse (the zero eigenspace, which the gradient never meets, is dropped)."""
    m = _net(kind, out_act=nn.Tanh() if out == "tanh" else None)
    x = torch.randn(1, 3, dtype=DT)
    y = _targets(loss, 1)
    dense = []
    for l in range(len(_lins(m))):
        Hd, gd = _dense_block(m, l, x, y, _per_sample_loss(loss))
        lam, U = torch.linalg.eigh(Hd)
        if rho > 0:
            step = -(U @ ((U.T @ gd.reshape(-1)) / (lam.abs() + rho)))
        else:
            absH = (U * lam.abs()) @ U.T
            step = -torch.linalg.pinv(absH, rtol=1e-10, hermitian=True) @ gd.reshape(-1)
        dense.append(step.reshape(gd.shape))
    before = _params(m)
    opt = ExactNewton(m, loss, lr=1.0, damping=rho)
    opt.step(batch=(x, y))
    assert opt.steps == 1
    for l, lin in enumerate(_lins(m)):
        dW = lin.weight.detach() - before[2 * l]
        db = lin.bias.detach() - before[2 * l + 1]
        got = torch.cat([dW, db[:, None]], 1)
        assert torch.allclose(got, dense[l], rtol=1e-9, atol=1e-12 * max(1.0, dense[l].abs().max())), (l, got, dense[l])


def test_some_blocks_are_indefinite_and_the_absolute_value_matters():
    """A smooth net has negative eigenvalues in its exact blocks (the φ'' term): |H| differs from H there."""
    m = _net("smooth")
    x, y = torch.randn(1, 3, dtype=DT), _targets("ce", 1)
    fac = ExactNewton(m, "ce").hessian_factors(batch=(x, y))
    assert any(bool((torch.linalg.eigvalsh(f["B"][0]) < -1e-8).any()) for f in fac)


def test_minibatch_direction_is_the_mean_of_per_sample_directions_and_chunking_is_invariant():
    m = _net("smooth")
    n = 7
    x = torch.randn(n, 3, dtype=DT)
    y = _targets("ce", n)
    before = _params(m)
    per_sample = []
    for i in range(n):
        mi = copy.deepcopy(m)
        ExactNewton(mi, "ce", lr=1.0, damping=0.2).step(batch=(x[i : i + 1], y[i : i + 1]))
        per_sample.append([p.detach() - b for p, b in zip(mi.parameters(), before)])
    mean = [torch.stack([d[k] for d in per_sample]).mean(0) for k in range(len(before))]
    for chunk in (None, 3, 1):
        mb = copy.deepcopy(m)
        ExactNewton(mb, "ce", lr=1.0, damping=0.2, chunk_size=chunk).step(batch=(x, y))
        for p, b, d in zip(mb.parameters(), before, mean):
            assert torch.allclose(p.detach() - b, d, rtol=1e-10, atol=1e-14), chunk


def test_psd_cholesky_path_equals_the_eigendecomposition():
    """ReLU/LeakyReLU nets with a convex loss have PSD blocks: the Cholesky fast path (ρ > 0, no floor) gives
    the eigh path's direction (forced here by a negligible eig_floor)."""
    x = torch.randn(9, 3, dtype=DT)
    y = _targets("bce", 9)
    outs = []
    for floor in (0.0, 1e-300):
        m = _net("relu")
        opt = ExactNewton(m, "bce", lr=1.0, damping=0.05, eig_floor=floor)
        assert opt._psd == [True, True, True]
        opt.step(batch=(x, y))
        outs.append(_params(m))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert ExactNewton(_net("smooth"), "ce")._psd == [False, False, True]


LOSS_SPECS = [
    ("ce", lambda z, t: F.cross_entropy(z, t), "ce"),
    (F.cross_entropy, F.cross_entropy, "ce"),
    (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="sum"), "ce"),
    (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), ignore_index=1),
     nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), ignore_index=1), "ce"),
    ("bce", _per_sample_loss("bce"), "bce"),
    (nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(), "bce"),
    (nn.BCEWithLogitsLoss(reduction="sum"), nn.BCEWithLogitsLoss(reduction="sum"), "bce"),
    (F.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, "bce"),
    ("mse", _per_sample_loss("mse"), "mse"),
    (nn.MSELoss(), nn.MSELoss(), "mse"),
    (nn.MSELoss(reduction="sum"), nn.MSELoss(reduction="sum"), "mse"),
    (F.mse_loss, F.mse_loss, "mse"),
]


@pytest.mark.parametrize("spec,closure_loss,kind", LOSS_SPECS)
def test_loss_conventions_give_the_exact_per_sample_output_hessian(spec, closure_loss, kind):
    """With L the closure's loss, ℓ_n is defined by L = mean_n ℓ_n: the output layer's factors are
    g_n = N ∂L/∂z_n and B_n = N ∂²L/∂z_n² (dense), for every supported loss and reduction."""
    m = _net("smooth")
    n = 6
    x = torch.randn(n, 3, dtype=DT)
    y = _targets(kind, n)
    if kind == "ce":
        y[2] = 1  # an ignored sample for the ignore_index case
    opt = ExactNewton(m, spec)
    f = opt.hessian_factors(lambda: closure_loss(m(x), y))[-1]
    z = m(x).detach()
    Hz = torch.autograd.functional.hessian(lambda zz: closure_loss(zz, y), z)
    zz = z.clone().requires_grad_()
    (gz,) = torch.autograd.grad(closure_loss(zz, y), zz)
    for i in range(n):
        assert torch.allclose(f["B"][i], n * Hz[i, :, i, :], atol=1e-13, rtol=1e-10), i
        assert torch.allclose(f["g"][i], n * gz[i], atol=1e-14, rtol=1e-12)


def test_closure_protocol_equals_batch_protocol_and_sets_grad():
    x = torch.randn(5, 3, dtype=DT)
    y = _targets("ce", 5)
    m1, m2, m3 = _net(), _net(), _net()
    ref = _net()
    F.cross_entropy(ref(x), y).backward()
    ExactNewton(m1, "ce", damping=0.5).step(batch=(x, y))
    loss = ExactNewton(m2, "ce", damping=0.5).step(lambda: F.cross_entropy(m2(x), y))

    def lbfgs_style():  # a closure that backpropagates itself
        loss = F.cross_entropy(m3(x), y)
        loss.backward()
        return loss

    ExactNewton(m3, "ce", damping=0.5).step(lbfgs_style)
    assert float(loss) == pytest.approx(float(F.cross_entropy(ref(x), y).detach()), rel=1e-14)
    for a, b, c, r in zip(m1.parameters(), m2.parameters(), m3.parameters(), ref.parameters()):
        assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-13, atol=1e-15)
        assert torch.allclose(b.grad, r.grad, rtol=1e-11, atol=1e-14)  # .grad = ∇L at the start of the step


def test_frozen_layer_is_not_updated_but_the_curvature_flows_through_it():
    m = _net()
    x, y = torch.randn(4, 3, dtype=DT), _targets("ce", 4)
    for p in _lins(m)[1].parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(m)
    frozen = _params(m)
    opt = ExactNewton(m, "ce")
    fac = opt.hessian_factors(batch=(x, y))
    opt.step(batch=(x, y))
    assert torch.equal(_lins(m)[1].weight, frozen[2])
    assert not torch.equal(_lins(m)[0].weight, frozen[0])
    ref_fac = ExactNewton(ref, "ce").hessian_factors(batch=(x, y))  # ref: the same net with everything trainable
    assert torch.allclose(fac[0]["B"], ref_fac[0]["B"])


def test_exact_newton_beats_adam_on_the_digits_autoencoder():
    """Same minibatches and step count (batch 200, 50 steps, closure protocol): Adam's best lr stays on the
    autoencoder's early plateau (~27.1), the averaged exact per-sample Newton steps get below it. lr ≈ 1/8:
    every one of the 8 layers takes its own per-sample Newton step."""
    final, adam, start, opt = _autoencoder_run(lambda m, lf: ExactNewton(m, "bce", lr=0.1, damping=3e-3), "closure")
    assert opt.skipped_steps == 0
    assert final < min(adam.values()) - 0.5 < start, (final, adam)


def test_state_dict_round_trip_is_bitwise():
    x = torch.randn(40, 3, dtype=DT)
    y = _targets("ce", 40)
    batches = [(x[i % 4 * 10 : (i % 4 + 1) * 10], y[i % 4 * 10 : (i % 4 + 1) * 10]) for i in range(20)]
    m1 = _net()
    o1 = ExactNewton(m1, "ce", lr=0.5, damping=0.3)
    for b in batches:
        o1.step(batch=b)
    m2 = _net()
    o2 = ExactNewton(m2, "ce", lr=0.5, damping=0.3)
    for b in batches[:10]:
        o2.step(batch=b)
    sd_m, sd_o = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3 = _net(seed=3)
    m3.load_state_dict(sd_m)
    o3 = ExactNewton(m3, "ce", lr=0.1, damping=1.0)
    o3.load_state_dict(sd_o)  # the hyperparameters come back too
    assert float(o3.param_groups[0]["lr"]) == 0.5 and o3.param_groups[0]["lr"].dtype == DT
    for b in batches[10:]:
        o3.step(batch=b)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
    assert o1.counters() == o3.counters()


@pytest.mark.parametrize("where", ["loss", "curvature"])
def test_nonfinite_step_is_skipped_and_parameters_unchanged(where, monkeypatch):
    m = _net()
    x, y = torch.randn(4, 3, dtype=DT), _targets("ce", 4)
    opt = ExactNewton(m, "ce")
    opt.step(batch=(x, y))
    params, counters = _params(m), opt.counters()
    if where == "loss":
        x = x.clone()
        x[0, 0] = float("nan")
    else:
        def nan_hessian(grad, z, elementwise=False):
            return torch.full((z.shape[0], 3, 3), float("nan"), dtype=DT)

        monkeypatch.setattr(en.losses, "per_sample_hessians", nan_hessian)
    opt.step(batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    after = opt.counters()
    assert after.pop("skipped_steps") == counters.pop("skipped_steps") + 1 and after == counters
    opt.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))


class _NotSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)


def test_unsupported_models_losses_and_calls_raise_clear_errors():
    lin = nn.Linear(3, 3)
    for model, match in [
        (_NotSequential(), "nn.Sequential"),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 3)), "Dropout"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 3)), "PReLU"),
        (nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(3, 3)), "Conv1d"),
        (nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 3)), "Flatten"),
        (nn.Sequential(lin, nn.ReLU(), lin), "twice"),
        (nn.Sequential(nn.ReLU()), "no nn.Linear"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExactNewton(model, "ce")
    with pytest.raises(TypeError, match="nn.Module"):
        ExactNewton([lin.weight], "ce")
    half = nn.Sequential(nn.Linear(3, 3))
    half[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ExactNewton(half, "ce")
    m = _net()
    # nested Sequentials and a leading Flatten are fine
    ExactNewton(nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)), "mse")
    for loss, match in [
        ("hinge", "one of"),
        (nn.MSELoss(reduction="none"), "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExactNewton(m, loss)
    with pytest.raises(TypeError, match="loss_fn"):
        ExactNewton(m, 3.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ExactNewton(m, "ce", chunk_size=0)
    with pytest.raises(ValueError, match="damping"):
        ExactNewton(m, "ce", damping=-1.0)
    with pytest.raises(ValueError, match="eig_floor"):
        ExactNewton(m, "ce", eig_floor=-1.0)
    opt = ExactNewton(m, "ce")
    x, y = torch.randn(4, 3, dtype=DT), _targets("ce", 4)
    params = _params(m)
    with pytest.raises(TypeError, match="not both"):
        opt.step(lambda: F.cross_entropy(m(x), y), batch=(x, y))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="pair"):
        opt.step(batch=x)
    with pytest.raises(RuntimeError, match="exactly once"):
        opt.step(lambda: F.cross_entropy(m(x), y) + F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="2-D"):
        opt.step(lambda: F.cross_entropy(m(x[None].expand(2, 4, 3)).reshape(8, 3), y.repeat(2)))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert "ExactNewton(" in repr(opt)
    # hooks are removed after every step, failed or not
    assert all(not lay._forward_hooks for lay in m) and not m._forward_hooks


# --------------------------------------------------------------------------------------------------------
# any loss: per-sample output Hessians by autograd
# --------------------------------------------------------------------------------------------------------
def _my_loss(out, t):
    """A user-written loss (the README's example): BCE summed over outputs, mean over the batch."""
    return F.binary_cross_entropy_with_logits(out, t, reduction="none").sum(1).mean()


def _soft(n: int, seed: int = 3) -> torch.Tensor:
    return torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT) * 2, 1)


ANY_LOSSES = {
    "soft-target-ce": (F.cross_entropy, lambda n: _soft(n)),
    "label-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), lambda n: _targets("ce", n)),
    "weighted-ce-sum": (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), reduction="sum"),
                        lambda n: _targets("ce", n)),
    "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.3, 1.0, 3.0], dtype=DT)),
                       lambda n: _targets("bce", n)),
    "user-written": (_my_loss, lambda n: _targets("bce", n)),
}


@pytest.mark.parametrize("name", list(ANY_LOSSES))
def test_any_loss_output_hessian_is_the_dense_autograd_one(name):
    """B of the last layer (no activation after it) is the per-sample output Hessian N ∂²L/∂z_n², compared
    with the dense float64 autograd Hessian of the loss in the whole output (whose cross-sample blocks
    vanish); forward-only closure and batch= agree."""
    loss_fn, targets = ANY_LOSSES[name]
    m = _net()
    x, y = torch.randn(5, 3, dtype=DT), targets(5)
    z = m(x).detach()
    Hd = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z)  # (N, K, N, K)
    n = z.shape[0]
    want = 5 * torch.stack([Hd[i, :, i, :] for i in range(n)])
    opt = ExactNewton(m, loss_fn)
    for fac in (opt.hessian_factors(batch=(x, y)), opt.hessian_factors(lambda: loss_fn(m(x), y))):
        torch.testing.assert_close(fac[-1]["B"], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(ANY_LOSSES))
def test_any_loss_step_equals_the_dense_absolute_hessian_solve(name):
    """One sample, lr = 1: the last layer moves by −(|H| + ρI)^{-1} vec(g āᵀ) with H the dense Hessian of the
    loss as written (probability targets gave a 12.6 % wrong step when the scale was inferred from one-hot
    labels)."""
    loss_fn, targets = ANY_LOSSES[name]
    m = _net()
    x, y = torch.randn(1, 3, dtype=DT), targets(1)
    Hd, gd = _dense_block(m, 2, x, y, loss_fn)
    lam, U = torch.linalg.eigh(Hd)
    want = -(U @ ((U.T @ gd.reshape(-1)) / (lam.abs() + 0.3))).reshape(gd.shape)
    lin = _lins(m)[2]
    before = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    ExactNewton(m, loss_fn, lr=1.0, damping=0.3).step(batch=(x, y))
    got = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1) - before
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * max(1.0, float(want.abs().max())))


def _backpropagating(loss_fn, m, x, y, *, detach: bool = False):  # type: ignore[no-untyped-def]
    """An LBFGS-style closure that calls backward() itself; ``detach``: return a detached copy (as Lightning)."""

    def closure():
        loss = loss_fn(m(x), y)
        loss.backward()
        return loss.detach().clone() if detach else loss

    return closure


@pytest.mark.parametrize("name", ["label-smoothing", "weighted-ce-sum", "bce-pos-weight"])
def test_a_closure_that_backpropagates_a_loss_module_uses_its_recorded_inputs(name):
    """A loss module passed as loss_fn and applied to the output: its (output, target) are recorded, so its
    Hessian is exact even though the closure's backward() consumed the loss graph."""
    loss_fn, targets = ANY_LOSSES[name]
    m = _net()
    x, y = torch.randn(5, 3, dtype=DT), targets(5)

    closure = _backpropagating(loss_fn, m, x, y)

    want = ExactNewton(m, loss_fn).hessian_factors(batch=(x, y))[-1]["B"]
    torch.testing.assert_close(ExactNewton(m, loss_fn).hessian_factors(closure)[-1]["B"], want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["soft-target-ce", "user-written"])
def test_a_closure_that_backpropagates_a_loss_whose_hessian_is_unknown_raises(name):
    """With the loss graph consumed by the closure's backward(), only a Hessian the gradient determines can
    be used: anything else raises instead of taking a wrong step (parameters unchanged)."""
    loss_fn, targets = ANY_LOSSES[name]
    m = _net()
    x, y = torch.randn(4, 3, dtype=DT), targets(4)
    opt = ExactNewton(m, loss_fn)
    params = _params(m)

    closure = _backpropagating(loss_fn, m, x, y)

    with pytest.raises(ValueError, match="backward"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))


@pytest.mark.parametrize("name", ["soft-target-ce", "user-written", "label-smoothing"])
def test_without_loss_fn_a_backpropagating_closure_gets_the_exact_hessian(name):
    """ExactNewton(model) (loss_fn=None) with an LBFGS-style closure that returns a detached copy of the loss
    (as Lightning's automatic optimization does): the graph of the tensor the closure backpropagated is kept,
    so B is the exact per-sample output Hessian, as with a forward-only closure."""
    loss_fn, targets = ANY_LOSSES[name]
    m = _net()
    x, y = torch.randn(5, 3, dtype=DT), targets(5)

    lbfgs_style = _backpropagating(loss_fn, m, x, y, detach=True)

    want = ExactNewton(m, loss_fn).hessian_factors(batch=(x, y))[-1]["B"]
    got = ExactNewton(m).hessian_factors(lbfgs_style)[-1]["B"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ExactNewton(m).hessian_factors(lambda: loss_fn(m(x), y))[-1]["B"], want, rtol=1e-12, atol=1e-14)
