r"""Grouped symmetric rank-k (SYRK) update of Kronecker factors with the EMA fused in the epilogue.

For every layer :math:`i` with factor :math:`A_i \in \mathbb{R}^{d_i\times d_i}` and batch
:math:`X_i \in \mathbb{R}^{m_i\times d_i}`, in place and only where ``oks[i]`` is True:

.. math:: A_i \leftarrow \beta A_i + \frac{1-\beta}{m_i} X_i^\top X_i
          \quad\text{or, with } \texttt{normalize=False},\quad A_i \leftarrow \beta A_i + (1-\beta) X_i^\top X_i .

One launch serves all layers. The host builds a *tile table* of ``(layer, ti, tj)`` triples with
``ti <= tj`` (the tiles on and above the block diagonal of every factor; cached per shapes and device)
and a table of data pointers (the current tensors); each program computes one upper tile of
:math:`X^\top X`, applies the EMA to the upper tile of :math:`A` (read once) and writes the result to the
upper tile and its transpose to the mirrored lower tile: half the FLOPs of a GEMM, and :math:`A` is left
*exactly* symmetric (the diagonal tiles are symmetrised from their upper triangle).

This module imports nothing from the rest of fastcurv; :func:`fastcurv.ops.kron_factor_update_foreach_`
validates the inputs and computes ``oks`` (the finiteness / range guard of
:func:`fastcurv.reference.kron_factor_update_`) before calling :func:`kron_factor_update`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compat import patch_interpreter

patch_interpreter()

__all__ = ["kron_factor_update"]


@triton.jit
def _kron_factor_kernel(
    tiles_ptr,  # int32 (T, 3): (layer, ti, tj) with ti <= tj, one row per program
    dims_ptr,  # int32 (L, 2): (d, m) per layer
    inv_ptr,  # (L,) of A's dtype: 1/m per layer (normalised) or 1
    ptrs_ptr,  # int64 (2L,): data pointers of A_0..A_{L-1}, then of X_0..X_{L-1}
    oks_ptr,  # bool (L,): apply the update to layer i only when oks[i]
    beta_ptr,  # 0-d tensor of A's dtype (also carries A's dtype)
    x_like_ptr,  # any X (only carries X's dtype)
    L,  # number of layers
    BLOCK: tl.constexpr,  # tile side (square tiles: the mirror of a tile is a tile)
    BLOCK_K: tl.constexpr,  # chunk of the batch dimension m per dot
    UPCAST: tl.constexpr,  # convert X tiles to A's dtype before tl.dot
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 dots only)
):
    r"""One program = one upper tile :math:`(t_i \le t_j)` of one layer's factor.

    With row block :math:`R = t_i B + [0, B)` and column block :math:`C = t_j B + [0, B)`:

    .. math::
        S_{RC} = \sum_{k_0 = 0, B_K, \dots}^{m-1} X_{k_0:k_0+B_K,\,R}^\top\, X_{k_0:k_0+B_K,\,C},
        \qquad N = \beta A_{RC} + s\, S_{RC},
        \qquad s = (1-\beta)\cdot\mathrm{inv},\ \mathrm{inv} \in \{\mathrm{fl}(1/m), 1\},

    accumulated in A's dtype (fp32 for bf16/fp16/fp32 X, fp64 for fp64 X). Then, in global indices,
    :math:`A_{rc} \leftarrow N_{rc}` for :math:`r \le c` and :math:`A_{cr} \leftarrow N_{rc}` for
    :math:`r < c`: off the diagonal (every :math:`r < c`) the tile and its transpose, on a diagonal tile
    its upper triangle mirrored onto the lower one, so the result is bitwise symmetric.
    Out-of-range rows/columns and the batch tail are masked (loads give 0, stores are dropped); when
    ``oks[layer]`` is False the batch loop is empty and every store is masked off, so A is untouched.
    Only the upper triangle of :math:`A` is read: the kernel assumes a symmetric :math:`A`.
    """
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + pid * 3)
    ti = tl.load(tiles_ptr + pid * 3 + 1)
    tj = tl.load(tiles_ptr + pid * 3 + 2)
    d = tl.load(dims_ptr + layer * 2)
    m = tl.load(dims_ptr + layer * 2 + 1)
    ok = tl.load(oks_ptr + layer) != 0

    acc_ty = beta_ptr.dtype.element_ty  # A's dtype: float32 or float64
    a_ptr = tl.load(ptrs_ptr + layer).to(tl.pointer_type(acc_ty))
    x_ptr = tl.load(ptrs_ptr + L + layer).to(tl.pointer_type(x_like_ptr.dtype.element_ty))

    # Masks come from effective sizes, not from `block & scalar_bool` (the interpreter mis-types that):
    # a skipped layer has n = 0 (every load and store masked off) and an empty batch loop.
    n = tl.where(ok, d, 0)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cmask = cols < n
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK, BLOCK), dtype=acc_ty)
    k_end = tl.where(ok, m, 0)  # a skipped layer does no work
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + rk
        kmask = (kk < m)[:, None]
        xrow = x_ptr + kk.to(tl.int64)[:, None] * d
        xr = tl.load(xrow + rows[None, :], mask=kmask & rmask[None, :], other=0.0)  # (BLOCK_K, BLOCK)
        xc = tl.load(xrow + cols[None, :], mask=kmask & cmask[None, :], other=0.0)
        if UPCAST:
            xr = xr.to(acc_ty)
            xc = xc.to(acc_ty)
        acc = tl.dot(tl.trans(xr), xc, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)

    beta = tl.where(ok, tl.load(beta_ptr), 0.0)  # a skipped layer may have a non-finite beta: keep it quiet
    # a multiplication by a per-layer factor from the host, not a division: a float64 division compiles to
    # a subroutine that spilled a few bytes on triton 3.6 (sm_90); and a table, not a constexpr flag, so
    # normalising or not is one compiled kernel
    scale = (1.0 - beta) * tl.load(inv_ptr + layer)
    mask = rmask[:, None] & cmask[None, :]
    up = a_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :]  # element (r, c): A[r, c]
    new = beta * tl.load(up, mask=mask, other=0.0) + scale * acc
    # Each value N[r, c] with r <= c goes to A[r, c] and (r < c) to A[c, r]: on a diagonal tile its upper
    # triangle is mirrored onto its lower one, off the diagonal (every r < c) the tile and its transpose.
    tl.store(up, new, mask=mask & (rows[:, None] <= cols[None, :]))
    lo = a_ptr + cols.to(tl.int64)[None, :] * d + rows[:, None]  # element (r, c): A[c, r]
    tl.store(lo, new, mask=mask & (rows[:, None] < cols[None, :]))


# --------------------------------------------------------------------------------------------------------
# Launch configurations. Not yet timed on a GPU. Compiled ahead of time for sm_90 (tools/aot_compile.py,
# results in bench/results/): fp32 with TF32 and bf16/fp16 X lower tl.dot to wgmma, fp64 to mma.sync, fp32
# "ieee" to FMAs; BLOCK 128 / 8 warps uses 255 registers and spills (232-336 bytes on triton 3.9, 448-696
# on 3.6: the epilogue keeps the A tile, the accumulator and 64-bit addresses live together), so float32
# uses BLOCK 64 / 4 warps only: 3 stages with TF32 (194-213 registers), 2 stages for "ieee" (212; with
# 3 stages it sits at 255 and spills 28 bytes). float64 keeps 64 (no spills) and 32 for
# layers too small to give every SM a tile: the largest BLOCK that still gives at least one tile per SM is
# used, else the smallest.
# Under the CPU interpreter the cost grows with (#programs x loop iterations), so blocks are large there
# (same kernel, other constexprs).
# --------------------------------------------------------------------------------------------------------
_LOW = (torch.bfloat16, torch.float16)
_LOW_CFG = {64: (64, 4, 3)}
# (A dtype, X dtype) -> {BLOCK: (BLOCK_K, num_warps, num_stages)}, largest BLOCK first
_GPU_CONFIGS: dict[tuple[torch.dtype, torch.dtype], dict[int, tuple[int, int, int]]] = {
    (torch.float32, torch.float32): {64: (32, 4, 2)},  # "ieee" (FMA) dots; TF32: _TF32_CONFIG
    (torch.float32, torch.bfloat16): _LOW_CFG,
    (torch.float32, torch.float16): _LOW_CFG,
    (torch.float64, torch.float64): {64: (32, 4, 2), 32: (32, 4, 3)},
}
_TF32_CONFIG = {64: (32, 4, 3)}  # float32 A and X with torch.backends.cuda.matmul.allow_tf32 (wgmma)
_INTERPRET_CONFIG = (64, 64, 1, 1)  # (BLOCK, BLOCK_K, num_warps, num_stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _n_tiles(dims: tuple[tuple[int, int], ...], block: int) -> int:
    return sum(t * (t + 1) // 2 for t in (triton.cdiv(d, block) for d, _ in dims))


@functools.lru_cache(maxsize=64)
def _plan(
    dims: tuple[tuple[int, int], ...],
    device: torch.device,
    a_dtype: torch.dtype,
    x_dtype: torch.dtype,
    interpret: bool,
    normalize: bool = True,
    tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int, int]]:
    """Cached per shapes, device, dtypes and ``normalize``: the tile table, the ``(d, m)`` table, the
    per-layer factor ``1/m`` (``normalize``) or 1 in A's dtype, and the launch configuration.

    ``tiles`` is int32 ``(T, 3)`` with rows ``(layer, ti, tj)``, ``ti <= tj``; ``dm`` is int32 ``(L, 2)``.
    """
    if interpret:
        cfg = _INTERPRET_CONFIG
    else:
        table = _TF32_CONFIG if tf32 else _GPU_CONFIGS[(a_dtype, x_dtype)]
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        block = next((b for b in table if _n_tiles(dims, b) >= n_sm), min(table))
        cfg = (block, *table[block])
    block = cfg[0]
    tiles = []
    for layer, (d, _) in enumerate(dims):
        nt = triton.cdiv(d, block)
        tiles.extend((layer, ti, tj) for ti in range(nt) for tj in range(ti, nt))
    t = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device)
    dm = torch.tensor(dims, dtype=torch.int32).reshape(-1, 2).to(device)
    inv = torch.tensor([1.0 / m if normalize else 1.0 for _, m in dims], dtype=a_dtype).to(device)
    return t, dm, inv, cfg


@functools.lru_cache(maxsize=64)
def _pointer_table(ptrs: tuple[int, ...], device: torch.device) -> Tensor:
    """The data pointers as an int64 tensor on ``device`` (keyed by their values: always current)."""
    return torch.tensor(ptrs, dtype=torch.int64).to(device)


def kron_factor_update(
    As: list[Tensor], Xs: list[Tensor], beta: Tensor, oks: Tensor, normalize: bool = True
) -> None:
    r"""In place, for each layer ``i`` with ``oks[i]`` True:

    .. math:: A_i \leftarrow \beta A_i + \frac{1-\beta}{m_i} X_i^\top X_i

    (:math:`(1-\beta) X_i^\top X_i` without the :math:`1/m_i` when ``normalize`` is False).

    ``As[i]`` is a contiguous symmetric ``(d_i, d_i)`` float32/float64 matrix (all of one dtype and device);
    ``Xs[i]`` is a contiguous ``(m_i, d_i)`` batch, ``m_i >= 1``, all of one dtype: ``As``' dtype, or
    bfloat16/float16 when ``As`` are float32 (accumulated in float32). ``beta`` is a 0-d tensor (read on
    the device, never on the host); ``oks`` is a ``(L,)`` bool tensor on the device. Layers with
    ``oks[i]`` False are left bitwise unchanged. Only the upper triangle of each ``A_i`` is read and the
    result is written mirrored, so ``A_i`` comes out exactly symmetric. One kernel launch for all layers.
    """
    if len(As) != len(Xs):
        raise ValueError(f"As and Xs must have the same length, got {len(As)} and {len(Xs)}")
    if not As:
        return
    A0, X0 = As[0], Xs[0]
    dev = A0.device
    if A0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"As must be float32 or float64, got {A0.dtype}")
    if X0.dtype != A0.dtype and not (A0.dtype == torch.float32 and X0.dtype in _LOW):
        raise TypeError(f"Xs have dtype {X0.dtype} but As are {A0.dtype}")
    for i, (A, X) in enumerate(zip(As, Xs)):
        if A.dtype != A0.dtype or X.dtype != X0.dtype or A.device != dev or X.device != dev:
            raise ValueError(f"As[{i}]/Xs[{i}] differ in dtype or device from As[0]/Xs[0]")
        if A.dim() != 2 or X.dim() != 2 or A.shape[0] != A.shape[1] or X.shape[1] != A.shape[0] or X.shape[0] < 1:
            raise ValueError(f"As[{i}] must be (d, d) and Xs[{i}] (m >= 1, d); got {tuple(A.shape)}, {tuple(X.shape)}")
        if not (A.is_contiguous() and X.is_contiguous()):
            raise ValueError(f"As[{i}] and Xs[{i}] must be contiguous")
    if oks.dtype != torch.bool or oks.shape != (len(As),):
        raise ValueError(f"oks must be a bool tensor of shape ({len(As)},), got {oks.dtype} {tuple(oks.shape)}")

    interpret = _interpreting()
    if interpret and dev.type != "cpu":
        # The interpreter dereferences the pointer table on the host: run on host copies, copy back.
        host = [A.cpu() for A in As]
        kron_factor_update(host, [X.cpu() for X in Xs], beta.cpu(), oks.cpu(), normalize)
        for A, h in zip(As, host):
            A.copy_(h)
        return

    beta = beta.to(device=dev, dtype=A0.dtype)
    oks = oks.to(dev)
    dims = tuple((A.shape[0], X.shape[0]) for A, X in zip(As, Xs))
    low = X0.dtype in _LOW
    tf32 = A0.dtype == torch.float32 and not low and not interpret and torch.backends.cuda.matmul.allow_tf32
    plan = _plan(dims, dev, A0.dtype, X0.dtype, interpret, bool(normalize), bool(tf32))
    tiles, dm, inv, (block, block_k, num_warps, num_stages) = plan
    ptrs = _pointer_table(tuple(A.data_ptr() for A in As) + tuple(X.data_ptr() for X in Xs), dev)
    _kron_factor_kernel[(tiles.shape[0],)](
        tiles,
        dm,
        inv,
        ptrs,
        oks,
        beta,
        X0,
        len(As),
        BLOCK=block,
        BLOCK_K=block_k,
        # bf16/fp16 products are exact in fp32, so on GPU the native low-precision dot (fp32 accumulator)
        # equals the upcast one; the interpreter's bf16 dot is wrong (docs/engineering.md §1), so upcast there.
        UPCAST=low and interpret,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        num_warps=num_warps,
        num_stages=num_stages,
    )
