r"""Curvature-vector products of a model's loss: Hessian (complex step or double backward) and GGN.

For a model :math:`f_\theta`, a batch :math:`(x, y)` and a scalar loss :math:`L(\theta) = \ell(f_\theta(x), y)`,
and a direction :math:`v` (one tensor per trainable parameter):

* ``method="complex-step"`` (default): :math:`Hv = \frac1h \nabla_\theta\,\mathrm{Im}\,L(\theta + ihv)`, the
  model run on real/imaginary planes (:mod:`fastcurv.complex_step`) and one *real* backward pass of
  :math:`\mathrm{Im}\,L` to the real parameters (never complex leaves: their conjugate-Wirtinger gradient
  would give :math:`-Hv`). In the default dual arithmetic :math:`h` is a pure scale (``h=None`` → 1.0);
  ``exact=True`` runs the textbook complex step in exact complex arithmetic (``h=None`` → 1e-20) for
  validation. ~2.4× a gradient; compiles with ``torch.compile(fullgraph=True)``; no double backward.
* ``method="double-backward"``: Pearlmutter's trick in reverse-over-reverse form,
  :math:`Hv = \nabla_\theta (\nabla_\theta L \cdot v)`. Works for any twice-differentiable model
  (the fallback for ops without a complex-step rule); cannot be compiled (aot_autograd has no double
  backward).
* ``method="ggn"``: the generalized Gauss–Newton product :math:`Gv = J^\top H_\ell J v` with
  :math:`J = \partial f/\partial\theta` and :math:`H_\ell = \partial^2\ell/\partial f^2`: a JVP
  (:math:`Jv`, the imaginary plane of the complex-step forward, or ``torch.autograd.forward_ad``), the
  loss Hessian (:func:`fastcurv.losses.hessian_vp`: analytic for cross-entropy/softmax, BCE-with-logits and
  MSE, by autograd for any other loss), and one VJP. Positive semi-definite whenever :math:`\ell` is convex in :math:`f`.

Every function leaves the model exactly as it found it: parameters (swapped only inside
``torch.func.functional_call``), their ``.grad`` (only ``torch.autograd.grad`` is used, never
``.backward()``), all buffers (the forwards run on copies of them, so a train-mode BatchNorm advances the
copies' running statistics and ``num_batches_tracked``; the model's own buffer tensors are never written,
so graphs that saved them stay differentiable) and the global RNG state (CPU and the
parameters' CUDA devices are forked, so a train-mode dropout mask drawn here is the one the *next* forward
will draw, and a training run is bit-identical with or without curvature products). Pass
``preserve_state=False`` to skip this (e.g. inside ``torch.compile``, where it is skipped automatically).

Scaled dot-product attention runs on its math backend inside every product (the fused flash and
memory-efficient kernels have no double backward or forward-mode rule), so transformers need no
``sdpa_kernel`` context from the caller.

Forward and losses run in train or eval mode as the model is set; all methods see the same function
(train-mode BatchNorm uses batch statistics, so its Hessian couples the samples of the batch).

Compiling: ``torch.compile(fullgraph=True)`` of a function calling :func:`hvp` (complex step, or the GGN
with ``jvp="planes"``) gives one graph with no break once ``torch._dynamo.config.trace_autograd_ops = True``
(otherwise each ``torch.autograd.grad`` is a graph break). Inside compiled code the buffers are still
restored but the RNG is not forked (Dynamo cannot trace ``fork_rng``), and Inductor's RNG differs from
eager's for train-mode dropout (``torch._inductor.config.fallback_random = True`` makes them agree).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv import complex_step as cs
from fastcurv import losses as _losses

__all__ = [
    "METHODS",
    "hvp",
    "grad_and_hvp",
    "ggn_vp",
    "hvp_many",
    "block_ggn_vp",
    "loss_hessian_vp",
]

METHODS = ("complex-step", "double-backward", "ggn")
_JVP_MODES = ("planes", "forward-ad")

LossFn = Callable[[Any, Any], Tensor]


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------
def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_batch(batch: object) -> tuple[Any, Any]:
    if isinstance(batch, Tensor) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError(
            f"batch must be a pair (inputs, targets) with loss_fn(model(inputs), targets) a scalar, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, Sequence) and not isinstance(batch, Tensor) else "")
        )
    return batch[0], batch[1]


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _check_h(h: object, exact: bool) -> float:
    if h is None:
        return 1e-20 if exact else 1.0
    if isinstance(h, bool) or not isinstance(h, (int, float)):
        raise TypeError(f"h must be a positive float or None, got {type(h).__name__}")
    f = float(h)
    if not (math.isfinite(f) and f > 0.0):
        raise ValueError(f"h must be a positive finite float, got {h}")
    return f


def _trainable(model: nn.Module, params: Sequence[Tensor] | None, what: str = "params") -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the trainable parameters (``requires_grad``), or of the given subset, in order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return [n for n, _ in named], [p for _, p in named]
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"{what} must be a list of the model's parameters, got {type(params).__name__}")
    by_id = {id(p): n for n, p in named}
    names, seen = [], set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or id(p) not in by_id:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"{what}[{i}] ({shape}) is not a trainable parameter (requires_grad=True) of the model")
        if id(p) in seen:
            raise ValueError(f"{what}[{i}] ({by_id[id(p)]}) appears twice")
        seen.add(id(p))
        names.append(by_id[id(p)])
    return names, list(params)


def _check_vectors(vectors: object, names: Sequence[str], params: Sequence[Tensor], what: str = "vectors") -> list[Tensor]:
    if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence):
        raise TypeError(
            f"{what} must be a list of tensors aligned with the trainable parameters ({len(params)}), "
            f"got {type(vectors).__name__}"
        )
    if len(vectors) != len(params):
        raise ValueError(
            f"{what} has {len(vectors)} tensors but there are {len(params)} parameters to match "
            f"({', '.join(names[:6])}{', …' if len(names) > 6 else ''})"
        )
    out = []
    for i, (n, p, v) in enumerate(zip(names, params, vectors)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{what}[{i}] must be a tensor, got {type(v).__name__}")
        if v.shape != p.shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(v.shape)} but parameter {n!r} has shape {tuple(p.shape)}")
        if v.dtype != p.dtype:
            raise TypeError(f"{what}[{i}] has dtype {v.dtype} but parameter {n!r} is {p.dtype}")
        if v.device != p.device:
            raise ValueError(f"{what}[{i}] is on {v.device} but parameter {n!r} is on {p.device}")
        out.append(v.detach())
    return out


def _scalar_loss(loss: object) -> None:
    re, _ = cs.split(loss)
    if not isinstance(re, Tensor) or re.numel() != 1:
        shape = tuple(re.shape) if isinstance(re, Tensor) else type(re).__name__
        raise ValueError(f"loss_fn(model(inputs), targets) must return a scalar tensor, got {shape}")


def _fill(grads: Sequence[Tensor | None], params: Sequence[Tensor], scale: float = 1.0) -> list[Tensor]:
    return [
        torch.zeros_like(p) if g is None else (g if scale == 1.0 else g / scale) for g, p in zip(grads, params)
    ]


# --------------------------------------------------------------------------------------------------------
# state preservation
# --------------------------------------------------------------------------------------------------------
def _cuda_devices(params: Sequence[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _get_rng(devices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state: tuple[Tensor, list[Tensor]], devices: Sequence[int]) -> None:
    torch.random.set_rng_state(state[0])
    for d, st in zip(devices, state[1]):
        torch.cuda.set_rng_state(st, d)


def _attention_math() -> contextlib.AbstractContextManager[None]:
    """Scaled dot-product attention on the composite (math) backend: the fused CPU/GPU kernels (flash,
    memory-efficient, cuDNN) have no double backward and no forward-mode rule, which every curvature
    product here needs; the math backend is built from differentiable ops."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def _preserved(model: nn.Module, params: Sequence[Tensor], enabled: bool) -> Iterator[None]:
    """Run with every buffer swapped for a copy and the RNG forked (CPU + the parameters' CUDA devices).

    The forwards inside see (and a train-mode BatchNorm advances) the copies; on exit the model's own buffer
    tensors are put back, never written. Copying the saved values back into them instead would bump their
    version counters, and autograd then refuses any graph that saved them (an eval-mode BatchNorm's running
    statistics, the ``position_ids`` a transformer indexes with): the caller's own loss graph, or the graph a
    curvature operator builds here and differentiates after the block. Inside ``torch.compile`` (which
    cannot trace the swap) the values are copied back as before. Attention runs on the math backend
    (:func:`_attention_math`)."""
    if not enabled:
        with torch.enable_grad(), _attention_math():
            yield
        return
    devices = _cuda_devices(params)
    if torch.compiler.is_compiling():
        # torch.compile cannot trace fork_rng: compiled callers get the buffers restored but not the RNG
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            with torch.enable_grad():
                yield
        finally:
            with torch.no_grad():
                for b, s in saved:
                    b.copy_(s)
        return
    owners = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    copies: dict[int, Tensor] = {}
    for _, _, b in owners:
        if id(b) not in copies:  # a buffer shared by two modules stays shared
            copies[id(b)] = b.detach().clone()
    try:
        for m, n, b in owners:
            m._buffers[n] = copies[id(b)]
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _attention_math():
            yield
    finally:
        for m, n, b in owners:
            m._buffers[n] = b


