"""Mixed precision: bf16 autocast (activations and their gradients in bf16, factors / inverses / BFGS matrices in
float32) and ``torch.amp.GradScaler`` through ``opt.step(closure, scaler=scaler)`` (fp16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv.ops
from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG

OPTS = {
    "kfac": (KFAC, dict(lr=0.3, damping=0.3)),
    "kbfgs": (KBFGS, dict(lr=0.1, damping=0.3)),
    "kbfgsl": (KBFGSL, dict(lr=0.1, damping=0.3, history=5)),
}


def _autoencoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 32)
    )


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.sigmoid(torch.randn(512, 6, generator=g) @ torch.randn(6, 32, generator=g))


def _loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # the K-BFGS problems' loss: summed over pixels, averaged over the batch (computed in float32)
    return F.binary_cross_entropy_with_logits(out.float(), x, reduction="sum") / x.shape[0]


def _closure(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None):
    """The autoencoder's closure on ``x``, its forward under ``dtype`` autocast (None: plain float32)."""

    def closure() -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
        return _loss(out, x)

    return closure


def _train(name: str, dtype: torch.dtype | None, steps: int = 30, scaler=None, plain: bool = False):
    cls, kw = OPTS[name]
    model = _autoencoder()
    opt = cls(model, **kw)
    X = _data()
    losses = []
    for k in range(steps):
        x = X[(k * 64) % 512 : (k * 64) % 512 + 64]

        closure = _closure(model, x, dtype)

        if plain:
            opt.zero_grad()
            loss = closure()
            (loss if scaler is None else scaler.scale(loss)).backward()
            opt.step(scaler=scaler)
        else:
            loss = opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
        losses.append(float(loss.detach()))
    return losses, model, opt


def _state(opt) -> dict:
    return {(i, k): v for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("name", OPTS)
def test_bf16_autocast_tracks_float32_and_keeps_float32_state(name):
    ref, _, _ = _train(name, None)
    got, model, opt = _train(name, torch.bfloat16)
    assert ref[-1] < 0.95 * ref[0]  # it trains
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert rel < 0.03, f"bf16 loss curve departs from float32 by {rel:.3%}"
    assert opt.counters()["skipped_steps"] == 0
    for k, t in _state(opt).items():
        assert t.dtype in (torch.float32, torch.int64), k  # factors, inverses, BFGS matrices: float32
        assert torch.isfinite(t).all(), k
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_capture_hands_bf16_rows_straight_to_the_factor_op(monkeypatch):
    """Under bf16 autocast the layer inputs and output gradients reach ``kron_factor_update_`` as bf16 rows
    (no upcast copy); the op accumulates them into float32 factors."""
    seen = []
    orig = fastcurv.ops.kron_factor_update_

    def spy(A, X, beta):
        seen.append((A.dtype, X.dtype, X.shape))
        return orig(A, X, beta)

    orig_foreach = fastcurv.ops.kron_factor_update_foreach_

    def spy_foreach(As, Xs, beta):  # the capture's deferred CPU path: one call for all layers
        seen.extend((A.dtype, X.dtype, X.shape) for A, X in zip(As, Xs))
        return orig_foreach(As, Xs, beta)

    monkeypatch.setattr(fastcurv.ops, "kron_factor_update_", spy)
    monkeypatch.setattr(fastcurv.ops, "kron_factor_update_foreach_", spy_foreach)
    _train("kfac", torch.bfloat16, steps=1)
    assert seen and all(a == torch.float32 for a, _, _ in seen)
    bf16 = [s for _, x, s in seen if x == torch.bfloat16]
    # A of layers 2-4 (bf16 tanh outputs) and G of all 4 layers (bf16 output gradients); layer 1's input is fp32
    assert len(bf16) == 7 and sum(1 for _, x, _ in seen if x == torch.float32) == 1


@pytest.mark.parametrize("name,plain", [("kfac", False), ("kfac", True), ("kbfgs", False), ("kbfgsl", False)])
def test_grad_scaler_with_a_power_of_two_scale_is_exact(name, plain):
    """A power-of-two loss scale is exact in floating point, so unscaling the gradients and the captured
    statistics (G by S^2, g-bar by S) must give bitwise the unscaled run."""
    ref, m1, o1 = _train(name, None, steps=6, plain=plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    got, m2, o2 = _train(name, None, steps=6, scaler=scaler, plain=plain)
    assert ref == got
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    a, b = _state(o1), _state(o2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", OPTS)
def test_grad_scaler_overflow_skips_the_step_and_backs_off(name):
    """fp16 autocast with a far too large loss scale: the fp16 activation gradients overflow, the scaler
    finds inf in the unscaled gradients, the step is skipped with nothing changed, the scale backs off, and
    training resumes once it is small enough."""
    cls, kw = OPTS[name]
    model = _autoencoder()
    opt = cls(model, **kw)
    x = _data()[:64]

    closure = _closure(model, x, torch.float16)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in _state(opt).items()}
    opt.step(closure, scaler=scaler)
    scaler.update()
    assert opt.counters()["skipped_steps"] == 1 and opt.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(v, state[k]) for k, v in _state(opt).items())
    assert scaler.get_scale() == 2.0**39
    for _ in range(30):
        opt.step(closure, scaler=scaler)
        scaler.update()
    assert opt.steps > 0 and scaler.get_scale() < 2.0**30
    assert all(torch.isfinite(t).all() for t in _state(opt).values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_autocast_with_grad_scaler_tracks_float32():
    ref, _, _ = _train("kfac", None, steps=20)
    got, _, opt = _train("kfac", torch.float16, steps=20, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    assert max(abs(a - b) / abs(a) for a, b in zip(ref, got)) < 0.03
    assert opt.counters()["skipped_steps"] == 0


def test_grad_scaler_protocol_errors_and_user_unscale():
    model = _autoencoder()
    opt = KFAC(model, lr=0.3, damping=0.3)
    x = _data()[:64]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.step(lambda: _loss(model(x), x), scaler=scaler)
    with pytest.raises(RuntimeError, match=r"scaler\.update\(\)"):  # update() forgotten
        opt.step(lambda: _loss(model(x), x), scaler=scaler)
    scaler.update()
    # plain loop: the user unscales first (to clip gradients); the optimizer still unscales the statistics
    ref_model = _autoencoder()
    ref = KFAC(ref_model, lr=0.3, damping=0.3)
    ref.step(lambda: _loss(ref_model(x), x))
    m2 = _autoencoder()
    o2 = KFAC(m2, lr=0.3, damping=0.3)
    sc2 = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    o2.zero_grad()
    sc2.scale(_loss(m2(x), x)).backward()
    sc2.unscale_(o2)
    o2.step(scaler=sc2)
    sc2.update()
    assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), m2.parameters()))


