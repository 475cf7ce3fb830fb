"""Tests of KBFGS / KBFGSL (fastcurv.optim.kbfgs) and the private compact-form L-BFGS operator.

The parity tests compare the optimizers with ``_RefKBFGS``, an independent float64 re-implementation of the
official iteration (renyiryry/kbfgs_neurips2020_public, ``Kron_BFGS_update`` and ``train_model``) written
here from docs/algorithms.md §1: loops over layers, dense matrices, the explicit inverses the code uses, plain
autograd with ``retain_grad`` on the pre-activations, and nothing imported from fastcurv.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from fastcurv.optim import KBFGS, KBFGSL
from fastcurv.optim._lbfgs import lbfgs_append, lbfgs_apply, lbfgs_memory

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread avoids oversubscription on a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ======================================================================================================
# independent reference of the official iteration (no fastcurv imports below this line until the tests)
# ======================================================================================================
def _bce_sum_mean(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MNIST/CURVES loss of the official code: sigmoid cross-entropy summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]


def _ref_bfgs(H, s, y, g_k):
    """``get_BFGS_formula``: inverse BFGS update with the code's three skip rules."""
    sy = torch.dot(s, y)
    if sy <= 0:
        return H, "skip"
    if sy <= 1e-4 * torch.dot(s, s) * math.sqrt(torch.dot(g_k, g_k).item()):
        return H, "skip"
    rho = 1 / sy
    Hy = H @ y
    H_new = H + (rho**2 * torch.dot(y, Hy) + rho) * torch.outer(s, s) - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
    if torch.isinf(H_new).any():
        return H, "skip"
    return H_new, "ok"


class _RefLBFGS:
    """The code's L-BFGS memory: lists of pairs, compact form with an explicit ``R^{-1}`` (gamma = 1)."""

    def __init__(self, p: int):
        self.p = p
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []

    def hv(self, v):
        if not self.S:
            return v.clone()
        S, Y = torch.stack(self.S), torch.stack(self.Y)
        R = torch.triu(S @ Y.T)
        Rinv = torch.linalg.inv(R)
        D = torch.diag(torch.diagonal(S @ Y.T))
        RinvS = Rinv @ S
        left = torch.cat([RinvS.T, Y.T], dim=1)
        right = torch.cat([(D + Y @ Y.T) @ RinvS - Y, -RinvS], dim=0)
        return v + left @ (right @ v)

    def append(self, s, y, g_k):
        ss, sy = torch.dot(s, s), torch.dot(s, y)
        if not torch.isinf(ss) and sy > 1e-4 * ss * math.sqrt(torch.dot(g_k, g_k).item()):
            if len(self.S) == self.p:
                self.S.pop(0)
                self.Y.pop(0)
            self.S.append(s.clone())
            self.Y.append(y.clone())
            return True
        return False


