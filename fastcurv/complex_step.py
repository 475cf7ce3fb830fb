r"""Run an unmodified ``nn.Module`` on complex-step planes: :math:`f(\theta + i h v)` with real tensors only.

A :class:`Planes` tensor carries a real plane ``re`` and an imaginary plane ``im`` (two ordinary real
tensors). It is a ``torch.Tensor`` subclass with ``__torch_function__`` only: every torch function
called on it is routed to a *rule* that computes both planes with real, differentiable PyTorch ops
(``fastcurv.ops.complex_linear`` for ``F.linear``). Parameters are swapped for ``Planes(W, h·V)`` with
:func:`torch.func.functional_call`, so ``nn.Sequential`` and ordinary ``forward`` methods run unchanged;
autograd then differentiates ``Im L`` with respect to the *real* leaves ``W`` (:mod:`fastcurv.hvp`):

.. math:: H v = \frac{1}{h}\,\nabla_\theta\, \mathrm{Im}\, L(\theta + i h v).

Two arithmetics (how ``h`` enters)
----------------------------------
* **dual (default).** Every rule keeps the terms of first order in the imaginary planes and drops the
  :math:`O(h^2)` ones (``complex_linear(..., dual=True)`` drops :math:`x'W'^\top`; ``tanh`` gives
  :math:`(\tanh a,\ a'(1-\tanh^2 a))`, …). This is the dual-number limit of the complex step —
  forward-mode AD carried on real planes — so the imaginary plane is *exactly linear* in ``h``: ``h`` is a
  pure scale, there is no truncation error at any ``h``, and the re plane is the ordinary forward. The
  recommended scale is ``h = 1``: a tiny ``h`` only risks underflow (float32 with a loss scaled by 1e-12
  loses everything at ``h = 1e-30``, docs/complex_step.md; float16 cannot even store 1e-20).
* **exact** (``exact=True`` / :func:`exact_arithmetic`): true complex arithmetic — all four real products
  in linear/conv/matmul/mul, complex ``tanh``/``exp``/``log``/division, complex statistics in the norms,
  softmax with the max shift taken on the real part. The imaginary plane is then
  :math:`\mathrm{Im} f(\theta + ihv) = h\,\partial f\,v + O(h^3)` and ``h`` must be tiny (e.g. 1e-20); it
  exists to validate the dual rules against the textbook complex step. Products of two complex operands
  are always four real products — never Gauss's 3-multiplication trick, which cancels the O(h) imaginary
  part (torch's own complex ``conv2d`` does that: measured, Im = 0 at h = 1e-20). Exceptions, where the exact rule
  *is* the dual rule: the piecewise-linear ops (relu, leaky_relu, abs, max/min, clamp, max-pool, dropout:
  the "complexify" convention :math:`\mathrm{relu}(z) = z\,1[\mathrm{Re}\,z > 0]`, exact for them) and
  ``gelu(approximate="none")`` (PyTorch has no complex ``erf``; its :math:`O(h^2)` terms are dropped).

Conventions (chosen to equal double backward, so every method agrees)
--------------------------------------------------------------------
Branches are taken on the real plane: ``relu'(0) = 0`` (``re > 0``), ``leaky_relu'(0) = slope``,
``abs'(0) = 0``, ties of ``maximum``/``minimum`` split the tangent in halves, ties of a full ``max``/``amax``
share it evenly, ``clamp`` passes the tangent where ``min <= re <= max`` (PyTorch's ``clamp_backward``),
max-pool routes it through the argmax of ``re``, train-mode dropout multiplies both planes by one mask
(drawn exactly as ``F.dropout`` would draw it). Non-differentiable results (comparisons, ``argmax``,
``sign``, ``round``, ``detach``, ``item``, ``zeros_like`` …) are computed from ``re`` and returned as plain
tensors — a zero tangent, exactly what autograd sees. Metadata (shape, dtype, device, ``requires_grad``,
``grad`` …) is answered from ``re``.

Anything else raises ``NotImplementedError("no complex-step rule for torch.Tensor.erf")`` — never a
silently wrong product (the default ``__torch_function__`` would compute on one plane and drop the
other). Unsupported options of supported ops (``label_smoothing``, ``pos_weight``, probability targets,
``rounding_mode``, a tensor exponent …) raise too.

In-place ops (``x += y``, ``add_``, ``mul_``, ``relu(inplace=True)``, ``dropout(inplace=True)`` …) on a
:class:`Planes` are computed out of place and rebind ``re``/``im`` on the same object; an in-place op on a
plain tensor with a :class:`Planes` operand raises (the result could not be carried). Views taken before
an in-place op do not see the rebinding, and ``__setitem__`` is unsupported.

Side effects: a train-mode BatchNorm updates its running statistics once (from ``re``), train-mode dropout
consumes the RNG as the ordinary forward would; :mod:`fastcurv.hvp` restores both.

Why a subclass with ``__torch_function__`` (not a ``TorchFunctionMode``, not ``__torch_dispatch__``): a mode
is bypassed under ``torch.compile`` for a parameter read through ``.T`` (its tangent is silently dropped),
and ops inside ``__torch_dispatch__`` are not recorded by autograd (docs/complex_step.md). ``T``/``mT``/``H``/``mH``
are Python properties here (Dynamo fails on ``.T`` of a subclass otherwise); ``H`` is a plain transpose —
the complex step of a real model never conjugates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcurv import ops

__all__ = [
    "Planes",
    "planes",
    "split",
    "exact_arithmetic",
    "is_exact",
    "functional_forward",
    "supported_ops",
]

aten = torch.ops.aten
_EXACT = False  # module-wide switch read by the rules (see exact_arithmetic)


# --------------------------------------------------------------------------------------------------------
# the tensor subclass
# --------------------------------------------------------------------------------------------------------
def _rev(t: Tensor) -> Tensor:
    return t.permute(*range(t.dim() - 1, -1, -1))


class Planes(Tensor):
    r"""A real tensor ``re`` with an imaginary plane ``im`` of the same shape: the value :math:`re + i\,im`.

    The object itself is an alias of ``re`` (``re.as_subclass(Planes)``) used for metadata only; the planes
    are the attributes ``re`` and ``im``, each an ordinary tensor with its own autograd history. Build it
    with :func:`planes`, read it with :func:`split`.
    """

    re: Tensor
    im: Tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            return rule(*args, **kwargs)
        if func in _REAL:  # metadata and zero-tangent results: from the real plane
            return func(*_reals(args), **_reals(kwargs))
        name = torch.overrides.resolve_name(func) or getattr(func, "__qualname__", repr(func))
        raise NotImplementedError(
            f"no complex-step rule for {name} (the supported ops: fastcurv.complex_step.supported_ops()); "
            "fastcurv.hvp's method='double-backward' handles any twice-differentiable model"
        )

    # Python properties: Dynamo cannot trace ``.T`` of a subclass through __torch_function__.
    @property
    def T(self) -> Tensor:  # type: ignore[override]
        return planes(_rev(self.re), _rev(self.im))

    @property
    def mT(self) -> Tensor:  # type: ignore[override]
        return planes(self.re.transpose(-2, -1), self.im.transpose(-2, -1))

    @property
    def H(self) -> Tensor:  # type: ignore[override]
        return self.T  # no conjugation: the complex extension of a real model's transpose

    @property
    def mH(self) -> Tensor:  # type: ignore[override]
        return self.mT


def planes(re: Tensor, im: Tensor | None) -> Tensor:
    r"""The value :math:`re + i\,im` as a :class:`Planes` (``re`` itself when ``im`` is None).

    ``im`` is broadcast (a view, no copy) to ``re``'s shape when it has fewer elements (e.g. the tangent of
    a broadcast bias). Neither plane is copied; gradients flow to both.
    """
    if im is None:
        return re
    if isinstance(re, Planes) or isinstance(im, Planes):
        raise TypeError("planes(re, im): re and im must be plain tensors, got a Planes")
    if im.shape != re.shape:
        im = im.expand(re.shape)
    p = re.as_subclass(Planes)
    p.re = re
    p.im = im
    return p


def split(x: Any) -> tuple[Any, Tensor | None]:
    """``(re, im)`` of a :class:`Planes`; ``(x, None)`` for anything else (a real tensor, a number)."""
    if isinstance(x, Planes):
        return x.re, x.im
    return x, None


def _reals(tree: Any) -> Any:
    if isinstance(tree, Planes):
        return tree.re
    if isinstance(tree, (list, tuple)):
        return type(tree)(_reals(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _reals(v) for k, v in tree.items()}
    return tree


def _has_planes(tree: Any) -> bool:
    if isinstance(tree, Planes):
        return True
    if isinstance(tree, (list, tuple)):
        return any(_has_planes(t) for t in tree)
    if isinstance(tree, dict):
        return any(_has_planes(t) for t in tree.values())
    return False


def is_exact() -> bool:
    """Whether the rules currently use exact complex arithmetic (see :func:`exact_arithmetic`)."""
    return _EXACT


@contextlib.contextmanager
def exact_arithmetic(enabled: bool = True) -> Iterator[None]:
    r"""Inside the block, rules compute :math:`f(a + ia')` in exact complex arithmetic (the true complex step,
    ``O(h^2)`` terms kept) instead of the dual-number limit. For validation with a tiny ``h``."""
    global _EXACT
    previous, _EXACT = _EXACT, bool(enabled)
    try:
        yield
    finally:
        _EXACT = previous


def functional_forward(
    model: torch.nn.Module,
    tangents: Mapping[str, Tensor],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    exact: bool = False,
) -> Any:
    r"""``model(*args, **kwargs)`` with each named parameter ``W`` replaced by :math:`W + i\,T` (``T = tangents[name]``).

    The real leaves stay the model's own parameters (gradients of either plane flow to them); the model is
    not modified (``torch.func.functional_call`` swaps the tensors back). ``tangents`` already include the
    step ``h``; parameters without a tangent stay real. ``exact=True`` runs the forward in exact complex
    arithmetic (wrap the loss too: ``with exact_arithmetic(): loss_fn(functional_forward(...), y)``).
    Returns the model's output, :class:`Planes` where it depends on a tangent.
    """
    params = dict(model.named_parameters())
    swapped = {}
    for name, t in tangents.items():
        if name not in params:
            raise ValueError(f"tangents has {name!r}, which is not a parameter of the model")
        swapped[name] = planes(params[name], t)
    if not exact:
        return torch.func.functional_call(model, swapped, tuple(args), dict(kwargs or {}))
    with exact_arithmetic(True):
        return torch.func.functional_call(model, swapped, tuple(args), dict(kwargs or {}))


# --------------------------------------------------------------------------------------------------------
# rule registry
# --------------------------------------------------------------------------------------------------------
_RULES: dict[Any, Callable[..., Any]] = {}
_REAL: set[Any] = set()


def _rule(*funcs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in funcs:
            _RULES[f] = fn
        return fn

    return deco


def supported_ops() -> list[str]:
    """Names of the torch functions with a complex-step rule (metadata and zero-tangent queries such as
    ``shape``, comparisons or ``detach``, answered from the real plane, are not listed)."""
    names = {torch.overrides.resolve_name(f) or getattr(f, "__qualname__", repr(f)) for f in _RULES}
    return sorted(names)


def _sum(*ts: Tensor | None) -> Tensor | None:
    out = None
    for t in ts:
        if t is not None:
            out = t if out is None else out + t
    return out


def _cx(t: Any, ti: Tensor | None) -> Any:
    """Exact mode: a complex tensor (or the real operand itself when it has no imaginary plane)."""
    if ti is None:
        return t
    return torch.complex(t, ti.to(t.dtype))


def _from_c(z: Tensor) -> Tensor:
    return planes(z.real, z.imag) if z.is_complex() else z


def _exact_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
    """Exact mode: run ``fn`` on complex tensors built from the planes and split the result."""
    cargs = [_cx(*split(a)) for a in args]
    ckw = {k: _cx(*split(v)) for k, v in kwargs.items()}
    ctype = next((t.dtype for t in (*cargs, *ckw.values()) if isinstance(t, Tensor) and t.is_complex()), None)
    if ctype is not None:  # some ops (conv, matmul) want every operand complex
        promote = lambda t: t.to(ctype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        cargs, ckw = [promote(t) for t in cargs], {k: promote(t) for k, t in ckw.items()}
    return _from_c(fn(*cargs, **ckw))


def _no_planes(op: str, **named: Any) -> None:
    for k, v in named.items():
        if _has_planes(v):
            raise NotImplementedError(f"complex-step rule for {op}: a complex {k} is not supported")


def _inplace_of(rule: Callable[..., Any], op: str) -> Callable[..., Any]:
    def inplace(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, Planes):
            raise NotImplementedError(
                f"in-place {op} on a real tensor with a complex-step operand cannot carry the imaginary plane; "
                "write it out of place (y = y + x)"
            )
        out = rule(self, *args, **kwargs)
        self.re, self.im = out.re, out.im
        return self

    return inplace


def _rebind(x: Any, out: Tensor) -> Any:
    if not isinstance(x, Planes):
        raise NotImplementedError("inplace=True on a real tensor whose result is complex is not supported")
    x.re, x.im = split(out)
    return x


# --------------------------------------------------------------------------------------------------------
# metadata and zero-tangent results (computed from the real plane, returned as plain tensors/values)
# --------------------------------------------------------------------------------------------------------
_META_PROPS = (
    "shape dtype device ndim layout requires_grad grad is_leaf grad_fn retains_grad is_cuda is_cpu is_sparse "
    "is_sparse_csr is_quantized is_meta is_mkldnn is_nested is_mps is_xpu is_xla is_ipu is_maia is_mtia "
    "is_vulkan itemsize nbytes names _base _version output_nr"
).split()
_META_METHODS = (
    "size dim numel nelement stride is_contiguous is_floating_point is_complex is_signed element_size get_device "
    "storage_offset data_ptr __len__ _is_view is_inference has_names is_pinned is_shared dim_order __format__ "
    # zero-tangent (non-differentiable) results, as autograd sees them
    "eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ argmax argmin sign floor ceil round trunc "
    "isnan isinf isfinite detach item tolist __bool__ __float__ __int__ __index__ all any equal allclose isclose "
    "new_zeros new_ones new_empty new_full new_tensor"
).split()
_META_TORCH = (
    "eq ne lt le gt ge argmax argmin sign floor ceil round trunc isnan isinf isfinite detach all any equal allclose "
    "isclose zeros_like ones_like empty_like full_like rand_like randn_like randint_like greater less greater_equal "
    "less_equal not_equal"
).split()


def _init_meta() -> None:
    for n in _META_PROPS:
        d = getattr(Tensor, n, None)
        if d is not None and hasattr(d, "__get__"):
            _REAL.add(d.__get__)
    for n in _META_METHODS:
        f = getattr(Tensor, n, None)
        if f is not None:
            _REAL.add(f)
    for n in _META_TORCH:
        f = getattr(torch, n, None)
        if f is not None:
            _REAL.add(f)


_init_meta()


@_rule(Tensor.__repr__)
def _repr(self: Planes, *args: Any, **kwargs: Any) -> str:
    return f"Planes(re={self.re!r},\n       im={self.im!r})"


# --------------------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------------------
@_rule(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
def _add(x: Any, y: Any, *, alpha: Any = 1) -> Tensor:
    (a, ai), (b, bi) = split(x), split(y)
    if _EXACT:
        return _exact_call(lambda u, v: torch.add(u, v, alpha=alpha), x, y)
    return planes(torch.add(a, b, alpha=alpha), _sum(ai, None if bi is None else (bi if alpha == 1 else bi * alpha)))


@_rule(torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.__sub__)
def _sub(x: Any, y: Any, *, alpha: Any = 1) -> Tensor:
    (a, ai), (b, bi) = split(x), split(y)
    if _EXACT:
        return _exact_call(lambda u, v: torch.sub(u, v, alpha=alpha), x, y)
    return planes(torch.sub(a, b, alpha=alpha), _sum(ai, None if bi is None else -(bi if alpha == 1 else bi * alpha)))


@_rule(torch.rsub)
def _rsub(x: Any, y: Any, *, alpha: Any = 1) -> Tensor:
    return _sub(y, x, alpha=alpha)


@_rule(Tensor.__rsub__)
def _rsub_dunder(x: Any, y: Any) -> Tensor:
    return _sub(y, x)


@_rule(torch.neg, torch.negative, Tensor.neg, Tensor.negative, Tensor.__neg__)
def _neg(x: Planes) -> Tensor:
    return planes(-x.re, -x.im)


@_rule(torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__)
def _mul(x: Any, y: Any) -> Tensor:
    (a, ai), (b, bi) = split(x), split(y)
    if _EXACT:
        return _exact_call(torch.mul, x, y)
    return planes(a * b, _sum(None if ai is None else ai * b, None if bi is None else a * bi))


@_rule(torch.div, torch.divide, torch.true_divide, Tensor.div, Tensor.divide, Tensor.true_divide, Tensor.__truediv__)
def _div(x: Any, y: Any, *, rounding_mode: str | None = None) -> Tensor:
    if rounding_mode is not None:
        raise NotImplementedError(f"no complex-step rule for torch.div with rounding_mode={rounding_mode!r}")
    (a, ai), (b, bi) = split(x), split(y)
    if _EXACT:
        return _exact_call(torch.div, x, y)
    q = a / b
    if bi is None:
        return planes(q, ai / b)
    return planes(q, (bi * -q if ai is None else ai - q * bi) / b)


@_rule(Tensor.__rtruediv__)
def _rdiv(x: Any, y: Any) -> Tensor:
    return _div(y, x)


for _name, _base in (("add_", _add), ("sub_", _sub), ("mul_", _mul), ("div_", _div)):
    _RULES[getattr(Tensor, _name)] = _inplace_of(_base, f"torch.Tensor.{_name}")
for _name, _base in (("__iadd__", _add), ("__isub__", _sub), ("__imul__", _mul), ("__itruediv__", _div)):
    if hasattr(Tensor, _name):
        _RULES[getattr(Tensor, _name)] = _inplace_of(_base, f"torch.Tensor.{_name}")


@_rule(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm)
def _matmul(x: Any, y: Any) -> Tensor:
    (a, ai), (b, bi) = split(x), split(y)
    re = torch.matmul(a, b)
    if _EXACT and ai is not None and bi is not None:  # four real products (no Gauss trick, no zgemm3m)
        re = re - torch.matmul(ai, bi)
    return planes(re, _sum(None if ai is None else torch.matmul(ai, b), None if bi is None else torch.matmul(a, bi)))


@_rule(Tensor.__rmatmul__)
def _rmatmul(x: Any, y: Any) -> Tensor:
    return _matmul(y, x)


@_rule(F.linear)
def _linear(input: Any, weight: Any, bias: Any = None) -> Tensor:
    r""":math:`(x + ix')(W + iW')^\top + b + ib'` through :func:`fastcurv.ops.complex_linear` (one fused op)."""
    (x, xi), (w, wi), (b, bi) = split(input), split(weight), split(bias)
    if x.dim() == 0 or w.dim() != 2 or (x.dtype not in (torch.float32, torch.float64)):
        raise NotImplementedError(
            f"complex-step rule for F.linear needs float32/float64 input and a 2-d weight, got input "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(w.shape)}"
        )
    y, yi = ops.complex_linear(x, xi, w, wi, b, bi, dual=not _EXACT)
    return planes(y, yi)


def _conv_rule(conv: Callable[..., Tensor], nd: int) -> Callable[..., Tensor]:
    def rule(input: Any, weight: Any, bias: Any = None, *args: Any, **kwargs: Any) -> Tensor:
        _no_planes(conv.__name__, other_arguments=(args, kwargs))
        (x, xi), (w, wi), (b, bi) = split(input), split(weight), split(bias)
        y = conv(x, w, b, *args, **kwargs)
        if _EXACT and xi is not None and wi is not None:
            # four real convolutions; never torch's complex conv, which uses Gauss's 3-multiplication
            # trick and cancels an O(h) imaginary part to zero (measured)
            y = y - conv(xi, wi, None, *args, **kwargs)
        im = _sum(
            None if xi is None else conv(xi, w, bi, *args, **kwargs),
            None if wi is None else conv(x, wi, None, *args, **kwargs),
        )
        if xi is None and bi is not None:  # the bias tangent alone, broadcast over the channel dim
            im = _sum(im, bi.reshape(-1, *([1] * nd)))
        return planes(y, im)

    return rule


_RULES[F.conv1d] = _conv_rule(F.conv1d, 1)
_RULES[F.conv2d] = _conv_rule(F.conv2d, 2)


@_rule(torch.pow, Tensor.pow, Tensor.__pow__)
def _pow(x: Any, exponent: Any) -> Tensor:
    if isinstance(exponent, Tensor) or not isinstance(x, Planes):
        raise NotImplementedError("complex-step rule for torch.pow: only a Planes base with a Python-number exponent")
    a, ai = x.re, x.im
    if _EXACT:
        return _exact_call(lambda u: torch.pow(u, exponent), x)
    y = torch.pow(a, exponent)
    if exponent == 0:
        return planes(y, torch.zeros_like(ai))
    return planes(y, ai * (exponent * torch.pow(a, exponent - 1)))


@_rule(torch.square, Tensor.square)
def _square(x: Planes) -> Tensor:
    if _EXACT:
        return _exact_call(torch.square, x)
    return planes(x.re * x.re, 2 * x.re * x.im)


# --------------------------------------------------------------------------------------------------------
# structural / linear ops: the same op on both planes
# --------------------------------------------------------------------------------------------------------
def _linear_unary(func: Callable[..., Any]) -> Callable[..., Any]:
    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, Planes) or _has_planes((args, kwargs)):
            name = torch.overrides.resolve_name(func) or repr(func)
            raise NotImplementedError(f"complex-step rule for {name}: only the first argument may be complex")
        return planes(func(x.re, *args, **kwargs), func(x.im, *args, **kwargs))

    return rule


def _linear_as(func: Callable[..., Any]) -> Callable[..., Any]:
    """``view_as``/``expand_as``/``reshape_as``/``type_as``/``to(other)``: the other tensor gives metadata only."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _reals(args), _reals(kwargs)
        if not isinstance(x, Planes):
            return func(x, *args, **kwargs)
        return planes(func(x.re, *args, **kwargs), func(x.im, *args, **kwargs))

    return rule


