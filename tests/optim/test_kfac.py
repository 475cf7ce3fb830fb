"""Tests of fastcurv.optim.KFAC: parity with a dense float64 re-implementation, convergence, Conv2d (KFC),
compile (graph count, inductor patterns), schedulers, state dicts, non-finite handling, fallbacks, errors."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.optim import KFAC

D64 = torch.float64


# ============================================================================================================
# Dense float64 reference (no fastcurv imports): the K-BFGS code's KFAC baseline, written out per layer.
# ============================================================================================================
class RefKFAC:
    """K-FAC on an MLP of nn.Linear layers with ``act`` between them (not after the last), float64.

    Per step k (0-based, applied steps): ĝ = [∇W + τW | ∇b + τb]; M ← ρM + (1-ρ)ĝ;
    A ← βA + (1-β)·mean(ā āᵀ), G ← βG + (1-β)·mean(g gᵀ) with g = N·∂L/∂h
    (β = 0 on the very first update without warm start); if k % T == 0 or k <= T: A_inv = (A + δ_A I)^-1,
    G_inv = (G + δ_G I)^-1 (dense torch.linalg.inv; δ = √λ, or π-corrected; 'exact' = (A⊗G + λI)^-1
    applied to vec(M) densely);
    P = G_inv M A_inv; ν = min(1, sqrt(κ / (η² Σ⟨P, M⟩))) if KL clipping; W̄ ← W̄ - ην P.
    """

    def __init__(self, Ws, bs, *, act, lr, damping, momentum, wd, beta, T, split="sqrt", kl=None):
        self.Ws = [w.detach().clone() for w in Ws]
        self.bs = [b.detach().clone() for b in bs]
        self.act, self.lr, self.lam, self.rho, self.wd, self.beta, self.T = act, lr, damping, momentum, wd, beta, T
        self.split, self.kl = split, kl
        L = len(Ws)
        self.A = [torch.zeros(w.shape[1] + 1, w.shape[1] + 1, dtype=D64) for w in Ws]
        self.G = [torch.zeros(w.shape[0], w.shape[0], dtype=D64) for w in Ws]
        self.M = [torch.zeros(w.shape[0], w.shape[1] + 1, dtype=D64) for w in Ws]
        self.Ainv = [None] * L
        self.Ginv = [None] * L
        self.Amat = [None] * L  # factors at the last refresh ('exact')
        self.Gmat = [None] * L
        self.k = 0
        self.updates = 0
        self.P = None
        self.nus: list[float] = []

    def forward(self, x):
        Ws = [w.detach().clone().requires_grad_(True) for w in self.Ws]
        bs = [b.detach().clone().requires_grad_(True) for b in self.bs]
        a, ins, hs = x, [], []
        for i, (w, b) in enumerate(zip(Ws, bs)):
            ins.append(a)
            h = a @ w.T + b
            h.retain_grad()
            hs.append(h)
            a = self.act(h) if i + 1 < len(Ws) else h
        return a, Ws, bs, ins, hs

    @staticmethod
    def batch_factors(ins, hs, n):
        As, Gs = [], []
        for a, h in zip(ins, hs):
            a = a.detach()
            ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D64)], 1)
            g = n * h.grad
            As.append(ab.T @ ab / a.shape[0])
            Gs.append(g.T @ g / g.shape[0])
        return As, Gs

    def sampled_G(self, out, ins, hs, Ws, bs, sample_loss):
        for h in hs:
            h.grad = None
        torch.autograd.grad(sample_loss(out), Ws, retain_graph=True)
        return self.batch_factors(ins, hs, out.shape[0])[1]

    def warm_start(self, batches, loss_fn, sample_loss=None):
        As, Gs = None, None
        for j, (x, y) in enumerate(batches, start=1):
            out, Ws, bs, ins, hs = self.forward(x)
            loss = loss_fn(out, y)
            loss.backward(retain_graph=True)
            Ab, Gb = self.batch_factors(ins, hs, x.shape[0])
            if sample_loss is not None:
                Gb = self.sampled_G(out, ins, hs, Ws, bs, sample_loss)
            if j == 1:
                As, Gs = Ab, Gb
            else:
                As = [A * ((j - 1) / j) + B * (1 / j) for A, B in zip(As, Ab)]
                Gs = [A * ((j - 1) / j) + B * (1 / j) for A, B in zip(Gs, Gb)]
        self.A, self.G = As, Gs
        self.updates += len(batches)

    def step(self, x, y, loss_fn, sample_loss=None):
        out, Ws, bs, ins, hs = self.forward(x)
        loss = loss_fn(out, y)
        loss.backward(retain_graph=True)
        Ab, Gb = self.batch_factors(ins, hs, x.shape[0])
        if sample_loss is not None:
            Gb = self.sampled_G(out, ins, hs, Ws, bs, sample_loss)
        beta = self.beta if self.updates > 0 else 0.0
        refresh = self.k % self.T == 0 or self.k <= self.T
        Ps = []
        for i in range(len(Ws)):
            ghat = torch.cat([Ws[i].grad + self.wd * self.Ws[i], (bs[i].grad + self.wd * self.bs[i])[:, None]], 1)
            self.M[i] = self.rho * self.M[i] + (1 - self.rho) * ghat
            self.A[i] = beta * self.A[i] + (1 - beta) * Ab[i]
            self.G[i] = beta * self.G[i] + (1 - beta) * Gb[i]
            A, G = self.A[i], self.G[i]
            if refresh:
                dA = dG = math.sqrt(self.lam)
                if self.split == "pi":
                    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
                    dA, dG = dA * pi, dG / pi
                self.Ainv[i] = torch.linalg.inv(A + dA * torch.eye(A.shape[0], dtype=D64))
                self.Ginv[i] = torch.linalg.inv(G + dG * torch.eye(G.shape[0], dtype=D64))
                self.Amat[i], self.Gmat[i] = A.clone(), G.clone()
            if self.split == "exact":
                Am, Gm = self.Amat[i], self.Gmat[i]
                K = torch.kron(Am, Gm) + self.lam * torch.eye(Am.shape[0] * Gm.shape[0], dtype=D64)
                vec = self.M[i].T.reshape(-1)  # column-major vec(M)
                Ps.append(torch.linalg.solve(K, vec).reshape(Am.shape[0], Gm.shape[0]).T)
            else:
                Ps.append(self.Ginv[i] @ self.M[i] @ self.Ainv[i])
        nu = 1.0
        if self.kl is not None:
            vg = sum(float((P * M).sum()) for P, M in zip(Ps, self.M)) * self.lr**2
            nu = min(1.0, math.sqrt(self.kl / abs(vg)))
        self.nus.append(nu)
        for i, P in enumerate(Ps):
            self.Ws[i] = self.Ws[i] - self.lr * nu * P[:, :-1]
            self.bs[i] = self.bs[i] - self.lr * nu * P[:, -1]
        self.P = [P * nu for P in Ps]
        self.k += 1
        self.updates += 1
        return loss.detach()


def _mlp(sizes=(6, 5, 4, 3), act=nn.Tanh, seed=0, dtype=D64):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _bce(out, y):
    return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]


def _data(n, d_in=6, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=D64)
    y = (torch.rand(n, d_out, generator=g, dtype=D64) > 0.5).to(D64)
    return x, y


PARITY = {
    "default": dict(opt={}, ref={}),
    "pi_eigh_kl": dict(opt=dict(damping_split="pi", inverse="eigh", kl_clip=1e-3), ref=dict(split="pi", kl=1e-3)),
    "exact": dict(opt=dict(damping_split="exact", inverse="eigh"), ref=dict(split="exact")),
    "sampled_warm": dict(opt=dict(fisher="sampled", likelihood="bernoulli", seed=7), ref={}, sampled=True, warm=True),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_dense_reference(name):
    cfg = PARITY[name]
    model = _mlp()
    lins = [m for m in model if isinstance(m, nn.Linear)]
    hp = dict(lr=0.7, damping=0.05, momentum=0.9, weight_decay=1e-3, stat_decay=0.8, inv_every=2)
    ref = RefKFAC(
        [m.weight for m in lins], [m.bias for m in lins], act=torch.tanh, lr=hp["lr"], damping=hp["damping"],
        momentum=hp["momentum"], wd=hp["weight_decay"], beta=hp["stat_decay"], T=hp["inv_every"], **cfg["ref"],
    )
    opt = KFAC(model, **hp, **cfg["opt"], compile=False)
    sample_loss = None
    if cfg.get("sampled"):
        gen = torch.Generator().manual_seed(7)  # the optimizer's documented sampling: bernoulli(sigmoid(z))

        def sample_loss(z):
            t = torch.bernoulli(torch.sigmoid(z.detach()), generator=gen)
            return _bce(z, t)

    def closure_for(x, y):
        def closure():
            out = model(x)
            loss = _bce(out, y)
            return (loss, out) if cfg.get("sampled") else loss

        return closure

    if cfg.get("warm"):
        batches = [_data(8, seed=100 + j) for j in range(3)]
        ref.warm_start(batches, _bce, sample_loss)
        assert opt.warm_start(closure_for(x, y) for x, y in batches) == 3
        for m in lins:  # warm start changes no parameter and leaves no gradient
            assert m.weight.grad is None
        for i, m in enumerate(lins):
            torch.testing.assert_close(opt.state[m.weight]["A"], ref.A[i], rtol=0, atol=1e-12)
            torch.testing.assert_close(opt.state[m.weight]["G"], ref.G[i], rtol=0, atol=1e-12)

    for step in range(5):
        x, y = _data(8, seed=10 + step)
        before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in lins]
        loss = opt.step(closure_for(x, y))
        ref_loss = ref.step(x, y, _bce, sample_loss)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        for i, m in enumerate(lins):
            st = opt.state[m.weight]
            tol = dict(rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(st["A"], ref.A[i], **tol)
            torch.testing.assert_close(st["G"], ref.G[i], **tol)
            torch.testing.assert_close(st["momentum"], ref.M[i], **tol)
            if "A_inv" in st:
                torch.testing.assert_close(st["A_inv"], ref.Ainv[i], **tol)
                torch.testing.assert_close(st["G_inv"], ref.Ginv[i], **tol)
            else:  # eigh: the stored eigenbases diagonalise the factors of the last refresh
                for Q, Fm in ((st["QA"], ref.Amat[i]), (st["QG"], ref.Gmat[i])):
                    D = Q.T @ Fm @ Q
                    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-10
            dW, db = (before[i][0] - m.weight) / hp["lr"], (before[i][1] - m.bias) / hp["lr"]
            direction = torch.cat([dW, db[:, None]], 1)
            torch.testing.assert_close(direction, ref.P[i], **tol)
            torch.testing.assert_close(m.weight.detach(), ref.Ws[i], **tol)
            torch.testing.assert_close(m.bias.detach(), ref.bs[i], **tol)
    if "kl_clip" in cfg["opt"]:
        assert min(ref.nus) < 0.5  # the clipping is active, so the test can tell
    refreshes = sum(1 for k in range(5) if k % 2 == 0 or k <= 2)
    assert opt.counters()["inverse_refreshes"] == refreshes == 4
    assert opt.steps == 5 and opt.skipped_steps == 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one intra-op thread avoids oversubscription on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================================================
# Convergence
# ============================================================================================================
def _autoencoder_problem():
    """fastcurv.data's 'digits' deep autoencoder (64-100-50-25-8-25-50-100-64, sigmoid CE summed over pixels);
    a synthetic low-rank stand-in of the same shape if scikit-learn is missing."""
    try:
        from fastcurv.data import load_problem

        prob = load_problem("digits")
        return prob.train_x, prob.build_model, prob.loss_fn
    except Exception:  # pragma: no cover - optional dependency
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1500, 8, generator=g)
        x = torch.sigmoid(z @ torch.randn(8, 64, generator=g) * 2)
        sizes = [64, 100, 50, 25, 8, 25, 50, 100, 64]

        def build(seed=0):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for i in range(len(sizes) - 1):
                layers.append(nn.Linear(sizes[i], sizes[i + 1]))
                if i + 1 not in (4, len(sizes) - 1):
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        return x, build, _bce


def test_convergence_beats_adam_on_deep_autoencoder():
    X, build, loss_fn = _autoencoder_problem()
    steps, bs = 100, 100
    g = torch.Generator().manual_seed(0)
    perm = torch.cat([torch.randperm(X.shape[0], generator=g) for _ in range(steps * bs // X.shape[0] + 1)])
    batches = [X[perm[i * bs : (i + 1) * bs]] for i in range(steps)]

    def full_loss(m):
        with torch.no_grad():
            return float(loss_fn(m(X), X))

    adam = []
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        m = build(seed=0)
        o = torch.optim.Adam(m.parameters(), lr=lr)
        for xb in batches:
            o.zero_grad()
            loss_fn(m(xb), xb).backward()
            o.step()
        adam.append(full_loss(m))
    m = build(seed=0)
    start = full_loss(m)
    opt = KFAC(m, lr=1.0, damping=0.3)
    for xb in batches:
        opt.step(lambda: loss_fn(m(xb), xb))
    kfac = full_loss(m)
    assert opt.skipped_steps == 0
    assert kfac < min(adam) - 1.0, (kfac, adam)
    assert kfac < 0.6 * start


def test_monotone_decrease_full_batch_small_lr():
    model = _mlp((6, 8, 8, 3))
    x, y = _data(64)
    opt = KFAC(model, lr=0.1, damping=0.1, momentum=0.0, weight_decay=0.0)
    losses = [float(opt.step(lambda: _bce(model(x), y))) for _ in range(30)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.93 * losses[0]


# ============================================================================================================
# Conv2d (KFC)
# ============================================================================================================
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def test_conv2d_kfc_factors_and_training():
    torch.manual_seed(0)
    model = _CNN().to(D64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 8, 8, generator=g, dtype=D64)
    y = torch.randint(0, 3, (16,), generator=g)
    opt = KFAC(model, lr=0.3, damping=0.1)
    assert "Conv2d (KFC) c1" in opt.describe() and "fallback" not in opt.describe().split("\n", 1)[1]

    # dense KFC statistics of the first step: A = L·mean(ā āᵀ) over N·L patch rows, G = mean(g gᵀ),
    # g = N ∂L/∂h
    c1, c2 = model.c1, model.c2
    w1, b1, w2 = c1.weight.detach(), c1.bias.detach(), c2.weight.detach()
    h1 = F.conv2d(x, w1, b1, padding=1).requires_grad_(True)
    a2 = torch.tanh(h1)
    h2 = F.conv2d(a2, w2, None, stride=2, padding=1)
    h2.retain_grad()
    loss = F.cross_entropy(F.linear(torch.tanh(h2).flatten(1), model.fc.weight.detach(), model.fc.bias.detach()), y)
    loss.backward()
    n = x.shape[0]
    want = {}
    for name, inp, h, conv in (("c1", x, h1, c1), ("c2", a2.detach(), h2, c2)):
        rows = F.unfold(inp, 3, padding=1, stride=conv.stride).transpose(1, 2).reshape(-1, inp.shape[1] * 9)
        if conv.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=D64)], 1)
        L = h.shape[2] * h.shape[3]
        gr = (n * h.grad).permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        want[name] = (L * rows.T @ rows / rows.shape[0], gr.T @ gr / gr.shape[0])
    losses = [float(opt.step(lambda: F.cross_entropy(model(x), y)))]
    for name, conv in (("c1", c1), ("c2", c2)):
        torch.testing.assert_close(opt.state[conv.weight]["A"], want[name][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[conv.weight]["G"], want[name][1], rtol=1e-12, atol=1e-12)
    for _ in range(24):
        losses.append(float(opt.step(lambda: F.cross_entropy(model(x), y))))
    assert losses[-1] < 0.3 * losses[0], losses
    assert opt.skipped_steps == 0


# ============================================================================================================
# Compile, schedulers
# ============================================================================================================
def _small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(D64)


def test_compiled_update_graph_count_constant_and_matches_eager():
    """Regression test for the inductor patterns the update relies on (EMA as ``mul_`` + ``add_(X * c)``, never
    ``alpha=``; 0-d tensor hyperparameters as inputs, never mutated in the graph; slicing/reshaping the direction
    into ``add_`` on parameters): the compiled update equals the eager one, and the graph count stays constant
    over 25 steps while a scheduler changes lr every step and inverses refresh (k <= 5, then every 5); the
    compiled finiteness check catches a NaN."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m1, m2 = _small(), _small()
    kw = dict(lr=0.5, damping=0.1, inv_every=5, kl_clip=10.0)
    o1, o2 = KFAC(m1, **kw, compile=True), KFAC(m2, **kw, compile=False)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda k: 1 / (1 + k))
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda k: 1 / (1 + k))
    counters.clear()
    g = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(25):
        x, y = torch.randn(16, 6, generator=g, dtype=D64), torch.randn(16, 3, generator=g, dtype=D64)
        o1.step(lambda: ((m1(x) - y) ** 2).mean())
        o2.step(lambda: ((m2(x) - y) ** 2).mean())
        s1.step()
        s2.step()
        graphs.append(counters["stats"]["unique_graphs"])
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert graphs[0] == 3 and len(set(graphs)) == 1, graphs  # health check, statistics update, direction
    assert not counters["graph_break"]
    # the compiled finiteness check still catches a NaN loss (skip, nothing changed, no new graph)
    snap = _snapshot(m1, o1)
    x = torch.randn(16, 6, generator=g, dtype=D64)
    o1.step(lambda: ((m1(x) - y) ** 2).mean() * float("nan"))
    _assert_unchanged(m1, o1, snap)
    assert o1.skipped_steps == 1 and counters["stats"]["unique_graphs"] == 3
    assert float(o1.param_groups[0]["lr"]) == pytest.approx(0.5 / 26)
    assert o1.counters()["inverse_refreshes"] == sum(1 for k in range(25) if k % 5 == 0 or k <= 5)


