r"""Benchmarks of one full :class:`fastcurv.optim.KFAC` step against ``torch.optim.AdamW``.

Both sides time a whole training step: forward + backward + optimizer update. AdamW is ``fused=True`` on CUDA
and ``foreach=True`` on CPU. Models: an MLP (8 ``nn.Linear`` layers of width 1024, batch 1024 on CUDA) and a
small CNN (3 convolutions + a linear head, 32x32 inputs, batch 128 on CUDA); tiny versions on CPU.

KFAC runs in its steady state: ``inv_every + 2`` steps are taken before timing (the schedule refreshes the
inverses at every step k <= inv_every), so the timed rounds pay the inverse refresh at its amortised rate
(once every ``inv_every`` steps).

``extra_info``:

* ``ratio_vs_adamw`` (the ``bench`` fixture's speed-up, AdamW time / KFAC time, below 1) and
  ``overhead_vs_adamw`` = KFAC time / AdamW time;
* a breakdown in milliseconds, each part timed alone: ``fwd_bwd_ms`` (forward + backward, statistics off),
  ``capture_ms`` (extra time of the same forward + backward with A and G statistics on),
  ``factor_update_ms`` (momentum + factor EMA), ``inverse_refresh_ms`` (one refresh of every inverse) and
  ``inverse_amortized_ms`` (that / inv_every), ``direction_ms`` (preconditioning + parameter update), and
  ``other_ms`` = the step's median minus those parts (the finiteness check's host sync, the fallback
  update, Python overhead).

On CUDA: ``pytest bench/test_bench_optim_kfac.py --benchmark-json=out.json`` (the update is compiled,
``compile="auto"``). On CPU, ``--benchmark-disable`` makes it a smoke test: every callable runs once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.conftest import DEVICE, HAS_CUDA, median_seconds
from fastcurv.optim import KFAC

INV_EVERY = 20


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    width, depth, batch = (1024, 8, 1024) if HAS_CUDA else (64, 4, 64)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i + 1 < depth:
            layers.append(nn.ReLU())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g)
    y = torch.randn(batch, width, generator=g)
    return nn.Sequential(*layers), x, y


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    c, side, batch = (64, 32, 128) if HAS_CUDA else (8, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c * (side // 4) ** 2, 10),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def _loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return (lambda o, t: 0.5 * (o - t).pow(2).sum(1).mean()) if kind == "mlp" else F.cross_entropy


def _adamw_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> Callable[[], None]:
    kw = {"fused": True} if HAS_CUDA else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kw)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _breakdown(opt: KFAC, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> dict[str, float]:
    """Time the parts of a KFAC step separately (milliseconds; uses the optimizer's internals)."""
    cap = opt._cap

    def fwd_bwd(stats: tuple[str, ...]) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            cap.reset()
            with cap.mode(stats):
                loss_fn(model(x), y).backward()

        return run

    t_plain = median_seconds(fwd_bwd(()))
    t_cap = median_seconds(fwd_bwd(("A", "G")))
    fwd_bwd(("A", "G"))()  # leave gradients and statistics for the parts below
    layers = opt._active_layers()
    As, Gs, Ls = opt._batch_stats(layers)
    g = opt.param_groups[0]
    st = [opt.state[lay.weight] for lay in layers]
    snapshot = [(p.detach().clone()) for p in model.parameters()]
    saved = [{k: v.clone() for k, v in s.items()} for s in st]

    @torch.no_grad()
    def stats_update() -> None:
        opt._stats_fn(
            [lay.weight for lay in layers], [lay.bias for lay in layers], [lay.weight.grad for lay in layers],
            [None if lay.bias is None else lay.bias.grad for lay in layers], [s["momentum"] for s in st],
            [s["A"] for s in st], [s["G"] for s in st], As, Gs, Ls, g["momentum"], g["weight_decay"], g["stat_decay"],
        )

    @torch.no_grad()
    def refresh() -> None:
        opt._refresh_inverses(layers)

    @torch.no_grad()
    def direction() -> None:
        inv = [opt._inverse_tensors(lay) for lay in layers]
        opt._apply_fn(
            [lay.weight for lay in layers], [lay.bias for lay in layers], [s["momentum"] for s in st],
            [t[0] for t in inv], [t[1] for t in inv], [t[2] for t in inv], g["lr"], g.get("kl_clip", opt._zero),
        )

    out = {
        "fwd_bwd_ms": 1e3 * t_plain,
        "capture_ms": 1e3 * (t_cap - t_plain),
        "factor_update_ms": 1e3 * median_seconds(stats_update),
        "inverse_refresh_ms": 1e3 * median_seconds(refresh, warmup=1, reps=5),
        "direction_ms": 1e3 * median_seconds(direction),
    }
    out["inverse_amortized_ms"] = out["inverse_refresh_ms"] / opt.inv_every
    with torch.no_grad():  # undo what the timing loops did to parameters and state
        for p, q in zip(model.parameters(), snapshot):
            p.copy_(q)
        for s, sv in zip(st, saved):
            for k in s:
                s[k].copy_(sv[k])
    opt.zero_grad(set_to_none=True)
    cap.reset()
    return out


@pytest.mark.benchmark(group="optim_kfac_step")
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kfac_step_vs_adamw(bench, benchmark, kind: str) -> None:
    build = _mlp if kind == "mlp" else _cnn
    model, x, y = build()
    base, _, _ = build()
    base.load_state_dict(model.state_dict())
    model, base, x, y = model.to(DEVICE), base.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    loss_fn = _loss(kind)
    opt = KFAC(model, lr=1e-2, damping=1.0, inv_every=INV_EVERY)

    def closure() -> torch.Tensor:
        return loss_fn(model(x), y)

    def kfac_step() -> None:
        opt.step(closure)

    for _ in range(1 if benchmark.disabled else INV_EVERY + 2):  # past the every-step refresh phase
        kfac_step()
    adamw = _adamw_step(base, x, y, loss_fn)
    bench(kfac_step, baselines={"adamw": adamw}, rounds=2 * INV_EVERY, warmup_rounds=2)
    assert opt.skipped_steps == 0
    if benchmark.disabled or benchmark.stats is None:
        return
    info = benchmark.extra_info
    info["overhead_vs_adamw"] = 1.0 / info["ratio_vs_adamw"]
    info["model"] = kind
    info["params"] = sum(p.numel() for p in model.parameters())
    parts = _breakdown(opt, model, x, y, loss_fn)
    info.update(parts)
    keys = ("fwd_bwd_ms", "capture_ms", "factor_update_ms", "inverse_amortized_ms", "direction_ms")
    accounted = sum(parts[k] for k in keys)
    info["other_ms"] = 1e3 * benchmark.stats.stats.median - accounted  # checks' host syncs, fallback, Python