_STRUCTURAL = [
    Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unflatten, torch.unflatten,
    Tensor.permute, torch.permute, Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes,
    Tensor.t, torch.t, Tensor.squeeze, torch.squeeze, Tensor.unsqueeze, torch.unsqueeze, Tensor.expand,
    Tensor.contiguous, Tensor.clone, torch.clone, Tensor.__getitem__, Tensor.sum, torch.sum, Tensor.mean,
    torch.mean, Tensor.movedim, torch.movedim, Tensor.narrow, torch.narrow, Tensor.repeat, Tensor.float,
    Tensor.double, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.nn.functional.pixel_shuffle,
]  # fmt: skip
for _f in _STRUCTURAL:
    _RULES[_f] = _linear_unary(_f)
for _f in (Tensor.view_as, Tensor.reshape_as, Tensor.expand_as, Tensor.type_as, Tensor.to):
    _RULES[_f] = _linear_as(_f)


def _multi_out(func: Callable[..., Any]) -> Callable[..., Any]:
    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, Planes) or _has_planes((args, kwargs)):
            raise NotImplementedError(f"complex-step rule for {func.__name__}: only the first argument may be complex")
        rs, ims = func(x.re, *args, **kwargs), func(x.im, *args, **kwargs)
        return tuple(planes(r, i) for r, i in zip(rs, ims))

    return rule