def test_scheduler_changes_lr_like_manual_fill():
    m1, m2 = _small(), _small()
    o1, o2 = KFAC(m1, lr=0.5, damping=0.1), KFAC(m2, lr=0.5, damping=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(o1, gamma=0.5)
    x, y = _data(16, d_out=3)
    for k in range(4):
        o1.step(lambda: _bce(m1(x), y))
        o2.step(lambda: _bce(m2(x), y))
        sched.step()
        o2.param_groups[0]["lr"].fill_(0.5 * 0.5 ** (k + 1))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert isinstance(o1.param_groups[0]["lr"], torch.Tensor)
    lr = o1.param_groups[0]["lr"]
    o1.param_groups[0]["lr"] = 0.1  # a Python float: copied into the same 0-d tensor at the next step
    o1.step(lambda: _bce(m1(x), y))
    assert o1.param_groups[0]["lr"] is lr and float(lr) == 0.1


# ============================================================================================================
# State dict
# ============================================================================================================
def _state_tensors(opt):
    return {(i, k): v for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state.get(p, {}).items()}


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_state_dict_round_trip_is_bitwise(inverse):
    def closure_for(model, x, y):
        def closure():
            out = model(x)
            return _bce(out, y), out

        return closure

    kw = dict(lr=0.5, damping=0.1, inv_every=3, fisher="sampled", likelihood="bernoulli", seed=3, inverse=inverse)
    batches = [_data(16, d_out=3, seed=50 + k) for k in range(20)]
    ref_model = _small()
    ref = KFAC(ref_model, **kw)
    for x, y in batches:
        ref.step(closure_for(ref_model, x, y))

    model = _small()
    opt = KFAC(model, **kw)
    for x, y in batches[:10]:
        opt.step(closure_for(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = _small(seed=123)
    model2.load_state_dict(saved["model"])
    opt2 = KFAC(model2, **dict(kw, seed=999))
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 10 and opt2.counters() == opt.counters()
    for x, y in batches[10:]:
        opt2.step(closure_for(model2, x, y))
    for p, q in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    a, b = _state_tensors(ref), _state_tensors(opt2)
    assert a.keys() == b.keys() and {"A", "G", "momentum"} <= {k for _, k in a}
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert a[key].dtype == b[key].dtype == D64
    assert ref.counters() == opt2.counters()


# ============================================================================================================
# Non-finite values, singular factors
# ============================================================================================================
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], {k: v.clone() for k, v in _state_tensors(opt).items()}


def _assert_unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = _state_tensors(opt)
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("bad", ["loss", "gradient", "factor"])
def test_nonfinite_step_is_skipped_and_state_unchanged(bad):
    model = _small()
    opt = KFAC(model, lr=0.5, damping=0.1)
    x, y = _data(16, d_out=3)
    for _ in range(3):
        opt.step(lambda: _bce(model(x), y))
    snap = _snapshot(model, opt)
    counters = opt.counters()
    xb = x.clone()
    if bad == "factor":  # finite loss and gradients, but ā āᵀ overflows
        xb[0, 0] = 1e200

    def closure():
        out = model(xb)
        if bad == "loss":
            return _bce(out, y) * float("nan")
        if bad == "gradient":
            return _bce(out, y) + (model[0].weight * float("inf")).sum() * 0.0
        return _bce(out, y)

    loss = opt.step(closure)
    if bad == "factor":
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1 and opt.steps == counters["steps"]
    opt.step(lambda: _bce(model(x), y))  # and it goes on normally
    assert opt.steps == counters["steps"] + 1

    opt_r = KFAC(_small(), lr=0.5, damping=0.1, on_nonfinite="raise")
    m = opt_r.model
    snap = _snapshot(m, opt_r)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt_r.step(lambda: _bce(m(x), y) * float("nan"))
    _assert_unchanged(m, opt_r, snap)
    assert opt_r.skipped_steps == 1


def test_singular_factor_uses_jitter_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    x, y = _data(16, d_out=3)
    x[:, :2] = 0.0  # A of the first layer has two zero rows: singular with damping 0
    opt = KFAC(model, lr=0.1, damping=1.0)
    opt.param_groups[0]["damping"].fill_(0.0)  # construction rejects 0; a schedule may still write it
    for _ in range(3):
        opt.step(lambda: _bce(model(x), y))
    c = opt.counters()
    assert c["jitter_fallbacks"] >= 3 and c["inverse_failures"] == 0
    assert all(torch.isfinite(t).all() for t in _state_tensors(opt).values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_indefinite_factor_never_puts_nan_in_state(inverse):
    model = _small()
    x, y = _data(16, d_out=3)
    opt = KFAC(model, lr=0.1, damping=1e-12, inverse=inverse)
    opt.step(lambda: _bce(model(x), y))
    w = model[0].weight
    opt.state[w]["A"].copy_(-torch.eye(7, dtype=D64))  # indefinite, kept by stat_decay = 1
    opt.state[w]["G"].fill_(float("nan") if inverse == "eigh" else 0.0)
    opt.param_groups[0]["stat_decay"].fill_(1.0)
    before = opt.counters()
    opt.step(lambda: _bce(model(x), y))  # k = 1 <= inv_every: refresh
    c = opt.counters()
    assert c["jitter_fallbacks"] > before["jitter_fallbacks"]
    if inverse == "cholesky":
        assert c["psd_fallbacks"] > before["psd_fallbacks"]
    else:
        assert c["inverse_failures"] > before["inverse_failures"]  # NaN factor: previous inverse kept
    for k, t in _state_tensors(opt).items():
        if k[1] not in ("A", "G"):
            assert torch.isfinite(t).all(), k
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ============================================================================================================
# Plain loop, fallback, warm start, errors
# ============================================================================================================
def test_plain_backward_loop_equals_closure():
    m1, m2 = _small(), _small()
    o1, o2 = KFAC(m1, lr=0.5, damping=0.1), KFAC(m2, lr=0.5, damping=0.1)
    for k in range(5):
        x, y = _data(16, d_out=3, seed=k)
        o1.step(lambda: _bce(m1(x), y))
        o2.zero_grad()
        _bce(m2(x), y).backward()
        assert o2.step() is None
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    for a, b in zip(_state_tensors(o1).values(), _state_tensors(o2).values()):
        assert torch.equal(a, b)


def test_fallback_partition_and_functional_weight_use():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # grouped: fallback
            self.norm = nn.LayerNorm(64)
            self.fc = nn.Linear(64, 8)
            self.head = nn.Linear(8, 2)  # used functionally below: no statistics

        def forward(self, x):
            h = self.norm(self.conv(x).flatten(1))
            return F.linear(torch.tanh(self.fc(h)), self.head.weight, self.head.bias)

    torch.manual_seed(0)
    net = Net().to(D64)
    opt = KFAC(net, lr=0.1, damping=0.1)
    text = opt.describe()
    assert "conv.weight" in text and "K-FAC Linear fc" in text
    fb = {n for n, p in net.named_parameters() if p in set(opt.fallback_params())}
    assert fb == {"conv.weight", "conv.bias", "norm.weight", "norm.bias"}
    x = torch.randn(4, 4, 4, 4, dtype=D64)
    before = net.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="head"):
        opt.step(lambda: net(x).pow(2).mean())
    assert "head.weight" in {n for n, p in net.named_parameters() if p in set(opt.fallback_params())}
    assert not torch.equal(before, net.head.weight)  # updated by the fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: net(x).pow(2).mean())


def test_bad_construction_and_bad_calls():
    m = _small()
    bad = [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(damping=float("nan")), ValueError, "damping"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(stat_decay=1.5), ValueError, "stat_decay"),
        (dict(weight_decay="x"), TypeError, "weight_decay"),
        (dict(inv_every=0), ValueError, "inv_every"),
        (dict(inv_every=2.5), ValueError, "inv_every"),
        (dict(fisher="hessian"), ValueError, "fisher"),
        (dict(fisher="sampled"), ValueError, "likelihood"),
        (dict(likelihood="bernoulli"), ValueError, "likelihood"),
        (dict(fisher="sampled", likelihood="poisson"), ValueError, "likelihood"),
        (dict(damping_split="half"), ValueError, "damping_split"),
        (dict(damping_split="exact"), ValueError, "eigh"),
        (dict(inverse="svd"), ValueError, "inverse"),
        (dict(kl_clip=0.0), ValueError, "kl_clip"),
        (dict(factor_dtype=torch.float16), TypeError, "factor_dtype"),
        (dict(seed="a"), TypeError, "seed"),
        (dict(layers=m[0]), TypeError, "layers"),
        (dict(compile="yes"), ValueError, "compile"),
        (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    ]
    for kw, exc, word in bad:
        with pytest.raises(exc, match=word):
            KFAC(_small(), **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        KFAC(list(m.parameters()))
    with pytest.raises(ValueError, match="no parameters"):
        KFAC(nn.Sequential(nn.Linear(2, 2).requires_grad_(False)))

    with pytest.raises(RuntimeError, match="taken over"):
        (KFAC(m), KFAC(m))[0].step()
    opt = KFAC(m)
    with pytest.raises(ValueError, match="loss.backward"):
        opt.step()
    x, y = _data(4, d_out=3)
    with pytest.raises(TypeError, match="0-d"):
        opt.step(lambda: m(x))
    s = KFAC(_small(), fisher="sampled", likelihood="bernoulli")
    with pytest.raises(ValueError, match="closure"):
        s.step()
    with pytest.raises(ValueError, match=r"\(loss, output\)"):
        s.step(lambda: _bce(s.model(x), y))
    assert s.steps == 0 and opt.steps == 0
    with pytest.raises(ValueError, match="no closure"):
        opt.warm_start([])
    # a state dict from another inverse= setting or another architecture: clear error, nothing loaded
    e = KFAC(_small(), inverse="eigh")
    snap = {k: v.clone() for k, v in _state_tensors(e).items()}
    with pytest.raises(ValueError, match="inverse="):
        e.load_state_dict(opt.state_dict())
    other = KFAC(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(D64))
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(opt.state_dict())
    assert all(torch.equal(v, snap[k]) for k, v in _state_tensors(e).items())


def test_layers_argument_restricts_preconditioning():
    m = _small()
    opt = KFAC(m, layers=["2", m[4]])
    pre = {n for n, p in m.named_parameters() if p not in set(opt.fallback_params())}
    assert pre == {"2.weight", "2.bias", "4.weight", "4.bias"}
    x, y = _data(8, d_out=3)
    opt.step(lambda: _bce(m(x), y))
    assert m[0].weight not in opt.state or "A" not in opt.state[m[0].weight]
    assert "momentum_buffer" in opt.state[m[0].weight]  # the SGD fallback's state
    opt.remove()  # detaches: the classes are restored and another optimizer may attach
    assert type(m[2]) is nn.Linear
    m[0].requires_grad_(False)  # a frozen layer is neither captured nor updated
    frozen = m[0].weight.detach().clone()
    opt = KFAC(m)
    assert type(m[0]) is nn.Linear and "0.weight" not in opt.describe()
    opt.step(lambda: _bce(m(x), y))
    assert torch.equal(frozen, m[0].weight)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_sampled_fisher_likelihoods_match_their_fisher(likelihood):
    """For a single linear layer z = W x̄ the sampled-Fisher G converges to E_i[F_z(x_i)] (×1 for the Gaussian,
    softmax Fisher diag(p) - ppᵀ for the categorical): check the average of many sampled G's."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).to(D64)
    x = torch.randn(64, 3, dtype=D64)
    opt = KFAC(lin, lr=0.0, fisher="sampled", likelihood=likelihood, seed=0, stat_decay=0.0)
    acc = torch.zeros(4, 4, dtype=D64)
    reps = 200
    for _ in range(reps):
        opt.step(lambda: (lambda z: (z.sum() * 0, z))(lin(x)))
        acc += opt.state[lin.weight]["G"]
    acc /= reps
    if likelihood == "gaussian":
        want = torch.eye(4, dtype=D64)
    else:
        p = torch.softmax(lin(x).detach(), 1)
        want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(acc, want, rtol=0, atol=0.03)


def test_compiled_model_gives_the_same_steps():
    """KFAC attached to a model that is then run through ``torch.compile(fullgraph=True)`` (aot_eager: dynamo +
    AOTAutograd, the capture's mechanism under compile) takes the same steps as with the eager model."""
    import torch._dynamo

    torch._dynamo.reset()
    m1, m2 = _small(), _small()
    o1, o2 = KFAC(m1, lr=0.5, damping=0.1), KFAC(m2, lr=0.5, damping=0.1)
    c2 = torch.compile(m2, fullgraph=True, backend="aot_eager")
    for k in range(4):
        x, y = _data(16, d_out=3, seed=k)
        o1.step(lambda: _bce(m1(x), y))
        o2.step(lambda: _bce(c2(x), y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for a, b in zip(_state_tensors(o1).values(), _state_tensors(o2).values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_sampled_fisher_skips_a_step_whose_output_is_not_finite(likelihood):
    """A diverged model (NaN logits) under the sampled Fisher: the targets are not drawn from NaN
    probabilities (torch.bernoulli/multinomial raised), the step is skipped with the state unchanged."""
    model = _small()
    opt = KFAC(model, lr=0.5, damping=0.1, fisher="sampled", likelihood=likelihood, seed=2)
    x, y = _data(16, d_out=3)

    def closure(inputs):
        def run():
            out = model(inputs)
            return _bce(out, y), out

        return run

    opt.step(closure(x))
    snap, counters = _snapshot(model, opt), opt.counters()
    xb = x.clone()
    xb[3, 1] = float("nan")
    opt.step(closure(xb))
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == counters["skipped_steps"] + 1 and opt.steps == counters["steps"]
    opt.step(closure(x))
    assert opt.steps == counters["steps"] + 1


def test_factor_init_zero_is_the_official_codes_first_average():
    """factor_init="zero": the factors start at 0 and the first update is the usual EMA, A₁ = (1 − β)·A_batch
    (the K-BFGS paper's KFAC code without an initialisation pass); the default sets A₁ = A_batch."""
    x, y = _data(16, d_out=3)
    factors = {}
    for init in ("batch", "zero"):
        model = _small()
        opt = KFAC(model, lr=0.1, damping=0.1, stat_decay=0.8, factor_init=init)
        opt.step(lambda: _bce(model(x), y))
        factors[init] = {k: v for k, v in _state_tensors(opt).items() if k[-1] in ("A", "G")}
    assert factors["batch"].keys() == factors["zero"].keys() and factors["batch"]
    for k, v in factors["batch"].items():
        torch.testing.assert_close(factors["zero"][k], 0.2 * v, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="factor_init"):
        KFAC(_small(), factor_init="identity")


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_loss_reduction_sum_gives_the_fisher_of_the_summed_loss(fisher):
    """A summed loss declared as such: G = N·G(mean) (the Fisher of Σℓ_n) and, as damping → 0, the same step
    as the mean loss; declared as a mean, G is N² times G(mean) and the step about N times smaller."""
    x, y = _data(32, d_out=3)
    n = x.shape[0]
    kw = dict(lr=1.0, damping=1e-18, weight_decay=0.0, momentum=0.0, inv_every=1)
    if fisher == "sampled":
        kw.update(fisher="sampled", likelihood="bernoulli", seed=4)
    runs = {}
    for name, reduction, scale in [("mean", "mean", 1.0), ("sum", "sum", n), ("sum-as-mean", "mean", n)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
        for lin in (model[0], model[2]):
            nn.init.normal_(lin.weight, std=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        opt = KFAC(model, loss_reduction=reduction, **kw)

        def closure():
            out = model(x)
            loss = _bce(out, y) * scale
            return (loss, out) if fisher == "sampled" else loss

        opt.step(closure)
        G = [opt.state[lin.weight]["G"].clone() for lin in (model[0], model[2])]
        runs[name] = (G, [p.detach() - b for p, b in zip(model.parameters(), before)])
    for gm, gs, gw in zip(runs["mean"][0], runs["sum"][0], runs["sum-as-mean"][0]):
        torch.testing.assert_close(gs, n * gm, rtol=1e-12, atol=0)
        if fisher == "empirical":
            torch.testing.assert_close(gw, n * n * gm, rtol=1e-12, atol=0)
    for dm, ds in zip(runs["mean"][1], runs["sum"][1]):
        torch.testing.assert_close(ds, dm, rtol=1e-5, atol=1e-12)
    if fisher == "empirical":
        ratio = runs["mean"][1][0].norm() / runs["sum-as-mean"][1][0].norm()
        assert 0.5 * n < ratio < 2 * n
    with pytest.raises(ValueError, match="loss_reduction"):
        KFAC(_small(), loss_reduction="batchmean")


def test_a_readable_loss_reduction_that_contradicts_the_declared_one_raises():
    model = _small()
    x, y = _data(8, d_out=3)
    opt = KFAC(model)
    params, state = _snapshot(model, opt)
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        opt.step(lambda: F.binary_cross_entropy_with_logits(model(x), y, reduction="sum"))
    _assert_unchanged(model, opt, (params, state))
    model = _small()
    KFAC(model, loss_reduction="sum").step(lambda: F.binary_cross_entropy_with_logits(model(x), y, reduction="sum"))
