r"""Step time of KBFGS / KBFGSL against AdamW, and where the time of a K-BFGS step goes.

What is timed: one ``opt.step(closure)`` — the optimizer's two forward/backward passes on the same minibatch
(with statistics capture), the compiled update phases and the host sync — against one AdamW step with its
forward/backward (``zero_grad``, ``loss.backward()``, ``step``; ``fused=True`` on CUDA, ``foreach=True`` on
CPU). ``extra_info["ratio_vs_adamw"]`` is ``t_adamw / t_kbfgs`` (below 1: K-BFGS is slower per step; it does
two passes, so about 0.4–0.5 is the floor a perfect implementation could reach).

Models: an MLP of 8 ``Linear(1024, 1024)`` layers (ReLU between) at batch 1024 and a small CNN (three 3×3
convolutions, 32×32×3 inputs, batch 256, a linear head) on CUDA; tiny versions on CPU (smoke test).

Breakdown (``extra_info["breakdown_s"]``, seconds per step, from a separate, non-benchmarked run with
device-synchronised timers; the syncs add a little): the optimizer's own phases through its
``phase_timer`` hook — ``pass1`` (parameter snapshot, closure and backward with capture), ``phase1``
(momentum, A EMA, direction, θ update), ``pass2``, ``check`` (the one host sync), ``phase2`` (curvature
pairs, H_g and H_a BFGS / L-BFGS updates), ``fallback`` — and, for attribution, the forward/backward of the
same closure with capture off, in ``"means"`` mode and in ``"a_factor+means"`` mode, and the direction
GEMMs alone. ``extra_info["where"]`` folds these into: ``fwd_bwd`` (two plain passes), ``capture`` (the
taps and means of both passes), ``factor_update`` (the A statistic in pass 1 + the rest of phase 1),
``direction``, ``bfgs_update`` (phase 2) and ``other`` (snapshot, check, fallback).

On CUDA: ``pytest bench/test_bench_optim_kbfgs.py --benchmark-json=out.json``. On CPU with
``--benchmark-disable`` every function runs once (no compile: the first step is eager and the compiled
phases are not built), as a smoke test.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.conftest import DEVICE, HAS_CUDA, device_name, sync
from fastcurv.optim import KBFGS, KBFGSL
from fastcurv.optim._lbfgs import lbfgs_apply

DTYPE = torch.float32


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    width, depth, batch = (1024, 8, 1024) if HAS_CUDA else (32, 4, 64)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    x = torch.randn(batch, width, device=DEVICE, dtype=DTYPE)
    t = torch.randn(batch, width, device=DEVICE, dtype=DTYPE)
    return nn.Sequential(*layers).to(DEVICE, DTYPE), x, t, F.mse_loss


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    c, side, batch = (64, 32, 256) if HAS_CUDA else (4, 8, 16)
    model = nn.Sequential(
        nn.Conv2d(3, c // 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c * (side // 4) ** 2, 10),
    )
    x = torch.randn(batch, 3, side, side, device=DEVICE, dtype=DTYPE)
    t = torch.randint(0, 10, (batch,), device=DEVICE)
    return model.to(DEVICE, DTYPE), x, t, F.cross_entropy


MODELS = {"mlp": _mlp, "cnn": _cnn}


class _SyncTimer:
    """``timer(name)`` context manager: device-synchronised wall time accumulated per name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.total[name] += time.perf_counter() - t0


def _mean_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _breakdown(opt, model: nn.Module, closure: Callable[[], torch.Tensor], reps: int) -> dict[str, dict[str, float]]:
    timer = _SyncTimer()
    opt.phase_timer = timer
    try:
        for _ in range(reps):
            opt.step(closure)
    finally:
        opt.phase_timer = None
    phases = {k: v / reps for k, v in timer.total.items()}

    def pass_in(mode: str) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            opt.capture.reset()
            with opt.capture.mode(mode), torch.enable_grad():
                closure().backward()

        return run

    t_plain = _mean_time(pass_in("off"), reps)
    t_means = _mean_time(pass_in("means"), reps)
    t_full = _mean_time(pass_in("a_factor+means"), reps)
    model.zero_grad(set_to_none=True)

    # the direction alone: H_g M H_a per layer (dense or compact L-BFGS), on the optimizer's own state
    states = [opt.state[L.weight] for L in opt._layers]

    def direction() -> None:
        with torch.no_grad():
            for s in states:
                M = s["grad_momentum"]
                X = lbfgs_apply(s["lbfgs_left"], s["lbfgs_right"], M) if "lbfgs_S" in s else s["H_g"] @ M
                X @ s["H_a"]

    t_dir = _mean_time(direction, reps)
    measured = {"fwd_bwd_plain": t_plain, "fwd_bwd_capture_means": t_means, "fwd_bwd_capture_a_factor+means": t_full,
                "direction_gemms": t_dir}
    where = {
        "fwd_bwd": 2 * t_plain,
        "capture": 2 * max(t_means - t_plain, 0.0),
        "factor_update": max(t_full - t_means, 0.0) + max(phases.get("phase1", 0.0) - t_dir, 0.0),
        "direction": t_dir,
        "bfgs_update": phases.get("phase2", 0.0),
    }
    total = sum(phases.values())
    where["other"] = max(total - sum(where.values()), 0.0)
    return {"phases": phases, "measured": measured, "where": where}


@pytest.mark.benchmark(group="optim_kbfgs")
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL], ids=["KBFGS", "KBFGSL"])
def test_step_time_vs_adamw(bench, benchmark, cls, model_name: str) -> None:
    torch.manual_seed(0)
    model, x, t, loss_fn = MODELS[model_name]()
    twin, _, _, _ = MODELS[model_name]()
    twin.load_state_dict(model.state_dict())

    opt = cls(model, lr=0.01, compile=False if benchmark.disabled else "auto")
    closure = lambda: loss_fn(model(x), t)  # noqa: E731
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-3, **({"fused": True} if HAS_CUDA else {"foreach": True}))

    def adamw_step() -> None:
        adamw.zero_grad(set_to_none=True)
        loss_fn(twin(x), t).backward()
        adamw.step()

    bench(lambda: opt.step(closure), baselines={"adamw": adamw_step}, rounds=20, warmup_rounds=3)
    assert opt.skipped_steps == 0

    info = _breakdown(opt, model, closure, reps=1 if benchmark.disabled else 10)
    assert set(info["phases"]) == {"pass1", "phase1", "pass2", "check", "phase2", "fallback"}
    benchmark.extra_info["breakdown_s"] = info["phases"]
    benchmark.extra_info["measured_s"] = info["measured"]
    benchmark.extra_info["where"] = info["where"]
    benchmark.extra_info["model"] = model_name
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["compiled"] = bool(opt.compile_enabled)