# ------------------------------------------------------------------------------------------------------------
# the Newton-type optimizers: autocast inside the closure (gradient, loss), curvature products as written
# ------------------------------------------------------------------------------------------------------------
NEWTON = {
    "newton_cg": lambda m: NewtonCG(m, _loss, method="ggn", damping=1.0, max_cg_iters=10),
    "block_hf": lambda m: BlockHF(m, _loss, damping=1.0, max_cg_iters=10),
    "exact_newton": lambda m: ExactNewton(m, "bce", lr=0.5, damping=1.0),
}


def _train_newton(name: str, dtype: torch.dtype | None, steps: int = 12, scaler=None):
    model = _autoencoder()
    opt = NEWTON[name](model)
    X = _data()
    losses = []
    for k in range(steps):
        x = X[(k * 64) % 512 : (k * 64) % 512 + 64]

        closure = _closure(model, x, dtype)

        if name == "exact_newton":
            loss = opt.step(closure)
        else:
            loss = opt.step(closure, batch=(x, x), scaler=scaler)
            if scaler is not None:
                scaler.update()
        losses.append(float(loss))
    return losses, model, opt


@pytest.mark.parametrize("name", NEWTON)
def test_newton_bf16_autocast_tracks_float32(name):
    ref, _, _ = _train_newton(name, None)
    got, model, opt = _train_newton(name, torch.bfloat16)
    assert ref[-1] < 0.95 * ref[0]  # it trains
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert rel < 0.03, f"bf16 loss curve departs from float32 by {rel:.3%}"
    assert opt.counters()["skipped_steps"] == 0
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in _state(opt).values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["newton_cg", "block_hf"])
def test_newton_grad_scaler_is_exact_and_overflow_skips(name):
    """A power-of-two scale gives bitwise the unscaled run; a huge one overflows the fp16 activation
    gradients: the step is skipped with nothing changed and the scale backs off."""
    ref, m1, _ = _train_newton(name, None, steps=4)
    got, m2, _ = _train_newton(name, None, steps=4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert ref == got and all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))

    model = _autoencoder()
    opt = NEWTON[name](model)
    x = _data()[:64]

    closure = _closure(model, x, torch.float16)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure, batch=(x, x), scaler=scaler)
    scaler.update()
    assert opt.counters()["skipped_steps"] == 1 and opt.steps == 0 and scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for _ in range(30):
        opt.step(closure, batch=(x, x), scaler=scaler)
        scaler.update()
    assert opt.steps > 0 and all(torch.isfinite(p).all() for p in model.parameters())