# --------------------------------------------------------------------------------------------------------
# the three products
# --------------------------------------------------------------------------------------------------------
def _complex_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    names: Sequence[str],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    h: float,
    exact: bool,
    want_grad: bool,
) -> tuple[Tensor, list[Tensor] | None, list[Tensor]]:
    tangents = {n: (v if h == 1.0 else v * h) for n, v in zip(names, vectors)}
    mode = cs.exact_arithmetic(True) if exact else contextlib.nullcontext()
    with mode:
        out = cs.functional_forward(model, tangents, (inputs,))
        loss = loss_fn(out, targets)
    _scalar_loss(loss)
    re, im = cs.split(loss)
    if im is None or not im.requires_grad:
        hv = [torch.zeros_like(p) for p in params]
    else:
        hv = _fill(torch.autograd.grad(im, params, allow_unused=True, retain_graph=want_grad), params, h)
    grad = None
    if want_grad:
        grad = _fill(torch.autograd.grad(re, params, allow_unused=True) if re.requires_grad else [None] * len(params), params)
    return re.detach().reshape(()), grad, hv


def _double_backward(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    params: Sequence[Tensor],
    vector_sets: Sequence[Sequence[Tensor]],
) -> tuple[Tensor, list[Tensor], list[list[Tensor]]]:
    loss = loss_fn(model(inputs), targets)
    _scalar_loss(loss)
    if not loss.requires_grad:
        zeros = [torch.zeros_like(p) for p in params]
        return loss.detach().reshape(()), zeros, [list(zeros) for _ in vector_sets]
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    results = []
    for k, vs in enumerate(vector_sets):
        if not live:
            results.append([torch.zeros_like(p) for p in params])
            continue
        hv = torch.autograd.grad(
            [g[i] for i in live],
            params,
            grad_outputs=[vs[i] for i in live],
            allow_unused=True,
            retain_graph=k < len(vector_sets) - 1,
        )
        results.append(_fill(hv, params))
    return loss.detach().reshape(()), _fill([None if gi is None else gi.detach() for gi in g], params), results


