"""BlockHF (block-diagonal Hessian-free, reconstructed): the block GGN operator against explicit Jacobians,
the per-block damped solve, warm start, curvature batch, convergence against Adam, state dicts,
non-finite handling and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv.optim.block_hf as bhf
from fastcurv import hvp as H
from fastcurv.optim import BlockHF
from tests.optim.test_newton_cg import _autoencoder_run, _one_thread, _data, _flat, _mlp, _params

DT = torch.float64

@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: one intra-op thread (see ``_one_thread``)."""
    with _one_thread():
        yield


def _dense_ggn(m: nn.Module, loss_fn, x, y, params) -> torch.Tensor:
    """G = J^T H_l J from torch.autograd.functional (J over ``params`` in that order)."""
    names = {p: n for n, p in m.named_parameters()}
    shapes = [p.shape for p in params]
    theta = _flat([p.detach() for p in params])

    def out_of(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for p, s in zip(params, shapes):
            ps[names[p]] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return torch.func.functional_call(m, ps, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(out_of, theta)
    o = out_of(theta).detach()
    oshape = m(x).shape
    Hl = torch.autograd.functional.hessian(lambda z: loss_fn(z.view(oshape), y), o)
    return J.T @ Hl @ J


def _blockdiag_matvec(G: torch.Tensor, sizes, v: torch.Tensor) -> torch.Tensor:
    out, i = [], 0
    for s in sizes:
        out.append(G[i : i + s, i : i + s] @ v[i : i + s])
        i += s
    return torch.cat(out)


@pytest.mark.parametrize("loss", ["ce", "mse", "custom"])
@pytest.mark.parametrize("partition", ["layers", "parameters", "reordered"])
def test_operator_equals_diagonal_blocks_of_the_explicit_ggn(loss, partition):
    m = _mlp((4, 5, 3, 3))
    x, yc = _data(n=7)
    if loss == "ce":
        loss_fn, y = F.cross_entropy, yc
    elif loss == "mse":
        loss_fn, y = F.mse_loss, torch.randn(7, 3, dtype=DT)
    else:  # no analytic loss Hessian: autograd inside the operator
        loss_fn, y = (lambda o, t: ((o - t) ** 4).mean() + (o.sin() * t).sum()), torch.randn(7, 3, dtype=DT)
    lins = [m[0], m[2], m[4]]
    if partition == "layers":
        blocks = None
        order = [[lin.weight, lin.bias] for lin in lins]
    elif partition == "parameters":
        order = [[p] for p in m.parameters()]
        blocks = order
    else:
        order = [[lins[2].bias, lins[0].weight], [lins[1].weight, lins[1].bias, lins[2].weight], [lins[0].bias]]
        blocks = order
    opt = BlockHF(m, loss_fn, blocks=blocks)
    op, seg, flat = opt.block_operator((x, y))
    params = [p for blk in order for p in blk]
    assert flat.params == params
    G = _dense_ggn(m, loss_fn, x, y, params)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = torch.randn(seg.n, generator=g, dtype=DT)
        got = op(v, [True] * seg.nblocks)
        want = _blockdiag_matvec(G, seg.sizes, v)
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-13 * want.abs().max())
    # an inactive block's product is not computed (zeros), the others are unchanged
    act = [b != 1 for b in range(seg.nblocks)]
    part = op(v, act).split(seg.sizes)
    assert bool((part[1] == 0).all())
    for b in (0, 2):
        assert torch.allclose(part[b], want.split(seg.sizes)[b], rtol=1e-11, atol=1e-13 * want.abs().max())
    # the same products as fastcurv.hvp.block_ggn_vp
    vs = flat.views(v)
    ref, i = [], 0
    blk_vs = []
    for blk in order:
        blk_vs.append(vs[i : i + len(blk)])
        i += len(blk)
    ref = H.block_ggn_vp(m, loss_fn, (x, y), order, blk_vs)
    assert torch.allclose(op(v, [True] * seg.nblocks), _flat([t for r in ref for t in r]), rtol=1e-11, atol=1e-14)
    # each damped block is PSD (convex losses; the custom one is not convex in the output)
    if loss != "custom":
        i = 0
        for s in seg.sizes:
            ev = torch.linalg.eigvalsh(G[i : i + s, i : i + s] + 1e-3 * torch.eye(s, dtype=DT))
            assert ev.min() >= 1e-3 * (1 - 1e-6)
            i += s


def test_one_step_is_the_per_block_damped_gauss_newton_step():
    """First step (no warm start), full CG solves: δ_b = −(G_bb + λI)^{-1} g_b, θ ← θ + lr δ."""
    m = _mlp((4, 5, 3))
    x, y = _data(n=9)
    lam, lr = 0.05, 0.8
    theta0 = _flat(_params(m))
    G = _dense_ggn(m, F.cross_entropy, x, y, list(m.parameters()))
    ref = copy.deepcopy(m)
    F.cross_entropy(ref(x), y).backward()
    g = _flat([p.grad for p in ref.parameters()])
    opt = BlockHF(m, F.cross_entropy, lr=lr, damping=lam, max_cg_iters=100, cg_tol=1e-13, progress_tol=None)
    sizes = [20 + 5, 15 + 3]
    delta, i = [], 0
    for s in sizes:
        delta.append(-torch.linalg.solve(G[i : i + s, i : i + s] + lam * torch.eye(s, dtype=DT), g[i : i + s]))
        i += s
    delta = torch.cat(delta)
    opt.step(batch=(x, y))
    assert opt.last_step["accepted"], opt.last_step
    assert opt.last_step["cg_exits"] == ["converged", "converged"]
    assert torch.allclose(_flat(_params(m)) - theta0, lr * delta, rtol=1e-8, atol=1e-12)
    # the warm-start state is the CG solution (before the lr scaling)
    assert torch.allclose(_flat([opt.state[p]["delta"] for p in m.parameters()]), delta, rtol=1e-8, atol=1e-12)
    # the prediction uses the block-diagonal model
    q = lr * float(g @ delta) + 0.5 * lr**2 * float(delta @ _blockdiag_matvec(G, sizes, delta))
    assert opt.last_step["predicted"] == pytest.approx(q, rel=1e-8)


def test_warm_start_is_decay_times_the_previous_solution(monkeypatch):
    seen = []
    real = bhf.truncated_cg

    def spy(*args, **kwargs):
        seen.append(None if kwargs.get("x0") is None else kwargs["x0"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(bhf, "truncated_cg", spy)
    m = _mlp()
    x, y = _data()
    opt = BlockHF(m, F.cross_entropy, cg_decay=0.9)
    opt.step(batch=(x, y))
    prev = _flat([opt.state[p]["delta"] for p in m.parameters()]).clone()
    opt.step(batch=(x, y))
    assert seen[0] is None
    assert torch.equal(seen[1], prev * 0.9)
    opt0 = BlockHF(_mlp(), F.cross_entropy, cg_decay=0.0)
    opt0.step(batch=(x, y))
    opt0.step(batch=(x, y))
    assert seen[2] is None and seen[3] is None


def test_curvature_batch_fraction_or_count(monkeypatch):
    sizes = []
    real = bhf._BlockGGNOperator

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, model, loss_fn, batch, flat, blocks, *rest):
            sizes.append((batch[0].shape[0], batch[1].shape[0]))
            super().__init__(model, loss_fn, batch, flat, blocks, *rest)

    monkeypatch.setattr(bhf, "_BlockGGNOperator", Spy)
    x, y = _data(n=10)
    for cb, want in ((None, 10), (1.0, 10), (0.25, 3), (0.01, 1), (4, 4), (100, 10)):
        m = _mlp()
        opt = BlockHF(m, F.cross_entropy, curvature_batch=cb)
        opt.step(batch=(x, y))
        assert sizes[-1] == (want, want), cb
        # the gradient always comes from the whole batch
        ref = copy.deepcopy(_mlp())
        F.cross_entropy(ref(x), y).backward()
        assert torch.allclose(m[0].weight.grad, ref[0].weight.grad, rtol=1e-13)
    opt = BlockHF(_mlp(), F.cross_entropy, curvature_batch=0.5)
    with pytest.raises(TypeError, match="curvature_batch"):
        opt.step(batch=([x], y))


def test_block_hf_beats_adam_on_the_digits_autoencoder():
    """Same minibatches and step count (batch 200, 50 steps), curvature on half of each batch. The per-block
    Newton steps add up across the 8 layers, hence lr = 0.2 (the damping adapts)."""
    final, adam, start, opt = _autoencoder_run(
        lambda m, lf: BlockHF(m, lf, lr=0.2, damping=0.01, max_cg_iters=20, curvature_batch=0.5), "batch"
    )
    assert opt.skipped_steps == 0
    assert final < min(adam.values()) - 0.5 < start, (final, adam)


def test_state_dict_round_trip_is_bitwise():
    """10 + 10 steps through a state dict == 20 steps (float64, CPU): damping, warm start and counters."""
    x, y = _data(n=48, seed=2)
    batches = [(x[i % 4 * 12 : (i % 4 + 1) * 12], y[i % 4 * 12 : (i % 4 + 1) * 12]) for i in range(20)]

    def make(m):
        return BlockHF(m, F.cross_entropy, damping=0.3, curvature_batch=0.5, max_cg_iters=15)

    m1 = _mlp((4, 6, 5, 3))
    o1 = make(m1)
    for b in batches:
        o1.step(batch=b)
    m2 = _mlp((4, 6, 5, 3))
    o2 = make(m2)
    for b in batches[:10]:
        o2.step(batch=b)
    sd_m, sd_o = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3 = _mlp((4, 6, 5, 3), seed=4)
    m3.load_state_dict(sd_m)
    o3 = make(m3)
    o3.load_state_dict(sd_o)
    assert all(o3.state[p]["delta"].dtype == DT for p in m3.parameters())
    for b in batches[10:]:
        o3.step(batch=b)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
    assert torch.equal(o1.lm_damping, o3.lm_damping)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(o1.state[p]["delta"], o3.state[q]["delta"])
    assert o1.counters() == o3.counters()


@pytest.mark.parametrize("where", ["loss", "grad", "curvature"])
def test_nonfinite_step_is_skipped_and_everything_unchanged(where, monkeypatch):
    m = _mlp()
    x, y = _data()
    opt = BlockHF(m, F.cross_entropy)
    opt.step(batch=(x, y))  # state exists: damping, warm start
    params = _params(m)
    deltas = [opt.state[p]["delta"].clone() for p in m.parameters()]
    lam, counters = float(opt.lm_damping), opt.counters()
    xb = x.clone()
    handle = None
    if where == "loss":
        xb[0, 0] = float("nan")
    elif where == "grad":
        handle = m[2].bias.register_hook(lambda gr: gr * float("nan"))
    else:
        class Bad:
            def __init__(self, *a, **k):
                pass

            def __call__(self, v, active):
                return v * float("nan")

        monkeypatch.setattr(bhf, "_BlockGGNOperator", Bad)
    opt.step(batch=(xb, y))
    if handle is not None:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert all(torch.equal(a, opt.state[p]["delta"]) for a, p in zip(deltas, m.parameters()))
    assert float(opt.lm_damping) == lam
    after = opt.counters()
    assert after.pop("skipped_steps") == counters.pop("skipped_steps") + 1
    assert after == counters
    opt.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="non-finite"):
        x2 = x.clone()
        x2[3, 1] = float("inf")
        opt.step(batch=(x2, y))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))


