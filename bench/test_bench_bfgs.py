r"""Benchmarks of the double-damped BFGS inverse update :math:`H^+ = H + c\,\tilde s\tilde s^\top -
\rho(\tilde s u^\top + u\tilde s^\top)` (:func:`fastcurv.ops.damped_bfgs_update_` and ``_foreach_``).

Single layer, float32, against the eager reference and ``torch.compile`` of the reference, in the two
configurations K-BFGS uses: ``double`` damping (Powell + Levenberg–Marquardt, the :math:`H_g` update: three
launches) and ``none`` (the Hessian-action :math:`H_a` update: two launches). Grouped: 50 layers of
:math:`n = 256` in one ``_foreach_`` call against a Python loop of single-layer calls (and the eager
reference).

The op is memory-bound, so throughput is reported as GB/s of the bytes the Triton kernels move to and from
DRAM (:func:`_bytes`): each GEMV pass reads all of :math:`H` (:math:`n^2`; one pass for :math:`Hy` when Powell
damping is on, one for :math:`u = H\tilde y`), the rank-2 pass reads the upper triangle
(:math:`n(n+1)/2`) and writes all of :math:`H` (:math:`n^2`, the lower triangle mirrored), plus
:math:`O(n)` vectors — :math:`3.5n^2` elements with double damping, :math:`2.5n^2` without.

On CUDA: ``pytest bench/test_bench_bfgs.py --benchmark-json=out.json``. On CPU the op runs its reference
path with tiny sizes as a smoke test (``--benchmark-disable``: everything runs once and the
``torch.compile`` baselines are not built at all).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.conftest import DEVICE, HAS_CUDA
from fastcurv import ops, reference

SIZES = (512, 2048, 4096) if HAS_CUDA else (64,)
FOREACH_LAYERS = 50
FOREACH_N = 256 if HAS_CUDA else 16
DAMPING = {"double": dict(mu1=0.2, mu2=0.5), "none": dict(mu1=None, mu2=None)}


def _bytes(n: int, itemsize: int, powell: bool) -> float:
    """DRAM traffic of the Triton path for one layer (see the module docstring)."""
    gemv_passes = 2 if powell else 1
    return itemsize * (gemv_passes * n * n + n * (n + 1) / 2 + n * n + 8 * n)


def _problem(n: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bitwise-symmetric SPD H and a pair with s^T y > 0 (so every call applies the update)."""
    B = torch.randn(n, n, generator=g, dtype=dtype).to(DEVICE)
    S = B @ B.T / n + torch.eye(n, dtype=dtype, device=DEVICE)
    H = (torch.triu(S) + torch.triu(S, 1).T).contiguous()
    s = torch.randn(n, generator=g, dtype=dtype).to(DEVICE)
    y = s + 0.1 * torch.randn(n, generator=g, dtype=dtype).to(DEVICE)
    return H, s, y


def _compiled(benchmark, fn: Callable[..., object]) -> Callable[..., object] | None:
    """``torch.compile(fn)``, or None under ``--benchmark-disable`` (compiling would dominate the smoke run)."""
    return None if benchmark.disabled else torch.compile(fn)


@pytest.mark.benchmark(group="damped_bfgs_update")
@pytest.mark.parametrize("damping", list(DAMPING))
@pytest.mark.parametrize("n", SIZES)
def test_damped_bfgs_update(bench, benchmark, n: int, damping: str) -> None:
    dtype = torch.float32
    kw = DAMPING[damping]
    H, s, y = _problem(n, dtype, torch.Generator().manual_seed(n))
    H_eager, H_comp = H.clone(), H.clone()

    baselines: dict[str, Callable[[], object]] = {
        "eager": lambda: reference.damped_bfgs_update_(H_eager, s, y, **kw),
    }
    comp = _compiled(benchmark, reference.damped_bfgs_update_)
    if comp is not None:
        baselines["compiled"] = lambda: comp(H_comp, s, y, **kw)

    bench(
        lambda: ops.damped_bfgs_update_(H, s, y, **kw),
        bytes_moved=_bytes(n, H.element_size(), kw["mu1"] is not None),
        baselines=baselines,
    )
    assert torch.equal(H, H.T)
    assert bool(ops.damped_bfgs_update_(H, s, y, **kw))


@pytest.mark.benchmark(group="damped_bfgs_update_foreach")
def test_damped_bfgs_update_foreach(bench) -> None:
    dtype = torch.float32
    n, L = FOREACH_N, FOREACH_LAYERS
    kw = DAMPING["double"]
    g = torch.Generator().manual_seed(0)
    Hs, ss, ys = map(list, zip(*(_problem(n, dtype, g) for _ in range(L))))
    Hs_loop = [H.clone() for H in Hs]
    Hs_eager = [H.clone() for H in Hs]

    def loop() -> None:
        for H, s, y in zip(Hs_loop, ss, ys):
            ops.damped_bfgs_update_(H, s, y, **kw)

    bench(
        lambda: ops.damped_bfgs_update_foreach_(Hs, ss, ys, **kw),
        bytes_moved=L * _bytes(n, Hs[0].element_size(), True),
        baselines={
            "loop": loop,
            "eager": lambda: reference.damped_bfgs_update_foreach_(Hs_eager, ss, ys, **kw),
        },
    )
    assert all(torch.equal(H, H.T) for H in Hs)
    assert bool(ops.damped_bfgs_update_foreach_(Hs, ss, ys, **kw).all())
