"""EKFAC against an independent dense float64 re-implementation (per-sample gradients from autograd, one sample at a
time), the exact-diagonal property on single-sample batches, and the contract tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastcurv.optim import EKFAC

HP = dict(lr=0.2, damping=0.05, momentum=0.8, weight_decay=1e-3, stat_decay=0.7, scale_decay=0.6, inv_every=3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches(n: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return [
        (torch.randn(size, 3, generator=g, dtype=f64), torch.randn(size, 2, generator=g, dtype=f64)) for _ in range(n)
    ]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - y).pow(2).sum() / x.shape[0]


class DenseEKFAC:
    """The algorithm of George et al. (2018) written out for a Linear-Tanh-Linear network on homogeneous weight
    matrices; every statistic from per-sample autograd (one sample at a time)."""

    def __init__(self, model: nn.Module, h: dict) -> None:
        self.Ws = [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).clone() for m in (model[0], model[2])]
        self.h = h
        self.k = 0
        self.st = [dict(A=None, G=None, UA=None, UG=None, S=None, M=torch.zeros_like(W)) for W in self.Ws]

    def _forward(self, Ws, x):
        a1 = torch.cat([x, torch.ones(1, dtype=x.dtype)])
        h1 = Ws[0] @ a1
        a2 = torch.cat([torch.tanh(h1), torch.ones(1, dtype=x.dtype)])
        h2 = Ws[1] @ a2
        return [a1, a2], [h1, h2], h2

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        h, n = self.h, x.shape[0]
        Ws = [W.clone().requires_grad_(True) for W in self.Ws]
        acts, gs, pgrads = [[], []], [[], []], [[], []]
        for i in range(n):
            a, hs, out = self._forward(Ws, x[i])
            li = 0.5 * (out - y[i]).pow(2).sum()
            dh = torch.autograd.grad(li, hs, retain_graph=True)
            dW = torch.autograd.grad(li, Ws)
            for j in range(2):
                acts[j].append(a[j].detach())
                gs[j].append(dh[j])
                pgrads[j].append(dW[j])
        first = self.k == 0
        refresh = self.k % h["inv_every"] == 0
        for j, (W, s) in enumerate(zip(self.Ws, self.st)):
            Ab = sum(torch.outer(v, v) for v in acts[j]) / n
            Gb = sum(torch.outer(v, v) for v in gs[j]) / n
            s["A"] = Ab if first else h["stat_decay"] * s["A"] + (1 - h["stat_decay"]) * Ab
            s["G"] = Gb if first else h["stat_decay"] * s["G"] + (1 - h["stat_decay"]) * Gb
            if refresh:
                s["UA"] = torch.linalg.eigh(s["A"])[1]
                s["UG"] = torch.linalg.eigh(s["G"])[1]
            Sb = sum((s["UG"].T @ d @ s["UA"]) ** 2 for d in pgrads[j]) / n
            s["S"] = Sb if (first or refresh) else h["scale_decay"] * s["S"] + (1 - h["scale_decay"]) * Sb
            grad = sum(pgrads[j]) / n + h["weight_decay"] * W
            s["M"] = h["momentum"] * s["M"] + (1 - h["momentum"]) * grad
            P = s["UG"] @ ((s["UG"].T @ s["M"] @ s["UA"]) / (s["S"] + h["damping"])) @ s["UA"].T
            self.Ws[j] = W - h["lr"] * P
        self.k += 1


def _hom(model: nn.Module) -> list[torch.Tensor]:
    return [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for m in (model[0], model[2])]


@pytest.mark.parametrize("loop", ["closure", "plain"])
def test_matches_dense_ekfac(loop: str) -> None:
    model = _model()
    ref = DenseEKFAC(model, HP)
    opt = EKFAC(model, **HP)
    start = _hom(model)
    worst = 0.0
    for x, y in _batches(12):
        if loop == "closure":
            opt.step(lambda: _loss(model, x, y))
        else:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        ref.step(x, y)
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(_hom(model), ref.Ws)))
    moved = max(float((a - b).abs().max()) for a, b in zip(_hom(model), start))
    assert moved > 0.05
    assert worst < 1e-10
    assert opt.counters()["basis_refreshes"] == 2 * 4  # steps 0, 3, 6, 9


def test_diagonal_is_exact_projected_second_moment_on_one_sample() -> None:
    model = _model()
    opt = EKFAC(model, **HP)
    x, y = _batches(1, size=1)[0]
    opt.step(lambda: _loss(model, x, y))
    for m in (model[0], model[2]):
        s = opt.state[m.weight]
        grad = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
        torch.testing.assert_close(s["scale"], (s["UG"].T @ grad @ s["UA"]) ** 2, rtol=1e-12, atol=1e-15)


def test_sequence_inputs_sum_positions_per_sample() -> None:
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # (N, T, d) input: the per-sample gradient sums the T positions; compare with autograd, one sample at a time
    torch.manual_seed(3)
    lin = nn.Linear(3, 2).double()
    opt = EKFAC(nn.Sequential(lin), **HP)
    grads = []
    for i in range(4):
        lin.zero_grad()
        (lin(x[i : i + 1]).pow(2).sum()).backward()
        grads.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
    lin.zero_grad()
    opt.step(lambda: lin(x).pow(2).sum() / x.shape[0])
    s = opt.state[lin.weight]
    Sb = sum((s["UG"].T @ d @ s["UA"]) ** 2 for d in grads) / 4
    torch.testing.assert_close(s["scale"], Sb, rtol=1e-12, atol=1e-14)


def _snapshot(opt: EKFAC, model: nn.Module) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def test_nonfinite_step_is_skipped_bitwise_and_resume_is_bitwise() -> None:
    data = _batches(10)
    m1 = _model()
    o1 = EKFAC(m1, **HP)
    for x, y in data[:5]:
        o1.step(lambda: _loss(m1, x, y))
    before = _snapshot(o1, m1)
    x, y = data[5]
    o1.step(lambda: _loss(m1, x, y) * float("inf"))
    assert o1.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, _snapshot(o1, m1)))
    m2 = copy.deepcopy(m1)
    o2 = EKFAC(m2, **HP)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    for x, y in data[5:]:
        o1.step(lambda: _loss(m1, x, y))
        o2.step(lambda: _loss(m2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(o1, m1), _snapshot(o2, m2)))


def test_fallback_and_arguments() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    opt = EKFAC(model)
    assert "fallback" in opt.describe() and "EKFAC Linear 0" in opt.describe()
    x = torch.randn(6, 3, dtype=torch.float64)
    ln_before = model[1].weight.detach().clone()
    opt.step(lambda: model(x).pow(2).sum() / 6)
    assert not torch.equal(ln_before, model[1].weight)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["lr"].dim() == 0
    with pytest.raises(ValueError, match="damping"):
        EKFAC(_model(), damping=0.0)
    with pytest.raises(ValueError, match="inv_every"):
        EKFAC(_model(), inv_every=0)
    with pytest.raises(ValueError, match="needs gradients"):
        EKFAC(_model()).step()
