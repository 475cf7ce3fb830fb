r"""K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions), as the K-BFGS paper's code runs it.

This is the baseline every fastcurv method is compared with, so it follows the K-FAC baseline of the K-BFGS
reference code (``renyiryry/kbfgs_neurips2020_public``, ``kfac_utils.py``/``training_function.py``; docs/algorithms.md
§1.7) unless an option says otherwise.

Per preconditioned layer (``nn.Linear``, or ``nn.Conv2d`` with ``groups=1``) with homogeneous input
:math:`\bar a = [a; 1]` (the bias is the last column of :math:`\bar W = [W \mid b]`), pre-activation
:math:`h = \bar W\bar a` and per-sample pre-activation gradient :math:`g = N\,\partial L/\partial h`
(:mod:`fastcurv.capture`), one step :math:`k = 0, 1, \dots` (counting applied steps) is:

1. gradient with L2 (``weight_decay`` :math:`\tau`): :math:`\hat g = \nabla_{\bar W} L + \tau\bar W`;
2. momentum in EMA form, no bias correction (``momentum`` :math:`\rho`): :math:`M \leftarrow \rho M + (1-\rho)\hat g`;
3. factors (``stat_decay`` :math:`\beta`): :math:`A \leftarrow \beta A + (1-\beta)\,\mathbb E[\bar a\bar a^\top]`,
   :math:`G \leftarrow \beta G + (1-\beta)\,\mathbb E[g g^\top]`, the batch statistics coming from
   :class:`fastcurv.capture.Capture` (which builds them with :func:`fastcurv.ops.kron_factor_update_`). The
   very first update (no :meth:`KFAC.warm_start`) sets :math:`A, G` to the batch statistics (:math:`\beta = 0`,
   ``factor_init="batch"``, the default). This deviates from the K-BFGS paper's KFAC code, which starts the
   factors from zero and applies the average from the first batch on (:math:`A_0 = (1-\beta)A_{batch}`,
   0.1·A_batch for the default :math:`\beta`) when it makes no initialisation pass: ``factor_init="zero"``;
4. when :math:`k \bmod T = 0` or :math:`k \le T` (``inv_every`` :math:`T`, the code's rule), refresh
   :math:`(A + \delta_A I)^{-1}` and :math:`(G + \delta_G I)^{-1}` from the *updated* factors;
5. direction :math:`P = (G + \delta_G I)^{-1}\, M\, (A + \delta_A I)^{-1}`, optional KL clipping
   :math:`\nu = \min(1, \sqrt{\kappa / (\eta^2\sum_l\langle P_l, M_l\rangle)})` (``kl_clip`` :math:`\kappa`,
   kfac-pytorch's rule), and :math:`\bar W \leftarrow \bar W - \eta\,\nu\,P` (``lr`` :math:`\eta`).

Damping (``damping`` :math:`\lambda`, Tikhonov, split between the two factors):

* ``damping_split="sqrt"`` (default, the code's): :math:`\delta_A = \delta_G = \sqrt\lambda`;
* ``"pi"`` (Martens & Grosse §6.3): :math:`\pi = \sqrt{(\operatorname{tr}A/d_a) / (\operatorname{tr}G/d_g)}`,
  :math:`\delta_A = \pi\sqrt\lambda`, :math:`\delta_G = \sqrt\lambda/\pi` (:math:`\pi = 1` if a trace is 0);
* ``"exact"`` (needs ``inverse="eigh"``): :math:`(A\otimes G + \lambda I)^{-1}` applied exactly in the
  factors' eigenbases, :math:`P = Q_G\,[(Q_G^\top M Q_A) \oslash (e_G e_A^\top + \lambda)]\,Q_A^\top`.

Inverses: ``inverse="cholesky"`` (default) factors :math:`F + \delta I` with ``torch.linalg.cholesky_ex`` and
inverts with ``cholesky_inverse``; ``"eigh"`` keeps :math:`F = Q\,\mathrm{diag}(e)\,Q^\top` (eigenvalues clamped
at 0) and the elementwise scaling :math:`1/((e_G+\delta_G)(e_A+\delta_A)^\top)`. A factorisation that fails
(singular or indefinite :math:`F + \delta I`, e.g. a damping of 0 written into ``param_groups``) is retried with jitter
:math:`\delta + s\sqrt{\varepsilon}\cdot\{1, 10^3, 10^6\}` (:math:`s` = mean :math:`|F_{ii}|`), then replaced by
the PSD projection :math:`Q\,\mathrm{diag}(1/(\max(e, 0) + \delta'))\,Q^\top`; if even that fails the previous
inverse is kept. Each case is counted (:meth:`KFAC.counters`: ``jitter_fallbacks``, ``psd_fallbacks``,
``inverse_failures``); no NaN ever reaches the state. A non-finite factor, momentum or inverse found in
the state (corrupted from outside the step) is reset — a factor restarts from the batch statistic — and the
affected inverses are refreshed in the same step (``state_resets``).

Blow-up guard (``blowup_factor`` :math:`c`, default 1.5; None turns it off), after Martens' Levenberg–Marquardt
rule (Martens 2010 §4.1; Martens & Grosse 2015 §6.5): a step whose *loss* blows up is rejected, not only one
whose loss is non-finite. K-FAC evaluates the loss once per step, at the point the previous step produced,
on a new minibatch; so step :math:`k+1`'s loss :math:`L_{k+1} = L(\theta_k)` judges step :math:`k`. With
:math:`\bar L` the exponential average (decay 0.9) of the losses of accepted steps (the first one sets it):

* :math:`L_{k+1} - \bar L \le (c-1)\,|\bar L|` (for a nonnegative loss: :math:`L_{k+1} \le c\,\bar L`; or
  either is NaN: the non-finite rule decides): step :math:`k` is accepted, :math:`L_{k+1}` enters
  :math:`\bar L`, step :math:`k+1` runs;
* otherwise step :math:`k` is **undone** — parameters, momentum, factors, fallback state
  and the step counters are restored bitwise from copies kept when step :math:`k` began — the damping is
  raised, :math:`\lambda \leftarrow \frac32\lambda` (``KFAC.LM_BOOST``, Martens' factor; it is written into
  ``param_groups[0]["damping"]`` and never lowered automatically), every inverse is refreshed with the new
  :math:`\lambda` (the inverses are the only state not restored: they are a function of the restored
  factors and of :math:`\lambda`), step :math:`k+1` is not applied, and ``counters()["rejected_steps"]``
  counts it. The next step starts again from :math:`\theta_{k-1}`. Under data parallelism the guard is off (each
rank sees only its local loss; agreeing on a global one would cost an all-reduce per step). A step can only be undone by the one
  right after it (not after a rejection, a skipped step, a checkpoint load or in the plain loop, which has
  no loss).

Why this detection: it needs no extra forward pass (an evaluation of the new point on the same minibatch
would add a third of a forward+backward to every step, about 18% of a K-FAC step on CURVES), the
comparison rides on the step's one host read of the finiteness flags, and the price is one copy of the
parameters, momentum and factors per step (``torch._foreach_copy_`` into buffers allocated once). The
reference is an average over minibatches because consecutive losses are on different minibatches;
:math:`c = 1.5` lies well above minibatch noise at the shipped problems' batch sizes and below the jumps
that start a divergence (on the generated CURVES, ``KFAC(model)`` without the guard went 225 → 501 → 874
→ 2·10⁵ → 7·10²⁷; with :math:`c = 2` the 874 was accepted and the guard, undoing one step at a time, then
needed many rejections to settle). Deviation from Martens: the damping is raised only on a blow-up, there is no reduction ratio
:math:`\rho` (it needs the quadratic model's value at the step) and no automatic lowering.

Data parallel (DDP; :mod:`fastcurv.distributed`): the batch :math:`A`, :math:`G` are averaged over the
ranks (weighted by rows) before the EMA; ``distributed="owner"`` gives each factorisation to one rank and
shares the result. Mixed precision: ``step(closure, scaler=...)`` unscales gradients and :math:`G`.
See docs/distributed.md.

Convolutions (KFC, Grosse & Martens 2016): :math:`\bar a` are the ``F.unfold`` patches (one row per sample and
output position, columns like ``weight.flatten(1)``), :math:`g` the output gradients at each position. The
capture gives row means; KFC's Fisher block is :math:`L\,(A\otimes G)` with :math:`L` output positions (sum over
positions of :math:`\bar a\bar a^\top`, mean of :math:`gg^\top`), so this optimizer uses :math:`L\cdot A` and
:math:`G`. The same rule (:math:`L` = rows per sample) applies to ``nn.Linear`` on ``(N, T, d)`` inputs (the
weight-sharing "expand" convention); for 2-D inputs :math:`L = 1`.

Fisher (``fisher``):

* ``"empirical"`` (default): :math:`g` from the backward of the training loss itself. Works with the plain
  loop ``loss.backward(); opt.step()`` and with ``opt.step(closure)``. The statistics are those of every
  grad-enabled forward/backward since the previous step (a running mean over all rows), so **gradient
  accumulation** over :math:`k` micro-batches works in both forms (Lightning's ``accumulate_grad_batches``:
  the closure of the last micro-batch does not zero, and ``step(closure)`` keeps what was accumulated).
  Convention: each micro-batch loss is divided by :math:`k` (as Lightning does), so that the accumulated
  gradient is that of the mean over all :math:`kN` samples; the tap scales :math:`g` by the micro-batch's
  :math:`N`, so :math:`G` is multiplied by :math:`k^2` (:math:`k` = backward passes that reached the layer's
  weight since the last step, counted by a post-accumulate-grad hook). Exact for equal micro-batch sizes.
  Run evaluation forwards under ``torch.no_grad()``.
* ``"sampled"`` (the code baseline; the true Fisher): :math:`g` from a second backward of the negative
  log-likelihood at targets sampled from the model's predictive distribution. The closure returns
  ``(loss, output)`` (forward only, or calling ``backward()`` itself: its graph is then retained); the
  optimizer backpropagates ``loss`` for the gradient, then builds
  :math:`\tilde L = \frac1N\sum_i -\log p(\tilde t_i \mid z_i)` (summed over non-batch dimensions) with
  ``likelihood``:

  - ``"categorical"``: ``output`` are logits with classes on dim 1 (``F.cross_entropy``), :math:`\tilde t \sim
    \mathrm{softmax}(z)`;
  - ``"bernoulli"``: logits (``F.binary_cross_entropy_with_logits``),
    :math:`\tilde t \sim \mathrm{Bernoulli}(\sigma(z))`;
  - ``"gaussian"``: :math:`\tilde L = \frac1{2N}\sum\|z - \tilde t\|^2`, :math:`\tilde t \sim \mathcal N(z, I)`
    (the Fisher of ½·squared error);
  - a callable ``output -> sampled loss`` for anything else (the user samples).

  The canonical per-sample scaling above matches the K-BFGS problems' losses (summed over pixels, averaged
  over the batch, e.g. :meth:`fastcurv.data.Problem.loss_fn`); a training loss averaged over *all* elements is
  smaller by the number of outputs per sample, which only rescales ``lr`` relative to ``damping``. Targets
  are drawn from the optimizer's own ``torch.Generator`` (``seed``), saved in the state dict.

Loss reduction (``loss_reduction``). The factors are those of the loss the closure returns. With
``"mean"`` (default) it is a batch mean, :math:`L = \frac1N\sum_n\ell_n`, and the rows
:math:`g_i = N\,\partial L/\partial h_i` are per-sample gradients. With ``"sum"``, :math:`L = \sum_n\ell_n`,
whose Fisher is :math:`N` times the mean's: the captured rows are then :math:`N` times the per-sample
gradients, and :math:`G` is divided by :math:`N` (for the sampled Fisher with a built-in ``likelihood``,
whose :math:`\tilde L` is a mean, multiplied by :math:`N`), so :math:`G_{sum} = N\,G_{mean}` and as the
damping goes to 0 the step is the same for either reduction. A summed loss declared as ``"mean"`` makes
:math:`G` :math:`N^2` times too large and the step about :math:`N` times too small (measured: 1024 at
:math:`N = 32`); when the closure returns a torch loss whose reduction autograd records
(:func:`fastcurv.losses.reduction_of`, e.g. ``F.cross_entropy(..., reduction="sum")``) a mismatch raises
``ValueError``; otherwise (a division after the loss, a user-written loss) it cannot be read, so set it. :math:`N` is this
process's number of samples in the step.

Compile: hyperparameters are 0-d tensors (``torch.optim.lr_scheduler`` works, no recompiles). The step is
three compiled functions (``torch.compile(fullgraph=True)`` when ``compile`` is on): the finiteness check (three
bools from one max-abs reduction per tensor group, one host sync per step; only when one is False does an eager
per-tensor check find the culprit), (momentum + factor EMA) and (direction + KL clip + parameter update);
the inverse refresh runs eagerly between the last two, so it adds no graphs and no recompiles. (Measured on torch 2.13 CPU: ``cholesky_ex`` + ``cholesky_inverse`` and ``eigh`` do
compile with ``fullgraph=True`` — extern LAPACK calls, bitwise equal to eager — but the jitter/PSD fallback
needs the factorisation's status on the host, and compiling the LAPACK call itself gains nothing.)
Inductor pitfalls avoided (docs/capture.md): no ``add(..., alpha=)`` (the EMA is ``mul_`` then ``add_(X * c)``),
no in-place update of a 0-d tensor inside a compiled region (counters are Python ints, host side), and the
loss enters the compiled check with shape (1,) (a 0-d float input gets a NaN guard: a NaN loss would
recompile). tests/optim/test_kfac.py pins each (compiled == eager, constant graph count, NaN step).

Defaults (K-BFGS code's KFAC baseline, Demo.ipynb's tuned MNIST values): ``lr=1``, ``damping=3``,
``momentum=0.9``, ``weight_decay=1e-5``, ``stat_decay=0.9``, ``inv_every=20``, and the blow-up guard
(``blowup_factor=1.5``). With the empirical Fisher these values diverge on the generated CURVES at step ~28
without the guard (loss 2·10⁵, then 7·10²⁷); with it the blow-ups are rejected, the damping rises and
training continues (``tests/optim/test_lm_guard.py``). Everything that is not
preconditioned (norms, embeddings, grouped convolutions, layers whose weights are used without calling
their ``forward``) goes to the base class's fallback rule; :meth:`describe` lists what went where.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv import losses as _losses
from fastcurv.capture import Capture, LayerStats, base_type
from fastcurv.optim._base import Closure, CurvatureOptimizer, Open, finite_flag, maybe_compile

__all__ = ["KFAC"]

_FISHERS = ("empirical", "sampled")
_LIKELIHOODS = _losses.LIKELIHOODS
_SPLITS = ("sqrt", "pi", "exact")
_INVERSES = ("cholesky", "eigh")
_JITTERS = (1.0, 1e3, 1e6)  # multiples of s·sqrt(eps) tried after a failed Cholesky


@dataclass
class _Layer:
    """One preconditioned layer: its capture statistics and parameters."""

    stats: LayerStats
    weight: nn.Parameter
    bias: nn.Parameter | None
    name: str


# ------------------------------------------------------------------------------------------------------------
# the compiled parts (pure functions of tensors; flags are closure constants)
# ------------------------------------------------------------------------------------------------------------
def _hom_grad(W: Tensor, b: Tensor | None, gW: Tensor, gb: Tensor | None, wd: Tensor, dtype: torch.dtype) -> Tensor:
    r""":math:`[\nabla W + \tau W \mid \nabla b + \tau b]` as a ``(d_g, d_a)`` matrix in the factor dtype."""
    gw = (gW.reshape(gW.shape[0], -1) + W.reshape(W.shape[0], -1) * wd).to(dtype)
    if b is None:
        return gw
    gbias = b * wd if gb is None else gb + b * wd
    return torch.cat([gw, gbias.to(dtype).unsqueeze(1)], dim=1)


def _stats_update(
    Ws: list[Tensor],
    Bs: list[Tensor | None],
    gWs: list[Tensor],
    gBs: list[Tensor | None],
    Ms: list[Tensor],
    As: list[Tensor],
    Gs: list[Tensor],
    A_batch: list[Tensor],
    G_batch: list[Tensor],
    A_scale: list[Tensor],
    momentum: Tensor,
    weight_decay: Tensor,
    beta: Tensor,
) -> None:
    r"""Steps 1-3: :math:`M \leftarrow \rho M + (1-\rho)\hat g`; :math:`A \leftarrow \beta A + (1-\beta) L\,A_b`;
    :math:`G \leftarrow \beta G + (1-\beta) G_b` (in place; ``A_scale`` = rows per sample :math:`L`).

    Foreach ops over the layers (the same arithmetic, in the same order, as one ``mul_``/``add_`` per tensor:
    bitwise equal), so the eager update is a few dispatches, not a few per layer."""
    if not Ms:
        return
    mom = momentum.to(Ms[0].dtype)
    bt = beta.to(As[0].dtype)
    hg = [_hom_grad(W, b, gW, gb, weight_decay.to(W.dtype), M.dtype) for W, b, gW, gb, M in zip(Ws, Bs, gWs, gBs, Ms)]
    torch._foreach_mul_(Ms, mom)
    torch._foreach_add_(Ms, torch._foreach_mul(hg, 1 - mom))
    torch._foreach_mul_(As, bt)
    torch._foreach_add_(As, torch._foreach_mul(A_batch, [s * (1 - bt) for s in A_scale]))
    torch._foreach_mul_(Gs, bt)
    torch._foreach_add_(Gs, torch._foreach_mul(G_batch, 1 - bt))


def _health_flags(tensors: list[Tensor], n_A: list[Tensor], n_G: list[Tensor], state: list[Tensor]) -> Tensor:
    """One bool vector: ``isfinite(t).all()`` for each tensor, then ``n_A > 0 and n_G > 0`` for each layer,
    then ``isfinite(t).all()`` for each optimizer-state tensor (compiled, it is a couple of fused reductions
    instead of two kernels per tensor)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    flags += [((a > 0) & (g > 0)).reshape(()) for a, g in zip(n_A, n_G)]
    flags += [torch.isfinite(t).all() for t in state]
    return torch.stack(flags)


