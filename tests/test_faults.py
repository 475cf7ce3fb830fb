"""Fault injection: every optimizer — K-FAC with both inverse kinds, K-BFGS, K-BFGS(L), and (second half of
this file) NewtonCG with complex-step and GGN products, BlockHF with a half-batch curvature subset and
ExactNewton — meets each fault that applies to it, then must either go on (a skipped step, a jitter / PSD
fallback, a rejected pair or step, a state reset, a negative-curvature / steepest-descent exit) or stop with
a clear error — and afterwards no parameter, state tensor, hyperparameter or running Levenberg–Marquardt
damping holds a non-finite value, and ``counters()`` says what happened."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG

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
    # the blow-up guard would reject some of these steps; this test is about the fallbacks and skip rules
    tiny = dict(damping=1e-12 if name.startswith("kfac") else 1e-10, blowup_factor=None)
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
@pytest.mark.parametrize("key", ["lr", "damping"])
def test_nonfinite_hyperparameter_is_a_skipped_step(name, key):
    """A scheduler (or a bug) writing NaN into a hyperparameter with ``fill_``: the step is skipped and nothing
    is written (K-FAC used to write NaN into every parameter)."""
    model = _model()
    opt = OPTS[name](model)
    _steps(model, opt, 2)
    snap = _snapshot(model, opt)
    good = opt.param_groups[0][key].clone()
    opt.param_groups[0][key].fill_(float("nan"))
    _steps(model, opt, 1, seed=60)
    opt.param_groups[0][key].copy_(good)
    assert _unchanged(model, opt, snap)
    assert opt.counters()["skipped_steps"] == 1 and opt.counters()["steps"] == 2
    _steps(model, opt, 2, seed=61)
    assert opt.counters()["steps"] == 4
    _assert_healthy(model, opt)


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


# ============================================================================================================
# the Newton-type optimizers: NewtonCG (complex-step / GGN products), BlockHF (curvature on half the batch),
# ExactNewton. They step with step(closure, batch=(x, y)) (ExactNewton: a closure or batch=, not both) and
# NewtonCG / BlockHF keep a running Levenberg–Marquardt damping (opt.lm_damping) outside the per-parameter state.
# ============================================================================================================
NEWTON = {
    "newton_cg": lambda m, loss_fn=_loss, **kw: NewtonCG(
        m, loss_fn, **{**dict(lr=1.0, damping=0.3, max_cg_iters=10), **kw}
    ),
    "newton_cg_ggn": lambda m, loss_fn=_loss, **kw: NewtonCG(
        m, loss_fn, **{**dict(lr=1.0, damping=0.3, max_cg_iters=10, method="ggn"), **kw}
    ),
    "block_hf": lambda m, loss_fn=_loss, **kw: BlockHF(
        m, loss_fn, **{**dict(lr=1.0, damping=0.3, max_cg_iters=10, curvature_batch=0.5), **kw}
    ),
    "exact_newton": lambda m, loss_fn="mse", **kw: ExactNewton(m, loss_fn, **{**dict(lr=0.5, damping=0.3), **kw}),
}
KRYLOV = ["newton_cg", "newton_cg_ggn", "block_hf"]


@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread (several times faster on a loaded 2-core CI machine, same results)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _newton_model(name: str) -> nn.Sequential:
    """ExactNewton takes Linear + elementwise activations only (no LayerNorm): its own MLP."""
    if name != "exact_newton":
        return _model()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5)).to(D64)


def _nstep(opt, closure, x, y) -> torch.Tensor:
    if isinstance(opt, ExactNewton):
        return opt.step(closure)
    return opt.step(closure, batch=(x, y))  # BlockHF: curvature on the first half of (x, y)


def _nsteps(model, opt, n: int, seed: int = 10) -> None:
    for k in range(n):
        x, y = _data(seed=seed + k)
        _nstep(opt, lambda: _loss(model(x), y), x, y)


def _nsnapshot(model, opt) -> dict:
    params, state = _snapshot(model, opt)
    hyper = {k: v.clone() for k, v in opt.param_groups[0].items() if isinstance(v, torch.Tensor)}
    lm = opt.lm_damping.clone() if hasattr(opt, "lm_damping") else None
    return dict(params=params, state=state, hyper=hyper, lm=lm, counters=opt.counters())


def _nassert_unchanged(model, opt, snap: dict, *, skipped: int) -> None:
    """Parameters, per-parameter state, hyperparameters and the LM damping bitwise as in ``snap``; the
    counters too, except ``skipped_steps`` which moved by ``skipped``."""
    assert _unchanged(model, opt, (snap["params"], snap["state"])), "a parameter or a state tensor changed"
    for k, v in snap["hyper"].items():
        assert torch.equal(opt.param_groups[0][k], v), k
    if snap["lm"] is not None:
        assert torch.equal(opt.lm_damping, snap["lm"]), (float(opt.lm_damping), float(snap["lm"]))
    now, then = opt.counters(), dict(snap["counters"])
    assert now.pop("skipped_steps") == then.pop("skipped_steps") + skipped
    assert now == then


def _nassert_healthy(model, opt) -> None:
    _assert_healthy(model, opt)
    if hasattr(opt, "lm_damping"):
        assert torch.isfinite(opt.lm_damping) and float(opt.lm_damping) > 0


class _NaNGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass puts a NaN into one entry of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[0, 0] = float("nan")
        return g


def _inject(name: str, model, where: str, x, y):
    """A closure (and hook handles to remove) with a non-finite value in a gradient, a layer input or the loss."""
    last = model[-1]
    handles = []
    if where == "gradient":
        if name == "exact_newton":
            # ExactNewton forms the layer gradients in closed form from dL/dz (parameter hooks never fire):
            # the NaN goes into the output gradient, the loss stays finite
            return (lambda: _loss(_NaNGrad.apply(model(x)), y)), handles

        def poison(g):
            g = g.clone()
            g[0, 0] = float("nan")
            return g

        handles.append(last.weight.register_hook(poison))
        return (lambda: _loss(model(x), y)), handles
    if where == "layer_input":  # +inf in the input of the last Linear (forward pre-hook)

        def pre(mod, inp):
            h = inp[0].clone()
            h[3, 2] = float("inf")  # row 3: inside BlockHF's curvature half too
            return (h,)

        handles.append(last.register_forward_pre_hook(pre))
        return (lambda: _loss(model(x), y)), handles
    return (lambda: _loss(model(x), y) + float("nan")), handles


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NEWTON)
@pytest.mark.parametrize("where", ["gradient", "layer_input", "loss"])
def test_newton_nonfinite_gradient_input_or_loss_is_a_skipped_step(name, where):
    model = _newton_model(name)
    opt = NEWTON[name](model)
    _nsteps(model, opt, 3)  # the LM damping and BlockHF's warm start have moved
    snap = _nsnapshot(model, opt)
    x, y = _data(seed=99)
    closure, handles = _inject(name, model, where, x, y)
    loss = _nstep(opt, closure, x, y)
    for h in handles:
        h.remove()
    _nassert_unchanged(model, opt, snap, skipped=1)
    assert torch.isfinite(loss).item() == (where == "gradient")
    _nsteps(model, opt, 2, seed=50)  # and training goes on
    assert opt.counters()["steps"] == snap["counters"]["steps"] + 2 and opt.skipped_steps == 1
    _nassert_healthy(model, opt)

    strict_model = _newton_model(name)
    strict = NEWTON[name](strict_model, on_nonfinite="raise")
    _nsteps(strict_model, strict, 2)
    snap = _nsnapshot(strict_model, strict)
    closure, handles = _inject(name, strict_model, where, x, y)
    with pytest.raises(FloatingPointError, match="non-finite"):
        _nstep(strict, closure, x, y)
    for h in handles:
        h.remove()
    _nassert_unchanged(strict_model, strict, snap, skipped=1)
    _nassert_healthy(strict_model, strict)


def _concave(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -0.5 * out.pow(2).sum(1).mean()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", KRYLOV)
def test_newton_negative_curvature_streak(name):
    """A concave loss (as ``loss_fn``, so the curvature products see it too) for several steps: the Hessian
    (complex step) is indefinite and the GGN J^T H_l J with H_l = -I negative semi-definite. The CG must leave
    at the first disturbing direction (the GGN and BlockHF's blocks: already at the first iteration, so a
    steepest-descent step), the LM damping is raised above that curvature, and the run goes on."""
    model = _model()
    opt = NEWTON[name](model, loss_fn=_concave)
    x, y = _data()
    with torch.no_grad():
        first = float(_concave(model(x), y))
    for _ in range(6):
        opt.step(batch=(x, y))
    _nassert_healthy(model, opt)
    c = opt.counters()
    assert c["steps"] == 6 and c["skipped_steps"] == 0
    blocks = len(opt.blocks) if name == "block_hf" else 1
    if name == "newton_cg":
        assert c["negative_curvature_exits"] + c["steepest_descent_steps"] >= 6
    else:  # every block of every step: p^T G p < 0 at the first iteration
        assert c["steepest_descent_steps"] == 6 * blocks and c["negative_curvature_exits"] == 0
    assert opt.last_step["disturbing_curvature"] < 0
    assert float(opt.lm_damping) >= -opt.last_step["disturbing_curvature"] * (1 - 1e-12)
    with torch.no_grad():
        assert float(_concave(model(x), y)) < first  # descent on the concave objective, not a stall
    assert c["rejected_steps"] < 6


@pytest.mark.usefixtures("one_thread")
def test_exact_newton_strongly_indefinite_blocks():
    """ExactNewton's hidden-layer block B = D W^T B W D + diag(phi'' * W^T g) is strongly indefinite when the
    residuals are large (targets x 100) and tanh saturates; the absolute-value spectrum turns it into a descent
    direction. With the pseudo-inverse (damping 0) and with a tiny damping: finite steps, loss goes down."""
    for damping in (0.0, 1e-8):
        model = _newton_model("exact_newton")
        opt = NEWTON["exact_newton"](model, damping=damping, lr=0.5)
        x, y = _data()
        y = 100.0 * y
        B = opt.hessian_factors(batch=(x, y))[0]["B"]
        e = torch.linalg.eigvalsh(B)
        assert (e[:, 0] < -1e-3 * e.abs().amax(1)).any() and (e[:, -1] > 0).any()  # indefinite blocks
        with torch.no_grad():
            first = float(_loss(model(x), y))
        for _ in range(5):
            opt.step(lambda: _loss(model(x), y))
        c = opt.counters()
        assert c["steps"] == 5 and c["skipped_steps"] == 0
        _nassert_healthy(model, opt)
        with torch.no_grad():
            assert float(_loss(model(x), y)) < first


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NEWTON)
def test_newton_zero_learning_rate_moves_nothing(name):
    model = _newton_model(name)
    opt = NEWTON[name](model, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    _nsteps(model, opt, 4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    c = opt.counters()
    assert c["steps"] == 4 and c["skipped_steps"] == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())  # g was formed
    if name in KRYLOV:  # the trial point is the start point: predicted 0, same loss -> accepted, never rejected
        assert c["rejected_steps"] == 0 and opt.last_step["predicted"] == 0.0 and opt.last_step["accepted"]
        assert c["curvature_products"] > 0  # the direction was computed, only its length is 0
    _nassert_healthy(model, opt)


#: what an empty batch (x[:0], y[:0]) does, per optimizer and loss reduction: "error" = a ValueError naming the
#: empty batch, raised before anything is written (as K-FAC / K-BFGS). A sum over zero samples is a finite 0
#: loss with zero gradients, so only the explicit row count catches it (it used to be a counted step).
EMPTY = {(n, r): "error" for n in ("newton_cg", "newton_cg_ggn", "block_hf", "exact_newton") for r in ("mean", "sum")}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,reduction", list(EMPTY))
def test_newton_empty_batch(name, reduction):
    """Zero rows: either a ValueError naming the empty batch with nothing changed, or a skipped step with
    everything unchanged (pinned per case in ``EMPTY``) — never a counted step or a changed state."""
    expected = EMPTY.get((name, reduction), "either")
    loss_fn = nn.MSELoss(reduction=reduction)
    model = _newton_model(name)
    opt = NEWTON[name](model, loss_fn=loss_fn)
    for k in range(2):
        opt.step(batch=_data(seed=20 + k))
    snap = _nsnapshot(model, opt)
    x, y = _data(0)
    try:
        loss = opt.step(batch=(x, y))
    except ValueError as e:
        assert expected in ("error", "either"), f"expected a skipped step, got ValueError: {e}"
        assert "empty batch" in str(e), e
        _nassert_unchanged(model, opt, snap, skipped=0)
    else:
        assert expected in ("skip", "either"), "expected a ValueError naming the empty batch"
        if reduction == "mean":
            assert torch.isnan(loss)
        _nassert_unchanged(model, opt, snap, skipped=1)
    for k in range(2):  # training goes on
        opt.step(batch=_data(seed=40 + k))
    assert opt.counters()["steps"] == 4
    _nassert_healthy(model, opt)




@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "name,key,value",
    [("newton_cg", "lm_damping", float("nan")), ("block_hf", "lm_damping", float("inf")),
     ("block_hf", "delta", float("nan"))],
)
def test_newton_nonfinite_state_is_reset_and_counted(name, key, value):
    model = _newton_model(name)
    opt = NEWTON[name](model)
    _nsteps(model, opt, 3)
    if key == "lm_damping":
        opt.lm_damping.fill_(value)  # the property is the live running value
    else:
        opt.state[model[0].weight]["delta"][1, 1] = value
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _nsteps(model, opt, 1, seed=70)
    assert opt.counters()["state_resets"] == 1
    _nassert_healthy(model, opt)
    _nsteps(model, opt, 3, seed=80)
    c = opt.counters()
    assert c["steps"] >= 6 and c["state_resets"] == 1
    _nassert_healthy(model, opt)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "name",
    [*KRYLOV, "exact_newton"],
)
def test_newton_nonfinite_learning_rate_changes_nothing(name):
    """A scheduler that writes NaN into ``lr`` (fill_): a skipped step or a clear error, nothing written."""
    model = _newton_model(name)
    opt = NEWTON[name](model)
    _nsteps(model, opt, 2)
    snap = _nsnapshot(model, opt)
    opt.param_groups[0]["lr"].fill_(float("nan"))
    x, y = _data(seed=99)
    skipped = 1
    try:
        _nstep(opt, lambda: _loss(model(x), y), x, y)
    except (ValueError, FloatingPointError) as e:
        assert "lr" in str(e), e
        skipped = 0
    opt.param_groups[0]["lr"].copy_(snap["hyper"]["lr"])
    _nassert_unchanged(model, opt, snap, skipped=skipped)
    _nsteps(model, opt, 2, seed=50)
    assert opt.counters()["steps"] == snap["counters"]["steps"] + 2
    _nassert_healthy(model, opt)
