r"""Cost of one whole training step of each fastcurv optimizer relative to ``torch.optim.AdamW``, against a FLOP
model of the step.

Models: the CURVES autoencoder (784-400-200-100-50-25-6, mirrored; batch 1000) and an MLP of 8 ``nn.Linear``
layers of width 1024 (batch 1024, ½·squared error), float32. Optimizers: AdamW (``foreach``, or ``fused`` on
CUDA), KFAC (empirical and sampled Fisher), KBFGS, KBFGSL and NewtonCG at their class defaults. All steps of
one model are timed *interleaved in one process* (each round runs one step of every optimizer, in turn), so
a loaded machine slows them alike; the ratio of medians is reported.

FLOP model (multiply-adds count 2; :math:`n` rows, layers :math:`l` with :math:`d_a = d_{in}+1`,
:math:`d_g = d_{out}`, :math:`S = \sum_l d_{in}d_{out}`):

* forward + backward: :math:`6nS` (forward :math:`2nS`, input and weight gradients :math:`4nS`);
  AdamW adds ~12 FLOPs per parameter;
* K-FAC: + factor SYRKs :math:`n\sum_l (d_a^2 + d_g^2)` (symmetric: half a GEMM) + preconditioning
  :math:`G^{-1}MA^{-1}`: :math:`2\sum_l (d_g^2 d_a + d_g d_a^2)` + inverses :math:`\sum_l (d_a^3 + d_g^3)/T`
  (Cholesky + inverse, every :math:`T` = ``inv_every`` steps); the sampled Fisher adds one more backward
  (:math:`4nS`);
* K-BFGS: + the second pass (forward :math:`2nS`, backward to the biases :math:`2nS`) + the A SYRK + the
  direction :math:`H_g M H_a` (as K-FAC's preconditioning) + the factor updates (:math:`O(d^2)`,
  :math:`6\sum_l(d_a^2 + d_g^2)`); K-BFGS(L) applies :math:`H_g` in compact form, :math:`8\,h\,d_g d_a` per
  layer (history :math:`h`) instead of :math:`2d_g^2 d_a`;
* NewtonCG: the gradient pass plus, per CG iteration, one complex-step Hessian-vector product: a forward and
  backward in complex arithmetic (4 real products per complex one, :math:`4\cdot 6nS`); the iterations are
  read from the optimizer's ``cg_iterations`` counter over the timed steps.

``extra_info`` per optimizer: ``step_ms``, ``adamw_ms``, ``ratio_vs_adamw`` (step / AdamW, medians of the
interleaved rounds), ``gflop`` and ``flop_ratio_vs_adamw`` (the model), ``achieved_over_ideal`` =
``ratio_vs_adamw / flop_ratio_vs_adamw`` (1 = the step costs exactly its FLOPs at AdamW's achieved rate).

Run: ``pytest bench/test_bench_step.py --benchmark-json=out.json`` (one thread:
``OMP_NUM_THREADS=1``). Under ``--benchmark-disable`` every optimizer runs at tiny sizes a few steps, as a
smoke test (no timing). No assertion on any time here or anywhere in tests/.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.conftest import DEVICE, HAS_CUDA, sync
from fastcurv.data import load_problem
from fastcurv.optim import KBFGS, KBFGSL, KFAC, NewtonCG

OPTIMIZERS = ("adamw", "kfac", "kfac-sampled", "kbfgs", "kbfgsl", "newton-cg")
MODELS = ("curves", "mlp8x1024")
WARMUP = {"kfac": 22, "kfac-sampled": 22}  # past inv_every (20): the timed steps pay the refresh amortised


@dataclass
class Setup:
    model_fn: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    likelihood: str
    dims: list[tuple[int, int]]  # (d_in, d_out) per Linear


def _setup(name: str, tiny: bool) -> Setup:
    if name == "curves":
        p = load_problem("curves", n_train=64 if tiny else 1000, n_test=10)
        sizes = [16, 8, 4, 8, 16] if tiny else p.layer_sizes
        n = 16 if tiny else 1000
        x = (p.train_x[:n, : sizes[0]] if tiny else p.train_x[:n]).contiguous().to(DEVICE)

        def model_fn() -> nn.Module:
            if not tiny:
                return p.build_model(seed=0).to(DEVICE)
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for i in range(len(sizes) - 1):
                layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
            return nn.Sequential(*layers[:-1]).to(DEVICE)

        return Setup(model_fn, x, x, p.loss_fn, "bernoulli", list(zip(sizes[:-1], sizes[1:])))
    width, depth, n = (16, 3, 16) if tiny else (1024, 8, 1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=g).to(DEVICE)
    y = torch.randn(n, width, generator=g).to(DEVICE)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers[:-1]).to(DEVICE)

    def mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (o - t).pow(2).sum() / o.shape[0]

    return Setup(mlp, x, y, mse, "gaussian", [(width, width)] * depth)


def _stepper(name: str, s: Setup) -> tuple[Callable[[], None], Any]:
    model = s.model_fn()
    x, y, loss_fn = s.x, s.y, s.loss_fn
    if name == "adamw":
        kw = {"fused": True} if HAS_CUDA else {"foreach": True}
        opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-3, **kw)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step, opt
    if name.startswith("kfac"):
        sampled = name == "kfac-sampled"
        opt = KFAC(model, **(dict(fisher="sampled", likelihood=s.likelihood, seed=0) if sampled else {}))

        def closure() -> Any:
            out = model(x)
            loss = loss_fn(out, y)
            return (loss, out) if sampled else loss

        return (lambda: opt.step(closure)), opt
    if name in ("kbfgs", "kbfgsl"):
        opt = (KBFGS if name == "kbfgs" else KBFGSL)(model)
        return (lambda: opt.step(lambda: loss_fn(model(x), y))), opt
    opt = NewtonCG(model, loss_fn)
    return (lambda: opt.step(batch=(x, y))), opt


def flops(name: str, s: Setup, *, cg_iters: float = 0.0, inv_every: int = 20, history: int = 100) -> float:
    """The FLOP model of one step (see the module docstring)."""
    n = s.x.shape[0]
    S = sum(a * b for a, b in s.dims)
    P = sum(a * b + b for a, b in s.dims)
    fb = 6.0 * n * S
    da = [a + 1 for a, _ in s.dims]
    dg = [b for _, b in s.dims]
    syrk_a = n * sum(d * d for d in da)
    syrk_g = n * sum(d * d for d in dg)
    precond = 2.0 * sum(g * g * a + g * a * a for a, g in zip(da, dg))
    if name == "adamw":
        return fb + 12.0 * P
    if name.startswith("kfac"):
        inv = sum(a**3 + g**3 for a, g in zip(da, dg)) / inv_every
        return fb + syrk_a + syrk_g + precond + inv + (4.0 * n * S if name == "kfac-sampled" else 0.0)
    if name in ("kbfgs", "kbfgsl"):
        direction = precond
        if name == "kbfgsl":
            direction = sum(8.0 * history * g * a + 2.0 * g * a * a for a, g in zip(da, dg))
        updates = 6.0 * sum(a * a + g * g for a, g in zip(da, dg))
        return fb + 4.0 * n * S + syrk_a + direction + updates
    return fb + cg_iters * 4.0 * 6.0 * n * S


def _interleaved(steppers: dict[str, tuple[Callable[[], None], Any]], rounds: int) -> dict[str, float]:
    ts: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for k, (step, _) in steppers.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


@pytest.fixture(scope="module")
def measured(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """model -> {"setup", "steppers", "info": optimizer -> extra_info}; timed once per module, interleaved."""
    tiny = bool(request.config.getoption("benchmark_disable", False))
    rounds = 1 if tiny else 15
    out: dict[str, dict[str, Any]] = {}
    for m in MODELS:
        s = _setup(m, tiny)
        steppers = {name: _stepper(name, s) for name in OPTIMIZERS}
        for name, (step, _) in steppers.items():
            for _ in range(2 if tiny else WARMUP.get(name, 3)):
                step()
        cg0 = steppers["newton-cg"][1].counters().get("cg_iterations", 0)
        med = _interleaved(steppers, rounds)
        cg_iters = (steppers["newton-cg"][1].counters().get("cg_iterations", 0) - cg0) / rounds
        base_t, base_f = med["adamw"], flops("adamw", s)
        info = {}
        for name in OPTIMIZERS:
            f = flops(name, s, cg_iters=cg_iters)
            r = med[name] / base_t
            info[name] = {
                "model": m,
                "optimizer": name,
                "timed_interleaved_rounds": rounds,
                "step_ms": med[name] * 1e3,
                "adamw_ms": base_t * 1e3,
                "ratio_vs_adamw": r,
                "gflop": f / 1e9,
                "flop_ratio_vs_adamw": f / base_f,
                "achieved_over_ideal": r / (f / base_f),
                "threads": torch.get_num_threads(),
            }
            if name == "newton-cg":
                info[name]["cg_iterations_per_step"] = cg_iters
        out[m] = {"setup": s, "steppers": steppers, "info": info}
    return out


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("model", MODELS)
def test_step_cost_vs_adamw(benchmark, measured, model: str, optimizer: str) -> None:
    entry = measured[model]
    step, opt = entry["steppers"][optimizer]
    benchmark.extra_info.update(entry["info"][optimizer])

    def timed() -> None:
        step()
        sync()

    benchmark.pedantic(timed, rounds=1 if benchmark.disabled else 5, iterations=1)
    # the smoke test's checks: the step ran and the model is still finite
    params = [p for p in (opt.param_groups[0]["params"])]
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert entry["info"][optimizer]["flop_ratio_vs_adamw"] >= 1.0
