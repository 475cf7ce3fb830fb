r"""Newton–CG with complex-step Hessian-vector products (Newton–Krylov with early termination).

.. note::
   **A reconstruction, not a port.** Shen, Shao, Zhou, Jiang, Luo & Yang (arXiv 2009.07098, 2020) train
   networks with complex-step (CS) Hessian-vector products and a Newton–Krylov method whose Krylov iteration
   stops "as soon as a disturbing direction is found" and whose step size is adjusted by "monitoring the
   Taylor-expansion approximation error". Only the abstract could be read (docs/algorithms.md §3, §8): the
   paper's Krylov method, thresholds, step control and defaults are unknown. Everything below is derived
   here from standard truncated-Newton practice (Steihaug 1983; Nocedal & Wright ch. 7) and the
   Levenberg–Marquardt rule of Hessian-free optimisation (Martens 2010), and every constant is an option.

Step protocol
-------------
Built from the model alone and stepped with a closure, like every fastcurv optimizer::

    opt = NewtonCG(model)                          # or NewtonCG(model, method="ggn", damping=0.3, ...)
    def closure():                                 # LBFGS-style (Lightning's automatic optimization) ...
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
    loss = opt.step(closure)                       # ... or forward only: opt.step(lambda: loss_fn(model(x), y))

The closure is the objective: its gradient is :math:`g`; the curvature products **replay it** with its
``zero_grad()``/``backward()`` turned into no-ops (:meth:`fastcurv.optim.CurvatureOptimizer._replay`), so the
user's forward and loss are used as written: ``"complex-step"`` with every parameter :math:`W` substituted
by the planes :math:`W + ih\,v_W` (``torch.func``-style reparametrisation of the module), ``"double-backward"``
from one replay with a ``create_graph`` gradient, ``"ggn"`` from one replay in which a forward hook cuts the
model's output :math:`o` from the loss (so :math:`H_\ell u` comes from the closure's own loss by double
backward; the closure must call the model the optimizer was built from exactly once — in a LightningModule,
``training_step`` calls ``self(x)``). The trial loss is one more replay without gradients. A closure
replay costs a forward more than calling the loss directly, so the option stays::

    opt = NewtonCG(model, loss_fn)                 # loss_fn(model(x), y) -> scalar
    loss = opt.step(batch=(x, y))                  # products run loss_fn(model(x), y) directly
    loss = opt.step(closure, batch=(x, y))         # gradient from closure(), curvature on (x, y)

Gradients accumulated before the step (a backward since the last step or ``zero_grad``) raise
``ValueError``: the closure replays see only the last micro-batch.

One step (parameters :math:`\theta`, all trainable parameters form one block)
-----------------------------------------------------------------------------
1. :math:`L_0 = L(\theta)` and :math:`g = \nabla L(\theta)` from the closure.
2. Truncated CG (:func:`fastcurv.optim._cg.truncated_cg`) on :math:`(H + \lambda I)\,\delta = -g` from
   :math:`\delta_0 = 0`, with :math:`Hv` the minibatch Hessian-vector product of ``method``:
   ``"complex-step"`` (default; :math:`Hv = \frac1h\nabla_\theta\,\mathrm{Im}\,L(\theta + ihv)`, one
   real-plane forward and backward per product, :mod:`fastcurv.hvp`), ``"double-backward"`` (Pearlmutter;
   the first-order graph is built once per step and each product is one extra backward) or ``"ggn"``
   (:math:`Gv = J^\top H_\ell J v`, positive semi-definite; the forward graph is built once per step).
   The CG stops at the first of: a **disturbing direction** :math:`p^\top Hp \le
   \varepsilon\lVert p\rVert^2` (undamped curvature; returns the current iterate, or at the first
   iteration the steepest-descent direction :math:`-g` scaled by
   :math:`t = \lVert g\rVert^2 / (|g^\top H g| + \lambda\lVert g\rVert^2)`, the minimiser along
   :math:`-g` of the model with :math:`|H|`), relative residual
   :math:`\lVert r\rVert \le \texttt{cg\_tol}\,\lVert g\rVert`, or ``max_cg_iters`` iterations.
3. Trial :math:`\theta^+ = \theta + \eta\,\delta` (``lr`` :math:`\eta`) and :math:`L_1 = L(\theta^+)` (the
   closure again, no gradient).
4. **Taylor-model check.** The predicted change is the *undamped* quadratic model
   :math:`q(\eta\delta) = \eta\, g^\top\delta + \tfrac12\eta^2\,\delta^\top H\delta`, with both terms read
   off the CG (:math:`\delta^\top H\delta = \delta^\top(H+\lambda I)\delta - \lambda\lVert\delta\rVert^2`,
   :math:`\delta^\top(H+\lambda I)\delta = \delta^\top(-g - r)`: no extra product). The ratio
   :math:`\rho = (L_1 - L_0)/q` is 1 when the model is exact; if :math:`q \ge 0` (no predicted decrease)
   :math:`\rho := 1` when :math:`L_1 \le L_0`, else :math:`-\infty`.
5. **Accept or reject**: the step is kept iff :math:`L_1` is finite and :math:`\rho >` ``accept_ratio``
   (default 0: the loss went down); otherwise :math:`\theta` is restored.
6. **Levenberg–Marquardt** (``adapt_damping=True``): :math:`\lambda \leftarrow` ``damping_increase``
   :math:`\cdot\lambda` (3/2) if :math:`\rho <` ``rho_low`` (1/4) or :math:`L_1` is not finite,
   :math:`\lambda \leftarrow` ``damping_decrease`` :math:`\cdot\lambda` (2/3) if :math:`\rho >`
   ``rho_high`` (3/4), clamped to [``min_damping``, ``max_damping``]. :math:`\lambda` plays the role of an
   inverse trust radius: a larger :math:`\lambda` gives a shorter step closer to :math:`-g/\lambda`. After
   a disturbing-direction exit, :math:`\lambda` is also raised to at least :math:`-p^\top Hp/\lVert p\rVert^2`
   (that direction's Rayleigh quotient, a lower bound on :math:`|\lambda_{\min}(H)|`), so the next damped
   system :math:`H + \lambda I` is not negative along it — the Levenberg–Marquardt counterpart of the
   trust-region fact that the damped step solves the trust-region problem only for
   :math:`\lambda \ge -\lambda_{\min}(H)`.

``damping`` (a 0-d tensor hyperparameter) is the initial :math:`\lambda`; the running value is
:attr:`NewtonCG.lm_damping` (saved in the state dict). With ``adapt_damping=False``, :math:`\lambda` is
``param_groups[0]["damping"]`` at every step (so a scheduler can drive it).

Non-finite loss, gradient, curvature (a non-finite :math:`p^\top Hp` or residual in the CG) or direction:
the step is skipped before anything is written — parameters, :math:`\lambda` and counters other than
``skipped_steps`` bitwise unchanged — or ``FloatingPointError`` with ``on_nonfinite="raise"``. A non-finite
*trial* loss :math:`L_1` is not a skip: it is the LM rule's case of a step that was too long (rejected,
:math:`\lambda` increased, counted in ``rejected_steps``).

Side effects: the curvature products leave buffers, RNG and ``.grad`` untouched (:mod:`fastcurv.hvp`); the
two closure calls are ordinary forwards (a train-mode BatchNorm updates its statistics, dropout draws masks).
After the step every ``.grad`` holds :math:`\nabla L(\theta)` of the returned loss :math:`L_0`.

Data parallel (``distributed=``; docs/distributed.md)
-----------------------------------------------------
Under a process group of :math:`W > 1` ranks, rank :math:`r` holds :math:`n_r` rows of ``batch`` (its
gradient batch) and :math:`m_r` rows of the curvature batch. The closure's backward runs inside DDP's
``no_sync`` and one all-reduce makes the loss and every gradient the global-batch mean,
:math:`L = \sum_r (n_r/N)\,L_r`, :math:`g = \sum_r (n_r/N)\,g_r` (:math:`N = \sum_r n_r`; exact for unequal
local batches). Each curvature product is :math:`Hv = \sum_r (m_r/M)\,H_r v` (one all-reduce per product;
BlockHF starts each block's reduction while the next block is computed), and the trial loss
:math:`L_1` is reduced like :math:`L_0`. Every CG scalar is then computed from bitwise-identical vectors on
every rank, so the ranks take the same exits, accept/reject decisions and damping updates without further
consensus, and a non-finite value on one rank is non-finite in the sums everywhere (every rank skips). The
returned loss is the global mean. ``distributed="owner"`` behaves as ``"replicate"``. A model that is not
DDP-wrapped is accepted when every rank holds the same parameters (checked at construction).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch.nn.utils.stateless import _reparametrize_module

from fastcurv import complex_step as cs
from fastcurv import hvp as _hvp
from fastcurv.distributed import PendingSum, no_sync, unwrap
from fastcurv.optim._base import Closure, CurvatureOptimizer
from fastcurv.optim._cg import CGResult, Segments, truncated_cg

__all__ = ["NewtonCG"]

LossFn = Callable[[Any, Any], Tensor]
_METHODS = ("complex-step", "double-backward", "ggn")


# --------------------------------------------------------------------------------------------------------
# flat <-> per-parameter vectors
# --------------------------------------------------------------------------------------------------------
class _Flat:
    """Concatenation of a list of parameters into one flat vector (block after block)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]

    def cat(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                (torch.zeros(n, dtype=p.dtype, device=p.device) if t is None else t.reshape(-1))
                for t, p, n in zip(tensors, self.params, self.numels)
            ]
        )

    def views(self, flat: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes)]