def _jvp_forward(
    model: nn.Module, inputs: Any, names: Sequence[str], params: Sequence[Tensor], vectors: Sequence[Tensor], jvp: str
) -> tuple[Tensor, Tensor | None]:
    """The model output (with its autograd graph to the parameters) and :math:`Jv` (detached)."""
    if jvp == "planes":
        out = cs.functional_forward(model, dict(zip(names, vectors)), (inputs,))
        o, jv = cs.split(out)
    else:
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, v) for n, p, v in zip(names, params, vectors)}
            out = torch.func.functional_call(model, duals, (inputs,))
            if not isinstance(out, Tensor):
                raise TypeError(f"ggn_vp needs the model to return a tensor, got {type(out).__name__}")
            o, jv = fwAD.unpack_dual(out)
    if not isinstance(o, Tensor):
        raise TypeError(f"ggn_vp needs the model to return a tensor, got {type(o).__name__}")
    return o, None if jv is None else jv.detach()


def _ggn(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    names: Sequence[str],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    jvp: str,
    want_grad: bool,
) -> tuple[Tensor, list[Tensor] | None, list[Tensor]]:
    o, jv = _jvp_forward(model, inputs, names, params, vectors, jvp)
    loss = loss_fn(o, targets)
    _scalar_loss(loss)
    grad = None
    if want_grad:
        g = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) if loss.requires_grad else [None] * len(params)
        grad = _fill(g, params)
    if jv is None or not o.requires_grad:
        return loss.detach().reshape(()), grad, [torch.zeros_like(p) for p in params]
    hjv = loss_hessian_vp(loss_fn, o.detach(), targets, jv)
    gv = torch.autograd.grad(o, params, grad_outputs=hjv, allow_unused=True)
    return loss.detach().reshape(()), grad, _fill(gv, params)


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------
def _run(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    vectors: Sequence[Tensor],
    method: str,
    h: float | None,
    exact: bool,
    params: Sequence[Tensor] | None,
    jvp: str,
    preserve_state: bool,
    want_grad: bool,
) -> tuple[Tensor, list[Tensor] | None, list[Tensor]]:
    model = _check_model(model)
    method = _check_method(method)
    inputs, targets = _check_batch(batch)
    names, ps = _trainable(model, params)
    vs = _check_vectors(vectors, names, ps)
    if exact and method != "complex-step":
        raise ValueError(f"exact=True applies to method='complex-step' only, got method={method!r}")
    if h is not None and method != "complex-step":
        raise ValueError(f"h applies to method='complex-step' only, got method={method!r}")
    hh = _check_h(h, exact)
    if jvp not in _JVP_MODES:
        raise ValueError(f"jvp must be one of {_JVP_MODES}, got {jvp!r}")
    with _preserved(model, ps, preserve_state):
        if method == "complex-step":
            return _complex_step(model, loss_fn, inputs, targets, names, ps, vs, hh, exact, want_grad)
        if method == "double-backward":
            loss, grad, cvs = _double_backward(model, loss_fn, inputs, targets, ps, [vs])
            return loss, grad, cvs[0]
        return _ggn(model, loss_fn, inputs, targets, names, ps, vs, jvp, want_grad)


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    vectors: Sequence[Tensor],
    *,
    method: str = "complex-step",
    h: float | None = None,
    exact: bool = False,
    params: Sequence[Tensor] | None = None,
    jvp: str = "planes",
    preserve_state: bool = True,
) -> list[Tensor]:
    r"""Curvature-vector product :math:`Hv` (or :math:`Gv` for ``method="ggn"``) of
    :math:`L(\theta) = \text{loss\_fn}(\text{model}(x), y)` at the model's current parameters.

    Args:
        model: any ``nn.Module``; for the complex step every op of its forward (and of ``loss_fn``) needs a
            rule in :mod:`fastcurv.complex_step` (others raise ``NotImplementedError`` naming the op).
        loss_fn: ``loss_fn(model(inputs), targets)`` must return a scalar tensor.
        batch: ``(inputs, targets)``.
        vectors: one tensor per parameter of ``params`` (default: ``[p for p in model.parameters() if
            p.requires_grad]``), same shapes, dtypes and devices.
        method: ``"complex-step"`` (default), ``"double-backward"`` or ``"ggn"`` (see the module doc).
        h: complex-step scale; default 1.0 (dual arithmetic: any ``h`` gives the same product up to
            rounding, and 1.0 never underflows) or 1e-20 with ``exact=True``.
        exact: complex step in exact complex arithmetic (validation; :math:`O(h^2)` error).
        params: a subset :math:`S` of the trainable parameters: returns the diagonal block
            :math:`C_{SS} v_S` of the curvature restricted to them (block-diagonal methods).
        jvp: for ``"ggn"``, how :math:`Jv` is computed: ``"planes"`` (the dual-number forward of
            :mod:`fastcurv.complex_step`; compiles; supports train-mode BatchNorm) or ``"forward-ad"``
            (``torch.autograd.forward_ad``: any op with a forward-mode formula).
        preserve_state: restore buffers and the RNG afterwards (see the module doc).

    Returns:
        A list aligned with ``params``/``vectors``, same shapes; parameters without influence get zeros.

    Raises:
        TypeError / ValueError: a wrong model, batch, method, ``h``, parameter subset, or number, shape, dtype
            or device of ``vectors`` (before any computation).
        NotImplementedError: (complex step) an op without a complex-step rule, named in the message.
    """
    return _run(model, loss_fn, batch, vectors, method, h, exact, params, jvp, preserve_state, False)[2]


