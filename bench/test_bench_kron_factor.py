r"""Benchmarks of the Kronecker-factor update :math:`A \leftarrow \beta A + \frac{1-\beta}{m} X^\top X`.

Single layer: the fused SYRK + EMA op against the eager reference, ``torch.compile`` of the reference and
the eager two-kernel ``A.mul_(beta).addmm_(X.T, X, alpha=(1-beta)/m)`` (a full GEMM: the "1.6x addmm"
target). Grouped: 50 layers in one ``_foreach_`` call against a Python loop of single-layer calls.
CPU reference: the eager path K-FAC runs on the CPU (one GEMM with the EMA inside BLAS, then
:math:`(N+N^\top)/2`) against the former formulation (a full product, its upper triangle mirrored, then
the EMA as separate tensor ops), on the CURVES factor widths 784 and 400 at m = 1000, float32;
interleaved rounds, median ratio in ``extra_info``.
Throughput counts the symmetric FLOPs, :math:`2 m \cdot d(d+1)/2` per layer (only the upper triangle of
:math:`X^\top X` is needed), against the TF32 or FP32 peak according to
``torch.backends.cuda.matmul.allow_tf32``.

On CUDA: ``pytest bench/test_bench_kron_factor.py --benchmark-json=out.json``. On CPU the op runs its
reference path, with tiny sizes, as a smoke test (``--benchmark-disable``: everything runs once and
``torch.compile`` baselines are not built at all).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from bench.conftest import DEVICE, HAS_CUDA
from fastcurv import ops, reference

M = 1024  # rows of the batch X
SIZES = (256, 1024, 4096) if HAS_CUDA else (64,)
FOREACH_LAYERS = 50
FOREACH_N = 256 if HAS_CUDA else 16
BETA = 0.95


def _peak_key(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "TFLOP/s fp64"
    return "TFLOP/s tf32" if torch.backends.cuda.matmul.allow_tf32 else "TFLOP/s fp32"


def _syrk_flops(m: int, d: int) -> float:
    return 2.0 * m * d * (d + 1) / 2


def _bytes(m: int, d: int, itemsize: int) -> float:
    """X read once, the upper half of A read, all of A written."""
    return itemsize * (m * d + 1.5 * d * d)


def _factor(d: int, dtype: torch.dtype) -> torch.Tensor:
    B = torch.randn(d, d, device=DEVICE, dtype=dtype)
    S = B @ B.T / d
    return (torch.triu(S) + torch.triu(S, 1).T).contiguous()


def _compiled(benchmark, fn: Callable[..., object]) -> Callable[..., object] | None:
    """``torch.compile(fn)``, or None under ``--benchmark-disable`` (compiling would dominate the smoke run)."""
    return None if benchmark.disabled else torch.compile(fn)


@pytest.mark.benchmark(group="kron_factor_update")
@pytest.mark.parametrize("d", SIZES)
def test_kron_factor_update(bench, benchmark, d: int) -> None:
    dtype = torch.float32
    A = _factor(d, dtype)
    X = torch.randn(M, d, device=DEVICE, dtype=dtype)
    beta = torch.tensor(BETA, device=DEVICE, dtype=dtype)
    A_eager, A_comp, A_addmm = A.clone(), A.clone(), A.clone()
    alpha = (1 - BETA) / M

    baselines: dict[str, Callable[[], object]] = {
        "eager": lambda: reference.kron_factor_update_(A_eager, X, beta),
        "addmm": lambda: A_addmm.mul_(BETA).addmm_(X.T, X, alpha=alpha),
    }
    comp = _compiled(benchmark, reference.kron_factor_update_)
    if comp is not None:
        baselines["compiled"] = lambda: comp(A_comp, X, beta)

    bench(
        lambda: ops.kron_factor_update_(A, X, beta),
        flops=_syrk_flops(M, d),
        bytes_moved=_bytes(M, d, X.element_size()),
        baselines=baselines,
        peak_key=_peak_key(dtype),
    )
    assert torch.equal(A, A.T)


@pytest.mark.benchmark(group="kron_factor_update_foreach")
def test_kron_factor_update_foreach(bench, benchmark) -> None:
    dtype = torch.float32
    n, L = FOREACH_N, FOREACH_LAYERS
    As = [_factor(n, dtype) for _ in range(L)]
    Xs = [torch.randn(M, n, device=DEVICE, dtype=dtype) for _ in range(L)]
    beta = torch.tensor(BETA, device=DEVICE, dtype=dtype)
    As_loop = [A.clone() for A in As]
    As_eager = [A.clone() for A in As]
    As_comp = [A.clone() for A in As]

    def loop() -> None:
        for A, X in zip(As_loop, Xs):
            ops.kron_factor_update_(A, X, beta)

    baselines: dict[str, Callable[[], object]] = {
        "loop": loop,
        "eager": lambda: reference.kron_factor_update_foreach_(As_eager, Xs, beta),
    }
    comp = _compiled(benchmark, reference.kron_factor_update_foreach_)
    if comp is not None:
        baselines["compiled"] = lambda: comp(As_comp, Xs, beta)

    bench(
        lambda: ops.kron_factor_update_foreach_(As, Xs, beta),
        flops=L * _syrk_flops(M, n),
        bytes_moved=L * _bytes(M, n, Xs[0].element_size()),
        baselines=baselines,
        peak_key=_peak_key(dtype),
    )
    assert all(torch.equal(A, A.T) for A in As)


def _mirror_reference(A: torch.Tensor, X: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The former eager formulation: the full product, its upper triangle mirrored, the EMA as tensor ops."""
    C = X.T @ X
    S = torch.triu(C) + torch.triu(C, 1).T
    new = beta * A + ((1 - beta) / X.shape[0]) * S
    ok = torch.isfinite(X).all() & torch.isfinite(beta) & (beta >= 0) & (beta <= 1)
    A.copy_(torch.where(ok, new, A))
    return A


@pytest.mark.benchmark(group="kron_factor_reference_cpu")
@pytest.mark.parametrize("d", (784, 400))
def test_reference_update_cpu(benchmark, d: int) -> None:
    """CPU eager reference at K-FAC's CURVES widths: the GEMM-with-EMA form against the mirror form."""
    m = 1000 if not benchmark.disabled else 16
    g = torch.Generator().manual_seed(0)
    X = torch.randn(m, d, generator=g)
    A0 = X.T @ X / m
    A0 = torch.triu(A0) + torch.triu(A0, 1).T
    beta = torch.tensor(BETA)
    A_new, A_old = A0.clone(), A0.clone()
    new = lambda: reference.kron_factor_update_(A_new, X, beta)  # noqa: E731
    old = lambda: _mirror_reference(A_old, X, beta)  # noqa: E731
    out = benchmark.pedantic(new, rounds=5 if not benchmark.disabled else 1, iterations=1)
    assert torch.equal(out, out.T)
    if benchmark.disabled:
        old()
        return
    t_new, t_old = [], []
    for _ in range(15):  # interleaved: both see the same machine load
        for fn, ts in ((new, t_new), (old, t_old)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    info = benchmark.extra_info
    info["shape"] = f"X ({m}, {d}) float32, A ({d}, {d})"
    info["threads"] = torch.get_num_threads()
    info["new_median_s"] = statistics.median(t_new)
    info["mirror_median_s"] = statistics.median(t_old)
    info["ratio_mirror_over_new"] = statistics.median(o / n for o, n in zip(t_old, t_new))