# --------------------------------------------------------------------------------------------------------
# curvature operators (built once per step on the curvature batch)
# --------------------------------------------------------------------------------------------------------
class _ComplexStepOperator:
    """:math:`Hv` by the complex step: one planes forward + backward per product (:func:`fastcurv.hvp.hvp`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], flat: _Flat, h: float | None) -> None:
        self.model, self.loss_fn, self.batch, self.flat, self.h = model, loss_fn, batch, flat, h

    def __call__(self, v: Tensor, active: Sequence[bool]) -> Tensor:
        hv = _hvp.hvp(
            self.model, self.loss_fn, self.batch, self.flat.views(v), method="complex-step", h=self.h,
            params=self.flat.params,
        )
        return self.flat.cat(hv)


class _DoubleBackwardOperator:
    r""":math:`Hv = \nabla(\nabla L\cdot v)`: the ``create_graph`` gradient is built once per step, each
    product is one more backward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], flat: _Flat) -> None:
        self.flat = flat
        ps = flat.params
        if callable(batch):  # a closure (with its optimizer as loss_fn): replayed with a create_graph gradient
            g: Sequence[Tensor | None] = _closure_gradient(loss_fn, batch, ps)  # type: ignore[arg-type]
        else:
            with _hvp._preserved(model, ps, True):
                loss = loss_fn(model(batch[0]), batch[1])
                g = [None] * len(ps)
                if loss.requires_grad:
                    g = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        self.live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        self.g = g

    def __call__(self, v: Tensor, active: Sequence[bool]) -> Tensor:
        if not self.live:
            return torch.zeros_like(v)
        vs = self.flat.views(v)
        hv = torch.autograd.grad(
            [self.g[i] for i in self.live], self.flat.params, grad_outputs=[vs[i] for i in self.live],
            retain_graph=True, allow_unused=True,
        )
        return self.flat.cat(hv)


