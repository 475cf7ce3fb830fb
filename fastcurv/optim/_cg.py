r"""Truncated conjugate gradient for many independent systems at once (shared by NewtonCG and BlockHF).

For blocks :math:`b = 1, \dots, B` (one block = NewtonCG's whole parameter vector; BlockHF's layers) the
solver runs one CG per block on the damped system

.. math:: A_b x_b = c_b, \qquad A_b = H_b + \lambda I,

where :math:`H_b` is the block's curvature (Hessian or GGN block, applied by a callback), :math:`\lambda`
the Tikhonov shift and :math:`c_b = -g_b` the negative gradient. All blocks advance together: each
iteration makes **one** call of the operator for every still-active block, and every CG scalar
(:math:`r^\top r`, :math:`p^\top H p`, :math:`\alpha`, :math:`\beta`, the quadratic's value, the stopping
tests) is a length-:math:`B` tensor computed by segment reductions over one flat vector (``index_add_`` over
a segment index): no Python loop over blocks, one host synchronisation per iteration (the loop must know
when to stop).

The iteration (Hestenes–Stiefel, per block, from :math:`x_0` — zero or a warm start):

.. math::
    r_0 = c - A x_0,\quad p_0 = r_0;\qquad
    \kappa_k = p_k^\top A p_k,\quad \alpha_k = \frac{r_k^\top r_k}{\kappa_k},\quad
    x_{k+1} = x_k + \alpha_k p_k,\quad r_{k+1} = r_k - \alpha_k A p_k,\quad
    p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k .

CG minimises the quadratic model :math:`\phi(x) = \tfrac12 x^\top A x - c^\top x`; since
:math:`Ax = c - r`, its value is tracked with no extra product as :math:`\phi(x) = -\tfrac12 x^\top(c + r)`.

Stopping rules (a block stops at the first that fires; the others go on):

* **Disturbing direction** (truncated Newton / Steihaug): :math:`p_k^\top H p_k \le \varepsilon\lVert p_k\rVert^2`
  — the *undamped* curvature — means the model is not (sufficiently) convex along :math:`p_k`. The test is
  on :math:`H`, not on :math:`A = H + \lambda I`: a damped :math:`\kappa_k` that is positive only thanks to
  :math:`\lambda` gives a long, untrustworthy CG step :math:`\alpha_k = r^\top r/\kappa_k` along a
  direction of negative curvature (measured: such iterates were rejected by the reduction-ratio test with
  :math:`\rho \ll 0`). At
  :math:`k \ge 1` the current iterate :math:`x_k` is returned (it still decreases :math:`\phi`). At
  :math:`k = 0` there is no iterate yet (:math:`x_0` was not checked), so the **steepest-descent
  direction** :math:`p_0 = r_0` is returned, scaled by the saddle-free step length along it,
  :math:`t = r_0^\top r_0 / (|p_0^\top H p_0| + \lambda \lVert p_0\rVert^2)` (the minimiser along
  :math:`p_0` of the model with :math:`|H|` in place of :math:`H`; :math:`t = 1` if that denominator is 0).
  The Rayleigh quotient :math:`p_k^\top Hp_k/\lVert p_k\rVert^2` of the disturbing direction is reported
  (``CGResult.curvature``) so that the caller can raise its damping above it. For a PSD :math:`H` (the
  GGN) and :math:`\varepsilon = 0` the test fires only on exactly zero curvature, where the returned
  :math:`t\,p_0 = c/\lambda` is the exact solution along :math:`p_0`.
* **Converged**: :math:`\lVert r_{k+1}\rVert \le \text{tol}\,\lVert c\rVert` (relative residual; a zero
  right-hand side with :math:`x_0 = 0` is converged at once).
* **Relative progress** (Martens 2010, §4.4): after :math:`i` iterations, with
  :math:`k = \max(10, \lfloor i/10\rfloor)`, stop when :math:`i > k`, :math:`\phi_i < 0` and
  :math:`(\phi_i - \phi_{i-k})/\phi_i < \text{progress\_tol}`. Signs: CG makes :math:`\phi` decrease, so
  with :math:`\phi_i < 0` both numerator and denominator are negative and the ratio is the (positive)
  relative decrease over the last :math:`k` iterations. Martens writes the threshold as
  :math:`k\epsilon` with :math:`\epsilon = 5\cdot10^{-4}`; the PyTorch Hessian-free port
  (ltatzel/PyTorchHessianFree) compares against a flat ``5e-4`` (since 2022), while this module's callers
  (:class:`~fastcurv.optim.NewtonCG`, :class:`~fastcurv.optim.BlockHF`) default to a flat ``1e-4`` — a
  stricter threshold than both, so their CG runs at least as long.
* **Iteration cap** ``max_iters``.

A non-finite :math:`\kappa` or residual aborts the solve (``finite=False``); the caller skips the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Segments", "CGResult", "truncated_cg", "EXIT_CODES"]

#: exit reasons, by code
EXIT_CODES = ("max_iters", "converged", "progress", "negative_curvature", "steepest_descent")
_MAXIT, _CONV, _PROG, _NEG, _SD = range(5)

#: ``matvec(v, active)``: the curvature :math:`H` (without the shift) applied blockwise to the flat vector
#: ``v``; ``active[b]`` False means block b's result is not needed (zeros may be returned there).
MatVec = Callable[[Tensor, Sequence[bool]], Tensor]


class Segments:
    r"""A flat vector of length :math:`n = \sum_b n_b` cut into :math:`B` consecutive blocks.

    :meth:`dot` is the blockwise inner product (a length-:math:`B` tensor) and :meth:`expand` broadcasts a
    per-block scalar back to the elements (both one kernel, whatever :math:`B`).
    """

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"Segments: sizes must be a non-empty list of positive ints, got {sizes}")
        self.sizes = sizes
        self.n = sum(sizes)
        self.nblocks = len(sizes)
        self.index: Tensor | None = None
        if self.nblocks > 1:
            dtype = torch.int32 if self.n < 2**31 else torch.int64
            self.index = torch.repeat_interleave(
                torch.arange(self.nblocks, dtype=dtype, device=device),
                torch.tensor(sizes, device=device),
            )

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        r""":math:`(a_b^\top b_b)_{b=1..B}`."""
        if self.index is None:
            return torch.dot(a, b).reshape(1)
        return torch.zeros(self.nblocks, dtype=a.dtype, device=a.device).index_add_(0, self.index, a * b)

    def expand(self, s: Tensor) -> Tensor:
        """Per-block values ``s`` (shape ``(B,)``) as a tensor broadcastable to the flat vector."""
        if self.index is None:
            return s
        return s.index_select(0, self.index)


@dataclass
class CGResult:
    """Outcome of :func:`truncated_cg` (per-block quantities are length-``B`` tensors).

    Attributes:
        x: the flat solution (or the returned direction, see the stopping rules).
        exits: per block, one of :data:`EXIT_CODES`.
        iterations: per block, CG iterations taken (products with a search direction that were used).
        matvecs: operator calls made (each computes every active block).
        cx: :math:`c_b^\\top x_b` (with :math:`c = -g`: minus the directional derivative).
        xAx, xHx: :math:`x_b^\\top A_b x_b` and
            :math:`x_b^\\top H_b x_b = x_b^\\top A_b x_b - \\lambda\\lVert x_b\\rVert^2`.
        finite: False when a non-finite curvature or residual stopped the solve (``x`` is then meaningless).
        curvature: per block, the Rayleigh quotient :math:`p^\\top Hp/\\lVert p\\rVert^2` of the disturbing direction
            (0 for blocks that stopped otherwise).
    """

    x: Tensor
    exits: list[str]
    iterations: list[int]
    matvecs: int
    cx: Tensor
    xAx: Tensor
    xHx: Tensor
    finite: bool
    curvature: Tensor

    @property
    def model_value(self) -> Tensor:
        r"""Per block, the damped model :math:`\phi(x) = \tfrac12 x^\top A x - c^\top x`."""
        return 0.5 * self.xAx - self.cx


def _check_scalar(name: str, v: float, *, allow_zero: bool = True) -> float:
    v = float(v)
    if not (v == v) or v < 0.0 or (v == 0.0 and not allow_zero) or v == float("inf"):
        raise ValueError(f"truncated_cg: {name} must be a finite number >= 0, got {v}")
    return v


def truncated_cg(
    matvec: MatVec,
    c: Tensor,
    segments: Segments,
    *,
    shift: Tensor | float = 0.0,
    x0: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 0.0,
    eps: float = 0.0,
    progress_tol: float | None = None,
) -> CGResult:
    r"""Solve :math:`(H_b + \lambda I) x_b = c_b` for every block by truncated CG (see the module doc).

    Args:
        matvec: ``matvec(v, active) -> Hv`` on flat vectors (the shift is added here, not by the callback).
        c: the flat right-hand side (:math:`-g`), 1-D, floating point.
        segments: the block layout of ``c``.
        shift: :math:`\lambda \ge 0`, a float or 0-d tensor (or a ``(B,)`` tensor, one per block).
        x0: optional warm start (flat, like ``c``); ``None`` starts from 0 and saves one product.
        max_iters: iteration cap (>= 1).
        tol: relative residual tolerance (``0`` turns the test off except for an exactly zero residual).
        eps: the disturbing-direction threshold :math:`\varepsilon` on :math:`p^\top Hp/\lVert p\rVert^2` (any
            finite number: ``eps = -λ`` tests the damped curvature :math:`p^\top(H+\lambda I)p \le 0` instead).
        progress_tol: Martens' relative-progress threshold, or ``None`` to turn the test off.

    Returns:
        A :class:`CGResult`.
    """
    if not isinstance(c, Tensor) or c.dim() != 1 or not c.is_floating_point():
        raise TypeError(f"truncated_cg: c must be a 1-D floating tensor, got {getattr(c, 'shape', type(c))}")
    if c.numel() != segments.n:
        raise ValueError(f"truncated_cg: c has {c.numel()} entries but the segments cover {segments.n}")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != c.shape or x0.dtype != c.dtype):
        raise ValueError(f"truncated_cg: x0 must be a tensor like c {tuple(c.shape)} {c.dtype}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"truncated_cg: max_iters must be an int >= 1, got {max_iters!r}")
    tol = _check_scalar("tol", tol)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"truncated_cg: eps must be a finite number, got {eps!r}")
    if progress_tol is not None:
        progress_tol = _check_scalar("progress_tol", progress_tol)
    nb = segments.nblocks
    lam = torch.as_tensor(shift, dtype=c.dtype, device=c.device)
    if lam.dim() == 0:
        lam = lam.expand(nb)
    if lam.shape != (nb,):
        raise ValueError(f"truncated_cg: shift must be a scalar or have shape ({nb},), got {tuple(lam.shape)}")
    lam_e = segments.expand(lam)
    every = [True] * nb

    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(c)
        r = c.clone()
    else:
        x = x0.clone()
        r = c - (matvec(x, every) + lam_e * x)
        matvecs += 1
    p = r.clone()
    rr = segments.dot(r, r)
    cc = segments.dot(c, c)
    q_hist = [-0.5 * segments.dot(x, c + r)]
    tol2 = tol * tol

    # blocks already solved before any iteration (zero residual, or within tol)
    done0 = rr <= tol2 * cc
    flags = torch.cat([done0.to(c.dtype), torch.isfinite(rr).all().to(c.dtype).reshape(1)]).tolist()
    finite = flags[-1] == 1.0
    active = [f == 0.0 for f in flags[:nb]]
    exits = [_MAXIT if a else _CONV for a in active]
    iters = [0] * nb
    it = 0
    rq = torch.zeros(nb, dtype=c.dtype, device=c.device)
    while finite and any(active) and it < max_iters:
        act = torch.tensor(active, device=c.device)
        hp = matvec(p, active)
        matvecs += 1
        ap = hp + lam_e * p
        php = segments.dot(p, hp)
        pp = segments.dot(p, p)
        pap = php + lam * pp
        neg = act & (php <= eps * pp)
        go = act & ~neg
        alpha = torch.where(go, rr / torch.where(go, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        alpha_e = segments.expand(alpha)
        x = x + alpha_e * p
        r = r - alpha_e * ap
        if it == 0:
            # steepest descent, scaled by the saddle-free step length along it
            den = php.abs() + lam * pp
            t = torch.where(den > 0, rr / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
            sd = segments.expand(neg)
            t_e = segments.expand(t)
            x = torch.where(sd, t_e * p, x)
            r = torch.where(sd, c - t_e * ap, r)
        rq = torch.where(neg, php / torch.where(pp > 0, pp, torch.ones_like(pp)), rq)
        rr_new = segments.dot(r, r)
        q = -0.5 * segments.dot(x, c + r)
        q_hist.append(q)
        conv = go & (rr_new <= tol2 * cc)
        j = it + 1
        k = max(10, j // 10)
        if progress_tol is not None and j > k:
            q_back = q_hist[j - k]
            ratio = (q - q_back) / torch.where(q < 0, q, -torch.ones_like(q))
            prog = go & ~conv & (q < 0) & (ratio < progress_tol)
        else:
            prog = torch.zeros_like(go)
        cont = go & ~conv & ~prog
        beta = torch.where(cont, rr_new / torch.where(cont, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(segments.expand(cont), r + segments.expand(beta) * p, p)
        rr = torch.where(cont, rr_new, rr)
        code = torch.where(neg, float(_SD if it == 0 else _NEG), -1.0)
        code = torch.where(conv, float(_CONV), code)
        code = torch.where(prog, float(_PROG), code)
        ok = torch.isfinite(torch.where(act, pap, torch.zeros_like(pap))).all() & torch.isfinite(rr_new).all()
        host = torch.cat([code, go.to(code.dtype), ok.to(code.dtype).reshape(1)]).tolist()
        finite = host[-1] == 1.0
        for b in range(nb):
            if not active[b]:
                continue
            iters[b] += int(host[nb + b])
            if host[b] >= 0:
                exits[b] = int(host[b])
                active[b] = False
        it += 1

    cx = segments.dot(c, x)
    xAx = segments.dot(x, c - r)
    xHx = xAx - lam * segments.dot(x, x)
    return CGResult(
        x=x,
        exits=[EXIT_CODES[e] for e in exits],
        iterations=iters,
        matvecs=matvecs,
        cx=cx,
        xAx=xAx,
        xHx=xHx,
        finite=finite,
        curvature=rq,
    )
