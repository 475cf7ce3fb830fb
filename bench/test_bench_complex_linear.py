r"""Benchmarks: fused complex-perturbed linear layer, forward + backward, as used for complex-step HVPs.

Workload: ``ops.complex_linear(x, x_im, W, W_im, b, b_im, dual=True)`` with every plane requiring grad, then
the gradients of all six planes for given output cotangents. Real products actually performed
(docs/algorithms.md §3.2): forward 3 (:math:`xW^\top`; :math:`x'W^\top + xW'^\top`), dX/dX' 3
(:math:`G_rW + G_iW'`; :math:`G_iW`), dW/dW' 3 (:math:`G_r^\top x + G_i^\top x'`; :math:`G_i^\top x`):
``flops = 9 * 2 * batch * d_in * d_out``. Bias reductions are O(batch * d_out) and not counted.

Baselines: one *real* ``F.linear`` forward + backward at the same shape (3 products; the target is that
ours costs at most 3x this, i.e. ``ratio_vs_real_linear >= 1/3``), the eager reference, and
``torch.compile`` of the reference. On CUDA the shapes are (512, 1024, 1024) and (4096, 4096, 4096);
on CPU a tiny shape smoke-tests everything (the Triton kernel through the interpreter).

Run: ``pytest bench/test_bench_complex_linear.py --benchmark-json=out.json`` on a GPU;
``pytest -q bench/test_bench_complex_linear.py --benchmark-disable`` on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastcurv
from fastcurv import ops, reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPES = [(512, 1024, 1024), (4096, 4096, 4096)] if HAS_CUDA else [(8, 16, 24)]  # (batch, d_in, d_out)
DTYPE = torch.float32


def _planes(batch: int, d_in: int, d_out: int) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DTYPE).to(DEVICE)  # noqa: E731
    inputs = [r(batch, d_in), r(batch, d_in), r(d_out, d_in), r(d_out, d_in), r(d_out), r(d_out)]
    return [t.requires_grad_() for t in inputs], (r(batch, d_out), r(batch, d_out))


def _fwd_bwd(linear: Callable, inputs: list[torch.Tensor], cot: tuple[torch.Tensor, torch.Tensor]) -> Callable:
    """One complex-step layer step: both planes forward (dual), then all six plane gradients."""

    def step() -> tuple[torch.Tensor, ...]:
        y, y_im = linear(*inputs, dual=True)
        return torch.autograd.grad((y, y_im), inputs, cot)

    return step


def _ours(*args, dual: bool):  # type: ignore[no-untyped-def]
    # "auto" runs the kernel on CUDA; on CPU force the Triton kernel (interpreter) so the smoke test covers it
    ctx = contextlib.nullcontext() if HAS_CUDA else fastcurv.use_backend("triton")
    with ctx:
        return ops.complex_linear(*args, dual=dual)


@pytest.mark.benchmark(group="complex_linear_fwd_bwd")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_complex_linear_fwd_bwd(bench, benchmark, shape):
    batch, d_in, d_out = shape
    inputs, cot = _planes(batch, d_in, d_out)
    x, w, b = (inputs[0].detach().clone().requires_grad_(), inputs[2].detach().clone().requires_grad_(),
               inputs[4].detach().clone().requires_grad_())
    g = cot[0]

    def real_linear() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)

    compiled = torch.compile(reference.complex_linear, dynamic=False)
    ours = _fwd_bwd(_ours, inputs, cot)
    # one check that we benchmark the right thing: our gradients equal the eager reference's
    want = _fwd_bwd(reference.complex_linear, inputs, cot)()
    tf32 = HAS_CUDA and torch.backends.cuda.matmul.allow_tf32
    tol = (1e-2 if tf32 else 1e-4) * max(batch, d_in, d_out) ** 0.5
    for got_i, want_i in zip(ours(), want):
        torch.testing.assert_close(got_i, want_i, rtol=tol, atol=tol)

    flops = 9 * 2 * batch * d_in * d_out  # 3 real products forward, 3 for dX/dX', 3 for dW/dW'
    benchmark.extra_info.update(real_products=9, flops=flops, shape=dict(batch=batch, d_in=d_in, d_out=d_out))
    bench(
        ours,
        flops=flops,
        baselines={
            "real_linear": real_linear,
            "eager_reference": _fwd_bwd(reference.complex_linear, inputs, cot),
            "compiled_reference": _fwd_bwd(compiled, inputs, cot),
        },
        peak_key="TFLOP/s tf32" if tf32 else "TFLOP/s fp32",
        rounds=20 if HAS_CUDA else 1,
        warmup_rounds=3 if HAS_CUDA else 0,
    )