def test_partial_blocks_send_the_rest_to_the_fallback():
    m = _mlp((4, 6, 3))
    x, y = _data()
    opt = BlockHF(m, F.cross_entropy, blocks=[m[0]], fallback="adamw", fallback_lr=1e-2)
    assert opt.fallback_params() == [m[2].weight, m[2].bias]
    assert "AdamW (fallback)" in opt.describe() and "block-HF block 0" in opt.describe()
    before = _params(m)
    opt.step(batch=(x, y))
    assert not torch.equal(before[2], m[2].weight) and "exp_avg" in opt.state[m[2].weight]


def test_bad_construction_and_calls():
    m = _mlp()
    x, y = _data()
    with pytest.raises(TypeError, match="nn.Module"):
        BlockHF(list(m.parameters()), F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn"):
        BlockHF(m, "ce")
    with pytest.raises(ValueError, match="overlap"):
        BlockHF(m, F.cross_entropy, blocks=[[m[0].weight], [m[0].weight, m[0].bias]])
    with pytest.raises(ValueError, match="not a trainable parameter"):
        BlockHF(m, F.cross_entropy, blocks=[[torch.zeros(3, requires_grad=True)]])
    with pytest.raises(TypeError, match="blocks"):
        BlockHF(m, F.cross_entropy, blocks=m[0].weight)
    with pytest.raises(TypeError, match="blocks\\[0\\]"):
        BlockHF(m, F.cross_entropy, blocks=[3])
    with pytest.raises(ValueError, match="no trainable"):
        BlockHF(m, F.cross_entropy, blocks=[[]])
    with pytest.raises(ValueError, match="fraction"):
        BlockHF(m, F.cross_entropy, curvature_batch=1.5)
    with pytest.raises(ValueError, match="sample count"):
        BlockHF(m, F.cross_entropy, curvature_batch=0)
    with pytest.raises(TypeError, match="curvature_batch"):
        BlockHF(m, F.cross_entropy, curvature_batch="half")
    with pytest.raises(ValueError, match="cg_decay"):
        BlockHF(m, F.cross_entropy, cg_decay=1.5)
    with pytest.raises(ValueError, match="progress_tol"):
        BlockHF(m, F.cross_entropy, progress_tol=-1.0)
    with pytest.raises(ValueError, match="damping"):
        BlockHF(m, F.cross_entropy, damping=-1.0)
    with pytest.raises(ValueError, match="fallback"):
        BlockHF(m, F.cross_entropy, fallback="lion")
    opt = BlockHF(m, F.cross_entropy)
    params = _params(m)
    with pytest.raises(ValueError, match="curvature_batch"):
        BlockHF(m, curvature_batch=0.5).step(lambda: F.cross_entropy(m(x), y))
    with pytest.raises(TypeError, match="pair"):
        opt.step(batch=(x, y, y))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert "BlockHF(" in repr(opt)