class _RefKBFGS:
    """One official K-BFGS / K-BFGS(L) iteration per call of :meth:`step`, for an MLP of Linear layers."""

    def __init__(self, Ws, bs, relu, *, limited, history=100, lr=0.3, lam=0.3, rho=0.9, tau=1e-5):
        self.W = [w.detach().clone() for w in Ws]
        self.b = [b.detach().clone() for b in bs]
        self.relu = relu
        self.limited, self.lr, self.lam, self.rho, self.tau = limited, lr, lam, rho, tau
        n = len(Ws)
        self.MW = [torch.zeros_like(w) for w in self.W]
        self.Mb = [torch.zeros_like(b) for b in self.b]
        self.A = [torch.zeros(w.shape[1] + 1, w.shape[1] + 1, dtype=D64) for w in self.W]
        self.Ha = [None] * n
        self.Hg = [None] * n
        self.mem = [_RefLBFGS(history) for _ in range(n)]
        self.s_avg = [torch.zeros(w.shape[0], dtype=D64) for w in self.W]
        self.y_avg = [torch.zeros(w.shape[0], dtype=D64) for w in self.W]
        self.i = 0
        self.warm = False
        self.events = {"powell": 0, "lm": 0, "skip_g": 0}

    def forward(self, W, b, x):
        inputs, pre = [], []
        h = x
        for l in range(len(W)):
            inputs.append(h.detach())
            a = h @ W[l].T + b[l]
            if a.requires_grad:
                a.retain_grad()
            pre.append(a)
            h = torch.relu(a) if self.relu[l] else a
        return h, inputs, pre

    def warm_start(self, batches):
        """``train_initialization``: A = mean over minibatches of [h;1][h;1]^T / N at theta_0."""
        for j, x in enumerate(batches, start=1):
            _, inputs, _ = self.forward(self.W, self.b, x)
            for l, h in enumerate(inputs):
                hh = torch.cat([h, torch.ones(h.shape[0], 1, dtype=D64)], dim=1)
                self.A[l] = self.A[l] * ((j - 1) / j) + (hh.T @ hh / h.shape[0]) * (1 / j)
        self.warm = True

    def _damp(self, l, s, y):
        """``kron_bfgs_update_damping``: Powell on H (mu1 = 0.2), then LM on B (mu2 = sqrt(lambda))."""
        Hy = self.mem[l].hv(y) if self.limited else self.Hg[l] @ y
        sy, yHy = torch.dot(s, y), torch.dot(y, Hy)
        if not sy.item() / yHy.item() > 0.2:
            theta = ((1 - 0.2) * yHy / (yHy - sy)).item()
            s = theta * s + (1 - theta) * Hy
            self.events["powell"] += 1
        mu2 = math.sqrt(self.lam)
        ss, sy = torch.dot(s, s), torch.dot(s, y)
        if not sy / ss > mu2:
            theta = (1 - mu2) * ss / (ss - sy)
            y = theta * y + (1 - theta) * s
            self.events["lm"] += 1
        return s, y

    def step(self, x):
        N = x.shape[0]
        W = [w.clone().requires_grad_(True) for w in self.W]
        b = [v.clone().requires_grad_(True) for v in self.b]
        z, inputs, pre = self.forward(W, b, x)
        loss = _bce_sum_mean(z, x)
        loss.backward()
        a_grad = [N * a.grad for a in pre]
        n = len(W)
        # gradient + tau*theta, momentum EMA (zero start, no bias correction)
        for l in range(n):
            gW = W[l].grad + self.tau * self.W[l]
            gb = b[l].grad + self.tau * self.b[l]
            self.MW[l] = self.rho * self.MW[l] + (1 - self.rho) * gW
            self.Mb[l] = self.rho * self.Mb[l] + (1 - self.rho) * gb
        # step 1 per layer: A, A_LM, (k = 0: H_a, H_g), direction
        A_LM, pW, pb = [], [], []
        for l in range(n):
            hh = torch.cat([inputs[l], torch.ones(N, 1, dtype=D64)], dim=1)
            Ab = hh.T @ hh / N
            if self.i == 0:
                if not self.warm:
                    self.A[l] = Ab  # documented choice: A starts from the first minibatch
            else:
                self.A[l] = 0.9 * self.A[l] + 0.1 * Ab
            A_LM.append(self.A[l] + math.sqrt(self.lam) * torch.eye(self.A[l].shape[0], dtype=D64))
            if self.i == 0:
                self.Ha[l] = torch.linalg.inv(A_LM[l])
                self.Hg[l] = torch.eye(self.W[l].shape[0], dtype=D64)
            Mh = torch.cat([self.MW[l], self.Mb[l].unsqueeze(1)], dim=1)
            delta = self.mem[l].hv(Mh) if self.limited else self.Hg[l] @ Mh
            delta = delta @ self.Ha[l]
            pW.append(-delta[:, :-1])
            pb.append(-delta[:, -1])
        # second pass on the same minibatch at theta + lr p
        W2 = [(self.W[l] + self.lr * pW[l]).requires_grad_(True) for l in range(n)]
        b2 = [(self.b[l] + self.lr * pb[l]).requires_grad_(True) for l in range(n)]
        z2, _, pre2 = self.forward(W2, b2, x)
        _bce_sum_mean(z2, x).backward()
        a_grad2 = [N * a.grad for a in pre2]
        # step 2 per layer: H_g from the (EMA, damped) pair, H_a from the Hessian-action pair
        for l in range(n):
            s = pre[l].detach().mean(0) - pre2[l].detach().mean(0)
            g_k = a_grad[l].mean(0)
            y = g_k - a_grad2[l].mean(0)
            self.s_avg[l] = 0.9 * self.s_avg[l] + 0.1 * s
            self.y_avg[l] = 0.9 * self.y_avg[l] + 0.1 * y
            sd, yd = self._damp(l, self.s_avg[l], self.y_avg[l])
            if self.limited:
                self.events["skip_g"] += not self.mem[l].append(sd, yd, g_k)
            else:
                self.Hg[l], st = _ref_bfgs(self.Hg[l], sd, yd, g_k)
                self.events["skip_g"] += st == "skip"
            abar = torch.cat([inputs[l].mean(0), torch.ones(1, dtype=D64)])
            sa = self.Ha[l] @ abar
            ya = A_LM[l] @ sa
            self.Ha[l], _ = _ref_bfgs(self.Ha[l], sa, ya, abar)
        self.W = [w.detach() for w in W2]
        self.b = [v.detach() for v in b2]
        self.i += 1
        return loss.detach()


