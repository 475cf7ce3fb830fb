r"""Exact stochastic Newton for MLPs: per-sample exact Hessian blocks in closed form, averaged over a minibatch.

.. note::
   **A reconstruction from the abstract.** Mehouachi & Kasmi, "Exact Stochastic Second Order Deep Learning"
   (arXiv 2104.03804) claim an expression for the stochastic Hessian and its exact eigenvalues, a
   closed-form exact stochastic Newton direction, and a regularisation plus "spectral adjustment" (keyword:
   *absolute Hessian*) that handles non-convexity and favours flat minima. The paper's formulas could not be
   read (docs/algorithms.md §4, §7). What follows is derived here from first principles to match that
   description; it is *not* the paper's algorithm, and its choices (per-layer blocks, the
   :math:`|\lambda|` adjustment, Tikhonov :math:`\rho`, averaging per-sample directions) are ours.

Derivation (one sample, one layer)
----------------------------------
Model: ``nn.Sequential`` of ``nn.Linear`` layers :math:`l = 1..L` and elementwise activations,
:math:`h_l = \bar W_l \bar a_{l-1}` with :math:`\bar W_l = [W_l \mid b_l]` (:math:`d_{out} \times d_a`),
:math:`\bar a = [a; 1]` (no 1 without a bias), :math:`a_l = \varphi_l(h_l)` (:math:`\varphi_l` the
composition of the activations after layer :math:`l`, the identity if none), output :math:`z = a_L`.
Per-sample loss :math:`\ell(z)`, minibatch loss :math:`L = \frac1N\sum_n \ell_n` (see *Losses* for what
:math:`\ell_n` is for each supported loss).

*Hessian block.* :math:`\bar W_l` enters :math:`\ell` only through :math:`h_l`, linearly, so with
:math:`g_l = \partial\ell/\partial h_l` and :math:`B_l = \partial^2\ell/\partial h_l^2`,

.. math:: \frac{\partial\ell}{\partial \bar W_{ij}} = g_i\bar a_j, \qquad
   \frac{\partial^2\ell}{\partial \bar W_{ij}\,\partial \bar W_{kl}} = (B_l)_{ik}\,\bar a_j\bar a_l

(the term :math:`g_i\,\partial^2 h_i/\partial\bar W^2` vanishes because :math:`h` is linear in
:math:`\bar W`). Ordering convention: with the **column-major** :math:`\mathrm{vec}` (stacking columns,
index :math:`j\,d_{out} + i`) the block is :math:`(\bar a\bar a^\top)\otimes B_l` and
:math:`\mathrm{vec}(g\bar a^\top) = \bar a\otimes g`; with PyTorch's row-major ``flatten()`` of
:math:`\bar W` (index :math:`i\,d_a + j`) the same matrix is ``kron(B, a a^T)``. The tests check both.

*Backpropagating* :math:`B` *exactly* (Botev et al. 2017's recursion, for one sample): with
:math:`D_l = \mathrm{diag}(\varphi_l'(h_l))`, :math:`h_{l+1} = W_{l+1}a_l + b_{l+1}` and the chain rule twice,

.. math::
   g_l = D_l W_{l+1}^\top g_{l+1},\qquad
   B_l = D_l W_{l+1}^\top B_{l+1} W_{l+1} D_l + \mathrm{diag}\big(\varphi_l''(h_l)\odot W_{l+1}^\top g_{l+1}\big),

starting from :math:`g_L = \varphi_L'\odot\nabla_z\ell`,
:math:`B_L = D_L\,\nabla^2_z\ell\,D_L + \mathrm{diag}(\varphi_L''\odot\nabla_z\ell)`. The second term is what
makes :math:`B` exact (the Gauss–Newton part alone is the GGN); it vanishes for ReLU (:math:`\varphi''=0`
a.e.). :math:`\varphi', \varphi''` are computed by differentiating the activation modules twice
elementwise (``relu'(0) = 0``, PyTorch's convention).

*Exact eigenvalues.* With :math:`\bar a\bar a^\top = \lVert\bar a\rVert^2\hat a\hat a^\top` (rank one,
:math:`\hat a = \bar a/\lVert\bar a\rVert`) and :math:`B = U\Lambda U^\top`, the block
:math:`H = (\bar a\bar a^\top)\otimes B` has eigenpairs :math:`(\lVert\bar a\rVert^2\lambda_i,\ \hat a\otimes u_i)`,
:math:`i = 1..d_{out}`, and the eigenvalue 0 on :math:`\hat a^\perp\otimes\mathbb R^{d_{out}}` (multiplicity
:math:`(d_a - 1)\,d_{out}`).

*Closed-form direction.* Spectral adjustment :math:`|H|` (the "absolute Hessian": eigenvalues replaced by
their absolute values, so negative curvature is descended, saddle-free style), optional floor
:math:`\max(\cdot, \texttt{eig\_floor})`, Tikhonov :math:`\rho` (``damping``). The gradient
:math:`\mathrm{vec}(g\bar a^\top) = \lVert\bar a\rVert\,\hat a\otimes g` lies in
:math:`\mathrm{span}\{\hat a\otimes u_i\}`, so the zero eigenspace never meets it and

.. math::
   \Delta = -(|H| + \rho I)^{-1}\mathrm{vec}(g\bar a^\top)
   = -\,U\,\mathrm{diag}\Big(\frac{1}{\lVert\bar a\rVert^2|\lambda_i| + \rho}\Big)U^\top g\,\bar a^\top .

For :math:`\rho = 0` the inverse is the pseudo-inverse: terms with
:math:`\lVert\bar a\rVert^2|\lambda_i| \le d_{out}\,\epsilon_{mach}\max_j(\cdot)` are dropped (they include the
zero eigenspace, which :math:`g\bar a^\top` does not meet anyway).

*Minibatch.* The direction is the mean of the per-sample directions,
:math:`\Delta = \frac1N\sum_n\Delta_n = -\frac1N\sum_n w_n\bar a_n^\top` with
:math:`w_n = U_n\,\mathrm{diag}(\cdot)\,U_n^\top g_n`: batched ``eigh`` of the :math:`N` matrices
:math:`B_{l,n}` and batched ``einsum`` — no Python loop over samples (``chunk_size`` bounds the
:math:`N d_{out}^2` memory by processing samples in chunks). Update :math:`\bar W \leftarrow \bar W + \eta\Delta`
(``lr`` :math:`\eta`); every layer uses its own block (block-diagonal across layers). Cost per layer:
:math:`O(N d_{out}^3)` for ``eigh`` plus :math:`O(N d_{in} d_{out}(d_{in} + d_{out}))` for the recursion.

Losses (per-sample :math:`\ell_n` defined by :math:`L = \frac1N\sum_n\ell_n`)
----------------------------------------------------------------------------
``loss_fn`` declares the loss the closure computes: ``"ce"`` (cross-entropy, mean over the batch),
``"bce"`` (:math:`\ell_n = \sum_j \mathrm{softplus}(z_j) - t_jz_j`: summed over outputs, mean over the
batch), ``"mse"`` (:math:`\ell_n = \tfrac12\lVert z - t\rVert^2`) (:func:`fastcurv.losses.nll`), or any
callable ``loss_fn(output, target)`` — torch losses with any option (class weights, ``label_smoothing``,
probability targets, ``pos_weight``, ``reduction="mean"|"sum"``) or a user-written function. The loss must
be a sum of per-sample terms (each depending on one sample's output; every batch reduction is), and
:math:`\nabla^2_z\ell_n = N\,\partial^2 L/\partial z_n^2` comes from autograd
(:func:`fastcurv.losses.per_sample_hessians`: one double backward per output coordinate on the small loss
graph, one in all for the elementwise BCE/MSE), exact for every such loss; it holds the :math:`N K^2`
blocks at once. This needs the loss graph: a closure that returns the loss without calling ``backward()``
(or ``batch=``), or a loss module (``nn.CrossEntropyLoss(...)`` passed as ``loss_fn`` and applied to the
model output in the closure: its inputs are recorded). Otherwise a closure that backpropagates itself leaves
only :math:`\nabla_z L`, from which the Hessian is inferred for the losses it determines — cross-entropy with class-index targets
(:math:`c_n(\mathrm{diag}(p) - pp^\top)` with :math:`c_n = \sum_k[\nabla_z\ell_n]_k^+/(1 - p_y)`, the
gradient checked to be :math:`c_n(p - e_y)`), unweighted BCE and MSE — and anything else raises
``ValueError`` rather than take a wrong step. A user-written loss is assumed to be a batch mean under data
parallelism (a torch loss's ``reduction`` is read).

The per-sample output gradient is :math:`\nabla_z\ell_n = N\,\partial L/\partial z_n` (one backward of the
loss to the output only). The closure must compute exactly the declared loss of ``model(x)``.

Without ``loss_fn`` (the default) the loss is whatever the closure computes, as long as it is a mean of
per-sample terms: the per-sample output Hessians :math:`\nabla_z^2\ell_n = N\,\partial^2L/\partial z_n^2`
come from autograd on the closure's loss graph (:math:`K` backward passes through the loss only, :math:`K` =
outputs per sample; the graph is kept for them even when the closure calls ``backward()`` itself), and the
Cholesky fast path is off (the loss need not be convex in :math:`z`).

Step protocol (the closure is LBFGS-style or forward-only, as for every fastcurv optimizer)::

    opt = ExactNewton(model, lr=0.5, damping=1.0)             # any per-sample-mean loss, by autograd
    loss = opt.step(lambda: F.cross_entropy(model(x), y))     # the closure runs the forward once
    opt = ExactNewton(model, loss_fn="ce", lr=0.5, damping=1.0)  # analytic loss Hessians (faster)
    loss = opt.step(batch=(x, y))                             # same, with loss_fn(model(x), y)

The model is an ``nn.Sequential`` MLP, or a module (a LightningModule, a wrapper) with exactly one
``nn.Sequential`` holding every trainable parameter; the output of that ``nn.Sequential`` is :math:`z`.

The layers' inputs and outputs are recorded by forward hooks registered for the duration of the closure
(removed afterwards); the closure must call the model exactly once. After the step each parameter's
``.grad`` holds :math:`\nabla L` at the start of the step (computed in the recursion, :math:`\frac1N\sum_n
g_n\bar a_n^\top`). Non-finite loss, output gradient, curvature or direction: the step is skipped with the
parameters bitwise unchanged (``on_nonfinite="raise"`` raises). The optimizer keeps no state but its
counters.

Data parallel (``distributed=``; docs/distributed.md)
-----------------------------------------------------
The direction and the gradient are sums over samples, so rank :math:`r` computes
:math:`\sum_{n\in B_r}\Delta_n` and :math:`\sum_{n\in B_r} g_n\bar a_n^\top` for each layer, and one
all-reduce (with the loss and a skip flag) plus one for :math:`N = \sum_r n_r` give exactly the one-process
:math:`\frac1N\sum_n` over the global batch, for any local batch sizes. The per-sample gradient
:math:`\nabla_z\ell_n` is the local :math:`n_r\,\partial L_r/\partial z_n` for the mean losses and
:math:`N\,\partial L_r/\partial z_n` (global :math:`N`) for ``reduction="sum"``, whose per-sample scale is the
global batch. The closure runs inside DDP's ``no_sync`` (no gradient all-reduce: the gradients are computed
here). A non-finite loss on one rank makes every rank skip. The returned loss is the global mean (sum).

Supported models: ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` and elementwise
activations (the parameter-free modules of :data:`ELEMENTWISE`: ReLU, tanh, sigmoid, identity, ...), with
``nn.Flatten`` or activations allowed before the first ``nn.Linear``. Anything else (convolutions, norms,
dropout, PReLU, ...) raises ``ValueError`` at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcurv import losses
from fastcurv.distributed import no_sync, unwrap
from fastcurv.optim._base import Closure, CurvatureOptimizer

__all__ = ["ExactNewton", "ELEMENTWISE", "LOSSES"]

#: activation modules accepted between (and after) the ``nn.Linear`` layers: parameter-free and elementwise
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.SiLU, nn.GELU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish,
)
# activations with phi'' = 0 wherever defined (B stays PSD through them)
_PIECEWISE_LINEAR = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
#: string names of the supported losses (see the module docstring for the exact per-sample definitions)
LOSSES = ("ce", "bce", "mse")


# --------------------------------------------------------------------------------------------------------
# model and loss parsing
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Linear
    acts: list[nn.Module] = field(default_factory=list)  # elementwise modules after this layer

    @property
    def trainable(self) -> bool:
        return self.module.weight.requires_grad


def _flatten(seq: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for n, m in seq._modules.items():  # not named_children(): it hides a module used twice
        name = f"{prefix}{n}"
        if type(m) is nn.Sequential:
            yield from _flatten(m, name + ".")
        else:
            yield name, m


def _find_sequential(model: nn.Module) -> nn.Module:
    """``model`` itself if it is an ``nn.Sequential``; else its one ``nn.Sequential`` submodule holding every
    trainable parameter (a LightningModule or wrapper around the MLP); else ``model`` (rejected by the parser)."""
    if type(model) is nn.Sequential:
        return model
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for m in model.modules():
        if type(m) is nn.Sequential and {id(p) for p in m.parameters() if p.requires_grad} == trainable:
            return m
    return model


def _parse_model(model: object) -> list[_Layer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"ExactNewton is constructed from the model (an nn.Module), got {type(model).__name__}")
    if type(model) is not nn.Sequential:
        raise ValueError(
            f"ExactNewton supports nn.Sequential MLPs (nn.Linear + elementwise activations) only, got "
            f"{type(model).__name__}: the exact Hessian recursion needs the layer chain"
        )
    layers: list[_Layer] = []
    seen: set[int] = set()
    for name, m in _flatten(model, ""):
        if type(m) is nn.Linear:
            if id(m) in seen:
                raise ValueError(
                    f"ExactNewton: the Linear layer {name} appears twice (shared layers are not supported)"
                )
            seen.add(id(m))
            w, b = m.weight, m.bias
            if b is not None and b.requires_grad != w.requires_grad:
                raise ValueError(
                    f"ExactNewton: layer {name} has a trainable {'weight' if w.requires_grad else 'bias'} but a frozen "
                    f"{'bias' if w.requires_grad else 'weight'}; freeze or train both"
                )
            layers.append(_Layer(name, m))
        elif isinstance(m, ELEMENTWISE) and type(m) in ELEMENTWISE:
            if layers:
                layers[-1].acts.append(m)
        elif type(m) is nn.Flatten and not layers:
            continue
        else:
            where = "before the first Linear" if not layers else f"after layer {layers[-1].name}"
            raise ValueError(
                f"ExactNewton: unsupported module {name} ({type(m).__name__}) {where}; supported: nn.Linear, "
                f"elementwise activations ({', '.join(t.__name__ for t in ELEMENTWISE)}) and nn.Flatten before "
                f"the first Linear"
            )
    if not layers:
        raise ValueError("ExactNewton: the model has no nn.Linear layer")
    if not any(lay.trainable for lay in layers):
        raise ValueError("ExactNewton: the model has no trainable Linear layer")
    return layers


@dataclass
class _LossSpec:
    kind: str  # "ce" | "bce" | "mse" | "custom"
    scale: str  # "sample" (the string conventions), "mean" (over elements), "sum", "custom"
    fn: Callable[[Tensor, Tensor], Tensor]
    summed: bool = False  # reduction="sum": the loss is a sum over the batch, not a mean
    elementwise: bool = False  # the output Hessian is diagonal (BCE, MSE with any weights)

    def __post_init__(self) -> None:
        info = losses.describe(self.fn)
        self.summed = self.scale == "sum" or info.reduction == "sum"
        self.elementwise = self.kind in ("bce", "mse") or info.elementwise


_STRING_LOSSES = {"ce": "categorical", "bce": "bernoulli", "mse": "gaussian"}


def _parse_loss(loss_fn: object) -> _LossSpec:
    if loss_fn is None:  # the closure's own loss: per-sample output Hessians by autograd on its graph
        return _LossSpec("custom", "custom", None)  # type: ignore[arg-type]
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"ExactNewton: loss_fn must be one of {LOSSES} or a callable (output, target) -> loss, got {loss_fn!r}")
        lik = _STRING_LOSSES[loss_fn]
        return _LossSpec(loss_fn, "sample", lambda z, t: losses.nll(lik, z, t))
    if not callable(loss_fn):
        raise TypeError(f"ExactNewton: loss_fn must be one of {LOSSES} or a callable (output, target) -> loss, got {type(loss_fn).__name__}")
    info = losses.describe(loss_fn)
    if info.reduction == "none":
        raise ValueError(
            f"ExactNewton: {type(loss_fn).__name__}(reduction='none') is not supported (use 'mean' or 'sum')"
        )
    kind = {"cross_entropy": "ce", "bce_with_logits": "bce", "mse": "mse"}.get(info.kind, "custom")
    scale = "custom" if kind == "custom" else ("sample" if kind == "ce" else info.reduction)
    return _LossSpec(kind, scale, loss_fn)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# the exact per-sample recursion
# --------------------------------------------------------------------------------------------------------
def _activation_derivatives(acts: Sequence[nn.Module], h: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\varphi'(h)` and :math:`\varphi''(h)` of the elementwise chain ``acts`` (autograd, twice)."""
    acts = [m for m in acts if type(m) is not nn.Identity]
    if not acts:
        return torch.ones_like(h), torch.zeros_like(h)
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        y = x.clone()
        for m in acts:
            y = m(y)
        (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        d2 = None
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
    return d1.detach(), (torch.zeros_like(h) if d2 is None else d2.detach())


def _loss_hessian(spec: _LossSpec, z: Tensor, gz: Tensor, n_total: int) -> Tensor:
    r"""Per-sample :math:`\nabla_z^2\ell_n` (``(n, K, K)``) inferred from the outputs and per-sample output
    gradients alone, for a closure that backpropagated its loss itself (its graph is gone). Only a loss whose
    Hessian the gradient determines qualifies: cross-entropy with class-index targets (checked: the gradient
    must be :math:`c_n(p - e_y)`), BCE with logits and MSE without weights; any other raises ``ValueError``."""
    n, k = z.shape
    fn = spec.fn
    weighted = getattr(fn, "weight", None) is not None or getattr(fn, "pos_weight", None) is not None
    if spec.kind == "custom" or weighted or getattr(fn, "label_smoothing", 0.0) != 0.0:
        raise ValueError(
            "ExactNewton: the closure called backward() itself, so the loss graph is gone, and the Hessian of "
            f"this loss ({getattr(fn, '__name__', type(fn).__name__)}) cannot be inferred from its gradient; "
            "return the loss without calling backward() (step(lambda: loss_fn(model(x), y))) or use batch=(x, y)"
        )
    if spec.kind == "ce":
        p = torch.softmax(z, dim=1)
        y = gz.argmin(dim=1, keepdim=True)
        rest = p.scatter(1, y, 0.0).sum(1)  # 1 - p_y, without cancellation
        pos = gz.clamp_min(0).sum(1)
        c = torch.where(rest > 0, pos / torch.where(rest > 0, rest, torch.ones_like(rest)), torch.zeros_like(rest))
        # probability (soft) targets give a gradient c (p - t) that is no c (p - e_y): their Hessian is
        # (sum t) c (diag p - p p^T), which the gradient does not determine
        resid = (gz - c[:, None] * (p - F.one_hot(y[:, 0], k).to(p.dtype))).abs().amax(1)
        tol = torch.finfo(z.dtype).eps ** 0.5 * torch.maximum(c, gz.abs().amax(1))
        if bool((resid > tol).any()):
            raise ValueError(
                "ExactNewton: the closure called backward() itself and the cross-entropy gradient is not that of "
                "class-index targets (probability targets or label smoothing): the Hessian cannot be inferred from "
                "it; return the loss without calling backward() or use batch=(x, y)"
            )
        return c[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    if spec.scale == "sample":
        c = 1.0 if spec.kind == "bce" else 0.5
    elif spec.scale == "mean":
        c = 1.0 / k
    else:
        c = float(n_total)
    if spec.kind == "bce":
        s = torch.sigmoid(z)
        return torch.diag_embed(c * s * (1 - s))
    return torch.diag_embed(torch.full_like(z, 2.0 * c))


@dataclass
class _Record:
    inputs: list[Tensor]
    outputs: list[Tensor]
    z: Tensor
    dz: Tensor
    #: :math:`\nabla_z\ell_n` = ``n_scale`` * dz: the batch size the loss is a mean over (a sum over the
    #: global batch: the global size); None = this batch's size
    n_scale: int | None = None
    #: :math:`\partial^2 L/\partial z_n^2` by autograd (:func:`fastcurv.losses.per_sample_hessians`),
    #: ``(N, K, K)`` or ``(N, K)`` diagonals; None when the closure consumed the loss graph
    hz: Tensor | None = None


def _factors(
    layers: Sequence[_Layer], rec: _Record, spec: _LossSpec, sl: slice
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    r"""Yield ``(l, ā, g, B)`` for the samples ``sl``, from the last layer to the first trainable one:
    :math:`\bar a` ``(n, d_a)``, :math:`g = \partial\ell_n/\partial h_l` ``(n, d_out)`` and :math:`B_l`
    ``(n, d_out, d_out)``."""
    n_total = rec.z.shape[0] if rec.n_scale is None else rec.n_scale
    z = rec.z[sl]
    gz = rec.dz[sl] * n_total
    if rec.hz is None:
        hz = _loss_hessian(spec, z, gz, n_total)
    else:
        hz = n_total * rec.hz[sl]
        hz = torch.diag_embed(hz) if hz.dim() == 2 else hz
    last = len(layers) - 1
    d1, d2 = _activation_derivatives(layers[last].acts, rec.outputs[last][sl])
    g = d1 * gz
    B = d1[:, :, None] * hz * d1[:, None, :] + torch.diag_embed(d2 * gz)
    first = min(i for i, lay in enumerate(layers) if lay.trainable)
    for l in range(last, first - 1, -1):
        lay = layers[l]
        a = rec.inputs[l][sl]
        abar = a if lay.module.bias is None else torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        yield l, abar, g, B
        if l == first:
            break
        W = lay.module.weight.detach()
        t = g @ W  # W^T g per sample
        d1, d2 = _activation_derivatives(layers[l - 1].acts, rec.outputs[l - 1][sl])
        M = torch.matmul(torch.matmul(W.T, B), W)
        B = d1[:, :, None] * M * d1[:, None, :] + torch.diag_embed(d2 * t)
        g = d1 * t


def _batched_eigh(B: Tensor) -> tuple[Tensor, Tensor]:
    r"""``eigh`` of a batch of symmetric matrices, each scaled by its largest magnitude first (LAPACK's
    float32 solver was seen failing to converge on ReLU-network blocks of magnitude ~1e-5 with many zero rows;
    the scaled matrix converges), retried in float64 if it still fails; NaNs if that fails too (non-finite
    input), which the step's finiteness check turns into a skipped step."""
    s = B.abs().amax(dim=(1, 2))
    s = torch.where(s > 0, s, torch.ones_like(s))
    Bs = B / s[:, None, None]
    try:
        lam, U = torch.linalg.eigh(Bs)
    except torch.linalg.LinAlgError:
        try:
            lam, U = torch.linalg.eigh(Bs.double())
            lam, U = lam.to(B.dtype), U.to(B.dtype)
        except torch.linalg.LinAlgError:  # non-finite entries: let the step's finiteness check skip it
            nan = torch.full_like(B, float("nan"))
            return nan[:, :, 0], nan
    return lam * s[:, None], U


def _direction_sum(abar: Tensor, g: Tensor, B: Tensor, rho: Tensor, floor: Tensor, psd: bool = False) -> Tensor:
    r""":math:`\sum_n \Delta_n` for a chunk:
    :math:`-\sum_n U_n\mathrm{diag}(1/(\lVert\bar a_n\rVert^2|\lambda| + \rho))U_n^\top g_n\bar a_n^\top`.

    ``psd=True`` (the caller knows every :math:`B_n` is PSD, ``rho > 0`` and ``eig_floor = 0``): then
    :math:`|B| = B` and :math:`w_n = (\lVert\bar a_n\rVert^2 B_n + \rho I)^{-1} g_n` by a batched Cholesky solve
    (several times cheaper than ``eigh``); samples whose factorisation fails (rounding made the matrix
    indefinite) go through the eigendecomposition."""
    B = 0.5 * (B + B.transpose(1, 2))
    nrm2 = (abar * abar).sum(1)
    if psd:
        M = nrm2[:, None, None] * B + rho * torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
        L, info = torch.linalg.cholesky_ex(M)
        w = torch.cholesky_solve(g.unsqueeze(2), L).squeeze(2)
        bad = (info != 0).nonzero().flatten()
        if bad.numel():
            w[bad] = _eigen_w(abar[bad], g[bad], B[bad], rho, floor)
        return -(w.T @ abar)
    return -(_eigen_w(abar, g, B, rho, floor).T @ abar)


def _eigen_w(abar: Tensor, g: Tensor, B: Tensor, rho: Tensor, floor: Tensor) -> Tensor:
    r""":math:`w_n = U_n\,\mathrm{diag}(1/(\max(\lVert\bar a_n\rVert^2|\lambda_i|, f) + \rho))\,U_n^\top g_n`
    (pseudo-inverse for :math:`\rho = 0`)."""
    lam, U = _batched_eigh(B)
    ev = (abar * abar).sum(1, keepdim=True) * lam.abs()
    ev = torch.maximum(ev, floor)
    den = ev + rho
    d = den.shape[1]
    cut = torch.where(rho > 0, torch.zeros_like(rho), d * torch.finfo(den.dtype).eps * den.amax(1, keepdim=True))
    inv = torch.where(den > cut, 1.0 / torch.where(den > cut, den, torch.ones_like(den)), torch.zeros_like(den))
    u = torch.einsum("nij,ni->nj", U, g)  # U^T g
    return torch.einsum("nij,nj->ni", U, inv * u)


class ExactNewton(CurvatureOptimizer):
    r"""Exact stochastic Newton (per-sample exact layer Hessians, absolute-value spectrum, Tikhonov :math:`\rho`).

    A reconstruction from the abstract of Mehouachi & Kasmi 2021; the module docstring derives every formula.

    Args:
        model: an ``nn.Sequential`` MLP (``nn.Linear`` + elementwise activations).
        loss_fn: the loss the closure computes: ``"ce"``, ``"bce"``, ``"mse"``, any callable
            ``loss_fn(output, target)`` separable over the batch (see *Losses* in the module docstring; with
            ``step(batch=)`` it is called directly), or ``None`` (default): the closure's own loss, which must be
            a mean (or sum) of per-sample terms; its per-sample output Hessians come from autograd on the
            closure's loss graph.
        lr: step length :math:`\eta` (0-d tensor hyperparameter), default 1.
        damping: Tikhonov regularisation :math:`\rho \ge 0` (0 = pseudo-inverse), default 1.
        eig_floor: floor on the adjusted eigenvalues :math:`\lVert\bar a\rVert^2|\lambda_i|` (default 0; a
            flat-minima knob: small curvature is treated as at least this large).
        chunk_size: process at most this many samples at a time (bounds the :math:`N d^2` memory); ``None``:
            the whole batch.
        on_nonfinite: ``"skip"`` or ``"raise"``.
        compile: accepted for symmetry (nothing is compiled: batched ``eigh`` dominates).
        distributed, process_group: data parallelism (*Data parallel* in the module docstring);
            ``"owner"`` is the same as ``"replicate"`` here (all the work is per sample).
    """

    hyperparameters = {"lr": (0.0, None), "damping": (0.0, None), "eig_floor": (0.0, None)}
    _supports_distributed = True
    _reduces_gradients = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: str | Callable[..., Tensor] | None = None,
        lr: float | Tensor = 1.0,
        damping: float | Tensor = 1.0,
        *,
        eig_floor: float | Tensor = 0.0,
        chunk_size: int | None = None,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        #: the nn.Sequential the recursion runs on: the model, or (a LightningModule, a wrapper) the one
        #: nn.Sequential that holds every trainable parameter; its output is the z of the recursion
        self._seq = _find_sequential(unwrap(model)) if isinstance(model, nn.Module) else model
        layers = _parse_model(self._seq)
        self._spec = _parse_loss(loss_fn)
        bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        if chunk_size is not None and bad_chunk:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        super().__init__(
            model, dict(lr=lr, damping=damping, eig_floor=eig_floor), on_nonfinite=on_nonfinite, compile=compile,
            distributed=distributed, process_group=process_group,
        )
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self._layers = layers
        self._last_loss: Tensor | None = None
        # B_l is PSD when every activation from layer l up has phi'' = 0 (the losses are convex in z)
        self._psd: list[bool] = []
        ok = True
        for lay in reversed(layers):
            # (an arbitrary loss, loss_fn=None, need not be convex in z: no Cholesky fast path)
            ok = ok and self._spec.kind != "custom" and all(isinstance(m, _PIECEWISE_LINEAR) for m in lay.acts)
            self._psd.append(ok)
        self._psd.reverse()
        mapping = {}
        for lay in layers:
            if lay.trainable:
                for p in (lay.module.weight, lay.module.bias):
                    if p is not None:
                        mapping[p] = f"exact Newton layer {lay.name}"
        self._set_preconditioned(mapping)
        if self.fallback_params():
            names = {p: n for n, p in model.named_parameters()}
            outside = [names[p] for p in self.fallback_params()]
            raise ValueError(f"ExactNewton: parameters outside the Linear layers: {outside}")

    # ------------------------------------------------------------------ recording
    def _record(self, closure: Closure) -> tuple[Tensor, _Record]:
        inputs: list[list[Tensor]] = [[] for _ in self._layers]
        outputs: list[list[Tensor]] = [[] for _ in self._layers]
        zs: list[Tensor] = []
        dzs: list[Tensor] = []

        def layer_hook(i: int) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
                inputs[i].append(args[0].detach())
                outputs[i].append(out.detach().clone())  # an in-place activation may overwrite it

            return hook

        def model_hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            zs.append(out)
            if isinstance(out, Tensor) and out.requires_grad:
                out.register_hook(lambda gr: dzs.append(gr.detach()))

        seen: list[tuple[Any, ...]] = []  # (output, target) given to a loss module (its graph may be consumed)
        handles = [lay.module.register_forward_hook(layer_hook(i)) for i, lay in enumerate(self._layers)]
        handles.append(self._seq.register_forward_hook(model_hook))
        if isinstance(self._spec.fn, nn.Module):
            handles.append(self._spec.fn.register_forward_hook(lambda mod, args, out: seen.append(args)))
        auto = self._spec.fn is None  # the closure's own loss: keep its graph even if the closure backpropagates
        try:
            with no_sync(self.model):  # no DDP gradient sync: the gradients are computed (and reduced) here
                loss, _, self._last_loss, calls = self._eval_closure(
                    closure, backward=False, output=True, retain_graph=auto
                )
            with torch.enable_grad():
                if len(zs) != 1 or any(len(r) != 1 for r in inputs):
                    raise RuntimeError(
                        f"ExactNewton: the closure must call the model exactly once per step (it was called "
                        f"{len(zs)} times)"
                    )
                z = zs[0]
                hz = None
                if not dzs:  # the closure did not backpropagate itself: gradient to the output only
                    raw = self._last_loss
                    if raw.requires_grad and z.requires_grad:
                        (dz,) = torch.autograd.grad(raw, z, allow_unused=True, create_graph=True)
                        if dz is None:
                            dz = torch.zeros_like(z)
                        if z.dim() == 2:  # any loss: its per-sample output Hessians by autograd
                            hz = losses.per_sample_hessians(dz, z, elementwise=self._spec.elementwise)
                        dzs.append(dz.detach())
                    else:  # the loss does not depend on the output: no gradient, no curvature
                        dzs.append(torch.zeros_like(z))
                        hz = torch.zeros_like(z)
                elif len(seen) == 1 and len(seen[0]) == 2 and seen[0][0] is z and z.dim() == 2:
                    # the closure backpropagated a loss module applied to the output: its Hessian from a copy
                    f = z.detach().requires_grad_(True)
                    (dz,) = torch.autograd.grad(self._spec.fn(f, seen[0][1]), f, create_graph=True)
                    hz = losses.per_sample_hessians(dz, f, elementwise=self._spec.elementwise)
                elif auto and len(calls) == 1 and calls[0].requires_grad and z.requires_grad and z.dim() == 2:
                    # the closure backpropagated its own loss (LBFGS-style; Lightning's automatic optimization
                    # returns a detached copy): the graph of the tensor it backpropagated, retained, gives the
                    # per-sample output Hessians
                    n_dz = len(dzs)
                    (dz,) = torch.autograd.grad(calls[0], z, allow_unused=True, create_graph=True)
                    hz = torch.zeros_like(z) if dz is None else losses.per_sample_hessians(dz, z, elementwise=False)
                    del dzs[n_dz:]  # the output's gradient hook also saw these backward passes
        finally:
            for hd in handles:
                hd.remove()
            self._last_loss = None
        for i, lay in enumerate(self._layers):
            a, h = inputs[i][0], outputs[i][0]
            if a.dim() != 2 or h.dim() != 2:
                raise ValueError(
                    f"ExactNewton: layer {lay.name} saw input {tuple(a.shape)} / output {tuple(h.shape)}; only 2-D "
                    f"(batch, features) activations are supported"
                )
        z = zs[0].detach()
        if z.dim() != 2:
            raise ValueError(f"ExactNewton: the model output must be (batch, outputs), got {tuple(z.shape)}")
        # under autocast the recorded activations are bf16/fp16: the recursion, eigh and Cholesky run in the
        # parameters' dtype (float32 state for a low-precision forward)
        dt = self._layers[-1].module.weight.dtype
        return loss, _Record(
            [r[0].to(dt) for r in inputs], [r[0].to(dt) for r in outputs], z.to(dt), dzs[-1].to(dt),
            hz=None if hz is None else hz.to(dt),
        )

    def _resolve(self, closure: Closure | None, batch: Sequence[Any] | None) -> Closure:
        if closure is not None and batch is not None:
            raise TypeError("ExactNewton.step takes a closure or batch=(x, y), not both")
        if batch is not None:
            if self._spec.fn is None:
                raise ValueError("ExactNewton.step(batch=...) needs loss_fn at construction; or pass a closure")
            if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"ExactNewton.step: batch must be a pair (inputs, targets), got {type(batch).__name__}")
            x, y = batch
            model, fn = self.model, self._spec.fn
            return lambda: fn(model(x), y)
        if closure is None:
            raise ValueError("ExactNewton.step needs a closure (step(lambda: loss_fn(model(x), y))) or batch=(x, y)")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        return closure

    # ------------------------------------------------------------------ public
    _step_options = frozenset({"batch"})

    def _step(self, closure: Closure | None, batch: Sequence[Any] | None = None) -> tuple[Tensor | None, bool]:
        """One exact stochastic Newton step (``step(closure)`` or ``step(batch=(x, y))``); returns the loss at
        the start of the step (detached)."""
        return self._step_full(self._resolve(closure, batch))

    @torch.no_grad()
    def hessian_factors(
        self, closure: Closure | None = None, *, batch: Sequence[Any] | None = None
    ) -> list[dict[str, Tensor]]:
        r"""For inspection and tests: per ``nn.Linear`` layer (model order), the per-sample factors of its exact
        Hessian block, ``{"a": ā (N, d_a), "g": ∂ℓ_n/∂h (N, d_out), "B": ∂²ℓ_n/∂h² (N, d_out, d_out)}``
        (``None`` for layers below the first trainable one). The block of sample ``n`` is
        ``kron(a a^T, B)`` in column-major vec order. Parameters are not changed (``.grad`` is cleared)."""
        self._check_hyper_types()
        _, rec = self._record(self._resolve(closure, batch))
        self.zero_grad(set_to_none=True)
        out: list[dict[str, Tensor] | None] = [None] * len(self._layers)
        for l, abar, g, B in _factors(self._layers, rec, self._spec, slice(None)):
            out[l] = {"a": abar, "g": g, "B": B}
        return out  # type: ignore[return-value]

    def _step_full(self, closure: Closure) -> tuple[Tensor, bool]:
        loss, rec = self._record(closure)
        n = rec.z.shape[0]
        comm = self._comm
        if comm is None and n == 0:
            raise ValueError("ExactNewton.step: empty batch (the model saw no sample); nothing was changed")
        ok = self._all_finite([loss, rec.dz])
        if comm is None and not ok:
            self._skip("loss or output gradient")
            return loss, False
        big_n = n
        if comm is not None:  # the global batch size (a loss summed over the batch scales by it)
            counts = torch.tensor([n], dtype=torch.int64, device=rec.z.device)  # (NCCL: device tensors only)
            comm.all_reduce_sum_([counts])
            big_n = int(counts)
            if big_n == 0:
                raise ValueError("ExactNewton.step: empty batch on every rank; nothing was changed")
            if self._spec.summed:
                rec.n_scale = big_n
        grp = self.param_groups[0]
        rho, floor = grp["damping"], grp["eig_floor"]
        chunk = max(n, 1) if self.chunk_size is None else self.chunk_size
        fast = float(floor) == 0.0 and float(rho) > 0.0
        deltas: dict[int, Tensor] = {}
        grads: dict[int, Tensor] = {}
        for l, lay in enumerate(self._layers):
            if lay.trainable:
                w = lay.module.weight
                d_a = w.shape[1] + (lay.module.bias is not None)
                deltas[l] = torch.zeros(w.shape[0], d_a, dtype=w.dtype, device=w.device)
                grads[l] = torch.zeros_like(deltas[l])
        for s in range(0, n if ok else 0, chunk):  # sums over this rank's samples
            sl = slice(s, min(n, s + chunk))
            for l, abar, g, B in _factors(self._layers, rec, self._spec, sl):
                if not self._layers[l].trainable:
                    continue
                deltas[l] += _direction_sum(abar, g, B, rho, floor, psd=fast and self._psd[l])
                grads[l] += g.T @ abar
        if comm is not None:
            # one all-reduce: the sums of the directions and gradients, the loss, and whether a rank had a
            # non-finite loss / output gradient (its sums are zeros then; every rank skips together)
            summed = self._spec.summed
            lsum = torch.where(torch.isfinite(loss), loss * (1 if summed else n), torch.zeros_like(loss))
            bad = torch.tensor(0.0 if ok else 1.0, dtype=loss.dtype, device=loss.device)
            tail = [lsum.reshape(()).clone(), bad]
            comm.all_reduce_sum_([*deltas.values(), *grads.values(), *tail])
            ok = float(tail[1]) == 0.0
            loss = tail[0] / (1 if summed else max(big_n, 1)) if ok else torch.full_like(loss, float("nan"))
            if not ok:
                self._skip("loss or output gradient (on some rank)")
                return loss, False
        for l in deltas:
            deltas[l] = deltas[l] / big_n
            grads[l] = grads[l] / big_n
        if not self._all_finite([*deltas.values(), *grads.values(), grp["lr"]]):
            self._skip("curvature or direction")
            return loss, False
        lr = grp["lr"]
        for l, d in deltas.items():
            m = self._layers[l].module
            d_in = m.weight.shape[1]
            m.weight.grad = grads[l][:, :d_in].contiguous()
            m.weight.add_(lr * d[:, :d_in])
            if m.bias is not None:
                m.bias.grad = grads[l][:, d_in].contiguous()
                m.bias.add_(lr * d[:, d_in])
        return loss, True

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"ExactNewton(lr={float(g['lr']):g}, damping={float(g['damping']):g}, eig_floor={float(g['eig_floor']):g}, "
            f"loss_fn={self._spec.kind!r}, {len(self._layers)} layers)"
        )
