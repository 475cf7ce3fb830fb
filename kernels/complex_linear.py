r"""Planar complex GEMM with signed products: the kernel behind every complex-perturbed matmul.

Complex operands are stored as separate real planes, :math:`A = A_r + iA_i \in \mathbb{R}^{M\times K}` and
:math:`B = B_r + iB_i \in \mathbb{R}^{K\times N}`. With integer coefficients
``coef = (c_rr, c_ii, c_ir, c_ri)`` in :math:`\{-1, 0, 1\}` one kernel computes

.. math::
    C_r = c_{rr} A_r B_r + c_{ii} A_i B_i + b_r, \qquad
    C_i = c_{ir} A_i B_r + c_{ri} A_r B_i + b_i .

Uses (docs/algorithms.md §3.2, docs/complex_step.md):

* ``(1, -1, 1, 1)`` — the complex product :math:`AB`. The forward of a complex linear layer
  :math:`(X + iX')(W + iW')^\top` is ``A = X + iX'``, ``B = W^\top + iW'^\top`` (a transposed *view*: the
  kernel takes explicit strides, nothing is copied).
* ``(1, 1, 1, -1)`` — :math:`A\bar B`, the backward of that map for real cotangents
  :math:`G = G_r + iG_i` of the two output planes: :math:`(dX, dX') = G\,\overline{W}` and
  :math:`(dW, dW') = G^\top \overline{X}`. Each plane is an ordinary real tensor, so these are plain real
  gradients: the bar comes from the chain rule on the planes, not from Wirtinger calculus, and no operand
  is ever conjugate-*transposed*.
* A ``0`` entry drops a product at compile time. ``(1, 0, 1, 1)`` is the dual-number (forward-mode) limit
  of the complex step, where :math:`X'W'^\top = O(h^2)` is discarded and ``h`` factors out exactly;
  ``(1, 1, 1, 0)`` is its backward. A missing plane (``None``) is zero and likewise removes its products.

All four real products are evaluated as written: exact complex arithmetic, **never** Gauss's
three-multiplication form, whose :math:`A_r(B_i - B_r)` term absorbs an :math:`O(h)` imaginary plane
(:math:`h = 10^{-20}`) below rounding and returns :math:`\mathrm{Im} \approx 0`.

Fusion: each program owns one :math:`(BM \times BN)` output tile of *both* planes. Per K-step it loads each
needed operand tile (:math:`A_r, A_i, B_r, B_i`) once and feeds it to every ``tl.dot`` that uses it, so
the four products cost the loads of two GEMMs. A negative coefficient negates an operand tile (exact)
before the dot, so every product accumulates in place. float64 accumulates in float64; float32 in float32
with ``input_precision="tf32"`` only when ``torch.backends.cuda.matmul.allow_tf32`` is set (never in the
interpreter, which would compute full fp32 anyway).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compat import patch_interpreter

patch_interpreter()

__all__ = ["complex_matmul"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Launch configuration, per (dtype, input precision). Not yet timed on a GPU. Compiled ahead of time for
# sm_90 (tools/aot_compile.py, results in bench/results/): the float32 "ieee" path (the default: TF32 is off
# unless torch.backends.cuda.matmul.allow_tf32) lowers tl.dot to FMAs, and at 128x128x32 / 8 warps its two
# fp32 accumulators need more than the 255 registers a thread has (34-40 KB of spills on triton 3.6 and
# 3.9); at 64x64x16 / 4 warps the forward has none but the backward's four-product variants sit at 255
# registers and spill up to 400 bytes (with 2 stages too); 64x64x16 / 8 warps uses 103-184 registers and
# spills in no variant (64x64x32 / 8 warps and 32x64x32 / 4 warps spill). TF32 lowers to wgmma; at
# 128x128x32 / 8 warps the backward's four-product variants reach 255 registers and spill 48-212 bytes
# (2 stages: up to 384), at 128x64x32 / 8 warps / 3 stages they use 178-242 with no spills (4 tiles of
# 8-16 KiB x 3 stages = 144 KiB of shared memory of 227 KiB). float64 lowers to mma.sync; with two float64
# accumulators of 64x64 its backward variants spill 8-424 bytes at 4 warps and 16-28 at 8 warps (triton
# 3.6), so it uses 64x32x16 / 4 warps (165-196 registers, no spills).
# In the interpreter the cost is (#programs x K-steps) Python dispatches plus the numpy work of each (padded)
# tile, so blocks there are large but capped, and shrunk to the problem for tiny shapes.
# ---------------------------------------------------------------------------------------------------------
_CONFIGS: dict[tuple[torch.dtype, str], dict[str, int]] = {
    (torch.float32, "tf32"): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    (torch.float32, "ieee"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    (torch.float64, "ieee"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
}
_INTERPRETER_MAX_BLOCK = 64  # measured best on CPU between 16 and 128 (numpy work vs dispatch count)
_INT32_LIMIT = 2**31 - 1  # element offsets at or past this switch the kernel to int64 index arithmetic


@triton.jit
def _signed_dot(x, y, acc, SIGN: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + SIGN * (x @ y)`` for SIGN in {-1, 1}: the sign goes on the operand (exact), so the product
    still accumulates inside the dot. ``out_dtype`` is the accumulator's: Triton 3.6 defaults it to float32
    and rejects a float64 accumulator otherwise."""
    if SIGN < 0:
        x = -x
    return tl.dot(x, y, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _complex_matmul_kernel(
    # Pointers (an absent plane is a dummy pointer that is never read: its products are compiled out)
    a_ptr, ai_ptr, b_ptr, bi_ptr, bias_ptr, biasi_ptr, c_ptr, ci_ptr,
    # Matrix dimensions
    M, N, K,
    # Strides, per plane (any layout: transposed views are free)
    s_am, s_ak, s_aim, s_aik,
    s_bk, s_bn, s_bik, s_bin,
    s_bias, s_biasi,
    s_cm, s_cn,
    # Meta-parameters
    C_RR: tl.constexpr, C_II: tl.constexpr, C_IR: tl.constexpr, C_RI: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS_IM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    r"""One (BLOCK_M x BLOCK_N) tile of both planes of

    .. math:: C_r = c_{rr}A_rB_r + c_{ii}A_iB_i + b_r, \qquad C_i = c_{ir}A_iB_r + c_{ri}A_rB_i + b_i .

    The coefficients are constexpr: a zero coefficient removes its ``tl.dot``, and a plane is loaded only
    when some nonzero product reads it, at most once per K-step. Programs are ordered in groups of
    ``GROUP_M`` tile-rows so that consecutive programs share B tiles in L2. Rows/columns past the edge are
    wrapped (``% M``, ``% N``) for the loads — every load stays in bounds with only a K mask — and masked
    at the store.
    """
    LOAD_A: tl.constexpr = (C_RR != 0) or (C_RI != 0)
    LOAD_AI: tl.constexpr = (C_II != 0) or (C_IR != 0)
    LOAD_B: tl.constexpr = (C_RR != 0) or (C_IR != 0)
    LOAD_BI: tl.constexpr = (C_II != 0) or (C_RI != 0)

    # grouped ("super-tile") ordering of the output tiles
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    rows = offs_m % M  # wrapped: in bounds, the duplicates are masked at the store
    cols = offs_n % N

    a_ptrs = a_ptr + rows[:, None] * s_am + offs_k[None, :] * s_ak
    ai_ptrs = ai_ptr + rows[:, None] * s_aim + offs_k[None, :] * s_aik
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + cols[None, :] * s_bn
    bi_ptrs = bi_ptr + offs_k[:, None] * s_bik + cols[None, :] * s_bin

    acc_re = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_im = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        mask_a = offs_k[None, :] < k_left
        mask_b = offs_k[:, None] < k_left
        if LOAD_A:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        if LOAD_AI:
            ai = tl.load(ai_ptrs, mask=mask_a, other=0.0)
        if LOAD_B:
            b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        if LOAD_BI:
            bi = tl.load(bi_ptrs, mask=mask_b, other=0.0)
        if C_RR != 0:
            acc_re = _signed_dot(a, b, acc_re, C_RR, PRECISION)
        if C_II != 0:
            acc_re = _signed_dot(ai, bi, acc_re, C_II, PRECISION)
        if C_IR != 0:
            acc_im = _signed_dot(ai, b, acc_im, C_IR, PRECISION)
        if C_RI != 0:
            acc_im = _signed_dot(a, bi, acc_im, C_RI, PRECISION)
        a_ptrs += BLOCK_K * s_ak
        ai_ptrs += BLOCK_K * s_aik
        b_ptrs += BLOCK_K * s_bk
        bi_ptrs += BLOCK_K * s_bik

    if HAS_BIAS:
        acc_re += tl.load(bias_ptr + cols * s_bias).to(ACC_DTYPE)[None, :]
    if HAS_BIAS_IM:
        acc_im += tl.load(biasi_ptr + cols * s_biasi).to(ACC_DTYPE)[None, :]

    c_offs = offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    mask_c = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + c_offs, acc_re.to(c_ptr.dtype.element_ty), mask=mask_c)
    tl.store(ci_ptr + c_offs, acc_im.to(ci_ptr.dtype.element_ty), mask=mask_c)


def _max_offset(t: Tensor, pad: int) -> int:
    """Bound on the element offsets the kernel forms for ``t``: every extent rounded up to a multiple of
    ``pad`` (the largest block), since masked-off lanes still compute their offsets."""
    return sum((triton.cdiv(n, pad) * pad - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def complex_matmul(
    a: Tensor,
    a_im: Tensor | None,
    b: Tensor,
    b_im: Tensor | None,
    *,
    coef: tuple[int, int, int, int],
    bias: Tensor | None = None,
    bias_im: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Launch the planar complex GEMM: returns new contiguous ``(C_r, C_i)`` of shape (M, N), ``a``'s dtype.

    .. math::
        C_r = c_{rr} A_r B_r + c_{ii} A_i B_i + b_r, \qquad C_i = c_{ir} A_i B_r + c_{ri} A_r B_i + b_i

    ``a``/``a_im`` are (M, K), ``b``/``b_im`` (K, N), each with any strides (no copies are made); a plane
    that is None is zero. ``coef = (c_rr, c_ii, c_ir, c_ri)`` in {-1, 0, 1}; a zero coefficient or a missing
    plane removes the product from the compiled kernel. ``bias``/``bias_im`` are (N,) or None. All tensors
    share one float32/float64 dtype and one device (full validation with readable errors lives in
    :func:`fastcurv.ops.complex_matmul`; this launcher only asserts what the kernel relies on).
    """
    if len(coef) != 4 or any(c not in (-1, 0, 1) for c in coef):
        raise ValueError(f"coef must be four integers in {{-1, 0, 1}}, got {coef}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
    planes = {"a_im": (a_im, a.shape), "b": (b, b.shape), "b_im": (b_im, b.shape)}
    planes |= {"bias": (bias, (b.shape[1],)), "bias_im": (bias_im, (b.shape[1],))}
    for name, (t, shape) in planes.items():
        if t is None:
            continue
        if t.shape != shape or t.dtype != a.dtype or t.device != a.device:
            raise ValueError(
                f"{name} must be {a.dtype} on {a.device} with shape {tuple(shape)}, "
                f"got {t.dtype} on {t.device} with shape {tuple(t.shape)}"
            )

    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    c_im = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c, c_im

    # a missing plane is a zero plane: fold it into the coefficients so its products are compiled out
    c_rr, c_ii, c_ir, c_ri = (int(x) for x in coef)
    if a_im is None:
        c_ii = c_ir = 0
    if b_im is None:
        c_ii = c_ri = 0
    ai = a if a_im is None else a_im  # dummies are never dereferenced
    bi = b if b_im is None else b_im

    interp = _interpreting()
    if a.dtype == torch.float64:
        acc_dtype, precision = tl.float64, "ieee"
    else:
        tf32 = not interp and torch.backends.cuda.matmul.allow_tf32  # not interpreting: on CUDA
        acc_dtype, precision = tl.float32, ("tf32" if tf32 else "ieee")
    if interp:  # few, large programs; but no larger than the problem (tiny shapes stay cheap)
        blk = lambda n: min(max(triton.next_power_of_2(n), 16), _INTERPRETER_MAX_BLOCK)  # noqa: E731
        cfg = dict(BLOCK_M=blk(M), BLOCK_N=blk(N), BLOCK_K=blk(K), GROUP_M=8, num_warps=4, num_stages=1)
    else:
        cfg = dict(_CONFIGS[(a.dtype, precision)])
    pad = max(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
    big = max(_max_offset(t, pad) for t in (a, ai, b, bi, c, bias, bias_im) if t is not None)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    _complex_matmul_kernel[grid](
        a, ai, b, bi,
        c if bias is None else bias, c if bias_im is None else bias_im,
        c, c_im,
        M, N, K,
        a.stride(0), a.stride(1), ai.stride(0), ai.stride(1),
        b.stride(0), b.stride(1), bi.stride(0), bi.stride(1),
        0 if bias is None else bias.stride(0), 0 if bias_im is None else bias_im.stride(0),
        c.stride(0), c.stride(1),
        C_RR=c_rr, C_II=c_ii, C_IR=c_ir, C_RI=c_ri,
        HAS_BIAS=bias is not None, HAS_BIAS_IM=bias_im is not None,
        ACC_DTYPE=acc_dtype, PRECISION=precision, INT64=big >= _INT32_LIMIT,
        num_warps=num_warps, num_stages=num_stages,
        **cfg,
    )
    return c, c_im