# ======================================================================================================
# helpers
# ======================================================================================================
def _mlp(sizes=(10, 6, 3, 10), relu=(True, False, False), seed=0, dtype=D64):
    """Small autoencoder: Linear layers, ReLU where ``relu``; the code layer and the output are linear."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if relu[i]:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(dtype)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _batches(n, N=32, d=10, seed=1, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(N, d, generator=g, dtype=dtype) for _ in range(n)]


def _closure(model, x):
    return lambda: _bce_sum_mean(model(x), x)


def _state_tensors(opt):
    """Every state tensor, keyed (param index, name), plus the parameters."""
    out = {}
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        out[("param", i)] = p.detach().clone()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out[(i, k)] = v.clone()
    return out


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ======================================================================================================
# parity with the official iteration
# ======================================================================================================
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("variant", ["kbfgs", "kbfgsl", "kbfgsl-fifo3"])
def test_parity_with_official_iteration(variant, warm):
    model = _mlp()
    relu = (True, False, False)
    lins = _linears(model)
    limited = variant != "kbfgs"
    history = 3 if variant == "kbfgsl-fifo3" else 100
    ref = _RefKBFGS([m.weight for m in lins], [m.bias for m in lins], relu, limited=limited, history=history)
    opt = KBFGSL(model, history=history, compile=False) if limited else KBFGS(model, compile=False)
    batches = _batches(5)
    if warm:
        wb = _batches(3, seed=7)
        ref.warm_start(wb)
        assert opt.warm_start([_closure(model, x) for x in wb]) == 3
        for m, A in zip(lins, ref.A):
            torch.testing.assert_close(opt.state[m.weight]["A"], A, rtol=1e-12, atol=1e-12)
    tol = dict(rtol=1e-10, atol=1e-10)
    for k, x in enumerate(batches):
        l_ref = ref.step(x)
        l_opt = opt.step(_closure(model, x))
        torch.testing.assert_close(l_opt, l_ref, **tol)
        for l, m in enumerate(lins):
            st = opt.state[m.weight]
            torch.testing.assert_close(m.weight.detach(), ref.W[l], **tol, msg=f"W{l} step {k}")
            torch.testing.assert_close(m.bias.detach(), ref.b[l], **tol, msg=f"b{l} step {k}")
            torch.testing.assert_close(st["A"], ref.A[l], **tol, msg=f"A{l} step {k}")
            torch.testing.assert_close(st["H_a"], ref.Ha[l], **tol, msg=f"H_a{l} step {k}")
            torch.testing.assert_close(st["s_avg"], ref.s_avg[l], **tol)
            torch.testing.assert_close(st["y_avg"], ref.y_avg[l], **tol)
            Mh = torch.cat([ref.MW[l], ref.Mb[l].unsqueeze(1)], dim=1)
            torch.testing.assert_close(st["grad_momentum"], Mh, **tol)
            if not limited:
                torch.testing.assert_close(st["H_g"], ref.Hg[l], **tol, msg=f"H_g{l} step {k}")
            else:
                cnt = int(st["lbfgs_count"])
                mem = ref.mem[l]
                assert cnt == len(mem.S)
                if cnt:
                    torch.testing.assert_close(st["lbfgs_S"][-cnt:], torch.stack(mem.S), **tol)
                    torch.testing.assert_close(st["lbfgs_Y"][-cnt:], torch.stack(mem.Y), **tol)
                # the operator (and so the next direction) agrees on a probe matrix
                V = torch.randn(m.weight.shape[0], 4, dtype=D64)
                torch.testing.assert_close(lbfgs_apply(st["lbfgs_left"], st["lbfgs_right"], V), mem.hv(V), **tol)
    assert opt.steps == 5 and opt.skipped_steps == 0
    # the iteration exercised the interesting branches (a test that cannot fail is a defect)
    assert ref.events["lm"] > 0 or ref.events["powell"] > 0
    if variant == "kbfgsl-fifo3":
        assert all(len(m.S) == 3 for m in ref.mem)


@pytest.mark.parametrize("limited", [False, True], ids=["kbfgs", "kbfgsl"])
def test_parity_damping_and_skip_branches_exercised(limited):
    """A tiny lambda and lr = 1: Powell and LM damping both fire and an H_g update is skipped (KBFGS) / a
    pair rejected (KBFGSL); the parity still holds and the optimizer counts the same skips."""
    model = _mlp(seed=0)
    relu = (True, False, False)
    lins = _linears(model)
    ref = _RefKBFGS([m.weight for m in lins], [m.bias for m in lins], relu, limited=limited, lr=1.0, lam=1e-6)
    kw = dict(lr=1.0, damping=1e-6, compile=False, blowup_factor=None)  # the official iteration has no guard
    opt = KBFGSL(model, **kw) if limited else KBFGS(model, **kw)
    for x in _batches(5, seed=5):
        ref.step(x)
        opt.step(_closure(model, x))
    for l, m in enumerate(lins):
        torch.testing.assert_close(m.weight.detach(), ref.W[l], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(opt.state[m.weight]["H_a"], ref.Ha[l], rtol=1e-10, atol=1e-10)
        if not limited:
            torch.testing.assert_close(opt.state[m.weight]["H_g"], ref.Hg[l], rtol=1e-10, atol=1e-10)
        else:
            assert int(opt.state[m.weight]["lbfgs_count"]) == len(ref.mem[l].S)
    assert ref.events["lm"] > 0 and ref.events["powell"] > 0 and ref.events["skip_g"] > 0
    assert opt.counters()["rejected_g"] == ref.events["skip_g"]


# ======================================================================================================
# compact-form L-BFGS operator
# ======================================================================================================
def _dense_bfgs_chain(pairs, d, gamma=1.0):
    H = gamma * torch.eye(d, dtype=D64)
    for s, y in pairs:
        rho = 1 / torch.dot(s, y)
        V = torch.eye(d, dtype=D64) - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    return H


def _two_loop(pairs, v, gamma=1.0):
    q = v.clone()
    alphas = []
    for s, y in reversed(pairs):
        a = torch.dot(s, q) / torch.dot(s, y)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        beta = torch.dot(y, r) / torch.dot(s, y)
        r = r + s * (a - beta)
    return r


@pytest.mark.parametrize("d,p,n", [(7, 3, 5), (5, 8, 6), (12, 4, 4), (1, 2, 3)])
def test_lbfgs_compact_equals_bfgs_chain_and_two_loop(d, p, n):
    g = torch.Generator().manual_seed(d * 100 + p)
    mem = lbfgs_memory(p, d, dtype=D64, device=torch.device("cpu"))
    pairs = []
    yes = torch.ones((), dtype=torch.bool)
    for _ in range(n):
        s = torch.randn(d, generator=g, dtype=D64)
        y = s * (0.5 + torch.rand(d, generator=g, dtype=D64)) + 0.1 * torch.randn(d, generator=g, dtype=D64)
        if torch.dot(s, y) <= 0:
            y = -y
        S, Y, c, L, R = lbfgs_append(mem["S"], mem["Y"], mem["count"], s, y, yes)
        mem.update(S=S, Y=Y, count=c, left=L, right=R)
        pairs.append((s, y))
    kept = pairs[-p:]
    assert int(mem["count"]) == len(kept)
    torch.testing.assert_close(mem["S"][-len(kept):], torch.stack([s for s, _ in kept]))
    V = torch.randn(d, 3, generator=g, dtype=D64)
    Hv = lbfgs_apply(mem["left"], mem["right"], V)
    torch.testing.assert_close(Hv, _dense_bfgs_chain(kept, d) @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Hv[:, 0], _two_loop(kept, V[:, 0]), rtol=1e-12, atol=1e-12)


def test_lbfgs_rejected_pair_leaves_memory_bitwise_unchanged():
    g = torch.Generator().manual_seed(0)
    mem = lbfgs_memory(3, 4, dtype=D64, device=torch.device("cpu"))
    s = torch.randn(4, generator=g, dtype=D64)
    S, Y, c, L, R = lbfgs_append(mem["S"], mem["Y"], mem["count"], s, s * 2, torch.tensor(True))
    S2, Y2, c2, L2, R2 = lbfgs_append(S, Y, c, s * 3, s, torch.tensor(False))
    for a, b in ((S, S2), (Y, Y2), (c, c2), (L, L2), (R, R2)):
        assert torch.equal(a, b)
    empty = lbfgs_memory(3, 4, dtype=D64, device=torch.device("cpu"))
    v = torch.randn(4, generator=g, dtype=D64)
    assert torch.equal(lbfgs_apply(empty["left"], empty["right"], v), v)  # empty memory: H = I


def test_kbfgsl_with_unbounded_memory_equals_kbfgs():
    """No eviction: the compact form of all accepted pairs from H_0 = I is the dense BFGS chain."""
    finals = []
    for cls in (KBFGS, KBFGSL):
        model = _mlp(seed=2)
        opt = cls(model, compile=False)
        for x in _batches(8, seed=3):
            opt.step(_closure(model, x))
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# ======================================================================================================
# convergence
# ======================================================================================================
def _digits():
    """fastcurv.data's small deep autoencoder (scikit-learn's digits, 64-100-50-25-8-25-50-100-64)."""
    from fastcurv.data import ProblemError, load_problem

    try:
        prob = load_problem("digits")
    except (ProblemError, ImportError) as e:  # scikit-learn is an optional dependency
        pytest.skip(f"digits problem unavailable: {e}")
    return prob.train_x, prob.build_model, prob.loss_fn


def test_convergence_beats_adam_on_deep_autoencoder():
    """Same minibatches, same number of steps: KBFGS and KBFGSL (lr = 1, the README's advice is to tune only
    lr and damping) end with a lower full training loss than Adam with the best lr of a small grid."""
    X, build, loss_fn = _digits()
    B, steps = 100, 150
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(X.shape[0], generator=g) for _ in range(steps * B // X.shape[0] + 1)])
    batches = [X[order[i * B : (i + 1) * B]] for i in range(steps)]

    def full(m):
        with torch.no_grad():
            return float(loss_fn(m(X), X))

    adam = {}
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        m = build(seed=0)
        o = torch.optim.Adam(m.parameters(), lr=lr)
        for x in batches:
            o.zero_grad()
            loss_fn(m(x), x).backward()
            o.step()
        adam[lr] = full(m)
    best_adam = min(adam.values())
    for cls in (KBFGS, KBFGSL):
        m = build(seed=0)
        start = full(m)
        o = cls(m, lr=1.0, compile=False)
        for x in batches:
            o.step(lambda: loss_fn(m(x), x))
        final = full(m)
        assert o.skipped_steps == 0
        assert final < best_adam < start, (cls.__name__, final, adam)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_full_batch_loss_decreases_monotonically(cls):
    """Deterministic full batch, small lr, pair_decay = 0 (the official full-batch setting)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 10))
    model = model.double()
    x = _batches(1, N=64)[0]
    opt = cls(model, lr=0.05, pair_decay=0.0, compile=False)
    losses = [float(opt.step(_closure(model, x))) for _ in range(30)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1e-3


# ======================================================================================================
# Conv2d, bias-free layers, fallback, gradients after the step
# ======================================================================================================
def test_conv_kernel1_equals_linear():
    """A 1x1 convolution on 1x1 images has the linear layer's factor structure: identical iterates."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6, bias=False)).double()
    conv = nn.Sequential(nn.Conv2d(6, 5, 1), nn.Tanh(), nn.Conv2d(5, 6, 1, bias=False)).double()
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight.view(5, 6, 1, 1))
        conv[0].bias.copy_(lin[0].bias)
        conv[2].weight.copy_(lin[2].weight.view(6, 5, 1, 1))
    o1, o2 = KBFGS(lin, compile=False), KBFGS(conv, compile=False)
    for x in _batches(4, d=6):
        o1.step(lambda: F.mse_loss(lin(x), x))
        o2.step(lambda: F.mse_loss(conv(x[:, :, None, None]).flatten(1), x))
    torch.testing.assert_close(conv[0].weight.flatten(1), lin[0].weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv[2].weight.flatten(1), lin[2].weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o2.state[conv[0].weight]["H_a"], o1.state[lin[0].weight]["H_a"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_conv2d_model_runs_and_reduces_loss(cls):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )
    x = torch.randn(32, 1, 8, 8)
    t = torch.randn(32, 3)
    opt = cls(model, lr=0.3, compile=False)
    assert "0 fallback" in opt.describe() and "K-BFGS" in opt.describe()
    closure = lambda: F.mse_loss(model(x), t)  # noqa: E731
    with torch.no_grad():
        first = float(closure())
    for _ in range(30):
        opt.step(closure)
    assert opt.skipped_steps == 0
    with torch.no_grad():
        assert float(closure()) < 0.5 * first


def test_fallback_parameters_sgd_momentum_and_describe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 6)).double()
    opt = KBFGS(model, lr=0.1, momentum=0.9, weight_decay=1e-3, compile=False)
    text = opt.describe()
    assert "1.weight" in text and "fallback" in text and "2 fallback" in text
    assert len(opt.fallback_params()) == 2
    ln = model[1]
    w0 = ln.weight.detach().clone()
    x = _batches(1, d=6)[0]
    opt.step(lambda: F.mse_loss(model(x), x))
    # first step of the EMA-momentum SGD: w - lr (1 - mom)(grad + wd w); .grad is the first-pass gradient
    expect = w0 - 0.1 * (1 - 0.9) * (ln.weight.grad + 1e-3 * w0)
    torch.testing.assert_close(ln.weight.detach(), expect, rtol=1e-14, atol=1e-14)


def test_grad_after_step_is_first_pass_gradient():
    model = _mlp()
    twin = copy.deepcopy(model)
    x = _batches(1)[0]
    opt = KBFGS(model, compile=False)
    opt.step(_closure(model, x))
    _bce_sum_mean(twin(x), x).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_scheduler_changes_lr_tensor_in_place_and_is_used():
    model = _mlp()
    opt = KBFGS(model, compile=False)
    lr_t = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k == 2 else 0.5)
    for k, x in enumerate(_batches(4)):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(_closure(model, x))
        sched.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved == (k != 2)  # lr = 0 at step 2: theta unchanged (factors still update)
    assert opt.param_groups[0]["lr"] is lr_t and float(lr_t) == pytest.approx(0.15)


# ======================================================================================================
# state_dict round trip
# ======================================================================================================
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_state_dict_round_trip_is_bitwise(cls, warm):
    import io

    kw = dict(history=4) if cls is KBFGSL else {}  # a small memory: eviction happens before the save
    batches = _batches(20, seed=11)
    warm_b = _batches(2, seed=12)

    def fresh():
        model = _mlp(seed=4)
        return model, cls(model, compile=False, **kw)

    m1, o1 = fresh()
    if warm:
        o1.warm_start([_closure(m1, x) for x in warm_b])
    for x in batches:
        o1.step(_closure(m1, x))

    m2, o2 = fresh()
    if warm:
        o2.warm_start([_closure(m2, x) for x in warm_b])
    for x in batches[:10]:
        o2.step(_closure(m2, x))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m3, o3 = fresh()
    m3.load_state_dict(saved["model"])
    o3.load_state_dict(saved["opt"])
    assert o3.steps == 10 and o3._warm == warm
    _assert_bitwise(_state_tensors(o3), _state_tensors(o2))
    for x in batches[10:]:
        o3.step(_closure(m3, x))
    _assert_bitwise(_state_tensors(o3), _state_tensors(o1))
    assert o3.counters() == o1.counters()
    for k, v in o1.param_groups[0].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(o3.param_groups[0][k], v) and o3.param_groups[0][k].dtype == v.dtype


# ======================================================================================================
# non-finite steps: skipped, everything bitwise unchanged
# ======================================================================================================
def _nan_closure(model, x, where):
    """A closure whose loss (``where="loss1"``/``"loss2"``: first / second call) or gradient (``"grad"``:
    finite loss, NaN gradient through sqrt at 0) is not finite."""
    calls = [0]

    def closure():
        calls[0] += 1
        loss = _bce_sum_mean(model(x), x)
        if where == "loss1" and calls[0] == 1 or where == "loss2" and calls[0] == 2:
            return loss * float("nan")
        if where == "grad" and calls[0] == 1:
            return loss + torch.sqrt(0 * model[0].weight.sum())
        return loss

    return closure


@pytest.mark.parametrize("where", ["loss1", "loss2", "grad"])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_nonfinite_step_is_skipped_and_leaves_everything_unchanged(cls, where):
    batches = _batches(5, seed=21)
    m1, m2 = _mlp(seed=5), _mlp(seed=5)
    o1, o2 = cls(m1, compile=False), cls(m2, compile=False)
    for k, x in enumerate(batches):
        if k == 2:
            before = _state_tensors(o1)
            o1.step(_nan_closure(m1, x, where))
            _assert_bitwise(_state_tensors(o1), before)
            assert o1.skipped_steps == 1 and o1.steps == 2
            continue
        o1.step(_closure(m1, x))
        o2.step(_closure(m2, x))
    # the run with a skipped step is the run without that step, bitwise
    _assert_bitwise(_state_tensors(o1), _state_tensors(o2))
    assert o1.steps == o2.steps == 4 and o2.skipped_steps == 0


def test_nonfinite_on_first_step_keeps_first_step_semantics():
    m1, m2 = _mlp(seed=6), _mlp(seed=6)
    o1, o2 = KBFGS(m1, compile=False), KBFGS(m2, compile=False)
    b = _batches(3, seed=22)
    o1.step(_nan_closure(m1, b[0], "loss2"))
    assert o1.skipped_steps == 1 and o1.steps == 0
    for x in b[1:]:
        o1.step(_closure(m1, x))
        o2.step(_closure(m2, x))
    _assert_bitwise(_state_tensors(o1), _state_tensors(o2))


@pytest.mark.parametrize("where", ["loss1", "loss2", "grad"])
def test_nonfinite_raise_mode(where):
    model = _mlp()
    opt = KBFGSL(model, compile=False, on_nonfinite="raise")
    x0, x1 = _batches(2)
    opt.step(_closure(model, x0))
    before = _state_tensors(opt)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(_nan_closure(model, x1, where))
    _assert_bitwise(_state_tensors(opt), before)
    assert opt.skipped_steps == 1 and opt.steps == 1


# ======================================================================================================
# bad construction and misuse
# ======================================================================================================
def test_bad_construction_errors():
    ok = _mlp()
    with pytest.raises(ValueError, match="no supported layer"):
        KBFGS(nn.Sequential(nn.LayerNorm(4), nn.Tanh()))
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen[0].bias.requires_grad_(True)
    with pytest.raises(ValueError, match="no supported layer.*frozen"):
        KBFGS(frozen)
    with pytest.raises(TypeError, match="lr"):
        KBFGS(_mlp(), lr="0.1")
    with pytest.raises(TypeError, match="lr"):
        KBFGS(_mlp(), lr=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="lr"):
        KBFGS(_mlp(), lr=-0.1)
    with pytest.raises(ValueError, match="damping"):
        KBFGS(_mlp(), damping=0.0)
    with pytest.raises(ValueError, match="momentum"):
        KBFGS(_mlp(), momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        KBFGS(_mlp(), weight_decay=float("nan"))
    with pytest.raises(ValueError, match="history"):
        KBFGSL(_mlp(), history=0)
    with pytest.raises(TypeError, match="history"):
        KBFGSL(_mlp(), history=2.5)
    with pytest.raises(TypeError, match="nn.Module"):
        KBFGS(list(ok.parameters()))
    with pytest.raises(ValueError, match="on_nonfinite"):
        KBFGS(_mlp(), on_nonfinite="ignore")
    KBFGS(ok, lr=torch.tensor(0.1, dtype=D64))  # a 0-d tensor is fine
    # a model already owned by an optimizer: a second one takes its layers over, the first one then refuses
    first = KBFGS(ok)
    KBFGS(ok)
    with pytest.raises(RuntimeError, match="taken over"):
        first.step(lambda: ok(torch.zeros(2, ok[0].in_features, dtype=D64)).sum())


def test_misuse_errors():
    model = _mlp()
    opt = KBFGS(model, compile=False)
    x = _batches(1)[0]
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="at least one"):
        opt.warm_start([])
    with pytest.raises(TypeError, match="iterable"):
        opt.warm_start(_closure(model, x))
    opt.step(_closure(model, x))
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.warm_start([_closure(model, x)])
    opt.param_groups[0]["lr"] = "0.1"
    with pytest.raises(TypeError, match="float or a 0-d tensor"):
        opt.step(_closure(model, x))


# ======================================================================================================
# torch.compile: no recompiles under a scheduler, same numbers as eager, inductor patterns pinned
# ======================================================================================================
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_compiled_update_has_no_recompiles_with_scheduler_and_matches_eager(cls):
    torch._dynamo.reset()
    counters.clear()
    kw = dict(history=3) if cls is KBFGSL else {}
    mc, me = _mlp((6, 4, 6), (True, False), seed=8), _mlp((6, 4, 6), (True, False), seed=8)
    oc, oe = cls(mc, compile=True, **kw), cls(me, compile=False, **kw)
    assert oc.compile_enabled and not oe.compile_enabled
    sc = torch.optim.lr_scheduler.LambdaLR(oc, lambda k: 1.0 / (1 + 0.1 * k))
    se = torch.optim.lr_scheduler.LambdaLR(oe, lambda k: 1.0 / (1 + 0.1 * k))
    graphs = None
    for k, x in enumerate(_batches(22, d=6, seed=31)):
        oc.step(_closure(mc, x))
        oe.step(_closure(me, x))
        sc.step()
        se.step()
        if k == 1:  # warm-up: step 0 (eager first step + phase 2), step 1 (steady phase 1)
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 2
    assert counters["stats"]["unique_graphs"] == graphs  # 20 steps, lr changing every step: no recompile
    assert not counters["graph_break"]
    for p, q in zip(mc.parameters(), me.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    for (k1, v1), (k2, v2) in zip(_state_tensors(oc).items(), _state_tensors(oe).items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-10, msg=str(k1))
    assert oc.counters() == oe.counters()


def _pat_affine_mv(A, s, c):
    return A @ s + s * c  # y_a = A s + sqrt(lambda) s: an mm plus a scaled tensor, never add(..., alpha=)


def _pat_lbfgs_apply(v, left, right, c):
    return lbfgs_apply(left, right, v, 1.0) * c  # gamma v + L (R_m v)


def _pat_ema(A, Ab, beta):
    return beta * A + (1 - beta) * (Ab @ Ab.T)  # EMA with a 0-d tensor beta, the new term from a GEMM


def _pat_counter(cnt, flag, c):
    cnt.add_((~flag).to(torch.int64))  # (1,) int64 counter, never a 0-d float64 one (docs/capture.md pitfall 4)
    return cnt * c


@pytest.mark.parametrize(
    "fn", [_pat_affine_mv, _pat_lbfgs_apply, _pat_ema, _pat_counter],
    ids=["affine_mv", "lbfgs_apply", "ema", "int64_counter"],
)
def test_inductor_patterns_match_eager(fn):
    """Each pattern the compiled phases rely on, compiled with inductor (fullgraph) == eager, and a new
    value of a 0-d float64 hyperparameter (``fill_``, as a scheduler does) is used without a recompile.
    (The L-BFGS append — triangular solve, FIFO shift — is pinned by the KBFGSL compiled-vs-eager test.)"""
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    d, p = 5, 3
    if fn is _pat_affine_mv:
        args = [r(d, d), r(d)]
    elif fn is _pat_lbfgs_apply:
        args = [r(d, 2), r(d, 2 * p), r(2 * p, d)]
    elif fn is _pat_ema:
        args = [r(d, d), r(d, 7)]
    else:
        args = [torch.zeros(1, dtype=torch.int64), torch.tensor(False)]
    c = torch.tensor(0.7, dtype=D64)
    eager_args = [a.clone() for a in args]
    f = torch.compile(fn, fullgraph=True)
    for value in (0.7, 0.3):
        c.fill_(value)
        got = f(*args, c)
        want = fn(*eager_args, c)
        for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(args, eager_args):
            assert torch.equal(a, b)  # in-place effects (the counter) survive compilation
    assert counters["stats"]["unique_graphs"] == 1
