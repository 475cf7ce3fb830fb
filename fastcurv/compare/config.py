"""The settings of one comparison (:class:`CompareConfig`) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fastcurv.compare.errors import CompareError, one_line
from fastcurv.compare.registry import OptimizerEntry, entry_arguments, normalize_name, resolve

__all__ = ["DEFAULT_BUDGET_SECONDS", "CompareConfig"]

#: default training-clock budget per optimizer: the 8 default runs (exact-newton is skipped on a CPU) with
#: their evaluations fit in about 3 minutes on 2 quiet CPU cores
DEFAULT_BUDGET_SECONDS = 12.0


@dataclass
class CompareConfig:
    """Settings of one comparison (their meaning in the protocol: docs/compare.md).

    Attributes:
        optimizers: registry names or dotted paths to optimizer classes, in run order (``None``:
            :func:`~fastcurv.compare.default_optimizers`).
        budget_seconds: training-clock budget per optimizer (> 0).
        max_steps: optional cap on the steps per optimizer.
        batch_size: minibatch rows (clamped to ``n_train``).
        seed: initialisation, data order and sampling seed.
        device: a ``torch.device`` (already resolved; ``"auto"`` is resolved by the CLI).
        dtype: ``torch.float32`` or ``torch.float64``.
        eval_size: examples of each split used for evaluations (``None``: 10000 on CUDA, 2000 on CPU).
        n_evals: evaluations per run besides the one at step 0 (the last one at the end).
        warmup_steps: steps on a throwaway copy before each run's clock starts (``None``: 2 on CUDA, where
            compiled graphs are built at steps 1 and 2, and 1 on CPU).
        tune: run the grid first and keep the best point.
        tune_seconds: budget of each grid point (``None``: a quarter of ``budget_seconds``).
        overrides: ``{name: {kwarg: value}}`` applied on top of defaults and grid points (``compile`` for
            heavyball optimizers: ``True``, ``False`` or ``"auto"``, see docs/compare.md).
        progress: show one tqdm bar per run (on stderr).
        command: argv recorded in the JSON.
    """

    optimizers: list[str] | None = None
    budget_seconds: float = DEFAULT_BUDGET_SECONDS
    max_steps: int | None = None
    batch_size: int = 1000
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    eval_size: int | None = None
    n_evals: int = 10
    warmup_steps: int | None = None
    tune: bool = False
    tune_seconds: float | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    command: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise :class:`CompareError` (one line) for any setting out of range."""

        def positive_int(v: object, what: str) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CompareError(f"{what} must be a positive integer, got {v!r}")

        def positive_finite(v: object, what: str) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CompareError(f"{what} must be a positive number of seconds, got {v!r}")

        positive_finite(self.budget_seconds, "budget_seconds")
        if self.tune_seconds is not None:
            positive_finite(self.tune_seconds, "tune_seconds")
        if self.max_steps is not None:
            positive_int(self.max_steps, "max_steps")
        positive_int(self.batch_size, "batch_size")
        positive_int(self.n_evals, "n_evals")
        if self.eval_size is not None:
            positive_int(self.eval_size, "eval_size")
        w = self.warmup_steps
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise CompareError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CompareError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise CompareError(f"dtype must be float32 or float64, got {self.dtype}")
        if self.optimizers is not None:
            if not self.optimizers:
                raise CompareError("no optimizer selected")
            names = [normalize_name(n) for n in self.optimizers]
            resolved = {n: resolve(n) for n in names}
            for name, kw in self.overrides.items():
                key = normalize_name(name)
                if key not in resolved:
                    raise CompareError(f"a setting names optimizer {name!r}, which is not in the selection "
                                       f"{','.join(names)}")
                entry, cls = resolved[key]
                accepted = entry_arguments(entry, cls)
                for k in kw:
                    if accepted is not None and k not in accepted:
                        raise CompareError(f"{name} has no argument {k!r}; its arguments: {', '.join(accepted)}")
                _check_peer_arguments(key, entry, cls, kw)


def _check_peer_arguments(name: str, entry: OptimizerEntry, cls: type, kw: dict[str, Any]) -> None:
    """Settings of an optimizer built from parameters, checked before any training: ``compile`` (for an
    entry with a compile switch) and the rest by a trial construction on one dummy parameter (the
    constructor's own checks: torch.optim's value ranges, heavyball's unknown keywords)."""
    kw = dict(kw)
    if entry.compile_switch is not None and "compile" in kw:
        if kw["compile"] not in (True, False, "auto"):
            raise CompareError(f"{name}.compile must be True, False or 'auto', got {kw['compile']!r}")
        del kw["compile"]
    if not (entry.from_params or entry.is_torch):
        return
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **kw)
    except (TypeError, ValueError) as e:
        raise CompareError(f"{name}: bad setting: {one_line(e)}") from None
