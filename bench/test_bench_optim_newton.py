r"""Benchmarks for the Newton-type optimizers: the cost of one curvature-vector product, and of one step.

1. ``test_hvp_cost_vs_gradient``: one curvature-vector product by each :mod:`fastcurv.hvp` method
   (``complex-step``, ``double-backward``, ``ggn``) against one gradient (forward + backward,
   ``torch.autograd.grad``) of the same loss, on an MLP (8 ``nn.Linear`` of width 1024 with tanh, batch 512,
   MSE on CUDA) and a small CNN (3 convolutions + linear head, 32x32, batch 128, cross-entropy on CUDA);
   tiny versions on CPU. ``extra_info["hvp_over_gradient"]`` is the HVP time / gradient time (the
   target for the complex step on GPU is <= 3, ``target_met``; docs/algorithms.md §5 counts ~9F of matmul
   work vs the gradient's 3F per layer, docs/complex_step.md measured x2.3-2.6 on CPU).
2. ``test_step_time_vs_adamw``: wall time of one full optimizer step (closure, curvature products, update)
   against ``torch.optim.AdamW`` (``fused=True`` on CUDA, ``foreach=True`` on CPU) on the same model and
   batch. The Krylov methods run a fixed budget of ``CG_ITERS`` CG iterations (``cg_tol=0``; a
   disturbing-direction exit can end a solve earlier, so ``curvature_products_per_step`` is reported and
   ``ms_per_curvature_product`` = step time / that). ExactNewton's cost is :math:`O(N d^3)` per layer
   (batched Cholesky/eigh of per-sample blocks), so it runs on a narrower MLP (width 256, 4 layers, batch
   256 on CUDA), with AdamW timed on that model.

On CUDA: ``pytest bench/test_bench_optim_newton.py --benchmark-json=out.json``. On CPU,
``--benchmark-disable`` makes it a smoke test (every callable runs once).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.conftest import DEVICE, HAS_CUDA
from fastcurv import hvp as H
from fastcurv.optim import BlockHF, ExactNewton, NewtonCG

CG_ITERS = 10


def _mlp(width: int, depth: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i + 1 < depth:
            layers.append(nn.Tanh())
    x = torch.randn(batch, width, generator=g)
    y = torch.randn(batch, width, generator=g)
    return nn.Sequential(*layers).to(DEVICE), x.to(DEVICE), y.to(DEVICE)


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    c, side, batch = (64, 32, 128) if HAS_CUDA else (8, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c * (side // 4) ** 2, 10),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


def _problem(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    if kind == "mlp":
        model, x, y = _mlp(*((1024, 8, 512) if HAS_CUDA else (64, 4, 32)))
        return model, x, y, F.mse_loss
    model, x, y = _cnn()
    return model, x, y, F.cross_entropy


@pytest.mark.benchmark(group="hvp_vs_gradient")
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["complex-step", "double-backward", "ggn"])
def test_hvp_cost_vs_gradient(bench, benchmark, kind: str, method: str) -> None:
    model, x, y, loss_fn = _problem(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    v = [torch.randn(p.shape, generator=g, device=DEVICE, dtype=p.dtype) for p in params]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    def product() -> None:
        H.hvp(model, loss_fn, (x, y), v, method=method)

    bench(product, baselines={"gradient": gradient})
    if benchmark.disabled or benchmark.stats is None:
        return
    info = benchmark.extra_info
    info["hvp_over_gradient"] = 1.0 / info["ratio_vs_gradient"]
    info["model"] = kind
    info["method"] = method
    info["params"] = sum(p.numel() for p in params)
    if method == "complex-step":
        info["target_ratio"] = 3.0
        info["target_met"] = info["hvp_over_gradient"] <= 3.0


def _adamw_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> Callable[[], None]:
    kw = {"fused": True} if HAS_CUDA else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kw)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _make(name: str, model: nn.Module, loss_fn):
    if name == "NewtonCG":
        return NewtonCG(model, loss_fn, max_cg_iters=CG_ITERS, cg_tol=0.0)
    if name == "NewtonCG-ggn":
        return NewtonCG(model, loss_fn, method="ggn", max_cg_iters=CG_ITERS, cg_tol=0.0)
    if name == "BlockHF":
        return BlockHF(model, loss_fn, max_cg_iters=CG_ITERS, cg_tol=0.0, progress_tol=None)
    return ExactNewton(model, loss_fn)


@pytest.mark.benchmark(group="optim_newton_step")
@pytest.mark.parametrize("name", ["NewtonCG", "NewtonCG-ggn", "BlockHF", "ExactNewton"])
def test_step_time_vs_adamw(bench, benchmark, name: str) -> None:
    if name == "ExactNewton":
        build = lambda: _mlp(*((256, 4, 256) if HAS_CUDA else (32, 3, 16)))  # noqa: E731
    else:
        build = lambda: _mlp(*((1024, 8, 512) if HAS_CUDA else (64, 4, 32)))  # noqa: E731
    model, x, y = build()
    base, _, _ = build()
    base.load_state_dict(model.state_dict())
    loss_fn = F.mse_loss
    opt = _make(name, model, loss_fn)

    def step() -> None:
        opt.step(batch=(x, y))

    step()  # warm-up (and the smoke test under --benchmark-disable)
    before = dict(opt.counters())
    bench(step, baselines={"adamw": _adamw_step(base, x, y, loss_fn)}, rounds=10, warmup_rounds=1)
    assert opt.skipped_steps == 0
    if benchmark.disabled or benchmark.stats is None:
        return
    info = benchmark.extra_info
    info["overhead_vs_adamw"] = 1.0 / info["ratio_vs_adamw"]
    info["optimizer"] = name
    info["params"] = sum(p.numel() for p in model.parameters())
    after = opt.counters()
    steps = after["steps"] - before["steps"]
    if "curvature_products" in after and steps:
        per = (after["curvature_products"] - before["curvature_products"]) / steps
        info["curvature_products_per_step"] = per
        if per:
            info["ms_per_curvature_product"] = 1e3 * benchmark.stats.stats.median / per
