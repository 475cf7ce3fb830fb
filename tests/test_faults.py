"""Fault injection: every covered optimizer (K-FAC with both inverse kinds, K-BFGS, K-BFGS(L)) meets each fault,
then must either go on (a skipped step, a jitter / PSD fallback, a rejected pair, a state reset) or stop with
a clear error — and afterwards no parameter or state tensor holds a non-finite value, and ``counters()``
says what happened."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcurv.optim import KBFGS, KBFGSL, KFAC

D64 = torch.float64

OPTS = {
    "kfac": lambda m, **kw: KFAC(m, **{**dict(lr=0.3, damping=0.1, inv_every=2), **kw}),
    "kfac_eigh": lambda m, **kw: KFAC(m, **{**dict(lr=0.3, damping=0.1, inv_every=2, inverse="eigh"), **kw}),
    "kbfgs": lambda m, **kw: KBFGS(m, **{**dict(lr=0.1, damping=0.3), **kw}),
    "kbfgsl": lambda m, **kw: KBFGSL(m, **{**dict(lr=0.1, damping=0.3, history=4), **kw}),
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 5)).to(D64)


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=D64), torch.randn(n, 5, generator=g, dtype=D64)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1).mean()


def _state(opt) -> dict:
    return {(i, k): v for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state[p].items()}


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], {k: v.clone() for k, v in _state(opt).items()}


def _unchanged(model, opt, snap) -> bool:
    params, state = snap
    now = _state(opt)
    return (
        all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        and now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
    )


def _assert_healthy(model, opt) -> None:
    """No non-finite value anywhere: parameters, every state tensor, hyperparameters."""
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    for k, t in _state(opt).items():
        assert torch.isfinite(t).all(), k
    for k, v in opt.param_groups[0].items():
        if isinstance(v, torch.Tensor) and k != "params":
            assert torch.isfinite(v).all(), k


def _steps(model, opt, n: int, seed: int = 10) -> None:
    for k in range(n):
        x, y = _data(seed=seed + k)
        opt.step(lambda: _loss(model(x), y))


def _factor_key(opt) -> list[str]:
    st = opt.state[opt.model[0].weight]
    return ["A"] if "A_inv" in st or "QA" in st else ["A", "H_g" if "H_g" in st else "lbfgs_left"]


# ------------------------------------------------------------------------------------------------------------
# non-finite values in a gradient, a layer input, the loss: the step is skipped, nothing changes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("where", ["gradient", "layer_input", "loss"])
def test_nonfinite_gradient_input_or_loss_is_a_skipped_step(name, where):
    model = _model()
    opt = OPTS[name](model)
    _steps(model, opt, 3)
    snap = _snapshot(model, opt)
    before = opt.counters()
    x, y = _data(seed=99)
    handles = []
    if where == "gradient":  # NaN in one gradient entry, loss and statistics finite
        def poison(g):
            g = g.clone()
            g[0, 0] = float("nan")
            return g

        handles.append(model[3].weight.register_hook(poison))
    elif where == "layer_input":  # +inf in the input of the last layer (forward pre-hook)

        def pre(mod, inp):
            h = inp[0].clone()
            h[3, 2] = float("inf")
            return (h,)

        handles.append(model[3].register_forward_pre_hook(pre))
    extra = float("nan") if where == "loss" else 0.0
    loss = opt.step(lambda: _loss(model(x), y) + extra)
    for h in handles:
        h.remove()
    assert _unchanged(model, opt, snap), "a skipped step changed a parameter or the state"
    c = opt.counters()
    assert c["skipped_steps"] == before["skipped_steps"] + 1 and c["steps"] == before["steps"]
    if where == "loss":
        assert torch.isnan(loss)
    _steps(model, opt, 2, seed=50)  # and training goes on
    assert opt.counters()["steps"] == before["steps"] + 2
    _assert_healthy(model, opt)

    strict = OPTS[name](_model(), on_nonfinite="raise")
    snap = _snapshot(strict.model, strict)
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step(lambda: _loss(strict.model(x), y) + float("inf"))
    assert _unchanged(strict.model, strict, snap) and strict.counters()["skipped_steps"] == 1


# ------------------------------------------------------------------------------------------------------------
# corrupted optimizer state (NaN / Inf written into a factor, an inverse, the momentum)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_factor_in_the_state_is_reset_and_counted(name, value):
    model = _model()
    opt = OPTS[name](model)
    _steps(model, opt, 3)
    for key in _factor_key(opt):
        opt.state[model[0].weight][key][1, 1] = value
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _steps(model, opt, 1, seed=70)
    c = opt.counters()
    assert c["state_resets"] == 1
    _assert_healthy(model, opt)
    _steps(model, opt, 3, seed=80)
    assert opt.counters()["steps"] >= 6 and opt.counters()["state_resets"] == 1
    _assert_healthy(model, opt)


@pytest.mark.parametrize("name", ["kfac", "kfac_eigh"])
@pytest.mark.parametrize("key", ["momentum", "inverse"])
def test_kfac_nonfinite_momentum_or_inverse_is_reset(name, key):
    model = _model()
    opt = OPTS[name](model, inv_every=50)
    _steps(model, opt, 3)  # inverses not due at the next step: the reset must refresh them itself
    st = opt.state[model[3].weight]
    k = key if key == "momentum" else ("A_inv" if "A_inv" in st else "QA")
    st[k][0, 0] = float("nan")
    before = opt.counters()
    with pytest.warns(RuntimeWarning, match="momentum or inverse"):
        _steps(model, opt, 1, seed=70)
    c = opt.counters()
    assert c["state_resets"] == 1 and c["steps"] == before["steps"] + 1
    assert c["inverse_refreshes"] == before["inverse_refreshes"] + 1
    _assert_healthy(model, opt)


# ------------------------------------------------------------------------------------------------------------
# ill-conditioned curvature
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
def test_singular_and_indefinite_factors(name):
    model = _model()
    tiny = dict(damping=1e-12) if name.startswith("kfac") else dict(damping=1e-10)
    opt = OPTS[name](model, **tiny)
    x, y = _data()
    x[:, :3] = 0.0  # the first layer's A is singular (3 zero rows and columns)
    for _ in range(3):
        opt.step(lambda: _loss(model(x), y))
    _assert_healthy(model, opt)
    w = model[0].weight
    opt.state[w]["A"].copy_(-torch.eye(9, dtype=D64))  # indefinite, kept by stat_decay = 1
    opt.param_groups[0]["stat_decay"].fill_(1.0)
    before = opt.counters()
    for _ in range(3):
        opt.step(lambda: _loss(model(x), y))
    c = opt.counters()
    _assert_healthy(model, opt)
    if name == "kfac":
        assert c["jitter_fallbacks"] > 0 and c["psd_fallbacks"] > before["psd_fallbacks"]
    elif name == "kbfgs" or name == "kbfgsl":
        # y_a = (A + sqrt(lam) I) s_a has s_a^T y_a < 0: every H_a update is rejected, and counted
        assert c["rejected_a"] >= before["rejected_a"] + 3
    assert c["steps"] == before["steps"] + 3


@pytest.mark.parametrize("name", OPTS)
def test_negative_curvature_streak(name):
    """A concave loss for several steps: K-BFGS's pairs have s^T y < 0 (Powell damping or the skip rule keep
    H_g positive definite, counted as rejected pairs when skipped); K-FAC's Fisher is PSD regardless."""
    model = _model()
    opt = OPTS[name](model, lr=0.01)
    _steps(model, opt, 2)
    x, _ = _data()
    for _ in range(6):
        opt.step(lambda: -0.5 * model(x).pow(2).sum(1).mean())
    _assert_healthy(model, opt)
    c = opt.counters()
    assert c["steps"] == 8 and c["skipped_steps"] == 0
    if name.startswith("kbfgs"):
        for k in ("H_g",) if name == "kbfgs" else ():
            e = torch.linalg.eigvalsh(opt.state[model[0].weight][k])
            assert e.min() > 0  # still positive definite


@pytest.mark.parametrize("name", OPTS)
def test_zero_learning_rate_moves_nothing(name):
    model = _model()
    opt = OPTS[name](model, lr=0.0, fallback="sgd")
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt, 4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    c = opt.counters()
    assert c["steps"] == 4 and c["skipped_steps"] == 0
    if name.startswith("kbfgs"):
        assert c["rejected_g"] >= 3 * 2  # s = h - h+ = 0: every H_g pair after the first is rejected
    _assert_healthy(model, opt)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch(name, reduction):
    model = _model()
    opt = OPTS[name](model)
    _steps(model, opt, 2)
    snap = _snapshot(model, opt)
    x, y = _data(0)

    def closure():
        out = model(x)
        r = 0.5 * (out - y).pow(2).sum(1)
        return r.mean() if reduction == "mean" else r.sum()

    # the loss is NaN (mean) or 0 (sum) with zero gradients, and no layer saw a row: a clear error
    with pytest.raises(ValueError, match="empty batch"):
        opt.step(closure)
    assert opt.counters()["skipped_steps"] == 0
    assert _unchanged(model, opt, snap)
    _steps(model, opt, 2, seed=40)
    assert opt.counters()["steps"] == 4
    _assert_healthy(model, opt)