def grad_and_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    vectors: Sequence[Tensor],
    *,
    method: str = "complex-step",
    h: float | None = None,
    exact: bool = False,
    params: Sequence[Tensor] | None = None,
    jvp: str = "planes",
    preserve_state: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    r"""``(L, ∇L, Cv)`` from one pass: the loss (detached 0-d tensor), its gradient and a curvature product.

    ``C`` is the Hessian (``method="complex-step"`` or ``"double-backward"``) or the GGN (``"ggn"``). The
    gradient comes almost free: with the complex step it is the backward of the real plane
    (:math:`\mathrm{Re}\,L = L` in dual arithmetic), a second backward pass on the same graph with no
    extra forward; with double backward it is the first backward; with the GGN it is the backward of the
    same forward. Arguments as in :func:`hvp`; both lists are aligned with ``params``.
    """
    loss, grad, cv = _run(model, loss_fn, batch, vectors, method, h, exact, params, jvp, preserve_state, True)
    assert grad is not None
    return loss, grad, cv


def ggn_vp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    vectors: Sequence[Tensor],
    *,
    params: Sequence[Tensor] | None = None,
    jvp: str = "planes",
    preserve_state: bool = True,
) -> list[Tensor]:
    r"""GGN-vector product :math:`G_{SS} v = J_S^\top H_\ell J_S v` restricted to the parameters ``params``.

    :math:`J_S` is the Jacobian of the model output with respect to the parameters in ``params`` (default:
    all trainable ones) and :math:`H_\ell` the Hessian of ``loss_fn`` with respect to the output
    (:func:`loss_hessian_vp`). With ``params`` a layer's parameters this is that layer's diagonal block of
    the GGN, as block-diagonal Hessian-free needs. PSD for convex losses.
    """
    return hvp(model, loss_fn, batch, vectors, method="ggn", params=params, jvp=jvp, preserve_state=preserve_state)


