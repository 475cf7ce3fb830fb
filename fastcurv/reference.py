r"""Eager PyTorch reference of every fused op: the specification, and the CPU code path.

Each function here has the signature of its twin in :mod:`fastcurv.ops` and is written as readable math.
It imports nothing from triton. :mod:`fastcurv.ops` validates inputs before calling into this module, so
these functions assume well-formed arguments (shapes, dtypes, devices); the semantics of *values*
(non-finite inputs, skip rules) are specified here and the kernels must match them.

Notation follows ``docs/algorithms.md``: a Kronecker factor :math:`A \in \mathbb{R}^{d\times d}` is an EMA of
:math:`X^\top X / m` for a batch :math:`X \in \mathbb{R}^{m\times d}`; :math:`H` is an inverse-Hessian
approximation updated by BFGS from a pair :math:`(s, y)`; complex-perturbed matmuls act on real and
imaginary planes stored as separate real tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kron_factor_update_",
    "kron_factor_update_foreach_",
    "damped_pair",
    "damped_bfgs_update_",
    "damped_bfgs_update_foreach_",
    "complex_matmul",
    "complex_linear",
]


def _scalar(v: float | Tensor, like: Tensor) -> Tensor:
    """A 0-d tensor of ``like``'s dtype and device holding ``v`` (no host sync for tensors)."""
    if isinstance(v, Tensor):
        return v.to(dtype=like.dtype, device=like.device)
    return torch.tensor(v, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------------
# Kronecker-factor update
# --------------------------------------------------------------------------------------------------------
def kron_factor_update_(A: Tensor, X: Tensor, beta: float | Tensor, *, normalize: bool = True) -> Tensor:
    r"""Symmetric EMA of a Kronecker factor, in place, for a batch :math:`X \in \mathbb{R}^{m\times d}`:

    .. math::
        A \leftarrow \beta A + \frac{1-\beta}{m} X^\top X \quad (\texttt{normalize=True}), \qquad
        A \leftarrow \beta A + (1-\beta)\, X^\top X \quad (\texttt{normalize=False}).

    ``normalize=True`` averages per-sample rows (K-FAC's :math:`\mathbb{E}[aa^\top]`); ``normalize=False``
    is the plain sum, e.g. Shampoo/SOAP statistics :math:`L \leftarrow \beta L + (1-\beta) GG^\top` from a
    gradient matrix :math:`G` with ``X = G.T`` (and :math:`R` with ``X = G``).

    The product is accumulated in ``A.dtype`` (float32 when ``X`` is bf16/fp16), scaled and accumulated
    with :math:`\beta A` in place (two passes over :math:`d^2`, no host scalars: nothing synchronises), and
    the result :math:`N` is made *exactly* symmetric as :math:`(N + N^\top)/2` — floating-point addition
    commutes, so entries :math:`(i, j)` and :math:`(j, i)` are the same sum. ``A`` is assumed symmetric (it
    is read whole). Guard: when ``X`` or ``beta`` is non-finite, or ``beta`` lies outside ``[0, 1]``, ``A`` is
    left bitwise unchanged (decided with tensor ops).

    Only the block upper triangle of :math:`X^\top X` is multiplied (:func:`_gram`; BLAS ``syrk`` is not
    exposed by torch): panels of :data:`SYRK_PANEL` columns, :math:`\tfrac{k+1}{2k}` of the GEMM's flops
    for :math:`k` panels, the lower blocks copied from the upper ones. Measured for the whole op (with the
    finiteness test below) on one CPU thread, m = 1000 rows, on a loaded 2-core machine (docs/performance.md):
    d = 785 takes 38 ms against 76 ms with one GEMM, d = 401 7.2 ms against 11.7 ms, d = 101 1.3 against
    1.6 ms; up to one panel it is the one GEMM.
    """
    Xa = X.to(A.dtype)
    b = _scalar(beta, A)
    alpha = (1 - b) / X.shape[0] if normalize else 1 - b
    new = _gram(Xa).mul_(alpha).addcmul_(A, b)
    new = torch.add(new, new.T).mul_(0.5)
    ok = _all_finite(X) & torch.isfinite(b) & (b >= 0) & (b <= 1)
    torch.where(ok, new, A, out=A)
    return A


#: column panel width of :func:`_gram`'s block triangle
SYRK_PANEL = 128


def _gram(X: Tensor) -> Tensor:
    r""":math:`X^\top X` (``d x d``) from the block upper triangle: each panel :math:`X_i` of
    :data:`SYRK_PANEL` columns is multiplied with the columns from its own on (:math:`X_i^\top X_{i:}`), and
    the blocks below the diagonal are the transposes of those above. Equal to ``X.T @ X`` up to the
    summation order of the BLAS calls (entry for entry, the same dot products)."""
    d = X.shape[1]
    k = -(-d // SYRK_PANEL)
    if k < 2:
        return torch.mm(X.T, X)
    out = torch.empty(d, d, dtype=X.dtype, device=X.device)
    edges = [round(i * d / k) for i in range(k + 1)]
    for a, e in zip(edges[:-1], edges[1:]):
        torch.mm(X[:, a:e].T, X[:, a:], out=out[a:e, a:])
        if e < d:
            out[e:, a:e].copy_(out[a:e, e:].T)
    return out


def _all_finite(t: Tensor) -> Tensor:
    """0-d bool: every element of the real tensor ``t`` is finite — ``aminmax`` (NaN propagates; ±inf is the
    min or the max), vectorised on the CPU where ``isfinite(t).all()`` is not (6x faster on 0.8 M floats)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def kron_factor_update_foreach_(
    As: Sequence[Tensor], Xs: Sequence[Tensor], beta: float | Tensor, *, normalize: bool = True
) -> list[Tensor]:
    r""":func:`kron_factor_update_` applied to each pair ``(As[i], Xs[i])`` with a shared ``beta`` and
    ``normalize``.

    The guard is per layer: a non-finite ``Xs[i]`` leaves only ``As[i]`` unchanged.
    """
    return [kron_factor_update_(A, X, beta, normalize=normalize) for A, X in zip(As, Xs)]


# --------------------------------------------------------------------------------------------------------
# Damped BFGS
# --------------------------------------------------------------------------------------------------------
def damped_pair(
    s: Tensor,
    y: Tensor,
    Hy: Tensor,
    *,
    mu1: float | Tensor | None = 0.2,
    mu2: float | Tensor | None,
) -> tuple[Tensor, Tensor]:
    r"""Double damping (docs/algorithms.md §1.3) of a curvature pair :math:`(s, y)` given :math:`Hy`.

    Powell's damping on :math:`H` (skipped when ``mu1`` is None):

    .. math::
        \tilde s = \begin{cases} s & s^\top y \ge \mu_1\, y^\top H y \\
        \theta_1 s + (1-\theta_1) H y,\ \ \theta_1 = \frac{(1-\mu_1)\, y^\top H y}{y^\top H y - s^\top y}
        & \text{otherwise}\end{cases}

    Levenberg–Marquardt damping on :math:`B = H^{-1}` (skipped when ``mu2`` is None):

    .. math::
        \tilde y = \begin{cases} y & \tilde s^\top y \ge \mu_2\, \tilde s^\top \tilde s \\
        \theta_2 y + (1-\theta_2)\tilde s,\ \ \theta_2 = \frac{(1-\mu_2)\,\tilde s^\top\tilde s}
        {\tilde s^\top\tilde s - \tilde s^\top y} & \text{otherwise}\end{cases}

    The official code tests ``sᵀy / yᵀHy > μ1`` (and ``s̃ᵀy / s̃ᵀs̃ > μ2``); we test the cross-multiplied
    form with the boundary on the no-damping side. The two agree whenever the denominators are positive
    (at the boundary both give θ = 1), and the cross-multiplied form also covers ``y = 0`` (then ``yᵀHy = 0``
    and ``s̃ = s`` rather than 0/0). Afterwards ``s̃ᵀy ≥ μ1 yᵀHy`` and ``s̃ᵀỹ ≥ μ2 s̃ᵀs̃`` (equalities when
    damped). ``Hy`` may come from a dense ``H`` or from an L-BFGS operator.
    """
    sy = torch.dot(s, y)
    if mu1 is not None:
        m1 = _scalar(mu1, s)
        yHy = torch.dot(y, Hy)
        damp1 = sy < m1 * yHy
        theta1 = torch.where(damp1, (1 - m1) * yHy / torch.where(damp1, yHy - sy, 1), 1)
        s = torch.where(damp1, theta1 * s + (1 - theta1) * Hy, s)
    if mu2 is not None:
        m2 = _scalar(mu2, s)
        sy = torch.dot(s, y)
        ss = torch.dot(s, s)
        damp2 = sy < m2 * ss
        theta2 = torch.where(damp2, (1 - m2) * ss / torch.where(damp2, ss - sy, 1), 1)
        y = torch.where(damp2, theta2 * y + (1 - theta2) * s, y)
    return s, y


def damped_bfgs_update_(
    H: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    mu1: float | Tensor | None = 0.2,
    mu2: float | Tensor | None,
    curvature_tol: float | Tensor = 1e-4,
    grad_norm: float | Tensor | None = None,
) -> Tensor:
    r"""Double-damped BFGS update of an inverse-Hessian approximation, in place; returns "applied".

    1. :math:`(\tilde s, \tilde y)` = :func:`damped_pair` ``(s, y, H y)`` (either damping off when its ``mu`` is
       None).
    2. BFGS inverse update (docs/algorithms.md §1.4) with :math:`\rho = 1/\tilde s^\top\tilde y`,
       :math:`u = H\tilde y`:

       .. math:: H^+ = H + (\rho^2\, \tilde y^\top u + \rho)\, \tilde s\tilde s^\top
                 - \rho\,(\tilde s u^\top + u \tilde s^\top)
                 = (I - \rho \tilde s\tilde y^\top) H (I - \rho \tilde y\tilde s^\top) + \rho\tilde s\tilde s^\top

       computed elementwise as ``H + c·(s_i s_j) − ρ·(s_i u_j + u_i s_j)`` so that a symmetric ``H`` stays
       bitwise symmetric; :math:`H^+\tilde y = \tilde s` (secant condition).
    3. Skip rules (official code): the update is skipped and ``H`` left bitwise unchanged when
       :math:`\tilde s^\top\tilde y \le 0`, when ``grad_norm`` is given and
       :math:`\tilde s^\top\tilde y \le` ``curvature_tol`` :math:`\cdot\, \tilde s^\top\tilde s \cdot` ``grad_norm``,
       or when the result would not be finite. The official code tests :math:`H^+` for inf after forming
       it; an in-place one-pass kernel must decide before writing, so the finiteness rule here is the
       a-priori bound :math:`\max|H| + |c|\max|\tilde s|^2 + 2|\rho|\max|\tilde s|\max|u| < \infty`
       together with finite scalars and vectors — it implies a finite :math:`H^+` and differs from the
       official rule only for entries within a factor ~4 of the float range.

    All decisions are tensor ops (no host sync). Returns a 0-d bool tensor: True when ``H`` was updated.
    """
    Hy = H @ y
    s_t, y_t = damped_pair(s, y, Hy, mu1=mu1, mu2=mu2)
    u = H @ y_t
    sy = torch.dot(s_t, y_t)
    ss = torch.dot(s_t, s_t)
    rho = 1 / sy
    c = rho * rho * torch.dot(y_t, u) + rho
    ok = sy > 0
    if grad_norm is not None:
        ok = ok & (sy > _scalar(curvature_tol, H) * ss * _scalar(grad_norm, H))
    lo, hi = torch.aminmax(H)  # max|H| in one vectorised pass (NaN propagates)
    bound = torch.maximum(-lo, hi) + c.abs() * s_t.abs().amax() ** 2 + 2 * rho.abs() * s_t.abs().amax() * u.abs().amax()
    ok = ok & torch.isfinite(bound) & torch.isfinite(s_t).all() & torch.isfinite(y_t).all()
    # H + c*(s s^T) - rho*(s u^T + u s^T), the same roundings in the same order, in three d x d temporaries
    new = torch.outer(s_t, s_t).mul_(c).add_(H)
    new.sub_(torch.outer(s_t, u).add_(torch.outer(u, s_t)).mul_(rho))
    torch.where(ok, new, H, out=H)
    return ok


def damped_bfgs_update_foreach_(
    Hs: Sequence[Tensor],
    ss: Sequence[Tensor],
    ys: Sequence[Tensor],
    *,
    mu1: float | Tensor | None = 0.2,
    mu2: float | Tensor | None,
    curvature_tol: float | Tensor = 1e-4,
    grad_norms: Sequence[float | Tensor] | Tensor | None = None,
) -> Tensor:
    r""":func:`damped_bfgs_update_` for each layer ``i`` on ``(Hs[i], ss[i], ys[i])`` with shared damping
    constants and per-layer ``grad_norms[i]``. Returns a bool tensor of shape ``(len(Hs),)``."""
    out = []
    for i, (H, s, y) in enumerate(zip(Hs, ss, ys)):
        g = None if grad_norms is None else grad_norms[i]
        out.append(damped_bfgs_update_(H, s, y, mu1=mu1, mu2=mu2, curvature_tol=curvature_tol, grad_norm=g))
    if not out:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack([o.to(out[0].device) for o in out])


# --------------------------------------------------------------------------------------------------------
# Complex-perturbed matmuls
# --------------------------------------------------------------------------------------------------------
def complex_matmul(
    a: Tensor,
    a_im: Tensor | None,
    b: Tensor,
    b_im: Tensor | None,
    coef: tuple[int, int, int, int] = (1, -1, 1, 1),
    bias: Tensor | None = None,
    bias_im: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The planar complex GEMM that every complex-perturbed matmul reduces to.

    For :math:`A = A_r + iA_i \in \mathbb{R}^{M\times K}` and :math:`B = B_r + iB_i \in \mathbb{R}^{K\times N}`
    stored as separate planes, and integer coefficients ``coef = (c_rr, c_ii, c_ir, c_ri)`` in {-1, 0, 1}:

    .. math::
        C_r = c_{rr} A_r B_r + c_{ii} A_i B_i + b_r, \qquad C_i = c_{ir} A_i B_r + c_{ri} A_r B_i + b_i .

    ``(1, -1, 1, 1)`` is the complex product :math:`AB`; ``(1, 1, 1, -1)`` is :math:`A\bar B` (the
    backward of a complex linear map); a 0 drops a product (the dual-number limit). A missing plane
    (None) is zero. Bias planes, if given, have shape ``(N,)``. Four real products, never three.
    """
    re = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    im = torch.zeros_like(re)
    c_rr, c_ii, c_ir, c_ri = coef
    if c_rr:
        re = re + c_rr * (a @ b)
    if c_ii and a_im is not None and b_im is not None:
        re = re + c_ii * (a_im @ b_im)
    if c_ir and a_im is not None:
        im = im + c_ir * (a_im @ b)
    if c_ri and b_im is not None:
        im = im + c_ri * (a @ b_im)
    if bias is not None:
        re = re + bias
    if bias_im is not None:
        im = im + bias_im
    return re, im


def complex_linear(
    x: Tensor,
    x_im: Tensor | None,
    weight: Tensor,
    weight_im: Tensor | None,
    bias: Tensor | None = None,
    bias_im: Tensor | None = None,
    *,
    dual: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Real and imaginary planes of a complex affine map, with real tensors for each plane:

    .. math::
        (x + i x')(W + i W')^\top + (b + i b') =
        \underbrace{x W^\top - x' W'^\top + b}_{\mathrm{Re}} + i\,\underbrace{(x' W^\top + x W'^\top + b')}_{\mathrm{Im}}

    All four real products are kept (exact complex arithmetic, never Gauss's 3-multiplication form, which
    cancels an O(h) imaginary part). ``x_im``, ``weight_im``, ``bias``, ``bias_im`` may be None (a zero
    plane). With ``dual=True`` the second-order product :math:`x' W'^\top` is dropped from Re: the
    dual-number (forward-mode) limit of the complex step, in which the imaginary planes are tangents and
    any scale ``h`` factors out exactly. ``x`` may have leading batch dimensions, like ``F.linear``.
    Differentiable through autograd with respect to every plane (each plane is an ordinary real tensor,
    so gradients are plain real gradients — no Wirtinger conjugation).
    """
    re = F.linear(x, weight, bias)
    if x_im is not None and weight_im is not None and not dual:
        re = re - F.linear(x_im, weight_im)
    im = None
    if x_im is not None:
        im = F.linear(x_im, weight)
    if weight_im is not None:
        t = F.linear(x, weight_im)
        im = t if im is None else im + t
    if bias_im is not None:
        im = torch.zeros_like(re) + bias_im if im is None else im + bias_im
    if im is None:
        im = torch.zeros_like(re)
    return re, im