def _health_summary(tensors: list[Tensor], n_A: list[Tensor], n_G: list[Tensor], state: list[Tensor]) -> Tensor:
    """The steady-state check, three bools: every tensor finite, every layer got rows (``n_A``, ``n_G`` >
    0), every state tensor finite — one max-abs reduction per group (:func:`finite_flag`) instead of
    :func:`_health_flags`' two kernels per tensor, which runs only when one of these is False."""
    dev = tensors[0].device
    counts = torch.cat(n_A + n_G).gt(0).all() if n_A else torch.ones((), dtype=torch.bool, device=dev)
    return torch.stack([finite_flag(tensors, dev), counts.to(dev), finite_flag(state, dev)])


def _make_apply(eigen: bool, kl: bool) -> Callable[..., None]:
    """Step 5 for the chosen inverse representation and KL-clip flag."""

    def apply(
        Ws: list[Tensor],
        Bs: list[Tensor | None],
        Ms: list[Tensor],
        L1: list[Tensor],
        L2: list[Tensor],
        L3: list[Tensor],
        lr: Tensor,
        kl_clip: Tensor,
    ) -> None:
        r"""Direction :math:`P` per layer (``cholesky``: ``L1`` = :math:`G^{-1}`, ``L2`` = :math:`A^{-1}`;
        ``eigh``: ``L1`` = :math:`Q_G`, ``L2`` = :math:`Q_A`, ``L3`` = the elementwise scaling), optional KL
        clip, then :math:`\bar W \leftarrow \bar W - \eta\nu P`."""
        Ps = []
        for M, a, c, d in zip(Ms, L1, L2, L3):
            if eigen:
                Ps.append(a @ (((a.T @ M) @ c) * d) @ c.T)
            else:
                Ps.append((a @ M) @ c)
        step = -lr
        if kl:
            vg = torch.stack([(P * M).sum() for P, M in zip(Ps, Ms)]).sum().to(lr.dtype) * lr * lr
            tiny = torch.finfo(vg.dtype).tiny
            nu = torch.clamp(torch.sqrt(kl_clip.to(lr.dtype) / torch.clamp(vg.abs(), min=tiny)), max=1.0)
            step = step * nu
        for W, b, P in zip(Ws, Bs, Ps):
            k = W[0].numel()
            W.add_((P[:, :k] * step.to(P.dtype)).reshape(W.shape).to(W.dtype))
            if b is not None:
                b.add_((P[:, k] * step.to(P.dtype)).to(b.dtype))

    return apply