def hvp_many(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    vector_sets: Sequence[Sequence[Tensor]],
    *,
    method: str = "complex-step",
    h: float | None = None,
    exact: bool = False,
    params: Sequence[Tensor] | None = None,
    preserve_state: bool = True,
) -> list[list[Tensor]]:
    r"""Several products :math:`[C v_1, \dots, C v_k]` with work shared where it is cheap.

    * ``"double-backward"``: one forward and one ``create_graph`` backward for all :math:`k` vectors, then one
      extra backward each.
    * ``"ggn"``: one forward; :math:`Jv_i` by the double-VJP trick (:math:`u \mapsto J^\top u` built once with
      ``create_graph``, differentiated w.r.t. ``u`` for each :math:`v_i`), then one VJP each — no extra forward.
    * ``"complex-step"``: one planes forward + backward per vector (the tangent enters the forward).

    Returns one list per vector set, each aligned with ``params``.
    """
    model = _check_model(model)
    method = _check_method(method)
    inputs, targets = _check_batch(batch)
    names, ps = _trainable(model, params)
    if isinstance(vector_sets, Tensor) or not isinstance(vector_sets, Sequence):
        raise TypeError(f"vector_sets must be a list of vector lists, got {type(vector_sets).__name__}")
    sets = [_check_vectors(vs, names, ps, f"vector_sets[{k}]") for k, vs in enumerate(vector_sets)]
    if exact and method != "complex-step":
        raise ValueError(f"exact=True applies to method='complex-step' only, got method={method!r}")
    if h is not None and method != "complex-step":
        raise ValueError(f"h applies to method='complex-step' only, got method={method!r}")
    hh = _check_h(h, exact)
    if not sets:
        return []
    with _preserved(model, ps, preserve_state):
        if method == "double-backward":
            return _double_backward(model, loss_fn, inputs, targets, ps, sets)[2]
        if method == "ggn":
            return _ggn_shared(model, loss_fn, inputs, targets, [ps] * len(sets), [list(range(len(ps)))] * len(sets), ps, sets)
        out = []
        devices = _cuda_devices(ps)
        for vs in sets:
            state = _get_rng(devices) if preserve_state else None
            out.append(_complex_step(model, loss_fn, inputs, targets, names, ps, vs, hh, exact, False)[2])
            if state is not None:  # every vector sees the same dropout mask
                _set_rng(state, devices)
        return out


