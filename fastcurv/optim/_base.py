"""What every fastcurv optimizer shares: construction from a model, tensor hyperparameters, the step protocol,
the fallback for parameters the method does not precondition, non-finite handling and state dicts.

Step protocol (the same for every fastcurv optimizer)::

    def closure():
        return loss_fn(model(x), y)          # forward only: the optimizer calls backward itself
    loss = opt.step(closure)

The optimizer zeroes gradients, runs ``closure()`` and ``backward()`` as often as its method needs (a closure
that calls ``backward()`` itself, as for ``torch.optim.LBFGS``, is detected and not backpropagated twice) (K-BFGS
evaluates the same minibatch at a second point) and returns the loss of the first evaluation (a detached
0-d tensor). Methods that can (K-FAC) also accept the plain loop ``loss.backward(); opt.step()``.

Hyperparameters live in ``param_groups`` as 0-d tensors, so ``torch.optim.lr_scheduler`` schedulers change
them with ``fill_`` and a compiled update never recompiles for a new value (ENGINEERING.md §2). Setting a
hyperparameter to a Python number later is caught at the next step with the remedy.

Non-finite loss, gradient or curvature: with ``on_nonfinite="skip"`` (default) the step is skipped, every
parameter and state tensor is left bitwise unchanged and ``opt.skipped_steps`` counts it; with
``on_nonfinite="raise"`` a ``FloatingPointError`` is raised instead (state also unchanged). A non-finite
value found in the optimizer *state* (corrupted from outside a step) is repaired by the subclass and counted
in ``counters()["state_resets"]``.

Data parallel (``distributed=``, :mod:`fastcurv.distributed`) and mixed precision (``step(closure,
scaler=...)`` for ``torch.amp.GradScaler``; bf16 autocast inside the closure): docs/distributed.md.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv.distributed import communicator, is_ddp

__all__ = ["CurvatureOptimizer", "Closure", "maybe_compile", "finite_flag"]

Closure = Callable[[], Tensor]


def maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` when ``enabled`` (and not disabled globally by
    ``FASTCURV_COMPILE=0``), else ``fn`` itself."""
    if not enabled or os.environ.get("FASTCURV_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn, fullgraph=True, dynamic=False)


def finite_flag(tensors: Iterable[Tensor | None], device: torch.device | None = None) -> Tensor:
    """0-d bool tensor, True iff every element of every given tensor is finite; no host sync.

    One ``torch._foreach_norm(ord=inf)`` (max-abs, which propagates NaN and inf; a multi-tensor kernel on
    CUDA) per dtype and device, then one ``isfinite`` of the maxima, instead of ``isfinite(t).all()`` per
    tensor (two kernels and a dispatch each). The inf-norm cannot overflow on finite input (a 2-norm can).
    None, empty, integer and bool tensors are skipped (always finite); with none left the result is
    True on ``device``."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.numel() > 0:
            groups.setdefault((t.dtype, t.device), []).append(t)
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(ts, ord=math.inf)).amax()) for ts in groups.values()]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class of the fastcurv optimizers (not used directly).

    Subclasses set :attr:`hyperparameters` (name -> (low, high) bounds, inclusive, ``None`` = unbounded),
    decide which parameters they precondition (:meth:`_set_preconditioned`), and implement
    :meth:`_step` (returning ``(loss, ok)``). Everything else — validation, fallback updates, counters,
    snapshots for transactional steps, state dicts — is here.

    Args:
        model: the ``nn.Module`` being trained (optimizers are built from the model, not a parameter list,
            because they need its layers).
        defaults: hyperparameter values (floats or 0-d tensors), validated against :attr:`hyperparameters`.
        fallback: ``"sgd"`` (SGD with the method's momentum form and the same ``lr``, ``momentum`` and
            ``weight_decay``) or ``"adamw"`` (``torch.optim.AdamW`` semantics with ``fallback_lr``) for
            every parameter the method does not precondition (norms, embeddings, unrecognised layers).
            Such parameters are never silently dropped; :meth:`describe` lists what went where.
        fallback_lr: learning rate of the AdamW fallback (ignored for ``"sgd"``).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        compile: compile the update part of the step with ``torch.compile(fullgraph=True)``; ``"auto"``
            (default) compiles when the parameters live on CUDA.
        distributed: data-parallel behaviour when a ``torch.distributed`` process group of more than one
            process is initialised (:mod:`fastcurv.distributed`, docs/distributed.md): ``"replicate"``
            (default: curvature statistics are all-reduced, every rank computes everything), ``"owner"``
            (expensive per-layer work is done by one owner rank per layer and shared) or ``"off"``. Without
            a group, or with one process, the single-process code runs unchanged.
        process_group: the group to use (default: the default group).
    """

    #: hyperparameter name -> (low, high), inclusive bounds; None = unbounded
    hyperparameters: dict[str, tuple[float | None, float | None]] = {"lr": (0.0, None)}

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, float | Tensor],
        *,
        fallback: str = "sgd",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is constructed from the model (an nn.Module), e.g. "
                f"{type(self).__name__}(model, lr=...); got {type(model).__name__}"
            )
        if fallback not in ("sgd", "adamw"):
            raise ValueError(f"fallback must be 'sgd' or 'adamw', got {fallback!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: the model has no parameters that require grad")
        ref = params[0]
        tensors = {k: self._hyper_tensor(k, v, ref) for k, v in defaults.items()}
        self.model = model
        self.fallback = fallback
        self.on_nonfinite = on_nonfinite
        self.compile_enabled = ref.is_cuda if compile == "auto" else bool(compile)
        super().__init__([{"params": params}], tensors)
        if fallback == "adamw":
            self.param_groups[0]["fallback_lr"] = self._hyper_tensor("fallback_lr", fallback_lr, ref)
        self._comm = communicator(distributed, process_group)
        self.distributed = distributed
        if self._comm is not None and not self._supports_distributed:
            raise NotImplementedError(
                f"{type(self).__name__} has no data-parallel support yet (its curvature would differ between the "
                f"{self._comm.world_size} ranks and they would diverge); pass distributed='off' to run independent "
                f"processes"
            )
        if self._comm is not None and not is_ddp(model) and self._reduces_gradients:
            # nothing broadcasts the parameters at the start (DDP would): make sure the ranks agree
            diff = self._comm.max_abs_diff([p.detach() for p in params])
            if diff != 0.0:
                raise ValueError(
                    f"{type(self).__name__}: the {self._comm.world_size} ranks start from different parameters "
                    f"(max difference {diff:g}); wrap the model in DistributedDataParallel (it broadcasts rank 0's "
                    f"parameters) or seed / load every rank identically"
                )
        elif self._comm is not None and not is_ddp(model):
            warnings.warn(
                f"{type(self).__name__}: a process group of {self._comm.world_size} is initialised, so curvature "
                f"statistics are averaged over its ranks, but the model is not a DistributedDataParallel wrapper "
                f"(gradients are not averaged by fastcurv): build the optimizer from the DDP-wrapped model, or "
                f"pass distributed='off' for independent processes",
                stacklevel=3,
            )
        self._counters: dict[str, int] = {"steps": 0, "skipped_steps": 0, "state_resets": 0}
        self._method: dict[Tensor, str] = {}
        self._snap: list[Tensor] | None = None

    # ------------------------------------------------------------------ hyperparameters
    def _hyper_tensor(self, name: str, value: float | Tensor, ref: Tensor) -> Tensor:
        lo, hi = self.hyperparameters.get(name, (None, None))
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
        if isinstance(value, Tensor):
            if value.dim() != 0 or not value.is_floating_point():
                raise TypeError(f"{name} must be a 0-d floating-point tensor, got shape {tuple(value.shape)} {value.dtype}")
            v = float(value)  # construction time only: one host read is fine here
        else:
            v = float(value)
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{name} must be finite and in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.tensor(v, dtype=dtype, device=ref.device)

    def _check_hyper_types(self) -> None:
        for group in self.param_groups:
            for k in self.hyperparameters:
                if k in group and not isinstance(group[k], Tensor):
                    raise TypeError(
                        f"param_groups[...]['{k}'] was set to a {type(group[k]).__name__}; fastcurv keeps "
                        f"hyperparameters as 0-d tensors (no recompiles): use "
                        f"opt.param_groups[0]['{k}'].fill_(value) instead"
                    )

    # ------------------------------------------------------------------ parameter partition
    def _set_preconditioned(self, mapping: dict[Tensor, str]) -> None:
        """Record, for each parameter, how it is updated: ``mapping`` holds the preconditioned ones
        (param -> a short description, e.g. ``"K-BFGS layer fc1 (weight+bias)"``); the rest go to the fallback."""
        self._method = dict(mapping)
        self._init_fallback_state()

    def _init_fallback_state(self) -> None:
        """Create the fallback rule's state (zeros) for every fallback parameter now rather than at its first
        update, so the state dict has a fixed structure from construction on (``torch.distributed.checkpoint``
        loads in place into the structure of the target's state dict)."""
        for p in self.fallback_params():
            st = self.state[p]
            if self.fallback == "sgd":
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
            elif "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
                st["adam_step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def fallback_params(self) -> list[Tensor]:
        """Parameters updated by the fallback rule, in ``model.parameters()`` order."""
        return [p for p in self.param_groups[0]["params"] if p not in self._method]

    def describe(self) -> str:
        """A table: every trainable parameter of the model, its shape, and how this optimizer updates it."""
        names = {p: n for n, p in self.model.named_parameters()}
        fb = "SGD-momentum (fallback)" if self.fallback == "sgd" else "AdamW (fallback)"
        rows = [(names.get(p, "?"), tuple(p.shape), self._method.get(p, fb)) for p in self.param_groups[0]["params"]]
        w = max(len(r[0]) for r in rows)
        s = max(len(str(r[1])) for r in rows)
        lines = [f"{type(self).__name__}: {len(self._method)} preconditioned, {len(rows) - len(self._method)} fallback"]
        lines += [f"  {n:<{w}}  {str(sh):<{s}}  {m}" for n, sh, m in rows]
        return "\n".join(lines)

    # ------------------------------------------------------------------ fallback update
    def _fallback_update(self) -> None:
        """Update the fallback parameters from their ``.grad`` (eager foreach ops; small tensors)."""
        params = [p for p in self.fallback_params() if p.grad is not None]
        if not params:
            return
        g = self.param_groups[0]
        lr = g["lr"]
        wd = g.get("weight_decay", torch.zeros((), device=lr.device, dtype=lr.dtype))
        grads = [p.grad for p in params]
        if self.fallback == "sgd":
            mom = g.get("momentum", torch.zeros((), device=lr.device, dtype=lr.dtype))
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            d = torch._foreach_add(grads, torch._foreach_mul(params, wd))
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, torch._foreach_mul(d, 1 - mom))
            torch._foreach_add_(params, torch._foreach_mul(bufs, -lr))
        else:
            flr = g["fallback_lr"]
            for p in params:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["adam_step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["adam_step"] += 1
                t = st["adam_step"]
                p.mul_(1 - flr * wd)
                st["exp_avg"].lerp_(p.grad, 0.1)
                st["exp_avg_sq"].mul_(0.999).add_(p.grad * p.grad * 0.001)
                bc1 = 1 - 0.9**t
                bc2 = 1 - 0.999**t
                denom = (st["exp_avg_sq"] / bc2).sqrt_().add_(1e-8)
                p.sub_(flr * (st["exp_avg"] / bc1) / denom)

    # ------------------------------------------------------------------ transactional helpers
    def _snapshot_params(self) -> None:
        """Copy every trainable parameter into preallocated buffers (for :meth:`_restore_params`)."""
        params = self.param_groups[0]["params"]
        if self._snap is None:
            self._snap = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._snap, params)

    def _restore_params(self) -> None:
        assert self._snap is not None, "_snapshot_params must run first"
        with torch.no_grad():
            torch._foreach_copy_(self.param_groups[0]["params"], self._snap)

    @staticmethod
    def _all_finite(tensors: Iterable[Tensor | None]) -> bool:
        """One host sync: are all the given tensors finite? (:func:`finite_flag`)"""
        return bool(finite_flag(tensors))

    def _skip(self, why: str) -> None:
        self._counters["skipped_steps"] += 1
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite {why} at step {self._counters['steps']}; the step was not "
                f"applied and the optimizer state is unchanged"
            )

    # ------------------------------------------------------------------ counters and state
    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the loss, a gradient or a curvature statistic was not finite."""
        return self._counters["skipped_steps"]

    @property
    def steps(self) -> int:
        """Steps applied so far."""
        return self._counters["steps"]

    def counters(self) -> dict[str, int]:
        """All health counters of this optimizer (steps, skipped steps, method-specific fallbacks)."""
        return dict(self._counters)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus fastcurv's counters under the key ``"fastcurv"``."""
        sd = super().state_dict()
        sd["fastcurv"] = {"counters": dict(self._counters)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Unlike the base class, state tensors keep their saved dtype (factors
        kept in float32 for a bf16 model stay float32), so a round trip is exact."""
        sd = dict(state_dict)
        extra = sd.pop("fastcurv", {})
        super().load_state_dict(sd)
        for group in self.param_groups:  # never share hyperparameter tensors with the source dict
            for k, v in group.items():
                if k != "params" and isinstance(v, Tensor):
                    group[k] = v.detach().clone()
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            p = params[pid]
            self.state[p] = {
                k: (v.to(device=p.device).clone() if isinstance(v, Tensor) else v) for k, v in st.items()
            }
        self._counters.update(extra.get("counters", {}))

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, scaler: Any = None) -> Tensor | None:  # type: ignore[override]
        r"""One optimisation step; see the module docstring for the protocol. Returns the loss (detached).

        ``scaler``: a ``torch.amp.GradScaler`` (fp16 mixed precision). The optimizer backpropagates
        ``scaler.scale(loss)``, calls ``scaler.unscale_(self)`` once and divides the captured curvature
        statistics by the scale (:math:`S^2` for :math:`G`, :math:`S` for :math:`\bar g`) before they are
        used; a step whose unscaled gradients overflowed is skipped like any non-finite step. Call
        ``scaler.update()`` after ``step`` (never ``scaler.step(opt)``: it does not take a closure). In the
        plain loop: ``scaler.scale(loss).backward(); opt.step(scaler=scaler); scaler.update()``.
        """
        self._check_hyper_types()
        if scaler is not None and not self._supports_scaler:
            raise TypeError(f"{type(self).__name__}.step does not support a GradScaler (scaler=)")
        self._scaler = scaler
        try:
            loss, ok = self._step(closure)
        finally:
            self._scaler = None
        if ok:
            self._counters["steps"] += 1
        return loss

    # ------------------------------------------------------------------ mixed precision, data parallel
    _scaler: Any = None
    #: whether the subclass unscales its gradients and statistics (``step(..., scaler=)``)
    _supports_scaler = False
    #: whether the subclass reduces its curvature over the ranks of a process group (``distributed=``)
    _supports_distributed = False
    #: whether the subclass also reduces the gradients itself (weighted by the local batch sizes, inside DDP's
    #: ``no_sync``), so that it needs no DDP wrapper and unequal local batches are exact
    _reduces_gradients = False

    def _backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, through the step's GradScaler when there is one."""
        (loss if self._scaler is None else self._scaler.scale(loss)).backward(**kwargs)

    def _unscale(self, *, user_backward: bool = False) -> float:
        """With a GradScaler: unscale the gradients (``scaler.unscale_(self)``, once per step) and return
        :math:`1/S` for the statistics captured in the scaled backward; 1.0 without one.

        ``user_backward``: the plain loop, where the user may already have called ``scaler.unscale_(opt)``
        (e.g. to clip gradients); with a closure the optimizer ran backward itself, so an earlier
        ``unscale_`` means ``scaler.update()`` was not called after the previous step (an error)."""
        sc = self._scaler
        if sc is None or not sc.is_enabled():
            return 1.0
        try:
            sc.unscale_(self)
        except RuntimeError as e:
            if "already been called" not in str(e):
                raise
            if not user_backward:
                raise RuntimeError(
                    f"{type(self).__name__}.step(closure, scaler=scaler): the scaler was already used on this "
                    f"optimizer since its last update(); call scaler.update() after every step"
                ) from e
        return 1.0 / float(sc.get_scale())

    def _consensus(self, flags: Tensor) -> Tensor:
        """Finiteness flags agreed by every rank (entry True iff True everywhere); unchanged alone."""
        return flags if self._comm is None else self._comm.all_true(flags)

    def _step(self, closure: Closure | None) -> tuple[Tensor | None, bool]:
        raise NotImplementedError

    def _eval_closure(self, closure: Closure | None, *, backward: bool = True) -> Tensor:
        """Zero grads, run ``closure()`` with grad enabled and (by default) backpropagate. Checks the protocol."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure: step(lambda: loss_fn(model(x), y)); the closure "
                f"runs the forward pass and returns the loss, the optimizer calls backward itself"
            )
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise TypeError(f"the closure must return the loss as a 0-d tensor, got {type(loss).__name__}")
            # A closure written for torch.optim.LBFGS calls backward itself; don't do it twice.
            already = any(p.grad is not None for p in self.param_groups[0]["params"])
            if backward and not already and loss.requires_grad:
                self._backward(loss)
        return loss.detach()
