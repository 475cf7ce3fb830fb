r"""Double-damped BFGS inverse update, grouped over layers: two or three launches for any number of layers.

For each layer :math:`\ell` with a symmetric :math:`H \in \mathbb{R}^{n\times n}` and a pair :math:`(s, y)`
(the spec is :func:`fastcurv.reference.damped_bfgs_update_`):

1. Powell damping (when ``mu1`` is given), from :math:`Hy`:
   :math:`\tilde s = s` if :math:`s^\top y \ge \mu_1 y^\top Hy`, else
   :math:`\theta_1 s + (1-\theta_1)Hy` with :math:`\theta_1 = (1-\mu_1)\,y^\top Hy / (y^\top Hy - s^\top y)`.
2. Levenberg–Marquardt damping (when ``mu2`` is given):
   :math:`\tilde y = y` if :math:`\tilde s^\top y \ge \mu_2 \tilde s^\top\tilde s`, else
   :math:`\theta_2 y + (1-\theta_2)\tilde s` with
   :math:`\theta_2 = (1-\mu_2)\,\tilde s^\top\tilde s / (\tilde s^\top\tilde s - \tilde s^\top y)`.
3. :math:`u = H\tilde y`, :math:`\rho = 1/\tilde s^\top\tilde y`, :math:`c = \rho^2\,\tilde y^\top u + \rho` and

   .. math:: H^+_{ij} = H_{ij} + c\,(\tilde s_i\tilde s_j) - \rho\,(\tilde s_i u_j + u_i\tilde s_j),

   applied only when :math:`\tilde s^\top\tilde y > 0`, [:math:`\tilde s^\top\tilde y >
   \mathrm{tol}\cdot\tilde s^\top\tilde s\cdot\|g\|`], :math:`\tilde s, \tilde y` are finite and the a-priori
   bound :math:`\max|H| + |c|\max|\tilde s|^2 + 2|\rho|\max|\tilde s|\max|u|` is finite; otherwise
   :math:`H` is not written at all (bitwise unchanged).

Passes over :math:`H` (the only :math:`O(n^2)` data; everything else is :math:`O(n)`):

* ``_bfgs_gemv_kernel`` with ``STAGE=0`` (only when ``mu1`` is given): :math:`Hy` — one read of :math:`H`.
* ``_bfgs_gemv_kernel`` with ``STAGE=1``: every program recomputes the per-layer damping scalars from
  the full vectors (:math:`O(n)`, cheaper than a launch), forms :math:`\tilde y` block by block on the
  fly and computes its rows of :math:`u = H\tilde y`, plus per-row-block partials of
  :math:`\max|H|`, :math:`\tilde y^\top u`, :math:`\max|u|` — one read of :math:`H`.
* ``_bfgs_rank2_kernel``: reduces the partials (fixed order: deterministic), decides "applied" per layer and
  updates the tiles on and above the diagonal, mirroring each one to the lower triangle, so
  :math:`H^+` is bitwise symmetric whatever the compiler contracts into FMAs — reads :math:`n^2/2`, writes
  :math:`n^2`. (``H`` is assumed symmetric, as the op documents: the update is computed from its upper
  triangle, while the GEMVs and :math:`\max|H|` read all of it.)

DRAM traffic per layer: :math:`3.5n^2` elements with Powell damping, :math:`2.5n^2` without. The scratch
vectors (:math:`Hy`, :math:`\tilde s`, :math:`u`, partials) are :math:`O(n)` and stay in L2.

Layers are addressed through tables: a pointer table of the ``H`` data pointers (cached by pointer
values, so steady-state calls upload nothing), per-layer metadata ``(n, offset, first work item, row
blocks)`` and work tables ``(layer, row block)`` / ``(layer, ti, tj)``. ``s`` and ``y`` are concatenated
on the device (one ``torch.cat`` each) so their offsets depend on the sizes only. No host
synchronisation anywhere: every decision is made in the kernels.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compat import patch_interpreter

patch_interpreter()

__all__ = ["damped_bfgs_update"]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


# ``tl.sum`` / ``tl.max`` / ``tl.zeros`` are themselves @jit functions: under the interpreter every call of a
# nested @jit function re-patches triton.language (~5 ms each), which dominated this kernel's CPU-test time.
# So the kernels call the builtin ``tl.reduce`` with triton's own combine functions (the interpreter maps those
# to numpy; on GPU this is exactly what tl.sum / tl.max lower to) and ``tl.full`` instead of ``tl.zeros``.
# Fallbacks keep the kernels valid should the private names ever move.
_SUM = getattr(tl.standard, "_sum_combine", _add)
_MAX = getattr(tl.standard, "_elementwise_max", _maximum)


@triton.jit
def _bfgs_gemv_kernel(
    work_ptr,  # int32 (W, 2): (layer, row block)
    meta_ptr,  # int64 (L, 4): (n, offset into the flat vectors, first work item, number of row blocks)
    hptr_ptr,  # int64 (L,): data pointers of the H matrices
    s_ptr,  # (N,) concatenated s
    y_ptr,  # (N,) concatenated y
    hy_ptr,  # (N,) H y (written by STAGE 0, read by STAGE 1 when MU1)
    st_ptr,  # (N,) s~ (written by STAGE 1)
    u_ptr,  # (N,) u = H y~ (written by STAGE 1)
    part_ptr,  # (W, 3): per row block max|H|, y~.u, max|u| (written by STAGE 1)
    lsc_ptr,  # (L, 4): per layer s~.y~, s~.s~, max|s~|, max|y~| (written by STAGE 1)
    mu1_ptr,
    mu2_ptr,
    STAGE: tl.constexpr,
    MU1: tl.constexpr,
    MU2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
):
    r"""Row block ``rb`` of one layer's GEMV with :math:`H`.

    ``STAGE=0``: :math:`(Hy)_r = \sum_j H_{rj} y_j` for the rows :math:`r` of the block.

    ``STAGE=1``: the damping scalars :math:`s^\top y`, :math:`y^\top Hy` (→ :math:`\theta_1`) and
    :math:`\tilde s^\top y`, :math:`\tilde s^\top\tilde s` (→ :math:`\theta_2`) are recomputed from the full
    vectors by every program of the layer (identical code and data, hence identical values); then
    :math:`u_r = \sum_j H_{rj}\tilde y_j` with :math:`\tilde y_j` formed per column block, and the partials
    :math:`\max_{r,j}|H_{rj}|`, :math:`\sum_r \tilde y_r u_r`, :math:`\max_r |u_r|` of the block. Row block 0
    also stores the layer's :math:`\tilde s^\top\tilde y`, :math:`\tilde s^\top\tilde s`,
    :math:`\max|\tilde s|`, :math:`\max|\tilde y|`. Maxima of absolute values count NaN as +inf, so
    "max < inf" means "all finite". All arithmetic is in ``H``'s dtype (fp64 accumulates in fp64).
    """
    pid = tl.program_id(0)
    layer = tl.load(work_ptr + 2 * pid)
    rb = tl.load(work_ptr + 2 * pid + 1)
    n = tl.load(meta_ptr + 4 * layer)
    off = tl.load(meta_ptr + 4 * layer + 1)
    dt = s_ptr.dtype.element_ty
    H = tl.load(hptr_ptr + layer).to(tl.pointer_type(dt))
    INF = float("inf")

    rows = rb * BM + tl.arange(0, BM)
    rmask = rows < n
    rows64 = rows.to(tl.int64)

    if STAGE == 0:
        acc = tl.full((BM, BN), 0, dt)
        for k in range(0, n, BN):
            cols = k + tl.arange(0, BN)
            cmask = cols < n
            v = tl.load(y_ptr + off + cols, mask=cmask, other=0.0)
            h = tl.load(H + rows64[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += h * v[None, :]
        tl.store(hy_ptr + off + rows, tl.reduce(acc, 1, _SUM), mask=rmask)
    else:
        # ---- damping scalars (O(n), recomputed by every program of the layer) ----------------------
        damp1 = False
        theta1 = 1.0
        if MU1:
            m1 = tl.load(mu1_ptr)
            sy_v = tl.full((BV,), 0, dt)
            yhy_v = tl.full((BV,), 0, dt)
            for k in range(0, n, BV):
                idx = k + tl.arange(0, BV)
                vm = idx < n
                s = tl.load(s_ptr + off + idx, mask=vm, other=0.0)
                y = tl.load(y_ptr + off + idx, mask=vm, other=0.0)
                hy = tl.load(hy_ptr + off + idx, mask=vm, other=0.0)
                sy_v += s * y
                yhy_v += y * hy
            sy = tl.reduce(sy_v, 0, _SUM)
            yhy = tl.reduce(yhy_v, 0, _SUM)
            damp1 = sy < m1 * yhy
            theta1 = tl.where(damp1, (1 - m1) * yhy / tl.where(damp1, yhy - sy, 1.0), 1.0)
        damp2 = False
        theta2 = 1.0
        if MU2:
            m2 = tl.load(mu2_ptr)
            sty_v = tl.full((BV,), 0, dt)
            sts_v = tl.full((BV,), 0, dt)
            for k in range(0, n, BV):
                idx = k + tl.arange(0, BV)
                vm = idx < n
                st = tl.load(s_ptr + off + idx, mask=vm, other=0.0)
                y = tl.load(y_ptr + off + idx, mask=vm, other=0.0)
                if MU1:
                    hy = tl.load(hy_ptr + off + idx, mask=vm, other=0.0)
                    st = tl.where(damp1, theta1 * st + (1 - theta1) * hy, st)
                sty_v += st * y
                sts_v += st * st
            sty = tl.reduce(sty_v, 0, _SUM)
            sts = tl.reduce(sts_v, 0, _SUM)
            damp2 = sty < m2 * sts
            theta2 = tl.where(damp2, (1 - m2) * sts / tl.where(damp2, sts - sty, 1.0), 1.0)

        # ---- u = H y~ for the block's rows, with the layer's vector statistics along the way ----------
        acc = tl.full((BM, BN), 0, dt)
        hmax = tl.full((BM, BN), 0, dt)
        d_sy = tl.full((BN,), 0, dt)
        d_ss = tl.full((BN,), 0, dt)
        m_s = tl.full((BN,), 0, dt)
        m_y = tl.full((BN,), 0, dt)
        for k in range(0, n, BN):
            cols = k + tl.arange(0, BN)
            cmask = cols < n
            st = tl.load(s_ptr + off + cols, mask=cmask, other=0.0)
            yt = tl.load(y_ptr + off + cols, mask=cmask, other=0.0)
            if MU1:
                hy = tl.load(hy_ptr + off + cols, mask=cmask, other=0.0)
                st = tl.where(damp1, theta1 * st + (1 - theta1) * hy, st)
            if MU2:
                yt = tl.where(damp2, theta2 * yt + (1 - theta2) * st, yt)
            d_sy += st * yt
            d_ss += st * st
            m_s = tl.maximum(m_s, tl.where(st == st, tl.abs(st), INF))
            m_y = tl.maximum(m_y, tl.where(yt == yt, tl.abs(yt), INF))
            h = tl.load(H + rows64[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += h * yt[None, :]
            hmax = tl.maximum(hmax, tl.where(h == h, tl.abs(h), INF))
        u = tl.reduce(acc, 1, _SUM)

        # ---- the block's rows of s~ and y~, partials ----------------------------------------------
        st_r = tl.load(s_ptr + off + rows, mask=rmask, other=0.0)
        yt_r = tl.load(y_ptr + off + rows, mask=rmask, other=0.0)
        if MU1:
            hy_r = tl.load(hy_ptr + off + rows, mask=rmask, other=0.0)
            st_r = tl.where(damp1, theta1 * st_r + (1 - theta1) * hy_r, st_r)
        if MU2:
            yt_r = tl.where(damp2, theta2 * yt_r + (1 - theta2) * st_r, yt_r)
        tl.store(u_ptr + off + rows, u, mask=rmask)
        tl.store(st_ptr + off + rows, st_r, mask=rmask)
        tl.store(part_ptr + 3 * pid, tl.reduce(hmax, None, _MAX))
        tl.store(part_ptr + 3 * pid + 1, tl.reduce(yt_r * u, 0, _SUM))
        tl.store(part_ptr + 3 * pid + 2, tl.reduce(tl.where(u == u, tl.abs(u), INF), 0, _MAX))
        first = rb == 0
        tl.store(lsc_ptr + 4 * layer, tl.reduce(d_sy, 0, _SUM), mask=first)
        tl.store(lsc_ptr + 4 * layer + 1, tl.reduce(d_ss, 0, _SUM), mask=first)
        tl.store(lsc_ptr + 4 * layer + 2, tl.reduce(m_s, 0, _MAX), mask=first)
        tl.store(lsc_ptr + 4 * layer + 3, tl.reduce(m_y, 0, _MAX), mask=first)


@triton.jit
def _bfgs_rank2_kernel(
    work_ptr,  # int32 (T, 3): (layer, ti, tj) with ti <= tj
    meta_ptr,
    hptr_ptr,
    st_ptr,
    u_ptr,
    part_ptr,
    lsc_ptr,
    tol_ptr,
    gn_ptr,
    applied_ptr,  # bool (L,)
    HAS_GN: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
):
    r"""Tile :math:`(t_i, t_j)`, :math:`t_i \le t_j`, of one layer's rank-2 update, mirrored to :math:`(t_j, t_i)`.

    Reduces the layer's row-block partials to :math:`\tilde y^\top u`, :math:`\max|H|`, :math:`\max|u|`, forms
    :math:`\rho = 1/\tilde s^\top\tilde y` and :math:`c = \rho^2\tilde y^\top u + \rho`, and decides

    .. math:: \mathrm{ok} = [\tilde s^\top\tilde y > 0]\wedge[\tilde s^\top\tilde y > \mathrm{tol}\,
              \tilde s^\top\tilde s\,\|g\|]\wedge[\max|H| + |c|\max|\tilde s|^2 + 2|\rho|\max|\tilde s|\max|u|
              < \infty]\wedge[\tilde s, \tilde y\ \text{finite}]

    (the curvature test only with ``HAS_GN``). When ok, for :math:`i \le j` in the tile it writes
    :math:`H_{ij} + c(\tilde s_i\tilde s_j) - \rho(\tilde s_i u_j + u_i\tilde s_j)` to :math:`(i, j)` and the
    *same value* to :math:`(j, i)`; when not ok it reads and writes nothing. Tile (0, 0) stores "applied".
    """
    pid = tl.program_id(0)
    layer = tl.load(work_ptr + 3 * pid)
    ti = tl.load(work_ptr + 3 * pid + 1)
    tj = tl.load(work_ptr + 3 * pid + 2)
    n = tl.load(meta_ptr + 4 * layer)
    off = tl.load(meta_ptr + 4 * layer + 1)
    p0 = tl.load(meta_ptr + 4 * layer + 2)
    nrb = tl.load(meta_ptr + 4 * layer + 3)
    dt = st_ptr.dtype.element_ty
    H = tl.load(hptr_ptr + layer).to(tl.pointer_type(dt))
    INF = float("inf")

    # ---- per-layer scalars from the partials (fixed order: deterministic) ---------------------------
    yu_v = tl.full((BP,), 0, dt)
    mh_v = tl.full((BP,), 0, dt)
    mu_v = tl.full((BP,), 0, dt)
    for k in range(0, nrb, BP):
        idx = k + tl.arange(0, BP)
        pm = idx < nrb
        q = (p0 + idx) * 3
        mh_v = tl.maximum(mh_v, tl.load(part_ptr + q, mask=pm, other=0.0))
        yu_v += tl.load(part_ptr + q + 1, mask=pm, other=0.0)
        mu_v = tl.maximum(mu_v, tl.load(part_ptr + q + 2, mask=pm, other=0.0))
    yu = tl.reduce(yu_v, 0, _SUM)
    max_h = tl.reduce(mh_v, 0, _MAX)
    max_u = tl.reduce(mu_v, 0, _MAX)
    sy = tl.load(lsc_ptr + 4 * layer)
    ss = tl.load(lsc_ptr + 4 * layer + 1)
    max_s = tl.load(lsc_ptr + 4 * layer + 2)
    max_y = tl.load(lsc_ptr + 4 * layer + 3)

    rho = 1 / sy
    c = rho * rho * yu + rho
    # conditions are chained with tl.where, not `&`: the interpreter (triton 3.9) keeps a float dtype on
    # the handles of float comparisons and then fails on `int1 & int1`
    ok = sy > 0
    if HAS_GN:
        ok = tl.where(sy > tl.load(tol_ptr) * ss * tl.load(gn_ptr + layer), ok, False)
    bound = max_h + tl.abs(c) * (max_s * max_s) + 2 * tl.abs(rho) * max_s * max_u
    ok = tl.where(bound < INF, ok, False)
    ok = tl.where(max_s < INF, ok, False)
    ok = tl.where(max_y < INF, ok, False)
    tl.store(applied_ptr + layer, ok, mask=(ti == 0) & (tj == 0))

    # ---- the tile, read and written only when ok ----------------------------------------------------
    i = ti * BT + tl.arange(0, BT)
    j = tj * BT + tl.arange(0, BT)
    im = (i < n) & ok
    jm = (j < n) & ok
    s_i = tl.load(st_ptr + off + i, mask=im, other=0.0)
    u_i = tl.load(u_ptr + off + i, mask=im, other=0.0)
    s_j = tl.load(st_ptr + off + j, mask=jm, other=0.0)
    u_j = tl.load(u_ptr + off + j, mask=jm, other=0.0)
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)
    upper = im[:, None] & jm[None, :] & (i[:, None] <= j[None, :])
    h = tl.load(H + i64[:, None] * n + j64[None, :], mask=upper, other=0.0)
    new = h + c * (s_i[:, None] * s_j[None, :]) - rho * (s_i[:, None] * u_j[None, :] + u_i[:, None] * s_j[None, :])
    tl.store(H + i64[:, None] * n + j64[None, :], new, mask=upper)
    tl.store(H + j64[None, :] * n + i64[:, None], new, mask=upper & (i[:, None] < j[None, :]))



# ----------------------------------------------------------------------------------------------------------
# Launch configuration. ==== CONFIG TABLE (to be tuned on GPU: bench/gpu_check.sh) ====
#   BM, BN: GEMV row block x column block;  BV: vector block of the O(n) damping-scalar loops;
#   BT: rank-2 tile side;  BP: partials block;  *_WARPS: num_warps of each kernel.
# "cuda": untuned first guess. Compiled offline for sm_90 (no GPU run yet): with 8 warps the GEMV uses
#   108 registers and the rank-2 kernel 128, no spills (4 warps: 163 / 215). Candidates to try: BM 8..64,
#   BN 128..512, a split-K GEMV for n >= 4096 (only n/BM programs per layer), BT 32..128, int32 offsets
#   when n^2 < 2^31.
# "interpret": large blocks, few programs (the interpreter's cost grows with #programs x loop iterations);
#   _config shrinks them to the largest layer.
# ----------------------------------------------------------------------------------------------------------
_CONFIGS = {
    "interpret": dict(BM=128, BN=128, BV=512, BT=128, BP=64, GEMV_WARPS=4, RANK2_WARPS=4),
    "cuda": dict(BM=16, BN=256, BV=1024, BT=64, BP=128, GEMV_WARPS=8, RANK2_WARPS=8),
}
_PLAN_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(n_max: int) -> dict:
    """The launch configuration. Under the interpreter the blocks shrink to the largest layer (every
    numpy op there costs per element of the block, and new block sizes cost no compilation); on GPU the
    table is fixed so that the layer sizes never trigger a recompilation."""
    if not _interpreting():
        return _CONFIGS["cuda"]
    cfg = dict(_CONFIGS["interpret"])
    b = max(16, triton.next_power_of_2(max(n_max, 1)))
    for k in ("BM", "BN", "BT", "BV"):
        cfg[k] = min(cfg[k], b)
    return cfg


def _upload(rows: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host table as a device tensor, without synchronising the host (pinned memory, async copy)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _plan(Hs: list[Tensor], cfg: dict) -> tuple[Tensor, Tensor, Tensor, int, Tensor, int]:
    """Tables for one list of layers, cached by (device, H data pointers, sizes, blocks).

    Returns ``(hptrs, meta, gemv_work, W, tile_work, T)``. Each layer gets at least one row block and one
    tile, so even an ``n = 0`` layer has a program that writes its "applied" flag.
    """
    device = Hs[0].device
    ns = tuple(int(H.shape[0]) for H in Hs)
    ptrs = tuple(int(H.data_ptr()) for H in Hs)
    key = (str(device), ptrs, ns, cfg["BM"], cfg["BT"])
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit
    BM, BT = cfg["BM"], cfg["BT"]
    meta, gemv, tiles = [], [], []
    off = 0
    for layer, n in enumerate(ns):
        nrb = max(1, triton.cdiv(n, BM))
        meta.append([n, off, len(gemv), nrb])
        gemv.extend([layer, rb] for rb in range(nrb))
        nt = max(1, triton.cdiv(n, BT))
        tiles.extend([layer, ti, tj] for ti in range(nt) for tj in range(ti, nt))
        off += n
    plan = (
        _upload(list(ptrs), torch.int64, device),
        _upload(meta, torch.int64, device),
        _upload(gemv, torch.int32, device),
        len(gemv),
        _upload(tiles, torch.int32, device),
        len(tiles),
    )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def damped_bfgs_update(
    Hs: list[Tensor],
    ss: list[Tensor],
    ys: list[Tensor],
    *,
    mu1: Tensor | None,
    mu2: Tensor | None,
    curvature_tol: Tensor,
    grad_norms: Tensor | None,
    applied: Tensor,
) -> None:
    r"""Double-damped BFGS update of every ``Hs[i]`` in place (see the module docstring for the math).

    ``Hs``: contiguous symmetric ``(n_i, n_i)`` matrices of one dtype (float32/float64) on one device;
    ``ss``, ``ys``: contiguous ``(n_i,)`` of that dtype; ``mu1``/``mu2``: 0-d tensors or None (that damping
    stage off); ``curvature_tol``: 0-d; ``grad_norms``: ``(L,)`` or None (no curvature test); ``applied``:
    ``(L,)`` bool, filled with the per-layer "update applied" flag. Launches: 2 (``mu1`` None) or 3, for all
    layers together, plus one ``torch.cat`` each for ``ss`` and ``ys`` when there are several layers. No
    host synchronisation.
    """
    L = len(Hs)
    if L == 0:
        return
    H0 = Hs[0]
    dtype, device = H0.dtype, H0.device
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"damped_bfgs_update: H must be float32 or float64, got {dtype}")
    if not (len(ss) == len(ys) == L) or applied.shape != (L,) or applied.dtype != torch.bool:
        raise ValueError("damped_bfgs_update: ss, ys need one entry per H and applied must be a (L,) bool tensor")
    if not all(H.is_contiguous() and s.is_contiguous() and y.is_contiguous() for H, s, y in zip(Hs, ss, ys)):
        raise ValueError("damped_bfgs_update: H, s and y must be contiguous")
    cfg = _config(max(int(H.shape[0]) for H in Hs))
    hptrs, meta, gemv_work, W, tile_work, T = _plan(Hs, cfg)

    S = ss[0] if L == 1 else torch.cat(ss)
    Y = ys[0] if L == 1 else torch.cat(ys)
    N = S.numel()
    P = triton.cdiv(N, 32) * 32  # segment stride: every scratch vector starts 128-byte aligned
    scratch = torch.empty(3 * P + 3 * W + 4 * L, dtype=dtype, device=device)
    HY, ST, U = scratch[:N], scratch[P : P + N], scratch[2 * P : 2 * P + N]
    PART, LSC = scratch[3 * P : 3 * P + 3 * W], scratch[3 * P + 3 * W :]
    tol = curvature_tol.to(dtype=dtype, device=device)
    m1 = tol if mu1 is None else mu1.to(dtype=dtype, device=device)
    m2 = tol if mu2 is None else mu2.to(dtype=dtype, device=device)
    gn = tol if grad_norms is None else grad_norms.to(dtype=dtype, device=device).contiguous()

    gemv = dict(BM=cfg["BM"], BN=cfg["BN"], BV=cfg["BV"], num_warps=cfg["GEMV_WARPS"])
    args = (gemv_work, meta, hptrs, S, Y, HY, ST, U, PART, LSC, m1, m2)
    if mu1 is not None:
        _bfgs_gemv_kernel[(W,)](*args, STAGE=0, MU1=True, MU2=False, **gemv)  # MU2 unused in stage 0
    _bfgs_gemv_kernel[(W,)](*args, STAGE=1, MU1=mu1 is not None, MU2=mu2 is not None, **gemv)
    _bfgs_rank2_kernel[(T,)](
        tile_work, meta, hptrs, ST, U, PART, LSC, tol, gn, applied,
        HAS_GN=grad_norms is not None, BT=cfg["BT"], BP=cfg["BP"], num_warps=cfg["RANK2_WARPS"],
    )  # fmt: skip
