"""What every fastcurv optimizer shares: construction from a model, tensor hyperparameters, the step protocol,
the fallback for parameters the method does not precondition, non-finite handling and state dicts.

Step protocol (the same for every fastcurv optimizer)::

    opt = Cls(model, **hyperparameters)      # built from the model alone
    def closure():                           # LBFGS-style, as Lightning's automatic optimization passes it
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)                 # or a forward-only closure: lambda: loss_fn(model(x), y)

``step(closure=None, *, scaler=None, **options)`` is the one signature; ``options`` are method-specific
(``batch=(x, y)`` for the Newton-type optimizers built with a ``loss_fn``). :meth:`CurvatureOptimizer._eval_closure`
is the one closure evaluator: it runs ``closure()`` with grad enabled, backpropagates the loss unless the
closure did (its ``backward()`` call is observed, not guessed from ``.grad``), and returns the detached loss.
Methods that need more evaluations (K-BFGS at a second point, the Newton-type methods' curvature products and
trial loss) call the same closure again through :meth:`CurvatureOptimizer._replay`, which runs it with the
closure's ``zero_grad()`` and ``backward()`` turned into no-ops (and, for curvature products, the parameters
substituted by ``torch.func``-style reparametrisation), so the user's forward and loss are used as written.

Gradient accumulation. ``step(closure)`` never discards gradients accumulated before it: ``.grad`` that
changed since the end of this optimizer's previous step (or its last ``zero_grad``) is the user's
accumulation (e.g. Lightning's ``accumulate_grad_batches``, whose closure does not zero on the later
micro-batches), and the closure's backward adds to it. Gradients this optimizer itself left in ``.grad`` at
its previous step and nobody touched since are dropped (so a forward-only closure needs no ``zero_grad``).
Methods whose curvature pools over micro-batches (K-FAC with the empirical Fisher) support this; the others
(K-BFGS, which evaluates the same minibatch at a second point, and the Newton-type methods, which re-evaluate
the closure) raise a ``ValueError`` instead of silently using the last micro-batch only. Methods that can
(K-FAC) also accept the plain loop ``loss.backward(); opt.step()``.

Hyperparameters live in ``param_groups`` as 0-d tensors, so ``torch.optim.lr_scheduler`` schedulers change
them with ``fill_`` and a compiled update never recompiles for a new value. A Python number written into
``param_groups`` (``OneCycleLR`` writes ``momentum`` as a float) is validated and copied into the same 0-d
tensor at the next step, which is put back: the compiled update always sees the same tensor object.

Parameter groups. There is one group (the model's trainable parameters); :meth:`add_param_group` after
construction raises (build a new optimizer from the model after unfreezing layers). At construction, a
model of which nothing can be preconditioned raises ``ValueError``, and one of whose trainable parameters
(by count of elements) more than half go to the fallback rule gets one ``UserWarning`` with the
:meth:`CurvatureOptimizer.describe` table — the same rule for every optimizer.

Non-finite loss, gradient or curvature: with ``on_nonfinite="skip"`` (default) the step is skipped, every
parameter and state tensor is left bitwise unchanged and ``opt.skipped_steps`` counts it; with
``on_nonfinite="raise"`` a ``FloatingPointError`` is raised instead (state also unchanged). A non-finite
value found in the optimizer *state* (corrupted from outside a step) is repaired by the subclass and counted
in ``counters()["state_resets"]``.

Data parallel (``distributed=``, :mod:`fastcurv.distributed`) and mixed precision (``step(closure,
scaler=...)`` for ``torch.amp.GradScaler``; bf16 autocast inside the closure): docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv.distributed import communicator, is_ddp, no_sync

__all__ = ["CurvatureOptimizer", "Closure", "maybe_compile", "finite_flag"]

Closure = Callable[[], Tensor]

#: param -> (weak reference to the .grad a fastcurv optimizer last consumed or zeroed, its version), shared by
#: every optimizer (a second optimizer on the same model does not mistake the first one's gradients for an
#: accumulation): see CurvatureOptimizer._begin_closure
_GRAD_MARKS: dict[int, tuple[Any, Any, int]] = {}  # id(param) -> (weakref(param), weakref(grad), version)


def maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` when ``enabled`` (and not disabled globally by
    ``FASTCURV_COMPILE=0``), else ``fn`` itself."""
    if not enabled or os.environ.get("FASTCURV_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn, fullgraph=True, dynamic=False)


class Open(float):
    """An excluded bound in :attr:`CurvatureOptimizer.hyperparameters`: ``(Open(0.0), None)`` is
    :math:`(0, \\infty)`, ``(0.0, Open(1.0))`` is :math:`[0, 1)`."""


def _group_finite(ts: list[Tensor]) -> Tensor:
    """0-d bool: every element of the tensors (one dtype, one device) is finite (see :func:`finite_flag`)."""
    if ts[0].device.type == "cpu":
        ext = [torch.stack(torch.aminmax(torch.view_as_real(t) if t.is_complex() else t)) for t in ts]
        return torch.isfinite(torch.cat(ext)).all()
    return torch.isfinite(torch.stack(torch._foreach_norm(ts, ord=math.inf)).amax())


def finite_flag(tensors: Iterable[Tensor | None], device: torch.device | None = None) -> Tensor:
    """0-d bool tensor, True iff every element of every given tensor is finite; no host sync.

    Off the CPU: one ``torch._foreach_norm(ord=inf)`` (max-abs, which propagates NaN and inf; a multi-tensor
    kernel on CUDA) per dtype and device, then one ``isfinite`` of the maxima, instead of
    ``isfinite(t).all()`` per tensor (two kernels and a dispatch each). On the CPU: ``torch.aminmax`` per
    tensor (NaN propagates; ±inf is the min or the max), which is vectorised there while the inf-norm and
    ``isfinite`` are not — measured on 5.8 M float32 elements on one thread: 0.75 ms against 25 ms
    (``_foreach_norm``) and 28 ms (``isfinite().all()``). Neither can overflow on finite input (a 2-norm
    can). None, empty, integer and bool tensors are skipped (always finite); with none left the result is
    True on ``device``."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.numel() > 0:
            groups.setdefault((t.dtype, t.device), []).append(t)
    flags = [_group_finite(ts) for ts in groups.values()]
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

    #: hyperparameter name -> (low, high), inclusive bounds (:class:`Open` marks an excluded one); None = unbounded
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
        #: the 0-d hyperparameter tensors, by name: whatever a scheduler writes into ``param_groups`` is copied
        #: into these (same objects at every step: a compiled update never recompiles)
        self._hyper_store: dict[str, Tensor] = {
            k: v for k, v in self.param_groups[0].items() if k != "params" and isinstance(v, Tensor)
        }
        self._constructed = True
        self._mark_grads()  # gradients present at construction are not part of the first step
        self._replaying = False
        self._partition_checked = False
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
        lo_bad = lo is not None and (v <= lo if isinstance(lo, Open) else v < lo)
        hi_bad = hi is not None and (v >= hi if isinstance(hi, Open) else v > hi)
        if not math.isfinite(v) or lo_bad or hi_bad:
            interval = (
                f"{'(' if lo is None or isinstance(lo, Open) else '['}{'-inf' if lo is None else float(lo)}, "
                f"{'inf' if hi is None else float(hi)}{')' if hi is None or isinstance(hi, Open) else ']'}"
            )
            raise ValueError(f"{name} must be finite and in {interval}, got {v}")
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.tensor(v, dtype=dtype, device=ref.device)

    def _check_hyper_types(self) -> None:
        """Bring ``param_groups`` back to the 0-d hyperparameter tensors before a step: a Python number written
        by a scheduler (``OneCycleLR``'s float ``momentum``) is validated against :attr:`hyperparameters` and
        copied into the stored tensor, a tensor put in its place is copied too, and the stored tensor is put
        back (the same object every step: no recompile of a compiled update). Raises before anything changes."""
        if len(self.param_groups) != 1:
            raise RuntimeError(f"{type(self).__name__} has one parameter group; param_groups was changed from outside")
        group = self.param_groups[0]
        pending: list[tuple[Tensor, float | Tensor]] = []
        for k, store in self._hyper_store.items():
            v = group.get(k, store)
            if v is store:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
                raise TypeError(
                    f"param_groups[0]['{k}'] was set to a {type(v).__name__}; it must be a float or a 0-d tensor"
                )
            if isinstance(v, Tensor):
                if v.dim() != 0:
                    raise TypeError(f"param_groups[0]['{k}'] was set to a tensor of shape {tuple(v.shape)}; 0-d needed")
                pending.append((store, v))
                continue
            lo, hi = self.hyperparameters.get(k, (None, None))
            f = float(v)
            if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
                raise ValueError(
                    f"param_groups[0]['{k}'] was set to {v!r}; it must be finite and in "
                    f"[{lo}, {hi if hi is not None else 'inf'}]"
                )
            pending.append((store, f))
        for store, v in pending:
            if isinstance(v, Tensor):
                store.copy_(v.detach())
            else:
                store.fill_(v)
        for k, store in self._hyper_store.items():
            group[k] = store

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported after construction (raises ``ValueError``): a fastcurv optimizer is built from the model
        and partitions its trainable parameters once (preconditioned layers and the fallback, :meth:`describe`).
        After unfreezing layers, build a new optimizer from the model."""
        if getattr(self, "_constructed", False):
            raise ValueError(
                f"{type(self).__name__}.add_param_group is not supported: the optimizer is built from the model and "
                f"partitions its trainable parameters once at construction (preconditioned layers, fallback). After "
                f"unfreezing parameters, build a new optimizer: {type(self).__name__}(model, ...)"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ parameter partition
    def _set_preconditioned(self, mapping: dict[Tensor, str]) -> None:
        """Record, for each parameter, how it is updated: ``mapping`` holds the preconditioned ones
        (param -> a short description, e.g. ``"K-BFGS layer fc1 (weight+bias)"``); the rest go to the fallback."""
        self._method = dict(mapping)
        self._init_fallback_state()
        if not self._partition_checked:
            self._partition_checked = True
            self._check_partition()

    #: fraction of the trainable elements above which the fallback share is warned about at construction
    fallback_warn_share = 0.5

    def _check_partition(self) -> None:
        """The construction-time rule shared by every optimizer: nothing to precondition raises, more than
        :attr:`fallback_warn_share` of the trainable elements in the fallback warns (with :meth:`describe`)."""
        params = self.param_groups[0]["params"]
        total = sum(p.numel() for p in params)
        fb = sum(p.numel() for p in self.fallback_params())
        if not self._method:
            raise ValueError(
                f"{type(self).__name__}: nothing in the model can be preconditioned (every trainable parameter "
                f"would go to the fallback rule); use a torch.optim optimizer instead.\n{self.describe()}"
            )
        if total and fb / total > self.fallback_warn_share:
            warnings.warn(
                f"{type(self).__name__}: {fb} of the {total} trainable parameter elements ({100 * fb / total:.0f}%) "
                f"are not preconditioned and go to the {self.fallback} fallback rule:\n{self.describe()}",
                UserWarning,
                stacklevel=4,
            )

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
                if k != "params" and isinstance(v, Tensor) and k not in self._hyper_store:
                    group[k] = v.detach().clone()
        self._check_hyper_types()  # loaded values go into the stored 0-d tensors (same objects as before)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            p = params[pid]
            self.state[p] = {
                k: (v.to(device=p.device).clone() if isinstance(v, Tensor) else v) for k, v in st.items()
            }
        self._counters.update(extra.get("counters", {}))

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; a no-op while the optimizer replays the closure (its
        ``zero_grad()`` call must not clear the step's gradients)."""
        if self._replaying:
            return
        super().zero_grad(set_to_none=set_to_none)
        self._mark_grads()

    #: the keyword options :meth:`step` accepts besides ``scaler`` (subclasses extend it)
    _step_options: frozenset[str] = frozenset()

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, scaler: Any = None, **options: Any) -> Tensor | None:  # type: ignore[override]
        r"""One optimisation step; see the module docstring for the protocol. Returns the loss (detached).

        ``scaler``: a ``torch.amp.GradScaler`` (fp16 mixed precision). The optimizer backpropagates
        ``scaler.scale(loss)``, calls ``scaler.unscale_(self)`` once and divides the captured curvature
        statistics by the scale (:math:`S^2` for :math:`G`, :math:`S` for :math:`\bar g`) before they are
        used; a step whose unscaled gradients overflowed is skipped like any non-finite step. Call
        ``scaler.update()`` after ``step`` (never ``scaler.step(opt)``: it does not take a closure). In the
        plain loop: ``scaler.scale(loss).backward(); opt.step(scaler=scaler); scaler.update()``.

        ``options``: method-specific keywords (e.g. ``batch=(x, y)`` for the Newton-type optimizers).
        """
        unknown = sorted(set(options) - self._step_options)
        if unknown:
            allowed = ", ".join(sorted(self._step_options)) or "none"
            raise TypeError(f"{type(self).__name__}.step got unexpected keyword(s) {unknown} (options: {allowed})")
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._check_hyper_types()
        if scaler is not None and not self._supports_scaler:
            raise TypeError(f"{type(self).__name__}.step does not support a GradScaler (scaler=)")
        self._check_capture_owner()
        self._scaler = scaler
        try:
            loss, ok = self._step(closure, **options)
        finally:
            self._scaler = None
            self._mark_grads()  # what is in .grad now was consumed by this step
            self._end_round()
        if ok:
            self._counters["steps"] += 1
        return loss

    def _check_capture_owner(self) -> None:
        """Raise if another optimizer took over this one's layers (capture is transferable: the newest wins)."""
        for name in ("_cap", "capture"):
            cap = self.__dict__.get(name)
            if cap is not None and hasattr(cap, "check_owner"):
                cap.check_owner(type(self).__name__)

    # ------------------------------------------------------------------ the closure evaluator
    #: whether the method's gradient and curvature pool over micro-batches accumulated before step (K-FAC)
    _supports_accumulation = False

    def _mark_grads(self) -> None:
        """Remember the ``.grad`` tensors as they are now (consumed or zeroed by this optimizer)."""
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                _GRAD_MARKS.pop(id(p), None)
            else:
                _GRAD_MARKS[id(p)] = (weakref.ref(p, _unmark(id(p))), weakref.ref(p.grad), p.grad._version)

    def _accumulated(self) -> bool:
        """Whether some ``.grad`` changed since this optimizer last consumed or zeroed the gradients."""
        for p in self.param_groups[0]["params"]:
            g = p.grad
            if g is None:
                continue
            m = _GRAD_MARKS.get(id(p))
            if m is None or m[0]() is not p or m[1]() is not g or g._version != m[2]:
                return True
        return False

    def _fresh_round(self) -> None:
        """Hook: statistics of an earlier round are stale (subclasses reset their captured statistics)."""

    def _end_round(self) -> None:
        """Hook run after every step (applied, skipped or raised): the step consumed the accumulated round."""

    def _begin_closure(self, fresh: bool) -> bool:
        """Before the first evaluation of a step: keep gradients the user accumulated (returns True), or drop
        the ones this optimizer left (and the subclass's stale statistics). ``fresh``: always drop."""
        if not fresh and self._accumulated():
            if not self._supports_accumulation:
                raise ValueError(
                    f"{type(self).__name__}.step(closure): gradients were accumulated before the step (a backward "
                    f"since the last step or zero_grad, e.g. accumulate_grad_batches > 1), but "
                    f"{type(self).__name__} evaluates the closure again (on its last micro-batch only) and cannot "
                    f"include them. Use one larger batch, or call opt.zero_grad() before the step's closure"
                )
            return True
        super().zero_grad(set_to_none=True)
        self._fresh_round()
        return False

    def _eval_closure(
        self, closure: Closure | None, *, backward: bool = True, fresh: bool = False, output: bool = False,
        retain_graph: bool = False,
    ) -> Any:
        """The one closure evaluator: run ``closure()`` with grad enabled and backpropagate its loss unless the
        closure called ``backward()`` itself (observed, not guessed). Gradients accumulated before the step are
        kept (:meth:`_begin_closure`). Returns the detached loss; with ``output=True`` the closure may return
        ``(loss, model_output)`` and ``(loss, output, raw_loss, backward_calls)`` is returned (``backward_calls``:
        the tensors the closure called ``backward()`` on, empty when it did not).
        ``backward=False``: never backpropagate (the caller does). ``retain_graph``: a backward the closure
        calls keeps the graph (for a second backward through it)."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure: step(closure) with a closure that returns the loss "
                f"(forward only, or LBFGS-style: zero_grad(); loss = ...; loss.backward(); return loss)"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._begin_closure(fresh)
        with torch.enable_grad(), _observed_backward(run=True, retain_graph=retain_graph) as calls:
            out = closure()
        out_t = None
        if output and isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise TypeError(f"the closure must return loss or (loss, output), got a sequence of {len(out)}")
            out, out_t = out
        loss = _check_loss(out, output)
        if backward and not calls and loss.requires_grad:
            with torch.enable_grad():
                self._backward(loss, retain_graph=retain_graph)
        if output:
            return loss.detach(), out_t, loss, list(calls)
        return loss.detach()

    @contextlib.contextmanager
    def _replaying_closure(self) -> Iterator[list[Tensor]]:
        """Context for evaluating the closure again within a step: its ``zero_grad()`` and ``backward()``
        calls do nothing (the tensors ``backward()`` was called on are collected in the yielded list), every
        ``.grad`` is the same afterwards, and a DDP wrapper does not sync (``no_sync``)."""
        params = self.param_groups[0]["params"]
        grads = [p.grad for p in params]
        self._replaying = True
        try:  # (inside DDP's no_sync: a replayed forward is never followed by a DDP backward)
            with no_sync(self.model), _observed_backward(run=False) as calls:
                yield calls
        finally:
            self._replaying = False
            for p, g in zip(params, grads):
                p.grad = g

    def _replay(self, closure: Closure, *, grad: bool) -> Tensor:
        """Evaluate ``closure`` again (see :meth:`_replaying_closure`) and return its loss, not detached: the
        tensor its ``backward()`` was called on if it called it, else what it returned. ``grad``: build the
        autograd graph."""
        with self._replaying_closure() as calls, torch.set_grad_enabled(grad):
            out = closure()
        loss = calls[-1] if calls else out
        if isinstance(loss, (tuple, list)) and len(loss) == 2:
            loss = loss[0]
        return _check_loss(loss, False)

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

    def _step(self, closure: Closure | None, **options: Any) -> tuple[Tensor | None, bool]:
        raise NotImplementedError


def _unmark(key: int) -> Callable[[Any], None]:
    return lambda _ref: _GRAD_MARKS.pop(key, None)


def _check_loss(loss: object, pair: bool) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.dim() > 1:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""
        extra = " (or (loss, output))" if pair else ""
        raise TypeError(f"the closure must return the loss as a 0-d tensor{extra}, got {type(loss).__name__}{shape}")
    if loss.dim() == 0:
        return loss
    with torch.enable_grad():
        return loss.reshape(())


@contextlib.contextmanager
def _observed_backward(*, run: bool, retain_graph: bool = False) -> Iterator[list[Tensor]]:
    """Observe the backward calls made inside the block (a closure's own backward): the tensors are collected
    in the yielded list; ``run=False`` turns the calls into no-ops, ``retain_graph`` keeps the graph.

    ``torch.Tensor.backward`` and ``torch.autograd.backward`` are swapped for the duration of the block (one
    optimizer step on one thread; the originals are restored on exit). Lightning's ``manual_backward`` /
    ``strategy.backward``, ``accelerate``'s ``backward`` and ``GradScaler.scale(loss).backward()`` all end in
    one of them."""
    calls: list[Tensor] = []
    orig_t, orig_a = torch.Tensor.backward, torch.autograd.backward
    depth = [0]

    def tensor_backward(self: Tensor, gradient: Any = None, retain_graph_: Any = None, create_graph: bool = False,
                        inputs: Any = None, **kw: Any) -> None:
        calls.append(self)
        if run:
            rg = kw.pop("retain_graph", retain_graph_)
            depth[0] += 1
            try:
                orig_t(self, gradient, True if retain_graph else rg, create_graph, inputs)
            finally:
                depth[0] -= 1

    def autograd_backward(tensors: Any, *args: Any, **kw: Any) -> None:
        if depth[0]:  # called by Tensor.backward above: already recorded
            return orig_a(tensors, *args, **kw)
        ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        calls.extend(t for t in ts if isinstance(t, Tensor))
        if run:
            if retain_graph:
                if len(args) >= 2:
                    args = (args[0], True, *args[2:])
                else:
                    kw["retain_graph"] = True
            orig_a(tensors, *args, **kw)

    torch.Tensor.backward = tensor_backward  # type: ignore[method-assign]
    torch.autograd.backward = autograd_backward  # type: ignore[assignment]
    try:
        yield calls
    finally:
        torch.Tensor.backward = orig_t  # type: ignore[method-assign]
        torch.autograd.backward = orig_a  # type: ignore[assignment]
