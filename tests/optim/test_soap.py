"""SOAP against an independent dense float64 re-implementation of the authors' algorithm, plus the contract tests
(plain loop, non-finite steps, tensor hyperparameters, state dicts)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastcurv.optim import SOAP

torch.set_default_dtype(torch.float32)


def _model(seed: int = 0) -> nn.Module:
    # sides differ by at most one, so every factor's null space at the first step is at most one-dimensional and
    # its eigenbasis is unique up to signs (which SOAP's update does not depend on)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
            for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - y).pow(2).sum() / x.shape[0]


class DenseSOAP:
    """nikhilvyas/SOAP's step written out densely for matrices and vectors (float64), from the paper's algorithm
    and the code's order of operations: first step = statistics only; exp_avg kept in the eigenbasis and taken
    back to the original basis and forward again around every statistics update; QR refresh with sorting."""

    def __init__(self, params, lr, b1, b2, bs, eps, wd, freq):
        self.params = list(params)
        self.h = dict(lr=lr, b1=b1, b2=b2, bs=bs, eps=eps, wd=wd, freq=freq)
        self.st = [dict(step=0) for _ in self.params]

    @staticmethod
    def _proj(X, Q, back):
        if Q is None:
            return X
        QL, QR = Q
        return QL @ X @ QR.T if back else QL.T @ X @ QR

    def _update_pre(self, s, G):
        h = self.h
        if s["Q"] is not None:
            s["m"] = self._proj(s["m"], s["Q"], back=True)
        if G.dim() == 2:
            s["L"] = s["L"] + (1 - h["bs"]) * (G @ G.T - s["L"])
            s["R"] = s["R"] + (1 - h["bs"]) * (G.T @ G - s["R"])
            if s["Q"] is None:
                def eig(M):
                    return torch.flip(torch.linalg.eigh(M)[1], [1])
                s["Q"] = (eig(s["L"]), eig(s["R"]))
            elif s["step"] > 0 and s["step"] % h["freq"] == 0:
                qs = []
                v = s["v"]
                for ax, (M, O) in enumerate(zip((s["L"], s["R"]), s["Q"])):
                    idx = torch.argsort(torch.diag(O.T @ M @ O), descending=True)
                    v = v.index_select(ax, idx)
                    qs.append(torch.linalg.qr(M @ O[:, idx])[0])
                s["v"] = v
                s["Q"] = tuple(qs)
        if s["step"] > 0:
            s["m"] = self._proj(s["m"], s["Q"], back=False)

    @torch.no_grad()
    def step(self):
        h = self.h
        for p, s in zip(self.params, self.st):
            G = p.grad.reshape(p.shape[0], -1) if p.dim() >= 2 else p.grad
            if "m" not in s:
                s["m"] = torch.zeros_like(G)
                s["v"] = torch.zeros_like(G)
                s["Q"] = None
                if G.dim() == 2:
                    s["L"] = torch.zeros(G.shape[0], G.shape[0], dtype=G.dtype)
                    s["R"] = torch.zeros(G.shape[1], G.shape[1], dtype=G.dtype)
                self._update_pre(s, G)
                continue
            Gp = self._proj(G, s["Q"], back=False)
            s["step"] += 1
            t = s["step"]
            s["m"] = h["b1"] * s["m"] + (1 - h["b1"]) * Gp
            s["v"] = h["b2"] * s["v"] + (1 - h["b2"]) * Gp * Gp
            size = h["lr"] * (1 - h["b2"] ** t) ** 0.5 / (1 - h["b1"] ** t)
            u = self._proj(s["m"] / (s["v"].sqrt() + h["eps"]), s["Q"], back=True)
            p.sub_(size * u.reshape(p.shape))
            p.sub_(h["lr"] * h["wd"] * p)
            self._update_pre(s, G)


HP = dict(lr=0.05, betas=(0.9, 0.95), shampoo_beta=0.8, eps=1e-8, weight_decay=0.01, precondition_frequency=3)


def _dense_for(model: nn.Module) -> DenseSOAP:
    return DenseSOAP(model.parameters(), lr=0.05, b1=0.9, b2=0.95, bs=0.8, eps=1e-8, wd=0.01, freq=3)


@pytest.mark.parametrize("loop", ["closure", "plain"])
def test_matches_dense_soap_step_by_step(loop: str) -> None:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    opt = SOAP(m1, **HP)
    ref = _dense_for(m2)
    worst = 0.0
    moved = 0.0
    for x, y in _batches(25):
        if loop == "closure":
            opt.step(lambda: _loss(m1, x, y))
        else:
            opt.zero_grad()
            _loss(m1, x, y).backward()
            opt.step()
        m2.zero_grad()
        _loss(m2, x, y).backward()
        ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            worst = max(worst, float((p - q).detach().abs().max()))
    for p, q in zip(m1.parameters(), _model().parameters()):
        moved = max(moved, float((p - q).detach().abs().max()))
    assert moved > 0.1  # the run really trained (25 steps, 8 basis refreshes)
    assert worst < 1e-10
    assert opt.counters()["basis_refreshes"] == 8 * 3  # steps 3, 6, ..., 24 for the three weights


def test_first_step_only_collects_statistics() -> None:
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = SOAP(m, **HP)
    x, y = _batches(1)[0]
    opt.step(lambda: _loss(m, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    W = m[0].weight
    G = W.grad
    st = opt.state[W]
    torch.testing.assert_close(st["L"], 0.2 * G @ G.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st["R"], 0.2 * G.T @ G, rtol=1e-12, atol=1e-14)
    evals = torch.diag(st["QL"].T @ st["L"] @ st["QL"])
    assert bool((evals[:-1] >= evals[1:]).all())  # decreasing order, as the code's flip


def _snapshot(opt: SOAP, model: nn.Module) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_bitwise(where: str) -> None:
    m = _model()
    opt = SOAP(m, **HP)
    for x, y in _batches(4):
        opt.step(lambda: _loss(m, x, y))
    before = _snapshot(opt, m)
    x, y = _batches(5)[4]
    if where == "loss":
        opt.step(lambda: _loss(m, x, y) * float("nan"))
    else:
        x = x.clone()
        x[0, 0] = float("inf")
        opt.step(lambda: _loss(m, x, y))
    after = _snapshot(opt, m)
    assert opt.skipped_steps == 1 and opt.steps == 4
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    opt2 = SOAP(_model(), **HP, on_nonfinite="raise")
    with pytest.raises(FloatingPointError):
        opt2.step(lambda: torch.tensor(float("nan"), dtype=torch.float64, requires_grad=True) * 1)


def test_state_dict_resume_is_bitwise() -> None:
    data = _batches(14)
    m1 = _model()
    o1 = SOAP(m1, **HP)
    for x, y in data[:7]:
        o1.step(lambda: _loss(m1, x, y))
    m2 = copy.deepcopy(m1)
    o2 = SOAP(m2, **HP)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    for x, y in data[7:]:
        o1.step(lambda: _loss(m1, x, y))
        o2.step(lambda: _loss(m2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(o1, m1), _snapshot(o2, m2)))


def test_tensor_hyperparameters_and_scheduler() -> None:
    m = _model()
    opt = SOAP(m, lr=torch.tensor(0.01, dtype=torch.float64))
    g = opt.param_groups[0]
    assert all(isinstance(g[k], torch.Tensor) and g[k].dim() == 0 for k in SOAP.hyperparameters)
    assert float(g["shampoo_beta"]) == pytest.approx(0.95)  # None -> beta2
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batches(1)[0]
    opt.step(lambda: _loss(m, x, y))
    sched.step()
    assert isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(0.005)
    t = g["lr"]
    g["lr"] = 0.1  # a float written by a scheduler or by hand is copied into the same 0-d tensor
    opt.step(lambda: _loss(m, x, y))
    assert g["lr"] is t and float(t) == pytest.approx(0.1)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        SOAP([torch.zeros(2, requires_grad=True)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precondition_frequency"):
        SOAP(_model(), precondition_frequency=0)
    with pytest.raises(ValueError, match="betas"):
        SOAP(_model(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="needs gradients"):
        SOAP(_model()).step()


def test_max_precond_dim_leaves_a_side_unrotated() -> None:
    m = _model()
    opt = SOAP(m, **{**HP, "precondition_frequency": 2}, max_precond_dim=3)
    st = opt.state[m[0].weight]  # 4 x 4: no factor on either side -> Adam
    assert "L" not in st and "R" not in st
    st2 = opt.state[m[2].weight]  # 3 x 4: factor on the 3-side only
    assert "L" in st2 and "R" not in st2
    for x, y in _batches(5):
        opt.step(lambda: _loss(m, x, y))
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    assert "SOAP" in opt.describe()


def test_readme_example_soap_like_trains() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "soap_like.py"
    spec = importlib.util.spec_from_file_location("soap_like", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
    x = torch.randn(64, 6)
    opt = mod.SoapLike(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[1] == losses[0]  # the first step only collects statistics
    assert losses[-1] < 0.3 * losses[0]
    # the README shows the class verbatim: it must not drift from the file that is tested here
    readme = (path.parents[1] / "README.md").read_text()
    block = readme.split("class SoapLike(torch.optim.Optimizer):", 1)[1].split("```", 1)[0]
    source = path.read_text().split("class SoapLike(torch.optim.Optimizer):", 1)[1]
    assert source.startswith(block.rstrip("\n") + "\n")


def test_kfac_factors_option() -> None:
    m = _model()
    opt = SOAP(m, **HP, factors="kfac")
    x, y = _batches(1)[0]
    W = m[2].weight
    # K-FAC's statistics of the first batch for the middle layer, by hand (g = N dL/dh)
    a = torch.tanh(m[0](x)).detach()
    out = m[2](a).detach().requires_grad_(True)
    z = torch.tanh(out)
    g = torch.autograd.grad(0.5 * (m[4](z) - y).pow(2).sum() / 8, out)[0] * 8
    opt.step(lambda: _loss(m, x, y))
    st = opt.state[W]
    torch.testing.assert_close(st["L"], 0.2 * g.T @ g / 8, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(st["R"], 0.2 * a.T @ a / 8, rtol=1e-10, atol=1e-14)
    assert "K-FAC" in opt.describe()
    start = [p.detach().clone() for p in m.parameters()]
    for x, y in _batches(10, seed=3):
        opt.step(lambda: _loss(m, x, y))
    assert opt.skipped_steps == 0
    assert max(float((p - q).abs().max()) for p, q in zip(m.parameters(), start)) > 0.05
    opt.remove()
    with pytest.raises(ValueError, match="factors"):
        SOAP(_model(), factors="diag")