for _f in (Tensor.split, torch.split, Tensor.chunk, torch.chunk, Tensor.unbind, torch.unbind):
    _RULES[_f] = _multi_out(_f)


@_rule(Tensor.__iter__)
def _iter(x: Planes) -> Iterator[Tensor]:
    return iter(_multi_out(torch.unbind)(x, 0))


def _seq_planes(tensors: Sequence[Any]) -> tuple[list[Tensor], list[Tensor]]:
    rs, ims = [], []
    for t in tensors:
        r, i = split(t)
        rs.append(r)
        ims.append(torch.zeros_like(r) if i is None else i)
    return rs, ims


@_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(tensors: Sequence[Any], dim: int = 0, *, axis: int | None = None) -> Tensor:
    d = dim if axis is None else axis
    rs, ims = _seq_planes(tensors)
    return planes(torch.cat(rs, d), torch.cat(ims, d))


@_rule(torch.stack)
def _stack(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    rs, ims = _seq_planes(tensors)
    return planes(torch.stack(rs, dim), torch.stack(ims, dim))


@_rule(torch.where)
def _where(condition: Any, input: Any = None, other: Any = None) -> Tensor:
    if input is None or _has_planes(condition):
        raise NotImplementedError("complex-step rule for torch.where: needs where(condition, x, y) with a real condition")
    (a, ai), (b, bi) = split(input), split(other)
    zero = 0.0
    return planes(
        torch.where(condition, a, b),
        torch.where(condition, zero if ai is None else ai, zero if bi is None else bi),
    )


@_rule(Tensor.where)
def _where_method(input: Any, condition: Any, other: Any) -> Tensor:
    return _where(condition, input, other)


@_rule(Tensor.masked_fill)
def _masked_fill(x: Any, mask: Tensor, value: Any) -> Tensor:
    _no_planes("masked_fill", mask=mask, value=value)
    return planes(x.re.masked_fill(mask, value), x.im.masked_fill(mask, 0.0))


@_rule(F.pad)
def _pad(input: Any, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    x, xi = split(input)
    return planes(F.pad(x, pad, mode, value), F.pad(xi, pad, mode, None if mode != "constant" else 0.0))


# --------------------------------------------------------------------------------------------------------
# elementwise nonlinearities: (f(a), a' f'(a)) via differentiable aten backward kernels, or exact complex
# --------------------------------------------------------------------------------------------------------
def _elementwise(
    x: Any,
    f: Callable[[Tensor], Tensor],
    tangent: Callable[[Tensor, Tensor, Tensor], Tensor],
    fc: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    if not isinstance(x, Planes):
        raise NotImplementedError("complex-step elementwise rule called without a complex operand")
    if _EXACT and fc is not None:
        return _from_c(fc(torch.complex(x.re, x.im)))
    y = f(x.re)
    return planes(y, tangent(x.im, x.re, y))


@_rule(torch.tanh, Tensor.tanh, F.tanh)
def _tanh(x: Any) -> Tensor:
    return _elementwise(x, torch.tanh, lambda ai, a, y: aten.tanh_backward(ai, y), torch.tanh)


@_rule(torch.sigmoid, Tensor.sigmoid, F.sigmoid, torch.special.expit)
def _sigmoid(x: Any) -> Tensor:
    return _elementwise(x, torch.sigmoid, lambda ai, a, y: aten.sigmoid_backward(ai, y), torch.sigmoid)


@_rule(torch.exp, Tensor.exp)
def _exp(x: Any) -> Tensor:
    return _elementwise(x, torch.exp, lambda ai, a, y: ai * y, torch.exp)


@_rule(torch.log, Tensor.log)
def _log(x: Any) -> Tensor:
    return _elementwise(x, torch.log, lambda ai, a, y: ai / a, torch.log)


@_rule(torch.sqrt, Tensor.sqrt)
def _sqrt(x: Any) -> Tensor:
    return _elementwise(x, torch.sqrt, lambda ai, a, y: ai / (2 * y), torch.sqrt)


@_rule(torch.rsqrt, Tensor.rsqrt)
def _rsqrt(x: Any) -> Tensor:
    return _elementwise(x, torch.rsqrt, lambda ai, a, y: -0.5 * ai * y * y * y, torch.rsqrt)


@_rule(torch.abs, Tensor.abs, Tensor.__abs__, torch.absolute)
def _abs(x: Any) -> Tensor:
    # complexify convention abs(z) = z·sign(Re z), exact as well; abs'(0) = 0 as in autograd
    return _elementwise(x, torch.abs, lambda ai, a, y: ai * torch.sign(a), None)


@_rule(torch.relu, Tensor.relu, F.relu)
def _relu(input: Any, inplace: bool = False) -> Tensor:
    # relu(z) = z·1[Re z > 0]: relu'(0) = 0, PyTorch's convention (threshold_backward)
    out = _elementwise(input, torch.relu, lambda ai, a, y: aten.threshold_backward(ai, y, 0), None)
    return _rebind(input, out) if inplace else out


@_rule(torch.relu_, Tensor.relu_, F.relu_)
def _relu_(input: Any) -> Tensor:
    return _rebind(input, _relu(input))


@_rule(F.leaky_relu)
def _leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    out = _elementwise(
        input,
        lambda a: F.leaky_relu(a, negative_slope),
        lambda ai, a, y: aten.leaky_relu_backward(ai, a, negative_slope, False),
        None,
    )
    return _rebind(input, out) if inplace else out


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_c(z: Tensor) -> Tensor:
    return 0.5 * z * (1 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))


@_rule(F.gelu)
def _gelu(input: Any, approximate: str = "none") -> Tensor:
    return _elementwise(
        input,
        lambda a: F.gelu(a, approximate=approximate),
        lambda ai, a, y: aten.gelu_backward(ai, a, approximate=approximate),
        _gelu_tanh_c if approximate == "tanh" else None,  # no complex erf in PyTorch: dual rule for "none"
    )


@_rule(F.silu)
def _silu(input: Any, inplace: bool = False) -> Tensor:
    def tangent(ai: Tensor, a: Tensor, y: Tensor) -> Tensor:
        s = torch.sigmoid(a)  # written out: aten.silu_backward has no derivative
        return ai * (s * (1 + a * (1 - s)))

    out = _elementwise(input, F.silu, tangent, lambda z: z * torch.sigmoid(z))
    return _rebind(input, out) if inplace else out


@_rule(F.softplus)
def _softplus(input: Any, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    def exact(z: Tensor) -> Tensor:
        lin = z.real * beta > threshold
        u = torch.where(lin, torch.zeros_like(z), z * beta)
        return torch.where(lin, z, torch.log1p(torch.exp(u)) / beta)

    return _elementwise(
        input,
        lambda a: F.softplus(a, beta, threshold),
        lambda ai, a, y: aten.softplus_backward(ai, a, beta, threshold),
        exact,
    )


# --------------------------------------------------------------------------------------------------------
# max / min / clamp (branches on the real plane; tie conventions of PyTorch's backward formulas)
# --------------------------------------------------------------------------------------------------------
def _zero_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _binary_extremum(x: Any, y: Any, take_first: Callable[[Tensor, Tensor], Tensor], f: Callable[..., Tensor]) -> Tensor:
    (a, ai), (b, bi) = split(x), split(y)
    out = f(a, b)
    ai, bi = _zero_if_none(ai, a), _zero_if_none(bi, b if isinstance(b, Tensor) else a)
    im = torch.where(take_first(a, b), ai, torch.where(a == b, 0.5 * (ai + bi), bi))
    return planes(out, im)


@_rule(torch.maximum, Tensor.maximum, torch.fmax)
def _maximum(x: Any, y: Any) -> Tensor:
    return _binary_extremum(x, y, torch.gt, torch.maximum)


@_rule(torch.minimum, Tensor.minimum, torch.fmin)
def _minimum(x: Any, y: Any) -> Tensor:
    return _binary_extremum(x, y, torch.lt, torch.minimum)


def _extremum(kind: str) -> Callable[..., Any]:
    fn = torch.max if kind == "max" else torch.min
    binary = _maximum if kind == "max" else _minimum
    ret = torch.return_types.max if kind == "max" else torch.return_types.min

    def rule(x: Any, dim: Any = None, keepdim: bool = False) -> Any:
        if isinstance(dim, Tensor):  # torch.max(a, b)
            return binary(x, dim)
        a, ai = split(x)
        if dim is None:  # full reduction: ties share the tangent evenly
            y = fn(a)
            mask = (a == y).to(a.dtype)
            return planes(y, (ai * mask).sum() / mask.sum())
        values, idx = fn(a, dim, keepdim)
        im = ai.gather(dim, idx if keepdim else idx.unsqueeze(dim))
        return ret((planes(values, im if keepdim else im.squeeze(dim)), idx))

    return rule


_RULES[torch.max] = _RULES[Tensor.max] = _extremum("max")
_RULES[torch.min] = _RULES[Tensor.min] = _extremum("min")


def _amax_rule(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def rule(x: Any, dim: Any = (), keepdim: bool = False) -> Tensor:
        a, ai = split(x)
        y = f(a, dim, True)
        mask = (a == y).to(a.dtype)
        dims = tuple(range(a.dim())) if dim in ((), []) else dim
        im = (ai * mask).sum(dims, keepdim=True) / mask.sum(dims, keepdim=True)
        if not keepdim:
            return planes(f(a, dim, False), im.reshape(f(a, dim, False).shape))
        return planes(y, im)

    return rule


_RULES[torch.amax] = _RULES[Tensor.amax] = _amax_rule(torch.amax)
_RULES[torch.amin] = _RULES[Tensor.amin] = _amax_rule(torch.amin)


@_rule(torch.clamp, Tensor.clamp, torch.clip, Tensor.clip)
def _clamp(x: Any, min: Any = None, max: Any = None) -> Tensor:
    (a, ai), (lo, loi), (hi, hii) = split(x), split(min), split(max)
    y = torch.clamp(a, lo, hi)
    ai = _zero_if_none(ai, a)
    keep = torch.ones_like(a, dtype=torch.bool)
    if lo is not None:
        keep = keep & (a >= lo)
    if hi is not None:
        keep = keep & (a <= hi)
    im = torch.where(keep, ai, 0.0)
    # tangents of complex bounds (PyTorch's clamp_backward_min_max: min where a < min < max, max where a > max or max < min)
    if loi is not None:
        sel = a < lo if hi is None else (a < lo) & (lo < hi)
        im = im + torch.where(sel, loi, 0.0)
    if hii is not None:
        sel = a > hi if lo is None else (a > hi) | (hi < lo)
        im = im + torch.where(sel, hii, 0.0)
    return planes(y, im)


@_rule(torch.clamp_min, Tensor.clamp_min)
def _clamp_min(x: Any, min: Any) -> Tensor:
    return _clamp(x, min, None)


@_rule(torch.clamp_max, Tensor.clamp_max)
def _clamp_max(x: Any, max: Any) -> Tensor:
    return _clamp(x, None, max)


# --------------------------------------------------------------------------------------------------------
# pooling, dropout
# --------------------------------------------------------------------------------------------------------
def _max_pool_rule(with_indices: Callable[..., Any], nd: int) -> Callable[..., Any]:
    def rule(
        input: Any,
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
    ) -> Any:
        a, ai = split(input)
        y, idx = with_indices(a, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        # the tangent at the argmax of the real plane (indices are flat over the last nd dims)
        im = ai.flatten(-nd).gather(-1, idx.flatten(-nd)).reshape(y.shape)
        out = planes(y, im)
        return (out, idx) if return_indices else out

    return rule


for _f in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d):
    _RULES[_f] = _max_pool_rule(F.max_pool2d_with_indices, 2)
for _f in (F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d):
    _RULES[_f] = _max_pool_rule(F.max_pool1d_with_indices, 1)


@_rule(F.dropout)
def _dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    if not training or p == 0.0:
        return input
    a, ai = split(input)
    mask = F.dropout(torch.ones_like(a), p, True)  # the same RNG draws as F.dropout(a): one mask, both planes
    out = planes(a * mask, ai * mask)
    return _rebind(input, out) if inplace else out


# --------------------------------------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------------------------------------
def _norm_tangent(a: Tensor, ai: Tensor | None, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor | None]:
    r"""``n = (a - mean)·r`` with ``r = rsqrt(var + eps)`` (biased var over ``dims``) and its tangent
    :math:`n' = r\,(c' - n\,\overline{n c'})`, :math:`c' = a' - \overline{a'}` (all differentiable in ``a``)."""
    mu = a.mean(dims, keepdim=True)
    var = a.var(dims, correction=0, keepdim=True)
    r = torch.rsqrt(var + eps)
    n = (a - mu) * r
    if ai is None:
        return n, None
    c = ai - ai.mean(dims, keepdim=True)
    return n, r * (c - n * (n * c).mean(dims, keepdim=True))


def _norm_exact(z: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    c = z - z.mean(dims, keepdim=True)
    return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)  # no conjugation: the analytic extension


def _affine_c(n: Tensor, wc: Any, bc: Any) -> Tensor:
    out = n if wc is None else n * wc
    return out if bc is None else out + bc


def _affine_im(n: Tensor, ni: Tensor | None, w: Tensor | None, wi: Tensor | None, bi: Tensor | None) -> Tensor | None:
    return _sum(None if ni is None else (ni if w is None else ni * w), None if wi is None else n * wi, bi)


@_rule(F.layer_norm)
def _layer_norm(input: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Tensor:
    (a, ai), (w, wi), (b, bi) = split(input), split(weight), split(bias)
    dims = tuple(range(-len(normalized_shape), 0))
    if _EXACT:
        n = _norm_exact(_cx(a, ai), dims, eps)
        return _from_c(_affine_c(n, _cx(w, wi), _cx(b, bi)))
    n, ni = _norm_tangent(a, ai, dims, eps)
    return planes(F.layer_norm(a, normalized_shape, w, b, eps), _affine_im(n, ni, w, wi, bi))


@_rule(F.rms_norm)
def _rms_norm(input: Any, normalized_shape: Sequence[int], weight: Any = None, eps: float | None = None) -> Tensor:
    (a, ai), (w, wi) = split(input), split(weight)
    dims = tuple(range(-len(normalized_shape), 0))
    e = torch.finfo(a.dtype).eps if eps is None else eps
    if _EXACT:
        z = _cx(a, ai)
        n = z * torch.rsqrt((z * z).mean(dims, keepdim=True) + e)
        return _from_c(n * _cx(w, wi) if w is not None else n)
    r = torch.rsqrt((a * a).mean(dims, keepdim=True) + e)
    n = a * r
    ni = None if ai is None else r * (ai - n * (n * ai).mean(dims, keepdim=True))
    return planes(F.rms_norm(a, normalized_shape, w, eps), _affine_im(n, ni, w, wi, None))


@_rule(F.batch_norm)
def _batch_norm(
    input: Any,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    _no_planes("F.batch_norm", running_mean=running_mean, running_var=running_var)
    (a, ai), (w, wi), (b, bi) = split(input), split(weight), split(bias)
    shape = [1, -1] + [1] * (a.dim() - 2)
    v = lambda t: None if t is None else t.reshape(shape)  # noqa: E731
    if training:
        dims = [0] + list(range(2, a.dim()))
        if _EXACT:
            if running_mean is not None:  # advance the running statistics once, from the real plane
                F.batch_norm(a.detach(), running_mean, running_var, None, None, True, momentum, eps)
            n = _norm_exact(_cx(a, ai), dims, eps)
            return _from_c(_affine_c(n, _cx(v(w), v(wi)), _cx(v(b), v(bi))))
        y = F.batch_norm(a, running_mean, running_var, w, b, True, momentum, eps)  # updates the stats once
        n, ni = _norm_tangent(a, ai, dims, eps)
        return planes(y, _affine_im(n, ni, v(w), v(wi), v(bi)))
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm in eval mode needs running_mean and running_var")
    r = torch.rsqrt(running_var + eps).reshape(shape)
    n = (a - running_mean.reshape(shape)) * r
    if _EXACT:
        nc = (_cx(a, ai) - running_mean.reshape(shape)) * r
        return _from_c(_affine_c(nc, _cx(v(w), v(wi)), _cx(v(b), v(bi))))
    y = F.batch_norm(a, running_mean, running_var, w, b, False, momentum, eps)
    return planes(y, _affine_im(n, None if ai is None else ai * r, v(w), v(wi), v(bi)))


# --------------------------------------------------------------------------------------------------------
# softmax and losses
# --------------------------------------------------------------------------------------------------------
def _softmax_dim(dim: int | None, ndim: int) -> int:
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1  # F._get_softmax_dim's legacy rule


def _log_softmax_exact(z: Tensor, dim: int) -> Tensor:
    m = z.real.amax(dim, keepdim=True).detach()  # the shift cancels exactly; taken on the real part
    s = z - m
    return s - torch.log(torch.exp(s).sum(dim, keepdim=True))


def _softmax_impl(x: Any, dim: int | None, dtype: torch.dtype | None, log: bool) -> Tensor:
    a, ai = split(x)
    d = _softmax_dim(dim, a.dim())
    if dtype is not None:
        a, ai = a.to(dtype), None if ai is None else ai.to(dtype)
    if _EXACT:
        ls = _log_softmax_exact(_cx(a, ai), d)
        return _from_c(ls if log else torch.exp(ls))
    if log:
        y = F.log_softmax(a, d)
        s = torch.exp(y)
        return planes(y, ai - (s * ai).sum(d, keepdim=True))
    y = F.softmax(a, d)
    return planes(y, y * (ai - (y * ai).sum(d, keepdim=True)))


@_rule(F.softmax)
def _softmax_f(input: Any, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    return _softmax_impl(input, dim, dtype, log=False)


@_rule(F.log_softmax)
def _log_softmax_f(input: Any, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    return _softmax_impl(input, dim, dtype, log=True)


@_rule(torch.softmax, Tensor.softmax)
def _softmax_t(input: Any, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    return _softmax_impl(input, dim, dtype, log=False)


@_rule(torch.log_softmax, Tensor.log_softmax)
def _log_softmax_t(input: Any, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    return _softmax_impl(input, dim, dtype, log=True)


def _reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as _r

        return _r.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _reduce(t: Tensor, reduction: str) -> Tensor:
    return t.mean() if reduction == "mean" else (t.sum() if reduction == "sum" else t)


@_rule(F.nll_loss)
def _nll_loss(
    input: Any,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
) -> Tensor:
    _no_planes("F.nll_loss", target=target, weight=weight)
    red = _reduction(size_average, reduce, reduction)
    a, ai = split(input)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=red)
    return planes(F.nll_loss(a, target, **kw), F.nll_loss(ai, target, **kw))


@_rule(F.cross_entropy)
def _cross_entropy(
    input: Any,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""``Im = nll_loss(a' - Σ softmax(a)·a')``: the tangent of log-softmax, reduced like the loss."""
    _no_planes("F.cross_entropy", target=target, weight=weight)
    if label_smoothing != 0.0:
        raise NotImplementedError("no complex-step rule for F.cross_entropy with label_smoothing != 0")
    if target.is_floating_point():
        raise NotImplementedError("no complex-step rule for F.cross_entropy with probability (floating-point) targets")
    red = _reduction(size_average, reduce, reduction)
    a, ai = split(input)
    cdim = 1 if a.dim() >= 2 else 0
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=red)
    if _EXACT:
        ls = _log_softmax_exact(_cx(a, ai), cdim)
        return planes(F.nll_loss(ls.real, target, **kw), F.nll_loss(ls.imag, target, **kw))
    ls_im = ai - (torch.softmax(a, cdim) * ai).sum(cdim, keepdim=True)
    return planes(F.cross_entropy(a, target, **kw), F.nll_loss(ls_im, target, **kw))


@_rule(F.binary_cross_entropy_with_logits)
def _bce_with_logits(
    input: Any,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    reduce: Any = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""``Im = reduce(w·(σ(a) − t)·a')``; exact: :math:`m + \log(e^{-m} + e^{z-m}) - tz` with ``m = max(Re z, 0)``."""
    _no_planes("F.binary_cross_entropy_with_logits", target=target, weight=weight)
    if pos_weight is not None:
        raise NotImplementedError("no complex-step rule for F.binary_cross_entropy_with_logits with pos_weight")
    red = _reduction(size_average, reduce, reduction)
    a, ai = split(input)
    if _EXACT:
        z = _cx(a, ai)
        m = a.clamp_min(0).detach()
        loss = m + torch.log(torch.exp(-m) + torch.exp(z - m)) - target * z
        return _from_c(_reduce(loss if weight is None else loss * weight, red))
    el = (torch.sigmoid(a) - target) * ai
    if weight is not None:
        el = el * weight
    return planes(F.binary_cross_entropy_with_logits(a, target, weight, reduction=red), _reduce(el, red))


@_rule(F.mse_loss)
def _mse_loss(
    input: Any, target: Any, size_average: Any = None, reduce: Any = None, reduction: str = "mean", weight: Tensor | None = None
) -> Tensor:
    r"""``Im = reduce(2(a − t)(a' − t'))``; exact: ``reduce((d + id')²)``."""
    if weight is not None:
        raise NotImplementedError("no complex-step rule for F.mse_loss with weight")
    red = _reduction(size_average, reduce, reduction)
    (a, ai), (t, ti) = split(input), split(target)
    d = a - t
    di = ai if ti is None else (ti * -1 if ai is None else ai - ti)
    if _EXACT:
        dc = _cx(d, di)
        return _from_c(_reduce(dc * dc, red))
    return planes(F.mse_loss(a, t, reduction=red), _reduce(2 * d * di, red))