class _ClosureComplexStepOperator:
    r""":math:`Hv = \frac1h\nabla_\theta\,\mathrm{Im}\,L(\theta + ihv)` with :math:`L` the user's closure: the
    closure is replayed (its ``zero_grad``/``backward`` are no-ops) with every parameter :math:`W` substituted
    by the planes :math:`W + ih\,v_W` (``torch.func``-style reparametrisation of the module), one real backward
    of the imaginary plane per product."""

    def __init__(self, opt: _DampedKrylov, closure: Closure, flat: _Flat, h: float | None) -> None:
        self.opt, self.closure, self.flat = opt, closure, flat
        self.h = 1.0 if h is None else h
        names = {p: n for n, p in opt._net.named_parameters(remove_duplicate=False)}
        self.names = [names[p] for p in flat.params]

    def __call__(self, v: Tensor, active: Sequence[bool]) -> Tensor:
        opt, ps, h = self.opt, self.flat.params, self.h
        subs = {n: cs.planes(p, vi if h == 1.0 else vi * h) for n, p, vi in zip(self.names, ps, self.flat.views(v))}
        with _hvp._preserved(opt._net, ps, True), _reparametrize_module(opt._net, subs):
            loss = opt._replay(self.closure, grad=True)
        _, im = cs.split(loss)
        if im is None or not im.requires_grad:
            return torch.zeros_like(v)
        with torch.enable_grad():
            hv = torch.autograd.grad(im, ps, allow_unused=True)
        out = self.flat.cat(hv)
        return out if h == 1.0 else out / h


def _closure_gradient(opt: _DampedKrylov, closure: Closure, ps: Sequence[Tensor]) -> Sequence[Tensor | None]:
    """:math:`\nabla L` with ``create_graph`` from a replay of the closure (for double-backward products)."""
    with _hvp._preserved(opt._net, ps, True):
        loss = opt._replay(closure, grad=True)
        if not loss.requires_grad:
            return [None] * len(ps)
        return torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)


