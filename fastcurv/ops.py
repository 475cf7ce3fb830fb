r"""fastcurv's public fused ops: validate, dispatch (Triton or reference), register with ``torch.library``.

Every op here is the only door to its Triton kernel in :mod:`fastcurv.kernels`; its eager twin in
:mod:`fastcurv.reference` is the specification. Dispatch (see :mod:`fastcurv._backend`): CUDA tensors run
the Triton kernel, CPU tensors the reference, unless ``FASTCURV_BACKEND`` says otherwise.

Each op is a ``torch.library.custom_op`` with a fake implementation, so a function calling it compiles
with ``torch.compile(fullgraph=True)``: the op stays one opaque node in the graph (docs/engineering.md §2 shows
``triton_op`` failing under the CPU interpreter, so one mechanism serves both devices).

Inputs are validated before anything is written: a wrong shape, dtype or device raises ``ValueError`` /
``TypeError`` naming the argument and the shapes. Values are never checked on the host (that would
synchronise); non-finite values are handled by the ops' own guards, documented in :mod:`fastcurv.reference`.

Ops
---
``kron_factor_update_(A, X, beta, *, normalize)``, ``kron_factor_update_foreach_(As, Xs, beta, *, normalize)``
    Symmetric EMA of Kronecker factors, :math:`A \leftarrow \beta A + \frac{1-\beta}{m} X^\top X`
    (``normalize=False``: :math:`\beta A + (1-\beta) X^\top X`, Shampoo/SOAP statistics).
``damped_bfgs_update_(H, s, y, *, mu1, mu2, curvature_tol, grad_norm)``, ``damped_bfgs_update_foreach_``
    Double-damped BFGS inverse update with skip rules; returns "applied" as a bool tensor.
``damped_pair(s, y, Hy, *, mu1, mu2)``
    The double damping alone (for L-BFGS memories).
``complex_matmul(a, a_im, b, b_im, coef, bias, bias_im)``
    The planar complex GEMM (four real products, signs chosen by ``coef``).
``complex_linear(x, x_im, weight, weight_im, bias, bias_im, *, dual)``
    Real and imaginary planes of a complex affine map; differentiable w.r.t. every plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastcurv import _backend, reference

__all__ = [
    "kron_factor_update_",
    "kron_factor_update_foreach_",
    "damped_pair",
    "damped_bfgs_update_",
    "damped_bfgs_update_foreach_",
    "complex_matmul",
    "complex_linear",
]

_FLOATS = (torch.float32, torch.float64)
_LOW = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------
def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _dtype(name: str, t: Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def _ndim(name: str, t: Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def _same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def _contiguous_inplace(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is updated in place and must be contiguous (got strides {t.stride()} for shape "
            f"{tuple(t.shape)}); pass {name}.contiguous() and keep that tensor"
        )


def _scalar_arg(name: str, v: object, ref: Tensor, *, lo: float | None = None, hi: float | None = None) -> Tensor:
    """Validate a float or 0-d tensor hyperparameter and return it as a 0-d tensor of ``ref``'s dtype/device.

    Python floats are range-checked here; tensor values are not read (no host sync) — the ops' guards
    treat out-of-range tensor values as documented.
    """
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(v).__name__}")
    if isinstance(v, Tensor):
        if v.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.device != ref.device and v.device.type != "cpu":
            raise ValueError(f"{name} is on {v.device} but the operands are on {ref.device}")
        return v.to(dtype=ref.dtype, device=ref.device)
    f = float(v)
    if f != f or (lo is not None and f < lo) or (hi is not None and f > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must lie in {rng}, got {v}")
    return torch.tensor(f, dtype=ref.dtype, device=ref.device)


def _check_list(name: str, xs: object) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    return [_tensor(f"{name}[{i}]", t) for i, t in enumerate(xs)]


# --------------------------------------------------------------------------------------------------------
# Kronecker-factor update
# --------------------------------------------------------------------------------------------------------
def _names(single: bool, i: int, *names: str) -> tuple[str, ...]:
    return names if single else tuple(f"{n}[{i}]" for n in names)


def _check_kron(As: list[Tensor], Xs: list[Tensor], an: str, xn: str, single: bool = False) -> None:
    if len(As) != len(Xs):
        raise ValueError(f"{an} and {xn} must have the same length, got {len(As)} and {len(Xs)}")
    for i, (A, X) in enumerate(zip(As, Xs)):
        a, x = _names(single, i, an, xn)
        _dtype(a, A, _FLOATS)
        _ndim(a, A, 2, "a square (d, d) matrix")
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"{a} must be square (d, d), got shape {tuple(A.shape)}")
        _ndim(x, X, 2, f"(m, d) with d = {A.shape[0]} to match {a}")
        if X.shape[1] != A.shape[0]:
            raise ValueError(
                f"{x} has shape {tuple(X.shape)} but {a} has shape {tuple(A.shape)}: need X of shape (m, {A.shape[0]})"
            )
        if X.shape[0] == 0:
            raise ValueError(f"{x} is an empty batch (shape {tuple(X.shape)}); the factor update needs m >= 1 rows")
        allowed = _FLOATS[:1] + _LOW if A.dtype == torch.float32 else (torch.float64,)
        if X.dtype not in allowed:
            raise TypeError(
                f"{x} has dtype {X.dtype} but {a} is {A.dtype}: X must be {A.dtype}"
                + (" or bfloat16/float16 (accumulated in float32)" if A.dtype == torch.float32 else "")
            )
        _same_device(x, X, a, A)
        _same_device(a, A, f"{an}[0]", As[0])
        _contiguous_inplace(a, A)
        if A.dtype != As[0].dtype or X.dtype != Xs[0].dtype:
            raise TypeError(f"all of {an} (and of {xn}) must share one dtype; {a} is {A.dtype}, {x} is {X.dtype}")


@torch.library.custom_op("fastcurv::kron_factor_update_foreach_", mutates_args=("As",))
def _kron_op(As: list[Tensor], Xs: list[Tensor], beta: Tensor, normalize: bool = True) -> None:
    if not As:
        return
    if _backend.use_triton(As[0]):
        from fastcurv.kernels import kron_factor

        oks = torch.stack([torch.isfinite(X).all() for X in Xs]) & torch.isfinite(beta) & (beta >= 0) & (beta <= 1)
        kron_factor.kron_factor_update(As, [X.contiguous() for X in Xs], beta, oks, normalize)
    else:
        reference.kron_factor_update_foreach_(As, Xs, beta, normalize=normalize)


@_kron_op.register_fake
def _(As: list[Tensor], Xs: list[Tensor], beta: Tensor, normalize: bool = True) -> None:
    return None


def _check_normalize(normalize: object) -> bool:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return normalize


def kron_factor_update_(A: Tensor, X: Tensor, beta: float | Tensor, *, normalize: bool = True) -> Tensor:
    r"""In place: :math:`A \leftarrow \beta A + \frac{1-\beta}{m} X^\top X` for ``X`` of shape ``(m, d)``.

    ``normalize=False`` drops the :math:`1/m`: :math:`A \leftarrow \beta A + (1-\beta) X^\top X`, the
    statistics of Shampoo and SOAP, :math:`L \leftarrow \beta L + (1-\beta) GG^\top` for a gradient matrix
    ``G`` with ``X = G.T`` (and :math:`R \leftarrow \beta R + (1-\beta) G^\top G` with ``X = G``; a transposed
    view is accepted, the kernel path copies it to contiguous rows).

    A symmetric-rank-k update: the kernel computes only the tiles on and above the diagonal and mirrors
    them (half the FLOPs of a GEMM), so ``A`` stays exactly symmetric. ``A`` must be symmetric on entry:
    the kernel reads only its upper triangle (the reference reads all of it; they agree for symmetric ``A``,
    which every factor built by this op is). ``A`` is float32 or float64
    (contiguous); ``X`` has ``A``'s dtype, or bfloat16/float16 when ``A`` is float32 (accumulated in
    float32). ``beta`` is a float in [0, 1] or a 0-d tensor. When ``X`` or ``beta`` is non-finite (or a
    tensor ``beta`` is outside [0, 1]) ``A`` is left bitwise unchanged. Returns ``A``.
    """
    A, X = _tensor("A", A), _tensor("X", X)
    _check_kron([A], [X], "A", "X", single=True)
    nz = _check_normalize(normalize)
    b = _scalar_arg("beta", beta, A, lo=0.0, hi=1.0)
    torch.ops.fastcurv.kron_factor_update_foreach_([A], [X], b, nz)
    return A


def kron_factor_update_foreach_(
    As: Sequence[Tensor], Xs: Sequence[Tensor], beta: float | Tensor, *, normalize: bool = True
) -> list[Tensor]:
    r""":func:`kron_factor_update_` over lists of layers of different sizes, in one launch on CUDA.

    All ``As`` share one dtype and device (likewise all ``Xs``) and one ``normalize``; the non-finite guard
    is per layer. Returns the list ``As``.
    """
    As, Xs = _check_list("As", As), _check_list("Xs", Xs)
    _check_kron(As, Xs, "As", "Xs")
    nz = _check_normalize(normalize)
    if not As:
        return As
    b = _scalar_arg("beta", beta, As[0], lo=0.0, hi=1.0)
    torch.ops.fastcurv.kron_factor_update_foreach_(As, Xs, b, nz)
    return As


# --------------------------------------------------------------------------------------------------------
# Damped BFGS
# --------------------------------------------------------------------------------------------------------
def _check_bfgs(
    Hs: list[Tensor], ss: list[Tensor], ys: list[Tensor], hn: str, sn: str, yn: str, single: bool = False
) -> None:
    if not (len(Hs) == len(ss) == len(ys)):
        raise ValueError(f"{hn}, {sn}, {yn} must have the same length, got {len(Hs)}, {len(ss)}, {len(ys)}")
    for i, (H, s, y) in enumerate(zip(Hs, ss, ys)):
        h, sv, yv = _names(single, i, hn, sn, yn)
        _dtype(h, H, _FLOATS)
        _ndim(h, H, 2, "a square (n, n) matrix")
        if H.shape[0] != H.shape[1]:
            raise ValueError(f"{h} must be square (n, n), got shape {tuple(H.shape)}")
        n = H.shape[0]
        if n == 0:
            raise ValueError(f"{h} is empty (shape {tuple(H.shape)}); a BFGS update needs n >= 1")
        for name, v in ((sv, s), (yv, y)):
            if v.dim() != 1 or v.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},) to match {h} of shape {tuple(H.shape)}, got {tuple(v.shape)}")
            if v.dtype != H.dtype:
                raise TypeError(f"{name} has dtype {v.dtype} but {h} is {H.dtype}; they must match")
            _same_device(name, v, h, H)
        _same_device(h, H, f"{hn}[0]", Hs[0])
        if H.dtype != Hs[0].dtype:
            raise TypeError(f"all of {hn} must share one dtype; {h} is {H.dtype}, the first is {Hs[0].dtype}")
        _contiguous_inplace(h, H)


@torch.library.custom_op("fastcurv::damped_bfgs_update_foreach_", mutates_args=("Hs",))
def _bfgs_op(
    Hs: list[Tensor],
    ss: list[Tensor],
    ys: list[Tensor],
    mu1: Tensor,
    mu2: Tensor,
    curvature_tol: Tensor,
    grad_norms: Tensor | None,
    use_mu1: bool,
    use_mu2: bool,
) -> Tensor:
    if not Hs:
        return torch.zeros(0, dtype=torch.bool, device=mu1.device)
    m1 = mu1 if use_mu1 else None
    m2 = mu2 if use_mu2 else None
    if _backend.use_triton(Hs[0]):
        from fastcurv.kernels import bfgs

        applied = torch.empty(len(Hs), dtype=torch.bool, device=Hs[0].device)
        bfgs.damped_bfgs_update(
            Hs,
            [s.contiguous() for s in ss],
            [y.contiguous() for y in ys],
            mu1=m1,
            mu2=m2,
            curvature_tol=curvature_tol,
            grad_norms=grad_norms,
            applied=applied,
        )
        return applied
    gns = None if grad_norms is None else list(grad_norms.unbind(0))
    return reference.damped_bfgs_update_foreach_(
        Hs, ss, ys, mu1=m1, mu2=m2, curvature_tol=curvature_tol, grad_norms=gns
    ).to(Hs[0].device)


@_bfgs_op.register_fake
def _(Hs, ss, ys, mu1, mu2, curvature_tol, grad_norms, use_mu1, use_mu2):  # type: ignore[no-untyped-def]
    return torch.empty(len(Hs), dtype=torch.bool, device=Hs[0].device if Hs else mu1.device)


def _bfgs_scalars(ref: Tensor, mu1: object, mu2: object, curvature_tol: object) -> tuple[Tensor, Tensor, Tensor]:
    m1 = _scalar_arg("mu1", 0.0 if mu1 is None else mu1, ref, lo=0.0, hi=1.0)
    m2 = _scalar_arg("mu2", 0.0 if mu2 is None else mu2, ref, lo=0.0)
    tol = _scalar_arg("curvature_tol", curvature_tol, ref, lo=0.0)
    return m1, m2, tol


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
    r"""Double-damped BFGS update of the inverse-Hessian approximation ``H`` (n, n), in place.

    Powell damping with ``mu1`` then Levenberg–Marquardt damping with ``mu2`` (either off when None),
    then :math:`H^+ = (I-\rho\tilde s\tilde y^\top)H(I-\rho\tilde y\tilde s^\top)+\rho\tilde s\tilde s^\top`
    with the official skip rules (:math:`\tilde s^\top\tilde y \le 0`; :math:`\tilde s^\top\tilde y \le`
    ``curvature_tol``·:math:`\tilde s^\top\tilde s`·``grad_norm`` when ``grad_norm`` is given; a non-finite
    result). Full formulas in :func:`fastcurv.reference.damped_bfgs_update_`. ``H`` must be symmetric,
    float32/float64 and contiguous; ``s``, ``y`` have shape ``(n,)`` and ``H``'s dtype.

    No host synchronisation. Returns a 0-d bool tensor, True when ``H`` was updated; when False, ``H`` is
    bitwise unchanged.
    """
    H, s, y = _tensor("H", H), _tensor("s", s), _tensor("y", y)
    _check_bfgs([H], [s], [y], "H", "s", "y", single=True)
    m1, m2, tol = _bfgs_scalars(H, mu1, mu2, curvature_tol)
    gn = None if grad_norm is None else _scalar_arg("grad_norm", grad_norm, H, lo=0.0).reshape(1)
    out = torch.ops.fastcurv.damped_bfgs_update_foreach_([H], [s], [y], m1, m2, tol, gn, mu1 is not None, mu2 is not None)
    return out[0]


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
    r""":func:`damped_bfgs_update_` for every layer ``i`` on ``(Hs[i], ss[i], ys[i])``, one launch per
    phase for all layers on CUDA. ``grad_norms`` is None or one norm per layer (a list of floats / 0-d
    tensors, or a 1-d tensor). Returns a bool tensor of shape ``(len(Hs),)``."""
    Hs, ss, ys = _check_list("Hs", Hs), _check_list("ss", ss), _check_list("ys", ys)
    _check_bfgs(Hs, ss, ys, "Hs", "ss", "ys")
    if not Hs:
        return torch.zeros(0, dtype=torch.bool)
    m1, m2, tol = _bfgs_scalars(Hs[0], mu1, mu2, curvature_tol)
    gn = None
    if grad_norms is not None:
        if isinstance(grad_norms, Tensor):
            if grad_norms.shape != (len(Hs),):
                raise ValueError(f"grad_norms must have shape ({len(Hs)},), got {tuple(grad_norms.shape)}")
            gn = grad_norms.to(dtype=Hs[0].dtype, device=Hs[0].device)
        else:
            if len(grad_norms) != len(Hs):
                raise ValueError(f"grad_norms must have {len(Hs)} entries, got {len(grad_norms)}")
            gn = torch.stack([_scalar_arg(f"grad_norms[{i}]", g, Hs[0], lo=0.0) for i, g in enumerate(grad_norms)])
    return torch.ops.fastcurv.damped_bfgs_update_foreach_(Hs, ss, ys, m1, m2, tol, gn, mu1 is not None, mu2 is not None)


def damped_pair(
    s: Tensor,
    y: Tensor,
    Hy: Tensor,
    *,
    mu1: float | Tensor | None = 0.2,
    mu2: float | Tensor | None,
) -> tuple[Tensor, Tensor]:
    r"""Double damping of a curvature pair given :math:`Hy` — returns :math:`(\tilde s, \tilde y)`.

    Powell on :math:`H` with ``mu1``, then Levenberg–Marquardt on :math:`H^{-1}` with ``mu2``; formulas in
    :func:`fastcurv.reference.damped_pair`. ``Hy`` may come from a dense ``H`` or an L-BFGS operator. These
    are O(n) vector operations: they run as plain tensor ops (fused by ``torch.compile``), no kernel.
    Afterwards :math:`\tilde s^\top y \ge \mu_1 y^\top H y` and :math:`\tilde s^\top\tilde y \ge \mu_2\tilde s^\top\tilde s`.
    """
    s, y, Hy = _tensor("s", s), _tensor("y", y), _tensor("Hy", Hy)
    _dtype("s", s, _FLOATS)
    for name, v in (("s", s), ("y", y), ("Hy", Hy)):
        if v.dim() != 1 or v.shape != s.shape:
            raise ValueError(f"s, y and Hy must be vectors of one shape, got {name} of shape {tuple(v.shape)} (s: {tuple(s.shape)})")
        if v.dtype != s.dtype:
            raise TypeError(f"{name} has dtype {v.dtype} but s is {s.dtype}")
        _same_device(name, v, "s", s)
    m1 = None if mu1 is None else _scalar_arg("mu1", mu1, s, lo=0.0, hi=1.0)
    m2 = None if mu2 is None else _scalar_arg("mu2", mu2, s, lo=0.0)
    return reference.damped_pair(s, y, Hy, mu1=m1, mu2=m2)


# --------------------------------------------------------------------------------------------------------
# Complex-perturbed matmuls
# --------------------------------------------------------------------------------------------------------
_COEFS = (-1, 0, 1)


@torch.library.custom_op("fastcurv::complex_matmul", mutates_args=())
def _complex_matmul_op(
    a: Tensor,
    a_im: Tensor | None,
    b: Tensor,
    b_im: Tensor | None,
    coef: list[int],
    bias: Tensor | None,
    bias_im: Tensor | None,
) -> tuple[Tensor, Tensor]:
    if _backend.use_triton(a):
        from fastcurv.kernels import complex_linear as ck

        return ck.complex_matmul(a, a_im, b, b_im, coef=tuple(coef), bias=bias, bias_im=bias_im)
    return reference.complex_matmul(a, a_im, b, b_im, tuple(coef), bias, bias_im)  # type: ignore[arg-type]


@_complex_matmul_op.register_fake
def _(a, a_im, b, b_im, coef, bias, bias_im):  # type: ignore[no-untyped-def]
    out = a.new_empty(a.shape[0], b.shape[1])
    return out, torch.empty_like(out)


def _check_planes(pairs: Sequence[tuple[str, Tensor | None]], ref_name: str, ref: Tensor) -> None:
    for name, t in pairs:
        if t is None:
            continue
        _tensor(name, t)
        _dtype(name, t, _FLOATS)
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} is {ref.dtype}; all planes must share one dtype")
        _same_device(name, t, ref_name, ref)


def complex_matmul(
    a: Tensor,
    a_im: Tensor | None,
    b: Tensor,
    b_im: Tensor | None,
    coef: tuple[int, int, int, int] = (1, -1, 1, 1),
    bias: Tensor | None = None,
    bias_im: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Planar complex GEMM: :math:`C_r = c_{rr}A_rB_r + c_{ii}A_iB_i + b_r`, :math:`C_i = c_{ir}A_iB_r + c_{ri}A_rB_i + b_i`.

    ``a`` (M, K) and ``b`` (K, N), any strides (transposed views cost nothing); imaginary planes of the same
    shapes or None; ``coef`` in {-1, 0, 1}^4 (``(1, -1, 1, 1)``: :math:`AB`; ``(1, 1, 1, -1)``: :math:`A\bar B`).
    One kernel loads each operand tile once and produces both planes. Not differentiable itself: use
    :func:`complex_linear` for autograd. Returns ``(C_r, C_i)``, contiguous (M, N).
    """
    a, b = _tensor("a", a), _tensor("b", b)
    _dtype("a", a, _FLOATS)
    _ndim("a", a, 2, "a matrix (M, K)")
    _ndim("b", b, 2, f"a matrix (K, N) with K = {a.shape[1]}")
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"a has shape {tuple(a.shape)} and b has shape {tuple(b.shape)}: inner dimensions differ")
    _check_planes([("a_im", a_im), ("b", b), ("b_im", b_im), ("bias", bias), ("bias_im", bias_im)], "a", a)
    for name, t, shape in (("a_im", a_im, a.shape), ("b_im", b_im, b.shape)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    for name, t in (("bias", bias), ("bias_im", bias_im)):
        if t is not None and t.shape != (b.shape[1],):
            raise ValueError(f"{name} must have shape ({b.shape[1]},), got {tuple(t.shape)}")
    if len(coef) != 4 or any(c not in _COEFS for c in coef):
        raise ValueError(f"coef must be four integers in {{-1, 0, 1}}, got {coef}")
    return torch.ops.fastcurv.complex_matmul(a, a_im, b, b_im, [int(c) for c in coef], bias, bias_im)


class _ComplexLinear(torch.autograd.Function):
    r"""Autograd for :func:`complex_linear` on 2-d planes; forward and backward are fused complex GEMMs.

    With :math:`Y = X\bar{}^{\,}W^\top`-style planes (``dual`` drops the tangent×tangent product) and real
    cotangents :math:`(G_r, G_i)` of the two output planes:

    * :math:`(dX, dX') = G\,\bar W`: ``complex_matmul(G, G_i, W, W', coef=(1, 1, 1, -1))``
      (``(1, 1, 1, 0)`` when dual),
    * :math:`(dW, dW') = G^\top \bar X`: ``complex_matmul(G^T, G_i^T, X, X', coef=(1, 1, 1, -1))``
      (``(1, 1, 1, 0)`` when dual),
    * :math:`db = \sum_m G_r`, :math:`db' = \sum_m G_i`.

    The products of a gradient plane nobody asked for (``needs_input_grad``) get zero coefficients, so the
    kernel compiles them out; cotangents go in as they come (any strides, no copies).
    """

    @staticmethod
    def forward(ctx, x, x_im, w, w_im, b, b_im, dual: bool):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, x_im, w, w_im)
        ctx.dual = dual
        ctx.has = (x_im is not None, w_im is not None, b is not None, b_im is not None)
        coef = [1, 0 if dual else -1, 1, 1]
        wt = w.t()
        wt_im = None if w_im is None else w_im.t()
        return torch.ops.fastcurv.complex_matmul(x, x_im, wt, wt_im, coef, b, b_im)

    @staticmethod
    def backward(ctx, g, g_im):  # type: ignore[no-untyped-def]
        x, x_im, w, w_im = ctx.saved_tensors
        has_x_im, has_w_im, has_b, has_b_im = ctx.has
        need = ctx.needs_input_grad
        c_ri = 0 if ctx.dual else -1

        def coef(re: bool, im: bool) -> list[int]:  # zero the products of a plane nobody asked for
            return [int(re), int(re), int(im), c_ri if im else 0]

        # g, g_im may be strided (e.g. expanded) views: the kernel takes strides, so no .contiguous() copies
        dx = dx_im = dw = dw_im = db = db_im = None
        if need[0] or need[1]:
            dx, dx_im = torch.ops.fastcurv.complex_matmul(g, g_im, w, w_im, coef(need[0], need[1]), None, None)
        if need[2] or need[3]:
            dw, dw_im = torch.ops.fastcurv.complex_matmul(
                g.t(), g_im.t(), x, x_im, coef(need[2], need[3]), None, None
            )
        if need[4] and has_b:
            db = g.sum(0)
        if need[5] and has_b_im:
            db_im = g_im.sum(0)
        return (
            dx if need[0] else None,
            dx_im if need[1] and has_x_im else None,
            dw if need[2] else None,
            dw_im if need[3] and has_w_im else None,
            db,
            db_im,
            None,
        )


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
    r"""Real and imaginary planes of :math:`(x + i x')(W + iW')^\top + (b + ib')`, fused.

    .. math:: \mathrm{Re} = xW^\top - x'W'^\top + b, \qquad \mathrm{Im} = x'W^\top + xW'^\top + b'

    (all four products: exact complex arithmetic; with ``dual=True`` the :math:`x'W'^\top` term is dropped —
    the dual-number limit used for complex-step Hessian-vector products, where ``h`` then factors out).
    One kernel produces both planes (Im is :math:`[x' \mid x]\,[W \mid W']^\top`, one GEMM with a doubled
    inner dimension, every tile loaded once). ``x_im=None`` is a real input; ``weight_im``, ``bias``,
    ``bias_im`` may be None. ``x`` has shape ``(..., in_features)``, ``weight`` ``(out_features,
    in_features)``. Differentiable with respect to every plane through a ``torch.autograd.Function``
    whose backward is also fused. Returns ``(y, y_im)`` of shape ``(..., out_features)``.
    """
    x, weight = _tensor("x", x), _tensor("weight", weight)
    _dtype("x", x, _FLOATS)
    _ndim("weight", weight, 2, "a matrix (out_features, in_features)")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but weight has shape {tuple(weight.shape)}: x's last dimension must be {weight.shape[1]}"
        )
    _check_planes(
        [("x_im", x_im), ("weight", weight), ("weight_im", weight_im), ("bias", bias), ("bias_im", bias_im)], "x", x
    )
    if x_im is not None and x_im.shape != x.shape:
        raise ValueError(f"x_im must have x's shape {tuple(x.shape)}, got {tuple(x_im.shape)}")
    if weight_im is not None and weight_im.shape != weight.shape:
        raise ValueError(f"weight_im must have weight's shape {tuple(weight.shape)}, got {tuple(weight_im.shape)}")
    for name, t in (("bias", bias), ("bias_im", bias_im)):
        if t is not None and t.shape != (weight.shape[0],):
            raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x2_im = None if x_im is None else x_im.reshape(-1, x.shape[-1])
    y, y_im = _ComplexLinear.apply(x2, x2_im, weight, weight_im, bias, bias_im, bool(dual))
    return y.reshape(*lead, weight.shape[0]), y_im.reshape(*lead, weight.shape[0])
