"""Shared pytest-benchmark helpers: device-synchronised timing, ratios and throughput in ``extra_info``.

Run ``pytest bench/ --benchmark-json=out.json`` on a GPU (see README). On CPU CI the suites run as a smoke
test with ``--benchmark-disable`` (each benchmarked function runs once, nothing is timed).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Peak numbers used for "% of peak" (dense, no sparsity), by device-name substring.
PEAKS = {
    "H100": {"GB/s": 3350.0, "TFLOP/s fp32": 67.0, "TFLOP/s tf32": 495.0, "TFLOP/s fp64": 67.0, "TFLOP/s bf16": 990.0},
    "H200": {"GB/s": 4800.0, "TFLOP/s fp32": 67.0, "TFLOP/s tf32": 495.0, "TFLOP/s fp64": 67.0, "TFLOP/s bf16": 990.0},
}


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else f"cpu ({platform.processor() or platform.machine()})"


def peak(key: str) -> float | None:
    name = device_name()
    for k, v in PEAKS.items():
        if k in name:
            return v.get(key)
    return None


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn`` (device-synchronised) — used for the *baselines* a benchmark compares to."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


@pytest.fixture
def bench(benchmark):
    """``bench(fn, bytes_moved=..., flops=..., baselines={"eager": fn2, ...}, peak_key=...)``.

    Times ``fn`` with pytest-benchmark (synchronised), then records in ``extra_info``: the device, GB/s
    and/or TFLOP/s with the % of the device's peak, and for each baseline its median time and the
    speed-up ``baseline_time / fn_time`` (``ratio_vs_<name>``). Under ``--benchmark-disable`` ``fn`` runs
    once and nothing else is measured.
    """

    def run(
        fn: Callable[[], object],
        *,
        bytes_moved: float = 0.0,
        flops: float = 0.0,
        baselines: dict[str, Callable[[], object]] | None = None,
        peak_key: str | None = None,
        rounds: int = 20,
        warmup_rounds: int = 3,
    ) -> object:
        def timed() -> object:
            out = fn()
            sync()
            return out

        out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        if benchmark.disabled or benchmark.stats is None:
            for b in (baselines or {}).values():  # smoke-test the baselines too
                b()
            return out
        t = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["device"] = device_name()
        info["torch"] = torch.__version__
        if bytes_moved:
            info["GB/s"] = bytes_moved / t / 1e9
            p = peak("GB/s")
            if p:
                info["% peak GB/s"] = 100 * info["GB/s"] / p
        if flops:
            info["TFLOP/s"] = flops / t / 1e12
            p = peak(peak_key) if peak_key else None
            if p:
                info[f"% peak {peak_key}"] = 100 * info["TFLOP/s"] / p
        for name, b in (baselines or {}).items():
            tb = median_seconds(b)
            info[f"{name}_s"] = tb
            info[f"ratio_vs_{name}"] = tb / t
        return out

    return run
