r"""Compact-form (Byrd–Nocedal–Schnabel) L-BFGS operator with a fixed-size FIFO memory — private to K-BFGS(L).

The official K-BFGS(L) code (``LBFGS_Hv`` / ``Kron_LBFGS_append_s_y`` in ``kbfgs_utils.py``) applies the
limited-memory inverse-Hessian approximation through the compact representation, not the two-loop
recursion (docs/algorithms.md §1.5). With the :math:`k \le p` stored pairs as rows :math:`S, Y \in
\mathbb{R}^{k\times d}` (oldest first), :math:`R = \operatorname{triu}(S Y^\top)`,
:math:`D = \operatorname{diag}(s_i^\top y_i)` and :math:`H_0 = \gamma I`:

.. math::
    H v = \gamma v + L\,(R_m v),\qquad
    L = \big[(R^{-1}S)^\top,\ \gamma Y^\top\big] \in \mathbb{R}^{d\times 2k},\qquad
    R_m = \begin{bmatrix} (D + \gamma Y Y^\top) R^{-1} S - \gamma Y \\ -R^{-1} S \end{bmatrix}
    \in \mathbb{R}^{2k\times d}.

This equals :math:`k` successive BFGS inverse updates of :math:`\gamma I` with the stored pairs, in order
(valid whenever every :math:`s_i^\top y_i > 0`, for any :math:`k`, even :math:`k > d`). The official code
grows :math:`R^{-1}` incrementally and caches :math:`L, R_m`; here the memory has a *fixed* shape so that
the update compiles to one graph with no host synchronisation:

* ``S``, ``Y``: ``(p, d)`` buffers, the valid pairs in the **last** ``count`` rows (oldest first), the
  others zero. Appending shifts every row up by one (FIFO: the oldest pair falls out once ``count == p``).
* ``count``: int64 of shape ``(1,)`` (never a 0-d tensor: docs/capture.md pitfall 4).
* ``left`` ``(d, 2p)`` and ``right`` ``(2p, d)``: :math:`L` and :math:`R_m` padded with zero columns /
  rows for the empty slots, recomputed after each append. :math:`R^{-1}S` is obtained with a triangular
  solve on :math:`R` whose empty-slot diagonal entries are set to 1 (those rows of :math:`S` are zero,
  so they contribute nothing). With an empty memory ``left`` and ``right`` are zero and :math:`Hv = \gamma v`.

Applying :math:`H` to a matrix :math:`V` (``d × n``) is two skinny GEMMs, ``γV + left @ (right @ V)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lbfgs_memory", "lbfgs_apply", "lbfgs_append"]


def lbfgs_memory(p: int, d: int, *, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """An empty memory of ``p`` pairs of dimension ``d``: ``{"S", "Y", "count", "left", "right"}``."""
    kw = dict(dtype=dtype, device=device)
    return {
        "S": torch.zeros(p, d, **kw),
        "Y": torch.zeros(p, d, **kw),
        "count": torch.zeros(1, dtype=torch.int64, device=device),
        "left": torch.zeros(d, 2 * p, **kw),
        "right": torch.zeros(2 * p, d, **kw),
    }


def lbfgs_apply(left: Tensor, right: Tensor, v: Tensor, gamma: float = 1.0) -> Tensor:
    r""":math:`Hv = \gamma v + L(R_m v)` for a vector ``v`` ``(d,)`` or a matrix ``(d, n)`` (column-wise)."""
    return v * gamma + left @ (right @ v)


def _compact(S: Tensor, Y: Tensor, count: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(left, right)`` of the compact form for the valid (last ``count``) rows of ``S``, ``Y``."""
    p = S.shape[0]
    idx = torch.arange(p, device=S.device)
    valid = idx >= (p - count)  # (p,) bool; empty slots come first
    SY = S @ Y.T  # SY[i, j] = s_i . y_j
    D = torch.diagonal(SY)
    R = torch.triu(SY) + torch.diag((~valid).to(S.dtype))
    RinvS = torch.linalg.solve_triangular(R, S, upper=True)
    YY = Y @ Y.T
    left = torch.cat([RinvS.T, Y.T * gamma], dim=1)
    top = (torch.diag(D) + YY * gamma) @ RinvS - Y * gamma
    right = torch.cat([top, -RinvS], dim=0)
    return left, right


def lbfgs_append(
    S: Tensor, Y: Tensor, count: Tensor, s: Tensor, y: Tensor, accept: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Append the pair ``(s, y)`` when the 0-d bool ``accept`` holds (FIFO), functionally.

    Returns new ``(S, Y, count, left, right)``; when ``accept`` is False, ``S``, ``Y``, ``count`` are
    returned unchanged (bitwise) and ``left``, ``right`` are recomputed from them. The caller decides
    ``accept`` (K-BFGS(L): finite pair and :math:`s^\top y > 10^{-4} s^\top s \lVert g\rVert`); a pair
    with :math:`s^\top y \le 0` must never be accepted (the compact form would not be positive definite).
    """
    p = S.shape[0]
    S_new = torch.where(accept, torch.cat([S[1:], s.unsqueeze(0)], dim=0), S)
    Y_new = torch.where(accept, torch.cat([Y[1:], y.unsqueeze(0)], dim=0), Y)
    count_new = torch.where(accept, torch.clamp(count + 1, max=p), count)
    left, right = _compact(S_new, Y_new, count_new, gamma)
    return S_new, Y_new, count_new, left, right