# ------------------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------------------
def _count_round(rounds: dict[int, int]) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook counting the backward passes that reached a layer's weight."""

    def hook(p: Tensor) -> None:
        rounds[id(p)] = rounds.get(id(p), 0) + 1

    return hook


class KFAC(CurvatureOptimizer):
    r"""K-FAC for ``nn.Linear`` and ``nn.Conv2d`` layers (see the module docstring for the exact algorithm).

    Usage::

        opt = KFAC(model, lr=1.0, damping=3.0)
        for x, y in loader:                          # closure form (forward only; the optimizer backpropagates,
            opt.step(lambda: loss_fn(model(x), y))   # or LBFGS-style: zero_grad(); loss.backward(); return loss)
        # or the plain loop (empirical Fisher):
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        # sampled (true) Fisher: the closure also returns the model output
        opt = KFAC(model, fisher="sampled", likelihood="bernoulli")

        def closure():
            out = model(x)
            return loss_fn(out, y), out

        opt.step(closure)

    Args:
        model: the model (its Linear/Conv2d layers are captured by class swap, see :mod:`fastcurv.capture`).
        lr: step size :math:`\eta` (default 1, the K-BFGS Demo's tuned KFAC value).
        damping: Tikhonov :math:`\lambda > 0` (default 3, Demo); split by ``damping_split``.
        momentum: :math:`\rho \in [0, 1)` of the EMA-form momentum (default 0.9).
        weight_decay: L2 coefficient :math:`\tau` added to the gradient (default 1e-5, the code's).
        stat_decay: factor EMA :math:`\beta \in [0, 1)` (default 0.9, the code's ``kfac_rho``).
        inv_every: inverse period :math:`T \ge 1` (default 20); inverses are refreshed at step k when
            ``k % T == 0 or k <= T``.
        fisher: ``"empirical"`` (default) or ``"sampled"`` (needs ``likelihood`` and a closure returning
            ``(loss, output)``).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or a callable ``output -> loss`` (only
            with ``fisher="sampled"``).
        damping_split: ``"sqrt"`` (default), ``"pi"`` or ``"exact"`` (``"exact"`` needs ``inverse="eigh"``).
        inverse: ``"cholesky"`` (default) or ``"eigh"``.
        kl_clip: KL-clipping radius :math:`\kappa > 0`, or None (default: off).
        blowup_factor: :math:`c > 1` of the blow-up guard (default 1.5), or None (off, and no per-step copies);
            see the module docstring.
        factor_dtype: dtype of factors, inverses and momentum (default: the parameters' dtype, float32 for
            bf16/fp16 parameters).
        layers: restrict preconditioning to these modules (or qualified names); default every supported layer.
        seed: seed of the generator used for sampled targets (default: drawn from the global RNG).
        loss_reduction: ``"mean"`` (default) or ``"sum"``: how the closure's loss reduces over the batch (see
            *Loss reduction* in the module docstring; a summed loss declared as a mean takes steps about
            :math:`N` times too small).
        factor_init: the factors before the first update when :meth:`warm_start` was not called:
            ``"batch"`` (default: the first update sets them to the batch statistics) or ``"zero"`` (they start
            at zero and the first update is the usual average, :math:`A = (1-\beta)A_{batch}`: the K-BFGS
            paper's KFAC code without its initialisation pass).
        fallback, fallback_lr, on_nonfinite, compile, distributed, process_group: see
            :class:`~fastcurv.optim._base.CurvatureOptimizer`.
    """

    hyperparameters = {
        "lr": (0.0, None),
        "damping": (Open(0.0), None),  # 0: singular factors, unbounded steps
        "momentum": (0.0, Open(1.0)),  # 1: the momentum never leaves 0
        "weight_decay": (0.0, None),
        "stat_decay": (0.0, Open(1.0)),  # 1: the factors never see the data
        "kl_clip": (Open(0.0), None),
    }
    _supports_scaler = True
    _supports_distributed = True

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor = 1.0,
        damping: float | Tensor = 3.0,
        momentum: float | Tensor = 0.9,
        weight_decay: float | Tensor = 1e-5,
        stat_decay: float | Tensor = 0.9,
        inv_every: int = 20,
        *,
        fisher: str = "empirical",
        likelihood: str | Callable[[Tensor], Tensor] | None = None,
        damping_split: str = "sqrt",
        inverse: str = "cholesky",
        kl_clip: float | Tensor | None = None,
        blowup_factor: float | None = 1.5,
        factor_dtype: torch.dtype | None = None,
        layers: Iterable[nn.Module | str] | None = None,
        seed: int | None = None,
        loss_reduction: str = "mean",
        factor_init: str = "batch",
        fallback: str = "sgd",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        if isinstance(inv_every, bool) or not isinstance(inv_every, int) or inv_every < 1:
            raise ValueError(f"inv_every must be an int >= 1, got {inv_every!r}")
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if factor_init not in ("batch", "zero"):
            raise ValueError(f"factor_init must be 'batch' or 'zero', got {factor_init!r}")
        if fisher == "sampled":
            if likelihood is None:
                raise ValueError(
                    "fisher='sampled' needs likelihood= one of "
                    f"{_LIKELIHOODS} or a callable output -> sampled loss"
                )
            if not callable(likelihood) and likelihood not in _LIKELIHOODS:
                raise ValueError(f"likelihood must be one of {_LIKELIHOODS} or a callable, got {likelihood!r}")
        elif likelihood is not None:
            raise ValueError("likelihood is only used with fisher='sampled' (the empirical Fisher needs none)")
        if damping_split not in _SPLITS:
            raise ValueError(f"damping_split must be one of {_SPLITS}, got {damping_split!r}")
        if inverse not in _INVERSES:
            raise ValueError(f"inverse must be one of {_INVERSES}, got {inverse!r}")
        if damping_split == "exact" and inverse != "eigh":
            raise ValueError("damping_split='exact' applies (A⊗G + λI)^{-1} in the eigenbases: use inverse='eigh'")
        if blowup_factor is not None and (
            isinstance(blowup_factor, bool) or not isinstance(blowup_factor, (int, float)) or not blowup_factor > 1
        ):
            raise ValueError(f"blowup_factor must be a float > 1 or None (rule off), got {blowup_factor!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC is constructed from the model (an nn.Module), e.g. KFAC(model, lr=...); got "
                f"{type(model).__name__}"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if factor_dtype is None and params:
            factor_dtype = params[0].dtype if params[0].dtype in (torch.float32, torch.float64) else torch.float32
        if factor_dtype not in (torch.float32, torch.float64, None):
            raise TypeError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype}")
        defaults: dict[str, float | Tensor] = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, stat_decay=stat_decay
        )
        if kl_clip is not None:
            defaults["kl_clip"] = kl_clip
        super().__init__(
            model,
            defaults,
            fallback=fallback,
            fallback_lr=fallback_lr,
            on_nonfinite=on_nonfinite,
            compile=compile,
            distributed=distributed,
            process_group=process_group,
        )
        g = self.param_groups[0]

        self.inv_every = inv_every
        self.factor_init = factor_init
        self.loss_reduction = loss_reduction
        self.fisher = fisher
        self.likelihood = likelihood
        self.damping_split = damping_split
        self.inverse = inverse
        self.factor_dtype = factor_dtype
        self._kl = kl_clip is not None
        self.blowup_factor = None if blowup_factor is None else float(blowup_factor)
        self._guard_on = self.blowup_factor is not None
        self._eigen = inverse == "eigh"
        ref = params[0]
        self._gen = torch.Generator(device=ref.device)
        self._gen.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed)

        trainable = set(params)
        if layers is None:  # capture's default selection, minus layers with frozen parameters
            cap_layers: list[nn.Module | str] = [
                m for m in model.modules()
                if base_type(m) in (nn.Linear, nn.Conv2d) and getattr(m, "groups", 1) == 1 and m.weight in trainable
                and (m.bias is None or m.bias in trainable)
            ]
        else:
            if isinstance(layers, (str, nn.Module)):
                raise TypeError("layers must be an iterable of modules or module names, not a single one")
            cap_layers = list(layers)
        self._cap = Capture(model, layers=cap_layers, dtype=factor_dtype, grad_scale="batch", mode=("A", "G"))
        self._layers: list[_Layer] = []
        for st in self._cap.layers:
            w, b = st.module.weight, st.module.bias
            if w not in trainable or (b is not None and b not in trainable):
                continue  # frozen weight or bias: leave the layer to the fallback (frozen params are not in it)
            self._layers.append(_Layer(st, w, b, st.name or "<root>"))
        # backward rounds per layer since the statistics were last reset (gradient accumulation, _batch_stats)
        self._rounds: dict[int, int] = {id(lay.weight): 0 for lay in self._layers}
        self._round_hooks = [lay.weight.register_post_accumulate_grad_hook(_count_round(self._rounds))
                             for lay in self._layers]
        self._refresh_partition()
        self._counters.update(
            factor_updates=0, inverse_refreshes=0, jitter_fallbacks=0, psd_fallbacks=0, inverse_failures=0,
            rejected_steps=0,
        )
        for layer in self._layers:
            self._init_layer_state(layer)
        self._health_fn = _health_flags  # rare path (something is not finite): eager, no graph for it
        self._summary_fn = maybe_compile(_health_summary, self.compile_enabled)
        self._stats_fn = maybe_compile(_stats_update, self.compile_enabled)
        self._apply_fn = maybe_compile(_make_apply(self._eigen, self._kl), self.compile_enabled)
        self._zero = torch.zeros((), dtype=g["lr"].dtype, device=ref.device)
        self._guard_on = self._guard_on and self._comm is None  # local losses differ between ranks
        # Levenberg-Marquardt guard (see _guard_check): EMA of accepted losses (NaN: none yet), and the
        # targets/copies of everything the last applied step wrote except the inverses
        self._loss_ref = torch.full((1,), float("nan"), dtype=g["lr"].dtype, device=ref.device)
        self._undo: tuple[list[Tensor], list[Tensor]] | None = None
        self._undo_ok = False

    # -------------------------------------------------------------------------------------------- setup
    def _refresh_partition(self) -> None:
        mapping: dict[Tensor, str] = {}
        for layer in self._layers:
            kind = "Conv2d (KFC)" if layer.stats.conv else "Linear"
            what = "weight+bias" if layer.bias is not None else "weight"
            mapping[layer.weight] = f"K-FAC {kind} {layer.name} ({what})"
            if layer.bias is not None:
                mapping[layer.bias] = f"K-FAC {kind} {layer.name} (bias column)"
        self._set_preconditioned(mapping)

    def _init_layer_state(self, layer: _Layer) -> None:
        st, dev, dt = layer.stats, layer.weight.device, self.factor_dtype
        da, dg = st.d_a, st.d_g
        s = self.state[layer.weight]
        s["A"] = torch.zeros(da, da, dtype=dt, device=dev)
        s["G"] = torch.zeros(dg, dg, dtype=dt, device=dev)
        s["momentum"] = torch.zeros(dg, da, dtype=dt, device=dev)
        if self._eigen:
            s["QA"] = torch.zeros(da, da, dtype=dt, device=dev)
            s["QG"] = torch.zeros(dg, dg, dtype=dt, device=dev)
            s["scale"] = torch.zeros(dg, da, dtype=dt, device=dev)
        else:
            s["A_inv"] = torch.zeros(da, da, dtype=dt, device=dev)
            s["G_inv"] = torch.zeros(dg, dg, dtype=dt, device=dev)

    def _inverse_tensors(self, layer: _Layer) -> tuple[Tensor, Tensor, Tensor]:
        s = self.state[layer.weight]
        if self._eigen:
            return s["QG"], s["QA"], s["scale"]
        return s["G_inv"], s["A_inv"], s["G_inv"]  # third slot unused for Cholesky

    # -------------------------------------------------------------------------------------------- closure
    def _sampled_loss(self, output: Tensor) -> Tensor:
        r""":math:`\tilde L = \frac1N\sum_i -\log p(\tilde t_i\mid z_i)`, :math:`\tilde t_i \sim p(\cdot\mid z_i)`."""
        lik = self.likelihood
        if callable(lik):
            out = lik(output)
            if not isinstance(out, Tensor) or out.dim() != 0:
                raise TypeError(
                    f"likelihood(output) must return the sampled loss as a 0-d tensor, got {type(out).__name__}"
                )
            return out
        if not isinstance(output, Tensor) or output.dim() == 0:
            raise TypeError(
                "fisher='sampled': the closure's output must be the model output, a tensor with a batch dim"
            )
        # a non-finite output is sampled as if it were 0 (torch.bernoulli/multinomial would raise); the sampled
        # loss and G stay non-finite, so the step is skipped like any other non-finite statistic
        return _losses.nll(lik, output, _losses.sample_targets(lik, output, self._gen))

    def _forward_backward(self, closure: Closure, *, fresh: bool = False) -> Tensor:
        """Run the closure through the base class's evaluator (statistics of gradients accumulated before the
        step are kept, see :meth:`_begin_closure`) and, for the sampled Fisher, backpropagate the sampled
        loss, whose G replaces the empirical one. Returns the detached loss."""
        sampled = self.fisher != "empirical"
        loss, output, raw, _ = self._eval_closure(closure, fresh=fresh, output=True, retain_graph=sampled)
        red = _losses.reduction_of(raw)
        if red is not None and red != self.loss_reduction:  # a wrong declaration would rescale the step by N
            raise ValueError(
                f"KFAC: the closure's loss was reduced with reduction={red!r} but loss_reduction="
                f"{self.loss_reduction!r}; pass KFAC(..., loss_reduction={red!r})"
            )
        if sampled:
            if output is None:
                raise ValueError(
                    "fisher='sampled' needs the model output: let the closure return (loss, output)"
                )
            self._cap.reset("G")
            with torch.enable_grad():
                sloss = self._sampled_loss(output)
                ws = [lay.weight for lay in self._layers]
                if ws and sloss.requires_grad:
                    if self._scaler is not None:
                        sloss = self._scaler.scale(sloss)
                    torch.autograd.grad(sloss, ws, allow_unused=True)
        return loss

    @property
    def _supports_accumulation(self) -> bool:  # type: ignore[override]
        # the sampled Fisher's G comes from the step's own micro-batch only: no pooling with earlier ones
        return self.fisher == "empirical"

    def _fresh_round(self) -> None:
        self._cap.reset()
        self._end_round()

    def _end_round(self) -> None:
        for k in self._rounds:
            self._rounds[k] = 0

    # -------------------------------------------------------------------------------------------- statistics
    def _batch_stats(self, layers: list[_Layer]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Batch A, G and the KFC row factor L = n_A / n_s of each layer (tensors; no host sync)."""
        if not layers:
            return [], [], []
        sts = [lay.stats for lay in layers]
        As = [st.A for st in sts]
        # k > 1 backward rounds accumulated (micro-batches, each loss divided by k so that the gradient is the
        # mean over the whole batch): the per-call scale N_call of g is k times too small for the pooled batch
        ks = [self._rounds.get(id(lay.weight), 1) for lay in layers]
        Gs = [st.G if k <= 1 else st.G * float(k * k) for st, k in zip(sts, ks)]
        dt = As[0].dtype
        L = torch.cat([st.n_A for st in sts]).to(dt) / torch.cat([st.n_s for st in sts]).clamp(min=1).to(dt)
        return As, Gs, list(L.unbind())

    def _prepare_stats(self, layers: list[_Layer], *, user_backward: bool = False) -> None:
        """Make the captured batch statistics final: divide out a GradScaler's scale (:math:`G` was built
        from gradients scaled by :math:`S`), then, under data parallelism, replace each rank's statistics by
        the row-weighted mean over all ranks (:meth:`fastcurv.distributed.Communicator.weighted_mean_`)."""
        inv = self._unscale(user_backward=user_backward)
        if inv != 1.0:
            for lay in layers:
                lay.stats.G.mul_(inv * inv)
                lay.stats.g_mean.mul_(inv)
        if self.loss_reduction == "sum":  # G of the summed loss: N times the batch mean's (module doc)
            sampled = self.fisher == "sampled" and not callable(self.likelihood)
            for lay in layers:
                n = lay.stats.n_s.clamp(min=1).to(lay.stats.G.dtype)
                lay.stats.G.mul_(n) if sampled else lay.stats.G.div_(n)
        if self._comm is not None and layers:
            sts = [lay.stats for lay in layers]
            self._comm.weighted_mean_(
                [st.A for st in sts] + [st.G for st in sts],
                [st.n_A for st in sts] + [st.n_G for st in sts],
                counters=[st.n_s for st in sts],
            )

    def _state_tensors(self, lay: _Layer) -> list[Tensor]:
        s = self.state[lay.weight]
        return [s[k] for k in self._STATE_KEYS[self._eigen]]

    _STATE_KEYS = {False: ("A", "G", "momentum", "A_inv", "G_inv"), True: ("A", "G", "momentum", "QA", "QG", "scale")}

    def _check_and_filter(
        self, loss: Tensor | None, layers: list[_Layer], As: list[Tensor], Gs: list[Tensor]
    ) -> tuple[bool, list[int], list[int], list[int], bool]:
        """One host sync: are loss, gradients and batch factors finite; which layers got no statistics;
        which layers hold a non-finite factor (A or G), which a non-finite momentum or inverse (outside
        corruption: nothing a step writes is non-finite); whether the loss passes the blow-up test (last
        entry, :meth:`_guard_keep`). Under data parallelism the flags are agreed by all ranks first."""
        ts = [p.grad for p in self.param_groups[0]["params"] if p.grad is not None] + As + Gs
        # a non-finite hyperparameter (e.g. a scheduler writing NaN into lr) would write NaN into every
        # parameter: it skips the step like a non-finite gradient
        ts += [v.reshape(1) for k, v in self.param_groups[0].items() if k != "params" and isinstance(v, Tensor)]
        if loss is not None:
            ts.append(loss.reshape(1))  # shape (1,): a 0-d input would be specialised with a NaN guard (recompile)
        if not ts:
            return True, [], [], [], True
        k = len(self._STATE_KEYS[self._eigen])
        state = [t for lay in layers for t in self._state_tensors(lay)]
        n_A, n_G = [lay.stats.n_A for lay in layers], [lay.stats.n_G for lay in layers]
        summary = self._summary_fn(ts, n_A, n_G, state)
        vals = self._consensus(torch.cat([summary, self._guard_keep(loss).to(summary.device)])).tolist()
        keep = bool(vals.pop())
        if all(vals):  # the steady state: one reduction, one host read
            return True, [], [], [], keep
        vals = self._consensus(self._health_fn(ts, n_A, n_G, state)).tolist()  # which tensor, which layer
        n = len(ts)
        missing = [i for i, v in enumerate(vals[n : n + len(layers)]) if not v]
        st = vals[n + len(layers) :]
        bad_factors = [i for i in range(len(layers)) if not all(st[i * k : i * k + 2])]
        bad_other = [i for i in range(len(layers)) if not all(st[i * k + 2 : (i + 1) * k])]
        return all(vals[:n]), missing, bad_factors, bad_other, keep

    def _warn_reset(self, layers: list[_Layer], what: str) -> None:
        self._counters["state_resets"] += len(layers)
        warnings.warn(
            f"KFAC: non-finite {what} in the optimizer state of layer(s) {', '.join(lay.name for lay in layers)} "
            f"(corrupted from outside the step); reset (counted in counters()['state_resets'])",
            RuntimeWarning,
            stacklevel=6,  # the caller of opt.step (through torch.optim.Optimizer's step wrappers)
        )

    def _active_layers(self) -> list[_Layer]:
        return [lay for lay in self._layers if lay.weight.grad is not None]

    def _handle_missing(self, layers: list[_Layer], missing: list[int]) -> list[_Layer]:
        """Layers with gradients but no statistics: their weights were used without calling ``forward`` (e.g.
        ``nn.MultiheadAttention.out_proj``). Before any factor update they move to the fallback (a warning);
        later, it is an error (the model's use of the layer changed)."""
        if not missing:
            return layers
        bad = [layers[i] for i in missing]
        names = ", ".join(lay.name for lay in bad)
        if self._counters["factor_updates"] == 0:
            warnings.warn(
                f"KFAC: layer(s) {names} received gradients but no curvature statistics (their weights are used "
                f"without calling the module's forward, or the forward ran under no_grad); they are updated by "
                f"the {self.fallback} fallback instead",
                stacklevel=4,
            )
            self._layers = [lay for lay in self._layers if lay not in bad]
            for lay in bad:
                self.state.pop(lay.weight, None)
            self._refresh_partition()
            return [lay for lay in layers if lay not in bad]
        raise RuntimeError(
            f"KFAC: layer(s) {names} have gradients but no curvature statistics this step (was the forward run "
            f"under no_grad, or the weights used without calling the module?)"
        )

    # -------------------------------------------------------------------------------------------- inverses
    def _deltas(self, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """Damping added to A and G (0-d tensors): √λ each, or π-corrected."""
        lam = self.param_groups[0]["damping"].to(A.dtype)
        if self.damping_split == "exact":
            z = torch.zeros((), dtype=A.dtype, device=A.device)
            return z, z
        r = lam.sqrt()
        if self.damping_split == "sqrt":
            return r, r
        ta = torch.diagonal(A).sum() / A.shape[0]
        tg = torch.diagonal(G).sum() / G.shape[0]
        pi = torch.sqrt(ta / tg)
        pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
        return r * pi, r / pi

    def _psd_inverse(self, Fm: Tensor, delta: Tensor) -> Tensor | None:
        r"""Last resort: :math:`Q\,\mathrm{diag}(1/(\max(e,0)+\delta'))Q^\top`, :math:`\delta' > 0`."""
        try:
            e, Q = torch.linalg.eigh(Fm)
        except RuntimeError:
            return None
        s = torch.diagonal(Fm).abs().mean()
        s = torch.where(s > 0, s, torch.ones_like(s))
        floor = s * math.sqrt(torch.finfo(Fm.dtype).eps)
        d = e.clamp(min=0) + torch.maximum(delta, floor)
        inv = (Q / d) @ Q.T
        return inv if bool(torch.isfinite(inv).all()) else None

    def _cholesky_inverses(self, mats: list[Tensor], deltas: list[Tensor], outs: list[Tensor]) -> None:
        """outs[i] <- (mats[i] + deltas[i] I)^{-1} by Cholesky; jitter, PSD projection, keep-old fallbacks."""
        facs, infos = [], []
        for Fm, d in zip(mats, deltas):
            eye = torch.eye(Fm.shape[0], dtype=Fm.dtype, device=Fm.device)
            L, info = torch.linalg.cholesky_ex(Fm + eye * d)
            facs.append(L)
            infos.append(info)
        bad = torch.stack(infos).ne(0).tolist() if infos else []
        for i, (Fm, d, out) in enumerate(zip(mats, deltas, outs)):
            if not bad[i]:
                out.copy_(torch.cholesky_inverse(facs[i]))
                continue
            self._counters["jitter_fallbacks"] += 1
            eye = torch.eye(Fm.shape[0], dtype=Fm.dtype, device=Fm.device)
            s = torch.diagonal(Fm).abs().mean()
            s = torch.where(s > 0, s, torch.ones_like(s)) * math.sqrt(torch.finfo(Fm.dtype).eps)
            done = False
            for j in _JITTERS:
                L, info = torch.linalg.cholesky_ex(Fm + eye * (d + s * j))
                if int(info) == 0:
                    inv = torch.cholesky_inverse(L)
                    if bool(torch.isfinite(inv).all()):
                        out.copy_(inv)
                        done = True
                        break
            if done:
                continue
            self._counters["psd_fallbacks"] += 1
            inv = self._psd_inverse(Fm, d)
            if inv is None:
                self._counters["inverse_failures"] += 1
            else:
                out.copy_(inv)

    def _eigh(self, Fm: Tensor) -> tuple[Tensor, Tensor] | None:
        """Eigendecomposition with eigenvalues clamped at 0; jitter retries on failure."""
        try:
            e, Q = torch.linalg.eigh(Fm)
            if bool(torch.isfinite(e).all() & torch.isfinite(Q).all()):
                return e.clamp(min=0), Q
        except RuntimeError:
            pass
        self._counters["jitter_fallbacks"] += 1
        eye = torch.eye(Fm.shape[0], dtype=Fm.dtype, device=Fm.device)
        s = torch.diagonal(Fm).abs().mean()
        s = torch.where(s > 0, s, torch.ones_like(s)) * math.sqrt(torch.finfo(Fm.dtype).eps)
        for j in _JITTERS:
            try:
                e, Q = torch.linalg.eigh(Fm + eye * (s * j))
            except RuntimeError:
                continue
            if bool(torch.isfinite(e).all() & torch.isfinite(Q).all()):
                return (e - s * j).clamp(min=0), Q
        self._counters["inverse_failures"] += 1
        return None

    _FALLBACK_COUNTERS = ("jitter_fallbacks", "psd_fallbacks", "inverse_failures")

    def _refresh_inverses(self, layers: list[_Layer]) -> None:
        """Step 4 for every layer in ``layers`` (eager: Cholesky/eigh with data-dependent fallbacks).

        With ``distributed="owner"`` each factorisation (Cholesky: each factor, cost :math:`d^3`; eigh: each
        layer, cost :math:`d_a^3 + d_g^3`) is done by one owner rank and the results are shared
        (:meth:`fastcurv.distributed.Communicator.share_from_owners_`); the fallback counters are summed over
        the ranks so that every rank reports the same."""
        self._counters["inverse_refreshes"] += 1
        comm = self._comm if self._comm is not None and self._comm.owner_mode else None
        before = [self._counters[k] for k in self._FALLBACK_COUNTERS]
        self._refresh_inverses_local(layers, comm)
        if comm is not None:
            delta = comm.all_sum_ints([self._counters[k] - b for k, b in zip(self._FALLBACK_COUNTERS, before)])
            for k, b, d in zip(self._FALLBACK_COUNTERS, before, delta):
                self._counters[k] = b + d

    def _refresh_inverses_local(self, layers: list[_Layer], comm: Any) -> None:
        lam = self.param_groups[0]["damping"]
        if self._eigen:
            owners = None
            if comm is not None:
                owners = comm.owners([lay.stats.d_a**3 + lay.stats.d_g**3 for lay in layers])
            for i, lay in enumerate(layers):
                if owners is not None and owners[i] != comm.rank:
                    continue
                s = self.state[lay.weight]
                dA, dG = self._deltas(s["A"], s["G"])
                eA = self._eigh(s["A"])
                eG = self._eigh(s["G"])
                if eA is None or eG is None:
                    continue
                (ea, qa), (eg, qg) = eA, eG
                if self.damping_split == "exact":
                    denom = torch.outer(eg, ea) + lam.to(ea.dtype)
                else:
                    denom = torch.outer(eg + dG, ea + dA)
                scale = 1.0 / denom
                if not bool(torch.isfinite(scale).all()):
                    self._counters["inverse_failures"] += 1
                    continue
                s["QA"].copy_(qa)
                s["QG"].copy_(qg)
                s["scale"].copy_(scale)
            if owners is not None:
                ts = [self.state[lay.weight][k] for lay in layers for k in ("QA", "QG", "scale")]
                comm.share_from_owners_(ts, [r for r in owners for _ in range(3)])
            return
        mats, deltas, outs = [], [], []
        for lay in layers:
            s = self.state[lay.weight]
            dA, dG = self._deltas(s["A"], s["G"])
            mats += [s["A"], s["G"]]
            deltas += [dA, dG]
            outs += [s["A_inv"], s["G_inv"]]
        if comm is None:
            self._cholesky_inverses(mats, deltas, outs)
            return
        owners = comm.owners([m.shape[0] ** 3 for m in mats])
        mine = [i for i, r in enumerate(owners) if r == comm.rank]
        self._cholesky_inverses([mats[i] for i in mine], [deltas[i] for i in mine], [outs[i] for i in mine])
        comm.share_from_owners_(outs, owners)

    def _refresh_due(self) -> bool:
        k, T = self._counters["steps"], self.inv_every
        return k % T == 0 or k <= T

    # -------------------------------------------------------------------------------------------- LM guard
    #: factor by which a rejected step raises the damping (Martens 2010's Levenberg-Marquardt factor 3/2)
    LM_BOOST = 1.5
    #: decay of the reference loss (an EMA of the losses of accepted steps)
    LOSS_REF_DECAY = 0.9

    def _guard_keep(self, loss: Tensor | None) -> Tensor:
        """Shape-(1,) bool, True unless ``loss`` - ref > (``blowup_factor`` - 1) |ref| (no host sync)."""
        if loss is None or not self._guard_on:
            return torch.ones(1, dtype=torch.bool, device=self._loss_ref.device)
        ref = self._loss_ref
        return ~(loss.reshape(1).to(ref.dtype) - ref > (self.blowup_factor - 1) * ref.abs())

    def _guard_accept(self, loss: Tensor) -> None:
        """Fold an accepted step's loss into the reference (the first one sets it)."""
        ref, l = self._loss_ref, loss.reshape(1).to(self._loss_ref.dtype)
        d = self.LOSS_REF_DECAY
        ref.copy_(torch.where(torch.isnan(ref), l, ref * d + l * (1 - d)))

    def _keep_undo(self, layers: list[_Layer]) -> None:
        """Copy what this step is about to write (parameters, momentum, factors, fallback state) so that the
        next step can undo it. Buffers are allocated once and reused (static addresses)."""
        targets = [t for lay in layers for t in self._state_tensors(lay)[:3]]
        targets += [v for p in self.fallback_params() for v in self.state[p].values() if isinstance(v, Tensor)]
        if self._undo is None or len(self._undo[0]) != len(targets) or any(
            a is not b for a, b in zip(self._undo[0], targets)
        ):
            self._undo = (targets, [torch.empty_like(t) for t in targets])
        self._snapshot_params()
        torch._foreach_copy_(self._undo[1], targets)
        self._undo_ok = True

    def _reject(self) -> None:
        """Undo the previous step (its loss blew up at this step's evaluation): parameters, momentum, factors
        and fallback state restored bitwise, step counters decremented, damping x ``LM_BOOST``, every
        inverse refreshed with the new damping; counted in ``rejected_steps``."""
        assert self._undo is not None
        self._restore_params()
        torch._foreach_copy_(self._undo[0], self._undo[1])
        self._undo_ok = False
        self._counters["steps"] -= 1
        self._counters["factor_updates"] -= 1
        self._counters["rejected_steps"] += 1
        self.param_groups[0]["damping"].mul_(self.LM_BOOST)
        if self._layers:
            self._refresh_inverses(self._layers)

    # -------------------------------------------------------------------------------------------- step
    def _step(self, closure: Closure | None) -> tuple[Tensor | None, bool]:
        if closure is not None:
            loss: Tensor | None = self._forward_backward(closure)
        else:
            if self.fisher == "sampled":
                raise ValueError(
                    "fisher='sampled' needs opt.step(closure) with a closure returning (loss, output): the plain "
                    "loop's backward only gives the empirical Fisher"
                )
            if not any(p.grad is not None for p in self.param_groups[0]["params"]):
                raise ValueError(
                    "KFAC.step() without a closure needs gradients: call loss.backward() first, or pass a closure "
                    "(step(lambda: loss_fn(model(x), y)))"
                )
            loss = None
        layers = self._active_layers()
        self._prepare_stats(layers, user_backward=closure is None)
        As, Gs, Ls = self._batch_stats(layers)
        finite, missing, bad_factors, bad_other, keep = self._check_and_filter(loss, layers, As, Gs)
        if layers and len(missing) == len(layers):
            self._cap.reset()
            raise ValueError(
                "KFAC: no preconditioned layer received any rows this step (an empty batch, a forward run under "
                "no_grad, or every layer's weight used without calling its forward); nothing was changed"
            )
        if not finite:
            self._cap.reset()
            self._skip("loss, gradient or curvature statistic")
            return loss, False
        if not keep and self._undo_ok:
            self._cap.reset()
            self._reject()
            return loss, False
        if loss is not None and self._guard_on:
            self._guard_accept(loss)
        bad_factors = [layers[i] for i in bad_factors]  # state corrupted from outside: repaired, step goes on
        bad_other = [layers[i] for i in bad_other]
        if missing:
            layers = self._handle_missing(layers, missing)
            As, Gs, Ls = self._batch_stats(layers)
            bad_factors = [lay for lay in bad_factors if lay in layers]
            bad_other = [lay for lay in bad_other if lay in layers]
        if bad_other:
            self._warn_reset(bad_other, "momentum or inverse")
            for lay in bad_other:
                torch._foreach_zero_(self._state_tensors(lay)[2:])
        g = self.param_groups[0]
        self._undo_ok = False
        if loss is not None and self._guard_on:
            self._keep_undo(layers)
        if layers:
            first = self._counters["factor_updates"] == 0 and self.factor_init == "batch"
            beta = self._zero if first else g["stat_decay"]
            st = [self.state[lay.weight] for lay in layers]
            self._stats_fn(
                [lay.weight for lay in layers],
                [lay.bias for lay in layers],
                [lay.weight.grad for lay in layers],
                [None if lay.bias is None else lay.bias.grad for lay in layers],
                [s["momentum"] for s in st],
                [s["A"] for s in st],
                [s["G"] for s in st],
                As,
                Gs,
                Ls,
                g["momentum"],
                g["weight_decay"],
                beta,
            )
            if self._refresh_due():
                self._refresh_inverses(layers)
            elif bad_other:
                self._refresh_inverses(bad_other)
            if bad_factors:  # a non-finite factor restarts from this batch's statistic (the lost EMA is gone)
                self._warn_reset(bad_factors, "factor")
                for lay in bad_factors:
                    i = layers.index(lay)
                    st[i]["A"].copy_(As[i] * Ls[i])
                    st[i]["G"].copy_(Gs[i])
                self._refresh_inverses(bad_factors)
            inv = [self._inverse_tensors(lay) for lay in layers]
            self._apply_fn(
                [lay.weight for lay in layers],
                [lay.bias for lay in layers],
                [s["momentum"] for s in st],
                [t[0] for t in inv],
                [t[1] for t in inv],
                [t[2] for t in inv],
                g["lr"],
                g.get("kl_clip", self._zero),
            )
        self._counters["factor_updates"] += 1
        self._fallback_update()
        self._cap.reset()
        return loss, True

    # -------------------------------------------------------------------------------------------- warm start
    @torch.no_grad()
    def warm_start(self, closures: Iterable[Closure]) -> int:
        r"""Set the factors to their average over forward/backward passes at the current parameters
        :math:`\theta_0` (the K-BFGS code does one epoch): :math:`A = \frac1J\sum_j A_j`, :math:`G =
        \frac1J\sum_j G_j`, each pass with this optimizer's ``fisher``. Parameters, momentum and the step count
        are unchanged; batches with non-finite statistics are ignored. Returns the number J of batches used.

        Replaces any factors accumulated so far; the first step then applies the EMA (``stat_decay``) to them.
        """
        self._check_hyper_types()
        j = 0
        try:
            for closure in closures:
                loss = self._forward_backward(closure, fresh=True)
                layers = self._active_layers()
                self._prepare_stats(layers)
                As, Gs, Ls = self._batch_stats(layers)
                finite, missing, _, _, _ = self._check_and_filter(loss, layers, As, Gs)
                if not finite:
                    continue
                if missing:
                    layers = self._handle_missing(layers, missing)
                    As, Gs, Ls = self._batch_stats(layers)
                j += 1
                for lay, Ab, Gb, L in zip(layers, As, Gs, Ls):
                    s = self.state[lay.weight]
                    if j == 1:
                        s["A"].copy_(Ab * L)
                        s["G"].copy_(Gb)
                    else:
                        s["A"].mul_((j - 1) / j).add_(Ab * (L / j))
                        s["G"].mul_((j - 1) / j).add_(Gb * (1.0 / j))
        finally:
            self.zero_grad(set_to_none=True)
            self._cap.reset()
        if j == 0:
            raise ValueError("warm_start: no closure gave finite statistics (was the iterable empty?)")
        self._counters["factor_updates"] += j
        return j

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The base state dict (factors, inverses, momentum, counters) plus the sampling generator's state."""
        sd = super().state_dict()
        sd["fastcurv"]["rng_state"] = self._gen.get_state()
        sd["fastcurv"]["loss_ref"] = self._loss_ref.clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (factors, inverses, momentum, counters — so the inverse schedule resumes —
        and the sampling generator)."""
        extra = state_dict.get("fastcurv", {})
        need = {"A", "G", "momentum"} | ({"QA", "QG", "scale"} if self._eigen else {"A_inv", "G_inv"})
        index = {p: i for i, p in enumerate(self.param_groups[0]["params"])}
        saved_state = state_dict.get("state", {})
        for lay in self._layers:  # validate before anything is loaded
            s = saved_state.get(index[lay.weight], {})
            if "A" not in s:
                continue  # moved to the fallback in the saved run
            if not need <= s.keys():
                raise ValueError(
                    f"KFAC.load_state_dict: layer {lay.name} lacks {sorted(need - s.keys())}; the state dict was "
                    f"saved by an optimizer with another inverse= setting (this one uses {self.inverse!r})"
                )
            if tuple(s["A"].shape) != (lay.stats.d_a,) * 2 or tuple(s["G"].shape) != (lay.stats.d_g,) * 2:
                raise ValueError(
                    f"KFAC.load_state_dict: layer {lay.name} has factors of shapes {tuple(s['A'].shape)}, "
                    f"{tuple(s['G'].shape)} in the state dict but needs ({lay.stats.d_a}, {lay.stats.d_a}), "
                    f"({lay.stats.d_g}, {lay.stats.d_g})"
                )
        super().load_state_dict(state_dict)
        if "rng_state" in extra:
            self._gen.set_state(extra["rng_state"].clone())
        if "loss_ref" in extra:
            self._loss_ref.copy_(extra["loss_ref"])
        self._undo_ok = False  # the previous step's copies are not in the state dict: it cannot be undone
        # layers moved to the fallback at the saved run's first step are not in the saved state
        self._layers = [lay for lay in self._layers if "A" in self.state.get(lay.weight, {})]
        self._refresh_partition()

    def remove(self) -> None:
        """Detach from the model: restore the layers' original classes (the optimizer is unusable after)."""
        self._cap.remove()
        for h in self._round_hooks:
            h.remove()

    def __repr__(self) -> str:
        g = self.param_groups[0]
        hp = ", ".join(f"{k}={float(g[k]):g}" for k in self.hyperparameters if k in g)
        return (
            f"KFAC({hp}, inv_every={self.inv_every}, fisher={self.fisher!r}, damping_split="
            f"{self.damping_split!r}, inverse={self.inverse!r}, {len(self._layers)} layers)"
        )
