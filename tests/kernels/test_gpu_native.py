r"""What only a GPU can check: TF32 error bounds, native bf16/fp16 ``tl.dot``, and other launch configurations.

Every test is ``gpu_only`` (skipped under the CPU interpreter, which computes full fp32 and upcasts bf16) and
compares the Triton op with :mod:`fastcurv.reference` within an error bound valid for any summation order
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1; :math:`\gamma_k = ku/(1-ku)`). TF32 rounds each
factor of a product to an 11-bit significand (unit roundoff :math:`u_t = 2^{-11}`), so a product carries a
relative error of at most :math:`2u_t + u_t^2` before it is accumulated in fp32.
"""

from __future__ import annotations

import pytest
import torch

from fastcurv import ops, reference
from fastcurv.kernels import complex_linear as ck
from fastcurv.kernels import kron_factor as kf

pytestmark = pytest.mark.gpu_only

U32 = 2.0**-24
UT = 2.0**-11


def _gamma(k: int, u: float = U32) -> float:
    return k * u / (1 - k * u)


@pytest.fixture
def tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - expected.double()).abs()
    assert (err <= bound).all(), f"worst error / bound = {(err / bound).max().item():.3g}"


def _sym(d: int, g: torch.Generator) -> torch.Tensor:
    B = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = B @ B.T / d + torch.eye(d, dtype=torch.float64)
    return (torch.triu(S) + torch.triu(S, 1).T).float().cuda()


def _kron_bound(A0: torch.Tensor, X: torch.Tensor, beta: float, extra_u: float) -> torch.Tensor:
    """|op - reference| for the factor update: both within gamma_{m+6} of the exact value, plus the op's
    per-product rounding ``extra_u`` (TF32) on the product term."""
    m = X.shape[0]
    P = X.double().abs().T @ X.double().abs()
    mag = beta * A0.double().abs() + (1 - beta) / m * P
    return 2 * _gamma(m + 6) * mag + extra_u * (1 - beta) / m * P * (1 + _gamma(m + 6)) + 1e-30


@pytest.mark.parametrize("d, m", [(257, 130), (64, 1000), (1000, 33)])
def test_kron_tf32_within_bound(tf32, d, m):
    g = torch.Generator().manual_seed(d + m)
    A = _sym(d, g)
    X = torch.randn(m, d, generator=g).cuda()
    A0 = A.clone()
    expected = reference.kron_factor_update_(A0.clone(), X, 0.9)
    ops.kron_factor_update_(A, X, 0.9)
    assert torch.equal(A, A.T)
    b = float(torch.tensor(0.9, dtype=torch.float32))
    _assert_within(A, expected, _kron_bound(A0, X, b, 2 * UT + UT * UT))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_kron_native_low_precision_dot(monkeypatch, x_dtype):
    """On the GPU bf16/fp16 X go to ``tl.dot`` as they are (no upcast); their products are exact in fp32, so
    the result is within the fp32 accumulation bound of the reference (which upcasts)."""
    seen = []
    kernel_run = kf._kron_factor_kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs["UPCAST"])
        return kernel_run(*args, **kwargs)

    monkeypatch.setattr(kf._kron_factor_kernel, "run", spy)
    g = torch.Generator().manual_seed(5)
    A = _sym(200, g)
    X = torch.randn(300, 200, generator=g).to(dtype=x_dtype).cuda()
    A0 = A.clone()
    expected = reference.kron_factor_update_(A0.clone(), X, 0.5)
    ops.kron_factor_update_(A, X, 0.5)
    assert seen == [False]
    _assert_within(A, expected, _kron_bound(A0, X, 0.5, 0.0))


