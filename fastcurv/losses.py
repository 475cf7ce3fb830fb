r"""Losses: what the optimizers need to know about :math:`\ell(f, y)` as a function of the model output :math:`f`.

The one place that recognises losses; :mod:`fastcurv.hvp`, :class:`~fastcurv.optim.KFAC` (sampled Fisher),
:class:`~fastcurv.optim.ExactNewton` and :mod:`fastcurv.data` use it.

* :func:`describe`: the kind and reduction of a torch loss (``F.cross_entropy``/``nn.CrossEntropyLoss``,
  ``F.binary_cross_entropy_with_logits``/``nn.BCEWithLogitsLoss``, ``F.mse_loss``/``nn.MSELoss``); any other
  callable is ``"custom"`` with an unknown reduction.
* :func:`hessian_vp`: :math:`H_\ell u` with :math:`H_\ell = \partial^2\ell/\partial f^2` — analytic for the
  recognised losses with the options that have a rule, by autograd (double backward on the small loss graph)
  for everything else, so any twice-differentiable loss works.
* :func:`per_sample_hessians`: the diagonal blocks :math:`\partial^2 L/\partial f_n^2` (one per sample ``n``)
  of a loss :math:`L` that is a sum of per-sample terms, by autograd from :math:`\nabla_f L` built with
  ``create_graph=True``: one backward per output coordinate (cross-sample blocks vanish, so a unit vector
  repeated over the batch yields the same column of every block), or a single one when the loss is known to
  be elementwise (the blocks are diagonal).
* :func:`nll`: the papers' per-sample conventions (negative log-likelihoods summed over outputs, mean over
  the batch) for ``"categorical"``, ``"bernoulli"`` and ``"gaussian"`` (unit variance: half the squared
  error); :func:`sample_targets` draws :math:`\tilde t \sim p(\cdot\mid f)` for the true Fisher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "LIKELIHOODS",
    "LossInfo",
    "describe",
    "reduction_of",
    "hessian_vp",
    "per_sample_hessians",
    "output_hessians",
    "nll",
    "sample_targets",
]

#: kinds :func:`describe` reports
KINDS = ("cross_entropy", "bce_with_logits", "mse", "custom")
#: likelihoods of :func:`nll` and :func:`sample_targets` (loss: cross-entropy, BCE with logits, half MSE)
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


@dataclass(frozen=True)
class LossInfo:
    """What :func:`describe` knows about a loss callable.

    Attributes:
        kind: one of :data:`KINDS`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``; ``None`` when unknown (custom losses).
        elementwise: the loss is a sum of terms each depending on one output entry (its Hessian in the
            output is diagonal): BCE with logits and MSE, with any weights.
    """

    kind: str
    reduction: str | None
    elementwise: bool


def describe(loss_fn: Any) -> LossInfo:
    """Kind and reduction of ``loss_fn`` (functional torch losses use their default ``reduction="mean"``)."""
    if loss_fn is F.cross_entropy or type(loss_fn) is nn.CrossEntropyLoss:
        return LossInfo("cross_entropy", getattr(loss_fn, "reduction", "mean"), False)
    if loss_fn is F.binary_cross_entropy_with_logits or type(loss_fn) is nn.BCEWithLogitsLoss:
        return LossInfo("bce_with_logits", getattr(loss_fn, "reduction", "mean"), True)
    if loss_fn is F.mse_loss or type(loss_fn) is nn.MSELoss:
        return LossInfo("mse", getattr(loss_fn, "reduction", "mean"), True)
    return LossInfo("custom", None, False)


#: autograd nodes of torch losses that record their reduction (``_saved_reduction``: 0 none, 1 mean, 2 sum)
_REDUCING_NODES = ("NllLossBackward0", "NllLoss2DBackward0", "MseLossBackward0", "BinaryCrossEntropyWithLogitsBackward0",
                   "BinaryCrossEntropyBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0")


def reduction_of(loss: Tensor) -> str | None:
    """The batch reduction of a computed loss when its last op is a torch loss that records it
    (``F.cross_entropy(..., reduction="sum")`` gives ``"sum"``); ``None`` when it cannot be read (any op
    after the loss, e.g. a division by the batch size, or a user-written loss)."""
    fn = getattr(loss, "grad_fn", None)
    if fn is None or type(fn).__name__ not in _REDUCING_NODES:
        return None
    return {0: "none", 1: "mean", 2: "sum"}.get(getattr(fn, "_saved_reduction", None))


# --------------------------------------------------------------------------------------------------------
# H_l u
# --------------------------------------------------------------------------------------------------------
def _analytic(loss_fn: Any, o: Tensor, t: Any) -> Callable[[Tensor], Tensor] | None:
    """An analytic :math:`u \\mapsto H_\\ell u` for the recognised losses with supported options, else None."""
    from fastcurv import complex_step as cs

    if not isinstance(t, Tensor) or isinstance(t, cs.Planes):
        return None
    info = describe(loss_fn)
    mod = loss_fn if isinstance(loss_fn, nn.Module) else None
    red = info.reduction
    if red == "none":
        return None
    if info.kind == "cross_entropy":
        if mod is not None and (mod.weight is not None or mod.label_smoothing != 0.0):
            return None
        if t.is_floating_point() or o.dim() == 0:  # probability targets: autograd
            return None
        ignore = mod.ignore_index if mod is not None else -100
        cdim = 1 if o.dim() >= 2 else 0

        def ce(u: Tensor) -> Tensor:  # per sample: (diag(p) - p p^T) u
            p = torch.softmax(o, cdim)
            hu = p * (u - (p * u).sum(cdim, keepdim=True))
            keep = (t != ignore).unsqueeze(cdim)
            hu = torch.where(keep, hu, 0.0)
            return hu / keep.sum() if red == "mean" else hu

        return ce
    if info.kind == "bce_with_logits":
        w = None if mod is None else mod.weight
        if mod is not None and mod.pos_weight is not None:
            return None
        if t.shape != o.shape or (w is not None and torch.broadcast_shapes(w.shape, o.shape) != o.shape):
            return None

        def bce(u: Tensor) -> Tensor:  # diag(σ(1-σ)·w)
            s = torch.sigmoid(o)
            hu = s * (1 - s) * u
            if w is not None:
                hu = hu * w
            return hu / o.numel() if red == "mean" else hu

        return bce
    if info.kind == "mse":
        if t.shape != o.shape:
            return None
        return lambda u: (2.0 / o.numel()) * u if red == "mean" else 2.0 * u
    return None


def hessian_vp(loss_fn: Callable[[Any, Any], Tensor], output: Tensor, target: Any, u: Tensor) -> Tensor:
    r""":math:`H_\ell u` with :math:`H_\ell = \partial^2 \ell(f, y)/\partial f^2` at ``f = output``.

    Analytic for ``F.cross_entropy``/``nn.CrossEntropyLoss`` (class-index targets, ``ignore_index``, mean or
    sum; per sample :math:`\mathrm{diag}(p) - pp^\top` with :math:`p = \mathrm{softmax}(f)`),
    ``F.binary_cross_entropy_with_logits``/``nn.BCEWithLogitsLoss`` (:math:`\mathrm{diag}(\sigma(1-\sigma)w)`)
    and ``F.mse_loss``/``nn.MSELoss`` (:math:`2I`), divided by the mean's count. Any other loss or option
    (probability targets, ``label_smoothing``, class weights, ``pos_weight``, a user-written function) goes
    through autograd: :math:`\nabla_f(\nabla_f \ell \cdot u)` (double backward on the small loss graph).
    """
    rule = _analytic(loss_fn, output, target)
    if rule is not None:
        return rule(u)
    with torch.enable_grad():
        f = output.detach().requires_grad_(True)
        loss = loss_fn(f, target)
        (g,) = torch.autograd.grad(loss, f, create_graph=True)
        if not g.requires_grad:  # the loss is linear in f
            return torch.zeros_like(u)
        (hu,) = torch.autograd.grad(g, f, grad_outputs=u, allow_unused=True)
    return torch.zeros_like(u) if hu is None else hu.detach()


# --------------------------------------------------------------------------------------------------------
# per-sample output Hessians
# --------------------------------------------------------------------------------------------------------
def per_sample_hessians(grad: Tensor, output: Tensor, *, elementwise: bool = False) -> Tensor:
    r"""The per-sample blocks :math:`\partial^2 L/\partial f_n^2` of a loss separable over the batch.

    Args:
        grad: :math:`\nabla_f L` (shape of ``output``) computed with ``create_graph=True``.
        output: the model output :math:`f`, ``(N, ...)``; the trailing dims are flattened to ``K``.
        elementwise: the Hessian is known to be diagonal (:attr:`LossInfo.elementwise`): one backward.

    Returns:
        ``(N, K, K)`` blocks, or ``(N, K)`` diagonals when ``elementwise``. The loss must be a sum of
        per-sample terms (each depending on one sample's output only), as every reduction over the batch is.
    """
    n = output.shape[0]
    k = output[0].numel() if n else 0
    if not grad.requires_grad:  # linear in the output
        return output.new_zeros((n, k) if elementwise else (n, k, k))
    if elementwise:
        (d,) = torch.autograd.grad(grad, output, grad_outputs=torch.ones_like(grad), allow_unused=True)
        return output.new_zeros(n, k) if d is None else d.detach().reshape(n, k)
    cols = []
    for j in range(k):
        u = torch.zeros(n, k, dtype=output.dtype, device=output.device)
        u[:, j] = 1.0
        (c,) = torch.autograd.grad(grad, output, grad_outputs=u.view_as(grad), retain_graph=True, allow_unused=True)
        cols.append(torch.zeros(n, k, dtype=output.dtype, device=output.device) if c is None else c.detach().reshape(n, k))
    return torch.stack(cols, dim=2) if cols else output.new_zeros(n, k, k)


def output_hessians(loss_fn: Callable[[Any, Any], Tensor], output: Tensor, target: Any) -> Tensor:
    r"""``(N, K, K)`` blocks :math:`\partial^2\,\text{loss\_fn}(f, y)/\partial f_n^2` at ``f = output``, by
    autograd (:func:`per_sample_hessians`); exact for any loss separable over the batch."""
    with torch.enable_grad():
        f = output.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(f, target), f, create_graph=True)
        blocks = per_sample_hessians(g, f, elementwise=describe(loss_fn).elementwise)
    return torch.diag_embed(blocks) if blocks.dim() == 2 else blocks


# --------------------------------------------------------------------------------------------------------
# likelihoods: per-sample conventions and sampled targets (the true Fisher)
# --------------------------------------------------------------------------------------------------------
def _check_likelihood(likelihood: object) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood  # type: ignore[return-value]


def nll(likelihood: str, output: Tensor, target: Tensor) -> Tensor:
    r""":math:`\frac1N\sum_n -\log p(t_n\mid f_n)` up to constants: summed over outputs, mean over the batch.

    ``"categorical"``: cross-entropy of logits (classes on dim 1) and class indices; ``"bernoulli"``:
    :math:`\sum_j \mathrm{softplus}(f_j) - t_jf_j` (BCE with logits); ``"gaussian"`` (unit variance):
    :math:`\tfrac12\lVert f - t\rVert^2`.
    """
    lik = _check_likelihood(likelihood)
    n = output.shape[0]
    if lik == "categorical":
        return F.cross_entropy(output, target, reduction="sum") / n
    if lik == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum") / n
    return 0.5 * (output - target).pow(2).sum() / n


def sample_targets(likelihood: str, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Targets :math:`\tilde t_n \sim p(\cdot\mid f_n)` from the model's predictive distribution (detached).

    Non-finite entries of ``output`` are sampled as if they were 0, so the draw never fails (a NaN logit
    makes ``torch.bernoulli``/``multinomial`` raise); the output itself stays non-finite, so the sampled loss
    :func:`nll` and everything computed from it are non-finite too and the caller's finiteness check skips
    the step. No host synchronisation.
    """
    lik = _check_likelihood(likelihood)
    z = output.detach()
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    if lik == "categorical":
        if z.dim() < 2:
            raise ValueError(f"likelihood='categorical' needs logits (N, C, ...), got shape {tuple(z.shape)}")
        c = z.shape[1]
        probs = torch.softmax(z if z.dtype == torch.float64 else z.float(), dim=1).movedim(1, -1).reshape(-1, c)
        return torch.multinomial(probs, 1, generator=generator).reshape(z.movedim(1, -1).shape[:-1])
    if lik == "bernoulli":
        return torch.bernoulli(torch.sigmoid(z), generator=generator)
    return z + torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
