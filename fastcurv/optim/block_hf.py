r"""Block-diagonal Hessian-free optimisation (Zhang, Xiong, Bradbury & Socher, arXiv 1712.07296), reconstructed.

.. note::
   **A reconstruction, not a port.** Only the paper's abstract could be read (docs/algorithms.md §2, §8): it
   replaces Hessian-free's generalized Gauss–Newton (GGN) matrix by its **block-diagonal** part — curvature
   only between parameters of the same layer/block — and runs **CG independently for each block**. The
   block partition for CNNs/LSTMs, the damping schedule, the CG cap and the curvature-batch size are not
   known, so the Hessian-free machinery below is Martens' (2010) (Tikhonov damping with the
   Levenberg–Marquardt rule, warm start :math:`0.95\,\delta_{prev}`, the relative-progress CG stop, an
   iteration cap, a smaller curvature minibatch). Martens' CG-iterate backtracking, line search and diagonal
   preconditioner are not implemented. Two rules differ from the PyTorch Hessian-free port
   (ltatzel/PyTorchHessianFree), with which the products and CG iterates otherwise agree: the reduction
   ratio divides by the *undamped* block model :math:`q` measured from :math:`L(\theta)` (step 4; the port
   uses the damped CG quadratic measured from the warm start), and the warm-started progress rule divides by
   :math:`\phi_i` (step 3; the port divides by :math:`\phi_i - \phi_0`, the decrease since the warm
   start), so on a warm start the two stop CG at different iterations. Its progress threshold is ``5e-4``,
   this module's default ``progress_tol`` 1e-4.

Step protocol (as :class:`fastcurv.optim.NewtonCG`; the GGN products replay the closure)::

    opt = BlockHF(model)
    loss = opt.step(closure)                   # LBFGS-style or forward-only closure
    opt = BlockHF(model, loss_fn, curvature_batch=0.25)
    loss = opt.step(batch=(x, y))              # gradient on (x, y), curvature on its first quarter
    loss = opt.step(closure, batch=(xc, yc))   # gradient from closure(), curvature on (xc, yc)

One step
--------
With blocks :math:`b = 1..B` (default: the trainable parameters owned directly by each module — weight and
bias of a layer form one block), parameters :math:`\theta = (\theta_1, \dots, \theta_B)`:

1. :math:`L_0` and :math:`g = \nabla L(\theta)` from the closure (the gradient batch).
2. Curvature batch :math:`C` (``curvature_batch``: ``None`` = all of ``batch``, a float in (0, 1] = that
   fraction of its first samples, an int = that many first samples — shuffle your batches). The GGN of the
   curvature batch is :math:`G = J^\top H_\ell J` with :math:`J = \partial f(x_C)/\partial\theta` and
   :math:`H_\ell = \partial^2\ell/\partial f^2` (PSD for the convex losses CE, BCE, MSE); its diagonal block
   is :math:`G_{bb} = J_b^\top H_\ell J_b`. Products :math:`G_{bb}v_b` for **all** blocks are computed per
   CG iteration from one forward graph built once per step (:class:`fastcurv.optim.newton_cg._BlockGGNOperator`:
   :math:`J_bv_b` by the double-VJP trick, :math:`H_\ell` analytic, :math:`J_b^\top` by a VJP pruned to block
   :math:`b`).
3. For every block, CG on :math:`(G_{bb} + \lambda I)\,\delta_b = -g_b` — independent systems advanced
   together, all CG scalars vectorised across blocks (:func:`fastcurv.optim._cg.truncated_cg`) — from the
   warm start :math:`\delta_b^{(0)} = \texttt{cg\_decay}\cdot\delta_b^{prev}` (0.95; the previous step's CG
   solution, kept even when that step was rejected). A block stops on Martens' relative progress rule
   (:math:`k = \max(10, \lfloor i/10\rfloor)`, stop when :math:`i > k`, :math:`\phi_i < 0` and
   :math:`(\phi_i - \phi_{i-k})/\phi_i <` ``progress_tol`` = 1e-4, where :math:`\phi` is the damped quadratic
   and both differences are negative, so the ratio is the relative decrease over the last :math:`k`
   iterations), a relative residual below ``cg_tol``, ``max_cg_iters``, or a disturbing direction
   :math:`p^\top G_{bb}p \le \varepsilon\lVert p\rVert^2` (with the PSD GGN and :math:`\varepsilon = 0`:
   exactly zero curvature, e.g. a block of dead ReLU units; at the first iteration the block then gets
   :math:`-g_b/\lambda`, the exact damped solution along it).
4. :math:`\theta^+ = \theta + \eta\delta`, the block-diagonal model's prediction
   :math:`q = \eta\,g^\top\delta + \tfrac12\eta^2\sum_b \delta_b^\top G_{bb}\delta_b`, the reduction ratio
   :math:`\rho = (L(\theta^+) - L_0)/q` (closure again, no gradient), acceptance iff :math:`\rho >`
   ``accept_ratio`` (0), and the Levenberg–Marquardt rule :math:`\lambda \times 3/2` if :math:`\rho < 1/4`,
   :math:`\times 2/3` if :math:`\rho > 3/4` — all exactly as in :class:`~fastcurv.optim.NewtonCG` (its module
   docstring derives them).

Parameters not in any block (only when ``blocks`` is given and leaves some out) are updated by the base
class's fallback rule. Non-finite loss, gradient, curvature or direction: the step is skipped with
parameters and state (damping, warm start) bitwise unchanged (``on_nonfinite="raise"`` raises).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv.optim._cg import CGResult, Segments, truncated_cg
from fastcurv.optim.newton_cg import LossFn, _BlockGGNOperator, _DampedKrylov, _Flat, _pos_float

__all__ = ["BlockHF"]


def _default_blocks(model: nn.Module) -> list[list[Tensor]]:
    blocks, seen = [], set()
    for mod in model.modules():
        ps = [p for p in mod.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            blocks.append(ps)
    return blocks


def _user_blocks(model: nn.Module, blocks: object) -> list[list[Tensor]]:
    if isinstance(blocks, (Tensor, nn.Module)) or not isinstance(blocks, Iterable):
        raise TypeError(
            f"blocks must be a list of blocks (each a list of parameters or a module), got {type(blocks).__name__}"
        )
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    out, seen = [], set()
    for b, blk in enumerate(blocks):
        if isinstance(blk, nn.Module):
            ps = [p for p in blk.parameters() if p.requires_grad]
        elif isinstance(blk, Tensor) or not isinstance(blk, Iterable):
            raise TypeError(f"blocks[{b}] must be a list of parameters or a module, got {type(blk).__name__}")
        else:
            ps = list(blk)
        if not ps:
            raise ValueError(f"blocks[{b}] has no trainable parameter")
        for p in ps:
            if not isinstance(p, Tensor) or id(p) not in trainable:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"blocks[{b}] holds {shape}, which is not a trainable parameter of the model")
            if id(p) in seen:
                raise ValueError(f"blocks overlap: parameter {trainable[id(p)]!r} is in more than one block")
            seen.add(id(p))
        out.append(ps)
    if not out:
        raise ValueError("blocks is empty")
    return out


class BlockHF(_DampedKrylov):
    r"""Block-diagonal Hessian-free (GGN blocks per layer, independent CG per block, batched across blocks).

    A reconstruction (see the module docstring for the algorithm and what is not from the paper).

    Args:
        model: the model.
        loss_fn: optional; ``loss_fn(model(x), y)`` returns the scalar loss (curvature products on
            ``step(batch=)``, and default closure). The GGN's loss Hessian is analytic for CE /
            BCE-with-logits / MSE, else by autograd; with ``step(closure)`` alone it comes from the closure's
            own loss by autograd.
        lr: step length :math:`\eta` (0-d tensor hyperparameter), default 1.
        damping: initial Tikhonov damping :math:`\lambda` (default 0.5, Martens' :math:`\lambda_0`).
        blocks: ``None`` (one block per module owning trainable parameters) or a list of blocks, each a
            list of parameters or a module; parameters left out go to the ``fallback`` rule.
        curvature_batch: ``None`` (the whole ``batch``), a fraction in (0, 1] or a number of samples (>= 1)
            taken from the front of ``batch`` for the curvature products (needs ``step(batch=)``).
        max_cg_iters: CG cap (default 50).
        cg_tol: relative residual tolerance (default 1e-6).
        progress_tol: Martens' relative-progress threshold (default 1e-4; ``None`` turns it off).
        cg_decay: warm start factor (default 0.95; 0 starts CG from zero).
        curvature_eps, adapt_damping, min_damping, max_damping, rho_low, rho_high, damping_increase,
        damping_decrease, accept_ratio: as in :class:`~fastcurv.optim.NewtonCG`.
        fallback, fallback_lr: the rule for parameters outside every block (default ``"adamw"`` with
            ``fallback_lr``: ``lr`` is a Newton step length, not an SGD learning rate).
        on_nonfinite, compile: see :class:`~fastcurv.optim.CurvatureOptimizer` (nothing is compiled: the
            step is host-driven CG).
        distributed, process_group: data parallelism as in :class:`~fastcurv.optim.NewtonCG` (its module
            docstring); ``curvature_batch`` then selects from each rank's *local* batch, and each block's
            all-reduce overlaps with the next block's curvature product.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        lr: float | Tensor = 1.0,
        damping: float | Tensor = 0.5,
        *,
        blocks: Sequence[Sequence[Tensor] | nn.Module] | None = None,
        curvature_batch: float | int | None = None,
        max_cg_iters: int = 50,
        cg_tol: float = 1e-6,
        progress_tol: float | None = 1e-4,
        cg_decay: float = 0.95,
        curvature_eps: float = 0.0,
        adapt_damping: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        accept_ratio: float = 0.0,
        fallback: str = "adamw",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        if curvature_batch is not None:
            if isinstance(curvature_batch, bool) or not isinstance(curvature_batch, (int, float)):
                raise TypeError(
                    f"curvature_batch must be None, a fraction or a sample count, got {type(curvature_batch).__name__}"
                )
            if isinstance(curvature_batch, int) and curvature_batch < 1:
                raise ValueError(f"curvature_batch as a sample count must be >= 1, got {curvature_batch}")
            if isinstance(curvature_batch, float) and not (0.0 < curvature_batch <= 1.0):
                raise ValueError(f"curvature_batch as a fraction must be in (0, 1], got {curvature_batch}")
        self.curvature_batch = curvature_batch
        self.progress_tol = None if progress_tol is None else _pos_float("progress_tol", progress_tol)
        self.cg_decay = _pos_float("cg_decay", cg_decay, high=1.0)
        if not isinstance(model, nn.Module):
            raise TypeError(f"BlockHF is constructed from the model (an nn.Module); got {type(model).__name__}")
        blks = _default_blocks(model) if blocks is None else _user_blocks(model, blocks)
        super().__init__(
            model, loss_fn, dict(lr=lr, damping=damping), max_cg_iters=max_cg_iters, cg_tol=cg_tol,
            curvature_eps=curvature_eps, adapt_damping=adapt_damping, min_damping=min_damping,
            max_damping=max_damping, rho_low=rho_low, rho_high=rho_high, damping_increase=damping_increase,
            damping_decrease=damping_decrease, accept_ratio=accept_ratio, fallback=fallback, fallback_lr=fallback_lr,
            on_nonfinite=on_nonfinite, compile=compile, distributed=distributed, process_group=process_group,
        )
        self.blocks = blks
        flat_params = [p for blk in blks for p in blk]
        self._flat = _Flat(flat_params)
        idx, i = [], 0
        for blk in blks:
            idx.append(list(range(i, i + len(blk))))
            i += len(blk)
        self._block_index = idx
        self._segments = Segments([sum(p.numel() for p in blk) for blk in blks], flat_params[0].device)
        names = {p: n for n, p in model.named_parameters()}
        mapping = {}
        for b, blk in enumerate(blks):
            desc = f"block-HF block {b} ({', '.join(names.get(p, '?') for p in blk)})"
            for p in blk:
                mapping[p] = desc
        self._set_preconditioned(mapping)
        for p in flat_params:  # the warm-start state exists from construction on (a fixed state-dict structure)
            self.state[p]["delta"] = torch.zeros_like(p)

    # ------------------------------------------------------------------ curvature batch
    def _curvature_subset(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        cb = self.curvature_batch
        if cb is None:
            return batch
        x, y = batch
        ok = isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() > 0 and y.dim() > 0
        if not ok or x.shape[0] != y.shape[0]:
            raise TypeError(
                "BlockHF: curvature_batch needs batch=(inputs, targets) as tensors with the same leading (batch) "
                f"dimension, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))} and "
                f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}"
            )
        n = x.shape[0]
        m = max(1, math.ceil(cb * n)) if isinstance(cb, float) else min(cb, n)
        return (x, y) if m >= n else (x[:m], y[:m])

    # ------------------------------------------------------------------ direction
    def _preconditioned(self) -> list[Tensor]:
        return self._flat.params

    def _warm_start(self) -> Tensor | None:
        # before the first applied step there is no previous solution (``delta`` holds zeros): start from 0
        # without the product a zero x0 would cost
        if self.cg_decay == 0.0 or self._counters["steps"] == 0:
            return None
        prev = [self.state[p].get("delta") for p in self._flat.params]
        if any(d is None for d in prev):
            return None
        return self._flat.cat(prev) * self.cg_decay

    def _direction(self, batch: Any, g: Tensor, lam: Tensor) -> tuple[CGResult, Tensor] | None:
        op = _BlockGGNOperator(
            self._net, self._source_loss(batch), batch, self._flat, self._block_index, self._block_reducer()
        )
        res = truncated_cg(
            op, -g, self._segments, shift=lam, x0=self._warm_start(), max_iters=self.max_cg_iters, tol=self.cg_tol,
            eps=self.curvature_eps, progress_tol=self.progress_tol,
        )
        if not res.finite:
            return None
        return res, res.x

    def _after_solve(self, res: CGResult, delta: Tensor) -> None:
        for p, d in zip(self._flat.params, self._flat.views(delta)):
            st = self.state[p]
            if "delta" in st:
                st["delta"].copy_(d)
            else:
                st["delta"] = d.clone()

    def _carried_state(self) -> dict[str, Tensor]:
        st = super()._carried_state()
        for i, p in enumerate(self._flat.params):
            if "delta" in self.state[p]:
                st[f"delta[{i}]"] = self.state[p]["delta"]
        return st

    def _reset_carried(self, names: list[str]) -> None:
        super()._reset_carried(names)
        if any(n.startswith("delta") for n in names):  # one CG solution: restart it from zero
            for p in self._flat.params:
                if "delta" in self.state[p]:
                    self.state[p]["delta"].zero_()

    def block_operator(self, batch: tuple[Any, Any]) -> tuple[_BlockGGNOperator, Segments, _Flat]:
        """The block-diagonal GGN operator on ``batch`` (its curvature subset), with the flat layout used by
        the CG: ``op(v, [True] * B)`` returns :math:`(G_{bb} v_b)_b` for a flat ``v`` (for inspection and tests)."""
        return (
            _BlockGGNOperator(
                self._net, self.loss_fn, self._curvature_subset(tuple(batch)), self._flat, self._block_index
            ),
            self._segments,
            self._flat,
        )

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"BlockHF(lr={float(g['lr']):g}, damping={float(self.lm_damping):g}, blocks={len(self.blocks)}, "
            f"curvature_batch={self.curvature_batch!r}, max_cg_iters={self.max_cg_iters})"
        )
