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
``on_nonfinite="raise"`` a ``FloatingPointError`` is raised instead (state also unchanged).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CurvatureOptimizer", "Closure", "maybe_compile"]

Closure = Callable[[], Tensor]


def maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` when ``enabled`` (and not disabled globally by
    ``FASTCURV_COMPILE=0``), else ``fn`` itself."""
    if not enabled or os.environ.get("FASTCURV_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn, fullgraph=True, dynamic=False)


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
        self._counters: dict[str, int] = {"steps": 0, "skipped_steps": 0}
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
        """One host sync: are all the given tensors finite?"""
        ts = [t for t in tensors if t is not None]
        if not ts:
            return True
        flags = torch.stack([torch.isfinite(t).all() for t in ts])
        return bool(flags.all())

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
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimisation step; see the module docstring for the protocol. Returns the loss (detached)."""
        self._check_hyper_types()
        loss, ok = self._step(closure)
        if ok:
            self._counters["steps"] += 1
        return loss

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
                loss.backward()
        return loss.detach()