def block_ggn_vp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Any],
    blocks: Sequence[Sequence[Tensor]],
    vectors: Sequence[Sequence[Tensor]],
    *,
    preserve_state: bool = True,
) -> list[list[Tensor]]:
    r"""The block-diagonal GGN applied blockwise: ``[G_bb v_b for b in blocks]`` from one forward.

    ``blocks`` are disjoint lists of trainable parameters (e.g. one per layer) and ``vectors[b]`` is
    aligned with ``blocks[b]``. :math:`J_b v_b` by the double-VJP trick on a shared graph, then
    :math:`J_b^\top H_\ell J_b v_b` by a VJP restricted to block ``b``. Equals
    ``ggn_vp(..., params=blocks[b])`` for each ``b``.
    """
    model = _check_model(model)
    inputs, targets = _check_batch(batch)
    if isinstance(blocks, Tensor) or not isinstance(blocks, Sequence):
        raise TypeError(f"blocks must be a list of parameter lists, got {type(blocks).__name__}")
    if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence) or len(vectors) != len(blocks):
        raise ValueError(f"vectors must hold one vector list per block ({len(blocks)} blocks)")
    all_names, all_ps = _trainable(model, None)
    index = {id(p): i for i, p in enumerate(all_ps)}
    subsets, idxs, sets, seen = [], [], [], set()
    for b, blk in enumerate(blocks):
        names, ps = _trainable(model, blk, f"blocks[{b}]")
        for n, p in zip(names, ps):
            if id(p) in seen:
                raise ValueError(f"blocks overlap: parameter {n!r} is in more than one block")
            seen.add(id(p))
        subsets.append(ps)
        idxs.append([index[id(p)] for p in ps])
        sets.append(_check_vectors(vectors[b], names, ps, f"vectors[{b}]"))
    with _preserved(model, all_ps, preserve_state):
        return _ggn_shared(model, loss_fn, inputs, targets, subsets, idxs, all_ps, sets)


def _ggn_shared(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    subsets: Sequence[Sequence[Tensor]],
    idxs: Sequence[Sequence[int]],
    all_ps: Sequence[Tensor],
    sets: Sequence[Sequence[Tensor]],
) -> list[list[Tensor]]:
    o = model(inputs)
    if not isinstance(o, Tensor):
        raise TypeError(f"the GGN needs the model to return a tensor, got {type(o).__name__}")
    _scalar_loss(loss_fn(o.detach(), targets))
    if not o.requires_grad:
        return [[torch.zeros_like(p) for p in ps] for ps in subsets]
    u = torch.zeros_like(o, requires_grad=True)
    jt_u = torch.autograd.grad(o, all_ps, grad_outputs=u, create_graph=True, allow_unused=True)  # J^T u, linear in u
    out = []
    for ps, ix, vs in zip(subsets, idxs, sets):
        live = [(jt_u[i], v) for i, v in zip(ix, vs) if jt_u[i] is not None]
        jv = None
        if live:
            jv = torch.autograd.grad(
                [a for a, _ in live], u, grad_outputs=[v for _, v in live], retain_graph=True, allow_unused=True
            )[0]
        if jv is None:
            out.append([torch.zeros_like(p) for p in ps])
            continue
        hjv = loss_hessian_vp(loss_fn, o.detach(), targets, jv.detach())
        out.append(_fill(torch.autograd.grad(o, ps, grad_outputs=hjv, retain_graph=True, allow_unused=True), ps))
    return out


# --------------------------------------------------------------------------------------------------------
# loss Hessian with respect to the model output
# --------------------------------------------------------------------------------------------------------
#: :math:`H_\ell u` (:func:`fastcurv.losses.hessian_vp`: analytic for the recognised torch losses, autograd
#: for any other)
loss_hessian_vp = _losses.hessian_vp