def _closure_output(opt: _DampedKrylov, closure: Closure, ps: Sequence[Tensor]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    r"""Replay the closure with the model's output :math:`o` cut from the loss (a forward hook on the model
    returns a leaf copy :math:`\hat o`): returns :math:`o` (graph to the parameters) and
    :math:`u \mapsto H_\ell u = \nabla_{\hat o}(\nabla_{\hat o}\ell\cdot u)` from the closure's own loss."""
    outs: list[Tensor] = []
    leaves: list[Tensor] = []

    def hook(mod: nn.Module, args: Any, out: Any) -> Any:
        # a tensor, or a mapping holding the "logits" (Hugging Face's ModelOutput): the loss must then be
        # computed by the closure from those logits, not inside the model (its Hessian is taken in the logits)
        logits = out.get("logits") if isinstance(out, Mapping) else None
        if not isinstance(out, Tensor) and not isinstance(logits, Tensor):
            raise TypeError(
                f"the GGN needs the model to return a tensor (or a mapping with 'logits'), got {type(out).__name__}"
            )
        o = out if isinstance(out, Tensor) else logits
        outs.append(o)
        leaf = o.detach().requires_grad_(True)
        leaves.append(leaf)
        if isinstance(out, Tensor):
            return leaf
        out["logits"] = leaf
        return out

    handle = opt._net.register_forward_hook(hook)
    try:
        with _hvp._preserved(opt._net, ps, True):
            loss = opt._replay(closure, grad=True)
    finally:
        handle.remove()
    if len(outs) != 1:
        raise RuntimeError(
            f"{type(opt).__name__}: the GGN with a closure needs the closure to call the model the optimizer was built "
            f"from exactly once (it was called {len(outs)} times); e.g. in a LightningModule, training_step must call "
            f"self(x). Otherwise use method='complex-step' or 'double-backward'"
        )
    o, leaf = outs[0], leaves[0]
    with torch.enable_grad():
        (go,) = torch.autograd.grad(loss, leaf, create_graph=True, allow_unused=True) if loss.requires_grad else (None,)
    if go is None or not go.requires_grad:  # the loss is linear (or constant) in the output
        return o, torch.zeros_like

    def hess(u: Tensor) -> Tensor:
        with torch.enable_grad():
            (hu,) = torch.autograd.grad(go, leaf, grad_outputs=u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if hu is None else hu.detach()

    return o, hess


class _BlockGGNOperator:
    r"""Block-diagonal GGN :math:`v_b \mapsto G_{bb}v_b = J_b^\top H_\ell J_b v_b` for every block at once.

    One forward per step: the output :math:`o` and :math:`J^\top u` (``create_graph``, linear in a dummy
    :math:`u`) are built once; then per product and block, :math:`J_b v_b = \partial(J_b^\top u\cdot
    v_b)/\partial u` (a backward through the backward graph), :math:`H_\ell J_b v_b`
    (:func:`fastcurv.hvp.loss_hessian_vp`, analytic for CE/BCE/MSE), and :math:`J_b^\top(\cdot)` (a VJP that
    autograd prunes to the paths reaching block :math:`b`). With one block holding every parameter this is
    the full GGN product.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Sequence[Any],
        flat: _Flat,
        blocks: Sequence[Sequence[int]],
        reduce: Callable[[list[Tensor]], PendingSum] | None = None,
    ) -> None:
        self.flat, self.blocks, self.loss_fn = flat, [list(b) for b in blocks], loss_fn
        self.reduce = reduce
        ps = flat.params
        if callable(batch):  # a closure (with its optimizer as loss_fn): the loss Hessian from its own loss
            o, self._hess = _closure_output(loss_fn, batch, ps)  # type: ignore[arg-type]
        else:
            targets = batch[1]
            with _hvp._preserved(model, ps, True):
                o = model(batch[0])
            if not isinstance(o, Tensor):
                raise TypeError(f"the GGN needs the model to return a tensor, got {type(o).__name__}")
            od = o.detach()
            self._hess = lambda u: _hvp.loss_hessian_vp(loss_fn, od, targets, u)
        with torch.enable_grad():
            self.o = o
            if o.requires_grad:
                self.u = torch.zeros_like(o, requires_grad=True)
                self.jt_u = torch.autograd.grad(o, ps, grad_outputs=self.u, create_graph=True, allow_unused=True)
            else:
                self.u, self.jt_u = None, [None] * len(ps)
        self.od = o.detach()

    def __call__(self, v: Tensor, active: Sequence[bool]) -> Tensor:
        vs = self.flat.views(v)
        out: list[Tensor | None] = [None] * len(vs)
        pending: list[PendingSum] = []
        for b, idx in enumerate(self.blocks):
            if not active[b]:
                continue
            self._block(vs, idx, out)
            if self.reduce is not None:  # every rank reduces every active block (same calls everywhere)
                for i in idx:
                    if out[i] is None:
                        out[i] = torch.zeros_like(self.flat.params[i])
                pending.append(self.reduce([out[i] for i in idx]))  # overlaps with the next block's product
        for w in pending:
            w.wait()
        return self.flat.cat(out)

    def _block(self, vs: list[Tensor], idx: list[int], out: list[Tensor | None]) -> None:
        if self.u is None:
            return
        live = [i for i in idx if self.jt_u[i] is not None and self.jt_u[i].requires_grad]
        if not live:
            return
        (jv,) = torch.autograd.grad(
            [self.jt_u[i] for i in live], self.u, grad_outputs=[vs[i] for i in live], retain_graph=True,
            allow_unused=True,
        )
        if jv is None:
            return
        hjv = self._hess(jv.detach())
        gv = torch.autograd.grad(
            self.o, [self.flat.params[i] for i in idx], grad_outputs=hjv, retain_graph=True, allow_unused=True
        )
        for i, t in zip(idx, gv):
            out[i] = t


# --------------------------------------------------------------------------------------------------------
# shared machinery of the damped Newton–Krylov optimizers (NewtonCG, BlockHF)
# --------------------------------------------------------------------------------------------------------
def _check_batch(batch: object, who: str) -> tuple[Any, Any]:
    if batch is None:
        raise ValueError(
            f"{who}.step needs the minibatch for its curvature products: opt.step(batch=(x, y)) or "
            f"opt.step(closure, batch=(x, y)) (the loss is loss_fn(model(x), y))"
        )
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{who}.step: batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def _rows(x: object) -> int:
    """Samples in a batch's inputs (the leading dimension of a tensor; 1 for anything else)."""
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1


def _pos_float(name: str, v: object, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    f = float(v)
    bad = not math.isfinite(f) or f < low or (strict and f == low) or (high is not None and f > high)
    if bad:
        rng = f"{'(' if strict else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise ValueError(f"{name} must be finite and in {rng}, got {v!r}")
    return f


def _pos_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


class _DampedKrylov(CurvatureOptimizer):
    """Base of :class:`NewtonCG` and :class:`fastcurv.optim.BlockHF`: closure/batch handling, the trial step,
    the reduction ratio, the Levenberg–Marquardt rule and the saved damping. Subclasses implement
    :meth:`_direction`."""

    hyperparameters = {"lr": (0.0, None), "damping": (0.0, None)}
    _supports_scaler = True
    _supports_distributed = True
    _reduces_gradients = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        defaults: dict[str, float | Tensor],
        *,
        max_cg_iters: int,
        cg_tol: float,
        curvature_eps: float,
        adapt_damping: bool,
        min_damping: float,
        max_damping: float,
        rho_low: float,
        rho_high: float,
        damping_increase: float,
        damping_decrease: float,
        accept_ratio: float,
        fallback: str = "sgd",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        name = type(self).__name__
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"{name}: loss_fn must be None or a callable loss_fn(model(x), y) -> scalar, got "
                f"{type(loss_fn).__name__}"
            )
        self.max_cg_iters = _pos_int("max_cg_iters", max_cg_iters)
        self.cg_tol = _pos_float("cg_tol", cg_tol)
        self.curvature_eps = _pos_float("curvature_eps", curvature_eps, low=-math.inf)
        if not isinstance(adapt_damping, bool):
            raise TypeError(f"adapt_damping must be a bool, got {type(adapt_damping).__name__}")
        self.adapt_damping = adapt_damping
        self.min_damping = _pos_float("min_damping", min_damping)
        self.max_damping = _pos_float("max_damping", max_damping)
        if self.max_damping < self.min_damping:
            raise ValueError(f"max_damping ({max_damping}) must be >= min_damping ({min_damping})")
        self.rho_low = _pos_float("rho_low", rho_low, low=-math.inf)
        self.rho_high = _pos_float("rho_high", rho_high, low=-math.inf)
        if self.rho_high < self.rho_low:
            raise ValueError(f"rho_high ({rho_high}) must be >= rho_low ({rho_low})")
        self.damping_increase = _pos_float("damping_increase", damping_increase, low=1.0)
        self.damping_decrease = _pos_float("damping_decrease", damping_decrease, low=0.0, strict=True, high=1.0)
        self.accept_ratio = _pos_float("accept_ratio", accept_ratio, low=-math.inf)
        super().__init__(
            model, defaults, fallback=fallback, fallback_lr=fallback_lr, on_nonfinite=on_nonfinite, compile=compile,
            distributed=distributed, process_group=process_group,
        )
        self.loss_fn = loss_fn
        #: the module the curvature products run on (inside a DDP wrapper: no DDP hooks, no gradient sync)
        self._net = unwrap(model)
        # data parallel: this rank's share of the gradient batch and of the curvature batch (set every step)
        self._w_grad = 1.0
        self._w_curv = 1.0
        self._lm: Tensor | None = None
        self._counters.update(
            cg_iterations=0, curvature_products=0, negative_curvature_exits=0, steepest_descent_steps=0,
            rejected_steps=0,
        )
        #: diagnostics of the last applied step (not saved): rho, damping used, CG exits and iterations
        self.last_step: dict[str, Any] = {}

    # ------------------------------------------------------------------ damping
    @property
    def lm_damping(self) -> Tensor:
        r"""The current Levenberg–Marquardt damping :math:`\lambda` (0-d tensor; the initial value until the
        first step). Assign a float to reset it."""
        if self.adapt_damping and self._lm is not None:
            return self._lm
        return self.param_groups[0]["damping"]

    @lm_damping.setter
    def lm_damping(self, value: float) -> None:
        v = _pos_float("lm_damping", value)
        if not self.adapt_damping:
            raise ValueError("adapt_damping=False: set param_groups[0]['damping'] instead")
        ref = self.param_groups[0]["damping"]
        self._lm = torch.tensor(v, dtype=ref.dtype, device=ref.device)

    def _current_damping(self) -> Tensor:
        if not self.adapt_damping:
            return self.param_groups[0]["damping"]
        if self._lm is None:
            return self.param_groups[0]["damping"].clone()
        return self._lm

    # ------------------------------------------------------------------ step
    _step_options = frozenset({"batch"})

    def _step(self, closure: Closure | None, batch: Sequence[Any] | None = None) -> tuple[Tensor | None, bool]:
        """One step (see the module docstring). ``step(closure)``: gradient, curvature products and trial loss
        all from the closure (replayed with the parameters substituted). ``step(batch=(x, y))`` (needs
        ``loss_fn``): the products run ``loss_fn(model(x), y)`` directly (faster: no closure replay, and
        BlockHF's ``curvature_batch`` applies); ``closure`` then defaults to ``lambda: loss_fn(model(x), y)``.
        Returns the loss at the start of the step (detached).

        ``scaler`` (``step(..., scaler=)``): a ``torch.amp.GradScaler`` for an fp16-autocast closure: the
        closure's backward runs on ``scaler.scale(loss)`` and the gradients are unscaled before anything uses
        them; a step whose gradients overflowed is skipped. The curvature products use the unscaled loss."""
        name = type(self).__name__
        if batch is not None:
            if self.loss_fn is None:
                raise ValueError(
                    f"{name}.step(batch=...) needs loss_fn at construction ({name}(model, loss_fn, ...)); or pass "
                    f"only a closure: step(closure)"
                )
            inputs, targets = _check_batch(batch, name)
            source: Any = self._curvature_subset((inputs, targets))  # validated before anything runs
            rows = (_rows(inputs), _rows(source[0]))
            if self._comm is None and 0 in rows:  # (under a process group: an empty *global* batch, after the reduce)
                raise ValueError(
                    f"{name}.step: empty batch (inputs {tuple(inputs.shape)}, curvature rows {rows[1]}); nothing was "
                    f"changed"
                )
            if closure is None:
                model, loss_fn = self.model, self.loss_fn

                def closure() -> Tensor:
                    return loss_fn(model(inputs), targets)

        else:
            if closure is None:
                raise ValueError(
                    f"{name}.step needs a closure (step(closure), the closure returns the loss; forward only or "
                    f"LBFGS-style) or, with loss_fn given at construction, batch=(x, y)"
                )
            if getattr(self, "curvature_batch", None) is not None:
                raise ValueError(f"{name}: curvature_batch selects from batch=(x, y); pass the batch to step")
            source = closure  # curvature products replay the closure
            rows = (1, 1)  # data parallel with a closure: every rank's minibatch weighs the same
        self._repair_state()
        return self._step_with(closure, source, rows)

    def _source_loss(self, source: Any) -> Any:
        """What the curvature operators take as ``loss_fn``: the optimizer itself when they replay a closure."""
        return self if callable(source) else self.loss_fn

    def _curvature_subset(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        """The part of ``batch`` the curvature products use (all of it here; BlockHF can take a subset)."""
        return batch

    def _direction(self, batch: tuple[Any, Any], g: Tensor, lam: Tensor) -> tuple[CGResult, Tensor] | None:
        """The CG solve on the curvature ``batch``: ``(result, direction)``, or None (non-finite)."""
        raise NotImplementedError

    def _preconditioned(self) -> list[Tensor]:
        raise NotImplementedError

    def _after_solve(self, res: CGResult, delta: Tensor) -> None:
        """Hook for state kept from the solution (BlockHF's warm start)."""

    def _carried_state(self) -> dict[str, Tensor]:
        """The state carried from step to step: the running damping (BlockHF adds its warm start)."""
        return {} if self._lm is None else {"lm_damping": self._lm}

    def _reset_carried(self, names: list[str]) -> None:
        if "lm_damping" in names:
            self._lm = None  # back to param_groups[0]["damping"]

    def _repair_state(self) -> None:
        """A non-finite carried state (corrupted from outside a step) is reset, warned about and counted
        (``state_resets``), as K-FAC / K-BFGS do; otherwise every later step would be skipped."""
        st = self._carried_state()
        if self._all_finite(st.values()):
            return
        bad = [k for k, t in st.items() if not bool(torch.isfinite(t).all())]
        self._reset_carried(bad)
        self._counters["state_resets"] += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite optimizer state ({', '.join(bad)}) (corrupted from outside the "
            f"step); reset (counted in counters()['state_resets'])",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ data parallel
    def _sync(self) -> contextlib.AbstractContextManager[Any]:
        """Under a process group: DDP's ``no_sync`` (the optimizer reduces the gradients itself, weighted)."""
        return no_sync(self.model) if self._comm is not None else contextlib.nullcontext()

    def _reduce_gradients(self, loss: Tensor, rows: tuple[int, int]) -> Tensor:
        r"""Data parallel: the loss and every ``.grad`` become the global-batch mean, and the weights of this
        rank's curvature products are set (one float and one int64 all-reduce).

        Rank :math:`r` holds :math:`n_r` gradient rows and :math:`m_r` curvature rows, its loss and gradient
        are local means. The global mean over :math:`N = \sum_r n_r` rows is
        :math:`\sum_r (n_r/N)\,L_r` (and the same for :math:`\nabla L`), exact for unequal local batches;
        curvature products are weighted by :math:`m_r/M` in the same way (:meth:`_matvec`). A parameter gets a
        gradient iff some rank's backward reached it."""
        comm = self._comm
        assert comm is not None
        n, m = rows
        params = self.param_groups[0]["params"]
        dev = params[0].device  # (NCCL reduces device tensors only)
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=dev)
        n_t = torch.tensor([n], dtype=torch.int64, device=dev)
        m_t = torch.tensor([m], dtype=torch.int64, device=dev)
        loss = loss.clone()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        comm.weighted_mean_([loss, *grads], [n_t] * (1 + len(grads)), counters=[m_t, has])
        big_n, big_m = int(n_t), int(m_t)
        if big_n == 0 or big_m == 0:  # every rank sees the same counts: every rank raises
            raise ValueError(
                f"{type(self).__name__}.step: empty batch on every rank ({big_n} gradient rows, {big_m} curvature "
                f"rows); parameters and state were not changed"
            )
        self._w_grad = n / big_n
        self._w_curv = m / big_m
        for p, g, h in zip(params, grads, has.tolist()):
            p.grad = g if h > 0 else None
        return loss

    def _reduce_loss(self, loss: Tensor) -> Tensor:
        """Data parallel: the global mean of a local mean loss (one all-reduce); unchanged alone."""
        if self._comm is None:
            return loss
        out = loss * self._w_grad
        self._comm.all_reduce_sum_([out])
        return out

    def _matvec(self, op: Callable[[Tensor, Sequence[bool]], Tensor]) -> Callable[[Tensor, Sequence[bool]], Tensor]:
        r"""Data parallel: the curvature product of the global curvature batch,
        :math:`Hv = \sum_r (m_r/M)\,H_r v` (one all-reduce per product); ``op`` itself alone."""
        comm = self._comm
        if comm is None:
            return op
        w = self._w_curv

        def matvec(v: Tensor, active: Sequence[bool]) -> Tensor:
            hv = op(v, active) * w
            comm.all_reduce_sum_([hv])
            return hv

        return matvec

    def _block_reducer(self) -> Callable[[list[Tensor]], PendingSum] | None:
        """Data parallel: a callback that starts the weighted sum of one block's products in the background
        (:class:`_BlockGGNOperator` overlaps it with the next block's product); None alone."""
        comm = self._comm
        if comm is None:
            return None
        w = self._w_curv

        def start(ts: list[Tensor]) -> PendingSum:
            return comm.start_sum_([t.mul_(w) for t in ts])

        return start

    def _step_with(self, closure: Closure, batch: tuple[Any, Any], rows: tuple[int, int]) -> tuple[Tensor, bool]:
        with self._sync():
            loss0 = self._eval_closure(closure)
        self._unscale()  # with a GradScaler: the gradients are unscaled (inf/NaN on overflow: skipped below)
        if self._comm is not None:
            loss0 = self._reduce_gradients(loss0, rows)
        params = self._preconditioned()
        flat = self._flat
        grads = [p.grad for p in params]
        fb = [p.grad for p in self.fallback_params() if p.grad is not None]
        if not self._all_finite([loss0, *grads, *fb]):
            self._skip("loss or gradient")
            return loss0, False
        g = flat.cat(grads)
        lam = self._current_damping()
        out = self._direction(batch, g, lam)
        if out is None:
            self._skip("curvature (a non-finite curvature-vector product in CG)")
            return loss0, False
        res, delta = out
        lr = self.param_groups[0]["lr"]
        gd = -res.cx.sum()  # g^T delta
        dhd = res.xHx.sum()  # delta^T H delta
        pred = lr * gd + 0.5 * lr * lr * dhd
        if not self._all_finite([delta, pred]):
            self._skip("direction")
            return loss0, False

        # ---- commit point: from here on the step is applied (possibly rejected) ----
        self._after_solve(res, delta)
        self._snapshot_params()
        with torch.no_grad():
            torch._foreach_add_(params, torch._foreach_mul(flat.views(delta), lr))
        self._fallback_update()
        with self._sync():
            loss1 = self._reduce_loss(self._trial_loss(closure))
        l0, l1, q = float(loss0), float(loss1), float(pred)
        if not math.isfinite(l1):
            rho = -math.inf
        elif q < 0:
            rho = (l1 - l0) / q
        else:
            rho = 1.0 if l1 <= l0 else -math.inf
        accepted = math.isfinite(l1) and rho > self.accept_ratio
        if not accepted:
            self._restore_params()
            self._counters["rejected_steps"] += 1
        lam_used = float(lam)
        if self.adapt_damping:
            new = lam.clone() if self._lm is None else self._lm
            if rho < self.rho_low:
                new.mul_(self.damping_increase)
            elif rho > self.rho_high:
                new.mul_(self.damping_decrease)
            bump = float((-res.curvature).clamp_min(0).max())
            if bump > float(new):
                new.fill_(bump)
            new.clamp_(self.min_damping, self.max_damping)
            self._lm = new
        self._counters["cg_iterations"] += max(res.iterations)
        self._counters["curvature_products"] += res.matvecs
        self._counters["negative_curvature_exits"] += sum(e == "negative_curvature" for e in res.exits)
        self._counters["steepest_descent_steps"] += sum(e == "steepest_descent" for e in res.exits)
        self.last_step = dict(
            loss=l0, trial_loss=l1, predicted=q, rho=rho, accepted=accepted, damping=lam_used,
            cg_exits=list(res.exits), cg_iterations=list(res.iterations),
            disturbing_curvature=float(res.curvature.min()),
        )
        return loss0, True

    def _trial_loss(self, closure: Closure) -> Tensor:
        """The closure at the trial point, without gradients (its ``zero_grad``/``backward`` are no-ops)."""
        return self._replay(closure, grad=False).detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base state dict plus the running damping :math:`\\lambda` (``["fastcurv"]["lm_damping"]``)."""
        sd = super().state_dict()
        # always a tensor (the initial damping before the first step), so that the state dict has a fixed
        # structure from construction on (torch.distributed.checkpoint loads in place)
        sd["fastcurv"]["lm_damping"] = self.lm_damping.detach().clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (parameters' state, counters and the running damping)."""
        lm = state_dict.get("fastcurv", {}).get("lm_damping")
        if lm is not None and (
            not isinstance(lm, Tensor) or lm.dim() != 0 or not bool(torch.isfinite(lm)) or float(lm) < 0
        ):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: lm_damping must be a finite 0-d tensor >= 0, got {lm!r}"
            )
        super().load_state_dict(state_dict)
        ref = self.param_groups[0]["damping"]
        self._lm = None if lm is None else lm.to(device=ref.device).clone()


class NewtonCG(_DampedKrylov):
    r"""Newton–CG (truncated Newton / Newton–Krylov) with complex-step Hessian-vector products.

    A reconstruction from the abstract of Shen et al. 2020 (see the module docstring for the algorithm,
    its derivation and what is not from the paper).

    Args:
        model: the model; every trainable parameter is in the Newton system (no fallback).
        loss_fn: optional; ``loss_fn(model(x), y)`` returns the scalar loss, used for curvature products on
            ``step(batch=(x, y))`` (and as the default closure). Without it, ``step(closure)`` replays the
            closure for the curvature products.
        lr: step length :math:`\eta` applied to the CG direction (0-d tensor hyperparameter), default 1.
        damping: initial Tikhonov/LM damping :math:`\lambda` (>= 0), default 1.
        method: curvature product, ``"complex-step"`` (default), ``"double-backward"`` or ``"ggn"``.
        h: complex-step scale (``None``: :mod:`fastcurv.hvp`'s default); only with ``"complex-step"``.
        max_cg_iters: CG iteration cap (default 20).
        cg_tol: relative residual tolerance :math:`\lVert r\rVert \le \text{tol}\lVert g\rVert` (default 0.1,
            a truncated-Newton forcing term).
        curvature_eps: :math:`\varepsilon` of the disturbing-direction test :math:`p^\top Hp \le
            \varepsilon\lVert p\rVert^2` (default 0; a negative value tolerates that much negative curvature,
            e.g. ``-damping`` tests the damped curvature instead).
        adapt_damping, min_damping, max_damping, rho_low, rho_high, damping_increase, damping_decrease:
            the Levenberg–Marquardt rule (defaults True, 1e-8, 1e8, 1/4, 3/4, 3/2, 2/3).
        accept_ratio: keep the step iff :math:`\rho` > this (default 0: iff the loss decreased).
        on_nonfinite: ``"skip"`` (default) or ``"raise"``.
        compile: accepted for symmetry with the other optimizers (the step is host-driven CG; nothing is
            compiled here).
        distributed, process_group: data parallelism (module docstring, *Data parallel*):
            ``"replicate"`` (default; ``"owner"`` is the same here) or ``"off"``, and the group (default: the
            default group).

    Example::

        opt = NewtonCG(model)
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        lr: float | Tensor = 1.0,
        damping: float | Tensor = 1.0,
        *,
        method: str = "complex-step",
        h: float | None = None,
        max_cg_iters: int = 20,
        cg_tol: float = 0.1,
        curvature_eps: float = 0.0,
        adapt_damping: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        accept_ratio: float = 0.0,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if h is not None:
            if method != "complex-step":
                raise ValueError(f"h applies to method='complex-step' only, got method={method!r}")
            _pos_float("h", h, strict=True)
        super().__init__(
            model, loss_fn, dict(lr=lr, damping=damping), max_cg_iters=max_cg_iters, cg_tol=cg_tol,
            curvature_eps=curvature_eps, adapt_damping=adapt_damping, min_damping=min_damping,
            max_damping=max_damping, rho_low=rho_low, rho_high=rho_high, damping_increase=damping_increase,
            damping_decrease=damping_decrease, accept_ratio=accept_ratio, on_nonfinite=on_nonfinite, compile=compile,
            distributed=distributed, process_group=process_group,
        )
        self.method = method
        self.h = h
        params = list(self.param_groups[0]["params"])
        self._flat = _Flat(params)
        self._segments = Segments([sum(self._flat.numels)], params[0].device)
        desc = "Newton-CG (GGN)" if method == "ggn" else f"Newton-CG ({method} Hessian)"
        self._set_preconditioned({p: desc for p in params})

    def _preconditioned(self) -> list[Tensor]:
        return self._flat.params

    def _operator(self, batch: Any) -> Callable[[Tensor, Sequence[bool]], Tensor]:
        """The curvature operator on ``batch``: a pair ``(x, y)`` with ``loss_fn``, or the step's closure."""
        src = self._source_loss(batch)
        if self.method == "complex-step":
            if callable(batch):
                return self._matvec(_ClosureComplexStepOperator(self, batch, self._flat, self.h))
            return self._matvec(_ComplexStepOperator(self._net, self.loss_fn, batch, self._flat, self.h))
        if self.method == "double-backward":
            return self._matvec(_DoubleBackwardOperator(self._net, src, batch, self._flat))
        return _BlockGGNOperator(
            self._net, src, batch, self._flat, [list(range(len(self._flat.params)))], self._block_reducer()
        )

    def _direction(self, batch: tuple[Any, Any], g: Tensor, lam: Tensor) -> tuple[CGResult, Tensor] | None:
        op = self._operator(batch)
        res = truncated_cg(
            op, -g, self._segments, shift=lam, max_iters=self.max_cg_iters, tol=self.cg_tol, eps=self.curvature_eps
        )
        if not res.finite:
            return None
        return res, res.x

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"NewtonCG(lr={float(g['lr']):g}, damping={float(self.lm_damping):g}, method={self.method!r}, "
            f"max_cg_iters={self.max_cg_iters}, cg_tol={self.cg_tol:g})"
        )