@pytest.mark.parametrize("cfg", [(128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 3), (64, 16, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_other_launch_configs(monkeypatch, cfg, dtype):
    """Every BLOCK / num_warps / num_stages the tables might be tuned to gives the same bounded result."""
    block, block_k, warps, stages = cfg
    monkeypatch.setitem(kf._GPU_CONFIGS, (dtype, dtype), {block: (block_k, warps, stages)})
    monkeypatch.setattr(kf, "_TF32_CONFIG", {block: (block_k, warps, stages)})
    kf._plan.cache_clear()
    g = torch.Generator().manual_seed(block + warps)
    As = [_sym(d, g).to(dtype) for d in (1, 100, 257)]
    Xs = [torch.randn(m, d, generator=g, dtype=dtype).cuda() for d, m in ((1, 3), (100, 65), (257, 130))]
    A0s = [A.clone() for A in As]
    expected = [reference.kron_factor_update_(A.clone(), X, 0.7) for A, X in zip(A0s, Xs)]
    try:
        ops.kron_factor_update_foreach_(As, Xs, 0.7)
    finally:
        kf._plan.cache_clear()
    u = U32 if dtype == torch.float32 else 2.0**-53
    for A, A0, X, e in zip(As, A0s, Xs, expected):
        assert torch.equal(A, A.T)
        m = X.shape[0]
        P = X.double().abs().T @ X.double().abs()
        bound = 2 * _gamma(m + 6, u) * (0.7 * A0.double().abs() + 0.3 / m * P) + 1e-300
        _assert_within(A, e, bound)


def _complex_bound(a, ai, b, bi, extra_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds for both planes of (1, -1, 1, 1): each entry sums 2K products (op) or two K-products and an
    addition (reference)."""
    K = a.shape[1]
    ab = lambda x, y: x.double().abs() @ y.double().abs()  # noqa: E731
    P_re = ab(a, b) + ab(ai, bi)
    P_im = ab(ai, b) + ab(a, bi)
    k = 2 * K + 3
    f = 2 * _gamma(k) + extra_u * (1 + _gamma(k))
    return f * P_re + 1e-30, f * P_im + 1e-30


@pytest.mark.parametrize("M, N, K", [(100, 77, 300), (257, 129, 65)])
def test_complex_matmul_tf32_within_bound(tf32, M, N, K):
    g = torch.Generator().manual_seed(M)
    a, ai = (torch.randn(M, K, generator=g).cuda() for _ in range(2))
    b, bi = (torch.randn(K, N, generator=g).cuda() for _ in range(2))
    re, im = ops.complex_matmul(a, ai, b, bi, (1, -1, 1, 1))
    er, ei = reference.complex_matmul(a, ai, b, bi, (1, -1, 1, 1))
    br, bim = _complex_bound(a, ai, b, bi, 2 * UT + UT * UT)
    _assert_within(re, er, br)
    _assert_within(im, ei, bim)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2),
    ],
    ids=["128x128x32-w8", "64x64x16-w4", "32x64x32-w4"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_complex_matmul_other_launch_configs(monkeypatch, cfg, dtype):
    monkeypatch.setitem(ck._CONFIGS, (dtype, "ieee"), cfg)
    g = torch.Generator().manual_seed(3)
    M, N, K = 130, 67, 200
    a, ai = (torch.randn(M, K, generator=g, dtype=dtype).cuda() for _ in range(2))
    b, bi = (torch.randn(K, N, generator=g, dtype=dtype).cuda() for _ in range(2))
    re, im = ops.complex_matmul(a, ai, b.T.contiguous().T, bi, (1, -1, 1, 1))  # one operand column-major
    er, ei = reference.complex_matmul(a, ai, b, bi, (1, -1, 1, 1))
    u = U32 if dtype == torch.float32 else 2.0**-53
    K2 = 2 * K + 3
    f = 2 * _gamma(K2, u)
    ab = lambda x, y: x.double().abs() @ y.double().abs()  # noqa: E731
    _assert_within(re, er, f * (ab(a, b) + ab(ai, bi)) + 1e-300)
    _assert_within(im, ei, f * (ab(ai, b) + ab(a, bi)) + 1e-300)
