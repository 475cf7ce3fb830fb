r"""The deep-autoencoder optimizer comparison behind ``fastcurv compare`` (argument parsing lives in
:mod:`fastcurv.cli`; this module is the engine: registry, runs, table, plot, JSON).

Protocol (what makes the comparison fair)
-----------------------------------------
Every optimizer trains a fresh copy of the same model, ``problem.build_model(seed)`` (identical initial
weights), on the same sequence of minibatches: one ``torch.Generator`` seeded with ``seed`` draws a
permutation of the training set per epoch and consecutive slices of ``batch_size`` rows are the batches (a
last partial slice is dropped, so every step sees ``batch_size`` rows). The loss is the problem's
(:meth:`fastcurv.data.Problem.loss_fn`: summed over pixels, averaged over the batch; the papers' reported
loss also adds :math:`\tfrac12\tau\lVert\theta\rVert^2`, which is *not* added here).

The budget is a *training clock*: only the steps (batch slicing, ``opt.step(closure)`` and reading the
returned loss — a host sync, so GPU work is finished when the clock stops) are timed; the run stops at the
first step boundary where the clock reaches ``budget_seconds`` (the last step may end past it) or after
``max_steps`` steps. Evaluations and progress display happen between steps with the clock paused. Before the
clock starts, ``warmup_steps`` steps are run on a throwaway copy of the model and a throwaway optimizer, so
one-time costs (``torch.compile`` graphs, Triton autotuning, CUDA/cuBLAS initialisation) are not billed to
the first optimizer that happens to pay them.

Evaluation: the "train loss" and "test loss" of the table, plot markers and JSON are the mean loss over a
fixed subset of each split (its first ``eval_size`` examples, default 2000 on CPU and 10000 on CUDA),
computed on a separate copy of the model (so no optimizer hook sees it), at training-clock 0, when the clock crosses ``k * budget / n_evals``
(or the step count crosses ``k * max_steps / n_evals``), and at the end. The target of the time-to-target
column is the reference optimizer's (``adam`` when it runs, else the first one) final train loss; an
optimizer's time to target is the training-clock time at which its evaluated train loss first reaches the
target, interpolated linearly in ``log(loss)`` between the two evaluations that straddle it;
``time_to_target_ratio = time_to_target / reference's time_to_target`` (< 1: faster than the reference).

Divergence: a non-finite loss with non-finite parameters, 20 consecutive non-finite losses (fastcurv
optimizers skip such steps and leave the parameters unchanged), or a minibatch loss above 100 times the
initial evaluated train loss (a blow-up) ends that optimizer's run with status ``"diverged"``; an
exception in construction, warm-up or a step ends it with status ``"error"``. Neither stops the
comparison; both are reported in the table and the JSON.

Optimizers (:data:`REGISTRY`): ``adam`` / ``adamw`` (``torch.optim.Adam`` / ``AdamW``, ``fused=True`` on
CUDA) and the fastcurv optimizers, whose classes are resolved lazily from :mod:`fastcurv.optim` so that a
class not (yet) present only disables its name. Default hyperparameters, with the grids of ``tune=True``
(short runs of ``tune_seconds`` each, best final train loss wins):

============== ==================================================== ============================================
name           defaults                                             ``--tune`` grid
============== ==================================================== ============================================
adam           **curves: lr 3e-3** (sweep below); other problems:   lr in {3e-4, 1e-3, 3e-3}
               lr 1e-3 (torch's default); betas (0.9, 0.999), eps
               1e-8, no weight decay
adamw          lr 1e-3, weight_decay 1e-2 (torch's defaults)        lr in {3e-4, 1e-3, 3e-3}
kfac           class defaults (lr 1, damping 3: the K-BFGS Demo's   lr in {0.3, 1} x damping in {0.3, 3}
               tuned KFAC; best of the curves sweep), sampled (true)
               Fisher as in the papers' code: likelihood bernoulli
               (sigmoid-CE problems) or gaussian (squared-error),
               ``seed`` = the run's seed
kbfgs, kbfgsl  **curves: lr 0.3, damping 0.7** (the paper's lr; its  lr in {0.1, 0.3} x damping in {0.3, 0.7, 1}
               damping 0.3 diverges there, see below); other
               problems: the paper's lr 0.3, damping 0.3
newton-cg,     class defaults, ``loss_fn`` = the problem's loss      lr x {1/3, 1, 3} of the class default when
block-hf,      (``Problem.loss_fn``; ExactNewton: ``"bce"`` /        the class has an ``lr`` argument, else none
exact-newton   ``"mse"``); NewtonCG and BlockHF are stepped with
               ``batch=(x, x)``
============== ==================================================== ============================================

``exact-newton`` is *skipped* (status ``"skipped"``, nothing run) when a rough lower estimate of one step's
time exceeds the budget: on the CPU it costs :math:`O(N\sum_l d_{out,l}^3)` (a batched ``eigh`` of every
per-sample block), about 90 s per step on CURVES at batch 1000 (1 thread), so it is not run by the default
``fastcurv compare`` on a CPU (raise ``--budget-seconds`` or lower ``--batch-size`` to run it).

Default hyperparameters on CURVES: the sweep
--------------------------------------------
Rule: each candidate trains for a fixed number of **steps** (not seconds: the sweep machine was shared and
timings are noisy) through :func:`run_comparison` itself (the CLI's code path: sampled-Fisher KFAC, same
initialisation and minibatches) on the generated CURVES set (20,000 train, batch 1000), float32, 1 thread,
seed 0; a candidate must be *stable* (status ``ok``: no blow-up above 100x the initial loss, no non-finite
parameters) and the best final train loss (mean over the first 2,000 training images) wins; the paper's
values are kept where they are stable, otherwise the closest stable choice. Command, per point::

    OMP_NUM_THREADS=1 python -c "import torch; torch.set_num_threads(1); from fastcurv import compare as c; \
    from fastcurv.data import load_problem; print(c.run_comparison(load_problem('curves'), c.CompareConfig( \
    optimizers=['kbfgs'], overrides={'kbfgs': {'lr': 0.3, 'damping': 0.7}}, max_steps=150, \
    budget_seconds=1e9, warmup_steps=0, progress=False))['optimizers'][0]['final_train_loss'])"

Final train loss after 150 steps (initial 543.4; the "mean image" plateau is ~164; ``div@k``: diverged at
step k; kbfgsl equals kbfgs up to float rounding until its 100-pair memory is full, but this chaotic problem
amplifies rounding, so near the stability edge one may diverge and the other not):

============= ============================================================================================
optimizer     lr, damping: final train loss at step 150
============= ============================================================================================
kbfgs         (0.3, 0.3) div@35 [paper]; (0.3, 0.5) div@103; **(0.3, 0.7) 163.15**; (0.3, 1) 163.22;
              (0.1, 0.3) 164.80; (0.1, 1) 165.67; (0.03, 0.3) 170.96; (0.03, 1) 173.09
kbfgsl        (0.3, 0.3) div@38 [paper]; (0.3, 0.5) 163.06; **(0.3, 0.7) 163.14**; (0.3, 1) 163.21;
              (0.1, 0.3) 164.82; (0.1, 1) 165.47; (0.03, 0.3) 170.40; (0.03, 1) 172.96
kfac          **(1, 3) 150.07** [class = Demo]; (1, 1) div@15; (1, 0.3) div@7; (0.3, 3) 163.36; (0.3, 1) 162.91;
              (0.3, 0.3) div@42; (0.1, 3) 164.22; (0.1, 1) 163.74; (0.1, 0.3) 163.06
adam          3e-4 163.10; 1e-3 160.18 [torch]; **3e-3 150.77**; 1e-2 149.58
newton-cg     class defaults 160.19 (stable; ~1.5 s/step); block-hf class defaults 162.94 after 60 steps
============= ============================================================================================

Longer checks of the finalists (seed 0): 400 steps: kbfgs (0.3, 0.7) 140.55, (0.3, 1) 147.15, (0.1, 0.3)
152.90; kbfgsl (0.3, 0.7) 126.58, (0.3, 1) 131.52; kfac (1, 3) 122.71; adam 3e-3 117.29, 1e-2 138.86 (so
3e-3: 1e-2 is ahead by 1.2 at 150 steps but behind by 21 at 400, and a default run gives Adam a few hundred
steps). 800 steps: kbfgs (0.3, 0.7) 67.16, (0.3, 1) 79.38. Seed 1 (data, initialisation and order), 150
steps: kbfgs (0.3, 0.7) 165.02, (0.3, 1) 165.12. All stable. kbfgsl takes kbfgs's (0.3, 0.7) rather than its
150-step winner (0.3, 0.5) (163.06 vs 163.14, a tie): with 0.5 it runs kbfgs's iteration until its memory
is full, and kbfgs diverged at step 103 with it.

Why the paper's damping fails here (not a porting bug: the port matches an independent re-implementation
of the official iteration to 1e-9 in float64 through the blow-up; the preconditioner stays bounded while
the steps overshoot and the momentum feeds the growing gradient back) is in the K-BFGS notes. Damping above 1
is excluded by construction: the Levenberg-Marquardt damping of :math:`H_g` uses :math:`\mu_2 =
\sqrt\lambda`, and :math:`\mu_2 > 1` makes the damped pair blow up when :math:`\tilde s^\top y \approx
\tilde s^\top\tilde s` (ALGORITHMS.md §1.3). These defaults were chosen on the generated CURVES set; they
are not verified on the real ``digs3pts_1.mat`` (``data=``), which also loads as ``curves``.

Adam here is ``torch.optim.Adam`` itself, not the papers' variant (which applies Adam to the momentum
gradient with beta2 = 0.9, eps = 1e-4). Warm starts (the K-FAC code's one-epoch factor average) are not
used by any optimizer.

JSON schema (``schema_version`` 1)
----------------------------------
Top level (exactly these keys; :data:`TOP_LEVEL_KEYS`)::

    schema_version      1
    versions            {"fastcurv", "torch", "triton" (null if not installed), "python"}
    created             ISO-8601 UTC time the comparison finished
    command             argv of the run (list of strings; [] when called from Python)
    device              {"type": "cpu" | "cuda", "name": str}
    dtype               "float32" | "float64"
    seed                int: model initialisation, data order, KFAC's sampling generator, data generation
    problem             {"name", "description", "n_train", "n_test", "layer_sizes", "loss", "data"}
    budget              {"seconds", "max_steps" (null = none), "warmup_steps", "tune", "tune_seconds"}
    batch_size          int (the one used: at most n_train)
    evaluation          {"train_examples", "test_examples", "n_evals"}
    reference           name of the optimizer whose final train loss is the target (null if none ran)
    target_train_loss   float or null
    optimizers          list of per-optimizer records, in run order

Per optimizer (exactly these keys; :data:`OPTIMIZER_KEYS`)::

    name                 registry name, e.g. "kbfgs"
    class                dotted class name, e.g. "fastcurv.optim.KBFGS"
    hyperparameters      {name: value} as used (param-group scalars and construction arguments)
    status               "ok" | "diverged" | "error" | "skipped" (not run: one step would exceed the budget)
    error                one-line message for "diverged" / "error" / "skipped", else null
    steps                steps taken (opt.step calls, including steps the optimizer skipped)
    skipped_steps        steps the optimizer skipped (non-finite), 0 for torch optimizers
    train_seconds        training clock at the end
    wall_seconds         wall time of the whole run (warm-up, evaluations and display included)
    ms_per_step          1000 * train_seconds / steps (null when no step)
    final_train_loss     last evaluated train loss (null if not finite)
    final_test_loss      last evaluated test loss (null if not finite)
    time_to_target       training-clock seconds to reach target_train_loss (null: not reached / no target)
    time_to_target_ratio time_to_target / the reference's (null when either is null)
    curve                {"step": [...], "seconds": [...], "train_loss": [...]}: for step k = 1, 2, ...
                         the minibatch loss it computed (at the parameters before its update) and the
                         training clock after it (the plot draws it at step k - 1 and the clock after
                         step k - 1, where those parameters existed)
    evals                {"step": [...], "seconds": [...], "train_loss": [...], "test_loss": [...]}
    counters             the optimizer's health counters (``opt.counters()``; {} for torch optimizers)
    tuning               null, or [{"hyperparameters", "train_loss", "steps", "status"}] for each grid point

Every non-finite float is written as null. :func:`plot` and :func:`format_table` take this dict (e.g. read
back with ``json.load``), so a saved comparison can be redrawn (``fastcurv plot results/compare-curves.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import inspect
import itertools
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv.data import Problem

__all__ = [
    "OPTIMIZER_KEYS",
    "REGISTRY",
    "SCHEMA_VERSION",
    "TOP_LEVEL_KEYS",
    "CompareConfig",
    "CompareError",
    "OptimizerEntry",
    "available_optimizers",
    "default_optimizers",
    "format_table",
    "plot",
    "resolve",
    "run_comparison",
    "save_json",
]

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = frozenset(
    {
        "schema_version", "versions", "created", "command", "device", "dtype", "seed", "problem", "budget",
        "batch_size", "evaluation", "reference", "target_train_loss", "optimizers",
    }
)
OPTIMIZER_KEYS = frozenset(
    {
        "name", "class", "hyperparameters", "status", "error", "steps", "skipped_steps", "train_seconds",
        "wall_seconds", "ms_per_step", "final_train_loss", "final_test_loss", "time_to_target",
        "time_to_target_ratio", "curve", "evals", "counters", "tuning",
    }
)

#: default training-clock budget per optimizer: 7 optimizers + evaluations fit in 3 minutes on 2 CPU cores
DEFAULT_BUDGET_SECONDS = 12.0

#: :func:`_exact_newton_seconds`: CPU seconds per unit of N * sum(d_out^3) (measured on CURVES, 1 thread)
EXACT_NEWTON_SECONDS_PER_UNIT = 1.4e-10

#: consecutive non-finite losses (with finite parameters) after which a run is declared diverged
MAX_NONFINITE = 20
#: a minibatch loss above BLOWUP x the initial evaluated train loss ends a run as diverged
BLOWUP = 100.0


class CompareError(ValueError):
    """A comparison cannot be set up (unknown or unavailable optimizer, bad setting); one-line message."""


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one optimizer of the comparison.

    Attributes:
        name: registry name (lower case, e.g. ``"kbfgs"``).
        target: ``"module:Class"``, imported lazily by :func:`resolve`.
        summary: one line for ``--help`` and the README.
        defaults: ``problem -> constructor keyword arguments`` (the documented defaults).
        grid: keyword-argument overrides tried by ``tune=True``; ``None`` means "lr x {1/3, 1, 3} of the
            class's default lr when it has one".
        closure_output: the closure returns ``(loss, output)`` (KFAC's sampled Fisher) instead of ``loss``.
        loss_arg: ``problem -> value`` of the constructor's ``loss_fn`` argument, for optimizers that evaluate
            curvature products themselves (``NewtonCG``, ``BlockHF``, ``ExactNewton``); ``None``: no such argument.
        batch_step: the optimizer is stepped as ``opt.step(closure, batch=(x, x))`` (the autoencoder's target
            is its input) instead of ``opt.step(closure)``.
        step_seconds: ``(problem, batch_size, device) -> float | None``, a rough *lower* estimate of one step's
            time; when it exceeds the budget the optimizer is not run (status ``"skipped"``), because a single
            step would overrun the whole budget (``None``: no estimate).
    """

    name: str
    target: str
    summary: str
    defaults: Callable[[Problem], dict[str, Any]] = lambda problem: {}
    grid: tuple[dict[str, Any], ...] | None = None
    closure_output: bool = False
    loss_arg: Callable[[Problem], Any] | None = None
    batch_step: bool = False
    step_seconds: Callable[[Problem, int, torch.device], float | None] | None = None

    @property
    def is_torch(self) -> bool:
        """Whether this is a plain ``torch.optim`` optimizer (built from parameters, stepped the usual way)."""
        return self.target.startswith("torch.optim:")


#: Defaults chosen for the embedded CURVES problem by the sweep of the module docstring (other problems keep
#: the paper's / torch's values): ``{registry name: constructor kwargs}``.
CURVES_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 3e-3},
    "kbfgs": {"lr": 0.3, "damping": 0.7},
    "kbfgsl": {"lr": 0.3, "damping": 0.7},
}


def _on_curves(name: str, otherwise: dict[str, Any]) -> Callable[[Problem], dict[str, Any]]:
    """Defaults function: :data:`CURVES_DEFAULTS` ``[name]`` on CURVES, ``otherwise`` on other problems."""
    return lambda problem: dict(CURVES_DEFAULTS[name] if problem.name == "curves" else otherwise)


def _kfac_defaults(problem: Problem) -> dict[str, Any]:
    return {"fisher": "sampled", "likelihood": "bernoulli" if problem.loss == "bce" else "gaussian"}


def _exact_newton_seconds(problem: Problem, batch_size: int, device: torch.device) -> float | None:
    r"""Lower estimate of one :class:`~fastcurv.optim.ExactNewton` step on the CPU: it runs a batched ``eigh``
    of the :math:`N` per-sample :math:`d_{out}\times d_{out}` blocks of every layer, :math:`O(N\sum_l
    d_{out,l}^3)`; the constant (1.4e-10 s per unit, 1 thread) is measured on CURVES (batch 1000: ~90 s per
    step). ``None`` (no estimate) on other devices."""
    if device.type != "cpu":
        return None
    return EXACT_NEWTON_SECONDS_PER_UNIT * batch_size * sum(d**3 for d in problem.layer_sizes[1:])


def _product(**axes: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    keys = list(axes)
    return tuple(dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys)))


REGISTRY: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        OptimizerEntry("adam", "torch.optim:Adam", "torch.optim.Adam, lr 3e-3 on curves (swept), else 1e-3",
                       _on_curves("adam", {"lr": 1e-3}), _product(lr=(3e-4, 1e-3, 3e-3))),
        OptimizerEntry("adamw", "torch.optim:AdamW", "torch.optim.AdamW, lr 1e-3, weight_decay 1e-2",
                       lambda p: {"lr": 1e-3, "weight_decay": 1e-2}, _product(lr=(3e-4, 1e-3, 3e-3))),
        OptimizerEntry("kfac", "fastcurv.optim:KFAC", "K-FAC (Martens & Grosse 2015), sampled Fisher",
                       _kfac_defaults, _product(lr=(0.3, 1.0), damping=(0.3, 3.0)), closure_output=True),
        OptimizerEntry("kbfgs", "fastcurv.optim:KBFGS", "K-BFGS (Goldfarb, Ren & Bahamou 2020)",
                       _on_curves("kbfgs", {}), _product(lr=(0.1, 0.3), damping=(0.3, 0.7, 1.0))),
        OptimizerEntry("kbfgsl", "fastcurv.optim:KBFGSL", "K-BFGS(L): limited-memory H_g",
                       _on_curves("kbfgsl", {}), _product(lr=(0.1, 0.3), damping=(0.3, 0.7, 1.0))),
        OptimizerEntry("newton-cg", "fastcurv.optim:NewtonCG", "truncated Newton-CG (complex-step HVPs)",
                       loss_arg=lambda p: p.loss_fn, batch_step=True),
        OptimizerEntry("block-hf", "fastcurv.optim:BlockHF", "block-diagonal Hessian-free",
                       loss_arg=lambda p: p.loss_fn, batch_step=True),
        OptimizerEntry("exact-newton", "fastcurv.optim:ExactNewton", "exact stochastic Newton (reconstruction)",
                       loss_arg=lambda p: p.loss, step_seconds=_exact_newton_seconds),
    )
}

#: Optimizers that run when none are named: the Adam baseline and every fastcurv optimizer that imports.
_DEFAULT_NAMES = ("adam", "kfac", "kbfgs", "kbfgsl", "newton-cg", "block-hf", "exact-newton")


def _import_target(target: str) -> type:
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ImportError(f"{module} has no attribute {attr}") from None


def resolve(name: str) -> tuple[OptimizerEntry, type]:
    """The registry entry and the optimizer class for ``name``.

    Raises:
        CompareError: unknown name, or a class that cannot be imported (one line, with the reason).
    """
    key = name.strip().lower()
    if key not in REGISTRY:
        raise CompareError(f"unknown optimizer {name!r}; known optimizers: {', '.join(REGISTRY)}")
    entry = REGISTRY[key]
    try:
        cls = _import_target(entry.target)
    except Exception as e:  # ImportError, or an error raised while importing the module
        dotted = entry.target.replace(":", ".")
        raise CompareError(
            f"optimizer {key!r} ({dotted}) is not available in this installation: {_one_line(e)}"
        ) from None
    return entry, cls


def available_optimizers() -> list[str]:
    """Registry names whose class imports in this installation."""
    out = []
    for name in REGISTRY:
        try:
            resolve(name)
        except CompareError:
            continue
        out.append(name)
    return out


def default_optimizers() -> list[str]:
    """The default selection: ``adam`` and every fastcurv optimizer that imports (unavailable ones skipped)."""
    avail = set(available_optimizers())
    return [n for n in _DEFAULT_NAMES if n in avail]


# ------------------------------------------------------------------------------------------------ config
@dataclass
class CompareConfig:
    """Settings of one comparison (see the module docstring for their meaning).

    Attributes:
        optimizers: registry names, in run order (``None``: :func:`default_optimizers`).
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
        overrides: ``{name: {kwarg: value}}`` applied on top of defaults and grid points.
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
            for name in self.optimizers:
                resolve(name)
            for name, kw in self.overrides.items():
                if name not in self.optimizers:
                    raise CompareError(f"a setting names optimizer {name!r}, which is not in the selection "
                                       f"{','.join(self.optimizers)}")
                accepted = _accepted_kwargs(resolve(name)[1])
                for key in kw:
                    if accepted is not None and key not in accepted:
                        raise CompareError(f"{name} has no argument {key!r}; its arguments: {', '.join(accepted)}")


# ------------------------------------------------------------------------------------------------ helpers
def _accepted_kwargs(cls: type) -> list[str] | None:
    """Keyword arguments ``cls(model_or_params, ...)`` accepts, following ``**kwargs`` up the MRO (a subclass
    forwarding to its base); ``None`` when that cannot be decided."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(vars(klass)["__init__"]).parameters
        except (TypeError, ValueError):
            return None
        for i, (k, p) in enumerate(params.items()):
            if i < 2 or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue  # self and the model / params argument
            if k not in names:
                names.append(k)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}"
    return text[:300] + ("..." if len(text) > 300 else "")


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _jsonable(v: Any) -> Any:
    """Hyperparameter / counter values as JSON-friendly scalars."""
    if isinstance(v, Tensor):
        return _finite_or_none(float(v)) if v.numel() == 1 else repr(v)
    if isinstance(v, float):
        return _finite_or_none(v)
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


class _Batches:
    """Infinite stream of minibatches: a seeded permutation per epoch, sliced into ``batch_size`` rows."""

    def __init__(self, x: Tensor, batch_size: int, seed: int) -> None:
        self.x = x
        self.b = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        n = self.x.shape[0]
        while True:
            perm = torch.randperm(n, generator=self.gen).to(self.x.device)
            for i in range(0, n - self.b + 1, self.b):
                yield self.x.index_select(0, perm[i : i + self.b])


def _mean_loss(problem: Problem, model: nn.Module, x: Tensor, chunk: int = 5000) -> float:
    """Mean per-example loss of ``model`` on the rows of ``x`` (no grad, chunked)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i : i + chunk]
            total += float(problem.loss_fn(model(xb), xb)) * xb.shape[0]
    return total / x.shape[0]


@dataclass
class _Runner:
    """Everything shared by the runs of one comparison (data on the device, settings)."""

    problem: Problem
    cfg: CompareConfig
    train_x: Tensor
    eval_train: Tensor
    eval_test: Tensor
    batch_size: int

    def build_model(self) -> nn.Module:
        return self.problem.build_model(self.cfg.seed, dtype=self.cfg.dtype).to(self.cfg.device)

    # ---------------------------------------------------------------------------------------- optimizer
    def make_optimizer(self, entry: OptimizerEntry, cls: type, model: nn.Module, kwargs: dict[str, Any]):
        """Build the optimizer and return ``(step_fn, optimizer, hyperparameters)``; ``step_fn(closure, xb)``
        (``xb`` the minibatch the closure evaluates) returns the loss (a detached tensor)."""
        kwargs = dict(kwargs)
        if entry.is_torch:
            if self.cfg.device.type == "cuda" and "fused" not in kwargs and "foreach" not in kwargs:
                kwargs["fused"] = True
            opt = cls(model.parameters(), **kwargs)

            def step_fn(closure: Callable[[], Tensor], xb: Tensor) -> Tensor:
                opt.zero_grad(set_to_none=True)
                loss = closure()
                loss.backward()
                opt.step()
                return loss.detach()

            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            hp = {k: _jsonable(v) for k, v in group.items() if v is not None}
            return step_fn, opt, hp
        if entry.name == "kfac" and "seed" not in kwargs:
            kwargs["seed"] = self.cfg.seed
        if entry.loss_arg is not None and "loss_fn" not in kwargs:
            kwargs["loss_fn"] = entry.loss_arg(self.problem)
        opt = cls(model, **kwargs)
        if entry.batch_step:

            def step_fn(closure: Callable[[], Any], xb: Tensor) -> Tensor:
                return opt.step(closure, batch=(xb, xb))

        else:

            def step_fn(closure: Callable[[], Any], xb: Tensor) -> Tensor:
                return opt.step(closure)

        hp = {k: _jsonable(v) for k, v in opt.param_groups[0].items() if k != "params"}
        for attr in ("history", "inv_every", "fisher", "likelihood", "damping_split", "inverse", "seed"):
            if attr in kwargs:
                hp[attr] = _jsonable(kwargs[attr])
            elif isinstance(getattr(opt, attr, None), (int, float, str)) and not attr.startswith("_"):
                hp[attr] = _jsonable(getattr(opt, attr))
        return step_fn, opt, hp

    def closure_for(self, entry: OptimizerEntry, model: nn.Module, xb: Tensor) -> Callable[[], Any]:
        loss_fn = self.problem.loss_fn
        if entry.closure_output:

            def closure_out() -> tuple[Tensor, Tensor]:
                out = model(xb)
                return loss_fn(out, xb), out

            return closure_out
        return lambda: loss_fn(model(xb), xb)

    # ---------------------------------------------------------------------------------------- one run
    def run(
        self,
        entry: OptimizerEntry,
        cls: type,
        kwargs: dict[str, Any],
        *,
        budget: float,
        n_evals: int,
        label: str,
        skip: str | None = None,
    ) -> dict[str, Any]:
        """Train one optimizer under ``budget`` seconds of training clock; returns its JSON record (status
        ``"skipped"`` with ``skip`` as the message, without running anything, when ``skip`` is given)."""
        cfg = self.cfg
        wall0 = time.perf_counter()
        rec: dict[str, Any] = {
            "name": entry.name,
            "class": entry.target.replace(":", "."),
            "hyperparameters": {k: _jsonable(v) for k, v in kwargs.items()},
            "status": "ok",
            "error": None,
            "steps": 0,
            "skipped_steps": 0,
            "train_seconds": 0.0,
            "wall_seconds": 0.0,
            "ms_per_step": None,
            "final_train_loss": None,
            "final_test_loss": None,
            "time_to_target": None,
            "time_to_target_ratio": None,
            "curve": {"step": [], "seconds": [], "train_loss": []},
            "evals": {"step": [], "seconds": [], "train_loss": [], "test_loss": []},
            "counters": {},
            "tuning": None,
        }
        curve, evals = rec["curve"], rec["evals"]
        shadow = self.build_model()
        shadow.requires_grad_(False)

        def fail(status: str, message: str) -> dict[str, Any]:
            rec["status"], rec["error"] = status, message
            rec["wall_seconds"] = time.perf_counter() - wall0
            return rec

        if skip is not None:
            return fail("skipped", skip)
        torch.manual_seed(cfg.seed)
        # ---- warm-up on a throwaway copy (one-time compilation / autotuning / library init)
        if cfg.warmup_steps:
            try:
                wmodel = self.build_model()
                wstep, wopt, _ = self.make_optimizer(entry, cls, wmodel, kwargs)
                for xb, _ in zip(_Batches(self.train_x, self.batch_size, cfg.seed), range(cfg.warmup_steps)):
                    float(wstep(self.closure_for(entry, wmodel, xb), xb))
                del wmodel, wstep, wopt
            except Exception as e:
                return fail("error", f"warm-up: {_one_line(e)}")
            torch.manual_seed(cfg.seed)

        model = self.build_model()
        try:
            step_fn, opt, hp = self.make_optimizer(entry, cls, model, kwargs)
        except Exception as e:
            return fail("error", f"construction: {_one_line(e)}")
        rec["hyperparameters"] = hp
        params = [p for p in model.parameters()]
        shadow_params = list(shadow.parameters())

        def evaluate(step: int, clock: float) -> float:
            with torch.no_grad():
                torch._foreach_copy_(shadow_params, params)
            tr = _mean_loss(self.problem, shadow, self.eval_train)
            te = _mean_loss(self.problem, shadow, self.eval_test)
            evals["step"].append(step)
            evals["seconds"].append(clock)
            evals["train_loss"].append(tr)
            evals["test_loss"].append(te)
            return tr

        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=round(budget, 2), desc=f"{label:>14}", unit="s", leave=True, file=sys.stderr,
                bar_format="{desc} |{bar}| {n:.1f}/{total:.1f}s{postfix}", dynamic_ncols=True, mininterval=0.2,
            )

        def show(step: int, clock: float, loss: float, final: bool = False) -> None:
            if bar is None:
                return
            rate = step / clock if clock > 0 else 0.0
            bar.n = min(clock, bar.total)
            bar.set_postfix_str(
                f"loss {loss:.4g} | {rate:.1f} steps/s | step {step} | {time.perf_counter() - wall0:.0f}s elapsed",
                refresh=False,
            )
            bar.refresh() if final else bar.update(0)

        def due(k: int, step: int, clock: float) -> bool:  # is the k-th scheduled evaluation due?
            by_steps = cfg.max_steps is not None and step >= math.ceil(k * cfg.max_steps / n_evals)
            return clock >= k * budget / n_evals or by_steps

        step, clock, last = 0, 0.0, float("nan")
        n_bad = 0
        next_eval = 1
        try:
            loss0 = evaluate(0, 0.0)
            batches = iter(_Batches(self.train_x, self.batch_size, cfg.seed))
            last_show = 0.0
            while clock < budget and (cfg.max_steps is None or step < cfg.max_steps):
                t0 = time.perf_counter()
                xb = next(batches)
                try:
                    loss = step_fn(self.closure_for(entry, model, xb), xb)
                    last = float(loss) if loss is not None else float("nan")
                except Exception as e:
                    clock += time.perf_counter() - t0
                    fail("error", f"step {step + 1}: {_one_line(e)}")
                    break
                clock += time.perf_counter() - t0
                step += 1
                curve["step"].append(step)
                curve["seconds"].append(clock)
                curve["train_loss"].append(last)
                if math.isfinite(last) and last > BLOWUP * max(loss0, 1e-30):
                    fail("diverged", f"step {step}: loss {last:.3g} > {BLOWUP:g}x the initial {loss0:.4g}")
                    break
                if not math.isfinite(last):
                    n_bad += 1
                    bad_params = not all(bool(torch.isfinite(p).all()) for p in params)
                    if bad_params or n_bad >= MAX_NONFINITE:
                        why = "parameters became non-finite" if bad_params else f"{n_bad} consecutive non-finite losses"
                        fail("diverged", f"step {step}: {why}")
                        break
                else:
                    n_bad = 0
                if next_eval < n_evals and due(next_eval, step, clock):
                    evaluate(step, clock)
                    while next_eval < n_evals and due(next_eval, step, clock):
                        next_eval += 1
                if bar is not None and time.perf_counter() - last_show > 0.2:
                    show(step, clock, last)
                    last_show = time.perf_counter()
            if not evals["step"] or evals["step"][-1] != step:
                evaluate(step, clock)
        except Exception as e:  # evaluation failure: report, keep the comparison going
            fail("error", f"evaluation: {_one_line(e)}")
        finally:
            if bar is not None:
                show(step, clock, last, final=True)
                bar.close()
        rec["steps"] = step
        rec["train_seconds"] = clock
        rec["ms_per_step"] = 1000.0 * clock / step if step else None
        counters = getattr(opt, "counters", None)
        if callable(counters):
            rec["counters"] = {k: _jsonable(v) for k, v in counters().items()}
        rec["skipped_steps"] = int(getattr(opt, "skipped_steps", 0) or 0)
        if evals["train_loss"]:
            rec["final_train_loss"] = _finite_or_none(evals["train_loss"][-1])
            rec["final_test_loss"] = _finite_or_none(evals["test_loss"][-1])
            if rec["status"] == "ok" and rec["final_train_loss"] is None:
                fail("diverged", "final train loss is not finite")
        rec["wall_seconds"] = time.perf_counter() - wall0
        return rec


def _grid(entry: OptimizerEntry, cls: type) -> list[dict[str, Any]]:
    if entry.grid is not None:
        return [dict(g) for g in entry.grid]
    try:
        lr = inspect.signature(cls).parameters["lr"].default
    except (KeyError, TypeError, ValueError):
        return [{}]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        return [{}]
    return [{"lr": lr / 3}, {"lr": float(lr)}, {"lr": lr * 3}]


def time_to_target(seconds: Sequence[float], losses: Sequence[float | None], target: float) -> float | None:
    r"""Training-clock time at which ``losses`` (evaluated at ``seconds``) first reach ``target``.

    Linear interpolation in :math:`\log L` between the last evaluation above the target and the first one at
    or below it (plain linear when a loss is not positive); ``None`` when never reached.
    """
    prev: tuple[float, float] | None = None
    for t, v in zip(seconds, losses):
        if v is None or not math.isfinite(v):
            prev = None
            continue
        if v <= target:
            if prev is None:
                return float(t)
            t0, v0 = prev
            if v0 > 0 and v > 0 and target > 0:
                frac = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(v))
            else:
                frac = (v0 - target) / (v0 - v)
            return float(t0 + frac * (t - t0))
        prev = (t, v)
    return None


# ------------------------------------------------------------------------------------------------ driver
def _versions() -> dict[str, str | None]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    import fastcurv

    return {
        "fastcurv": fastcurv.__version__,
        "torch": torch.__version__,
        "triton": version("triton"),
        "python": platform.python_version(),
    }


def _device_info(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"type": device.type, "name": name or platform.processor() or platform.machine() or device.type}


def run_comparison(problem: Problem, cfg: CompareConfig, *, data_source: str | None = None) -> dict[str, Any]:
    """Run every selected optimizer on ``problem`` under ``cfg`` and return the results (the JSON dict of
    the module docstring; :func:`format_table`, :func:`plot` and :func:`save_json` consume it).

    Raises:
        CompareError: a bad setting or an unavailable optimizer (checked before any training).
    """
    cfg.validate()
    names = [n.strip().lower() for n in (cfg.optimizers or default_optimizers())]
    if not names:
        raise CompareError("no optimizer is available")
    resolved = [resolve(n) for n in names]
    dev = cfg.device
    n_train = problem.train_x.shape[0]
    batch = min(cfg.batch_size, n_train)
    eval_size = cfg.eval_size if cfg.eval_size is not None else (10000 if dev.type == "cuda" else 2000)
    train_x = problem.train_x.to(device=dev, dtype=cfg.dtype)
    runner = _Runner(
        problem=problem,
        cfg=cfg,
        train_x=train_x,
        eval_train=train_x[:eval_size],
        eval_test=problem.test_x[:eval_size].to(device=dev, dtype=cfg.dtype),
        batch_size=batch,
    )
    tune_seconds = cfg.tune_seconds if cfg.tune_seconds is not None else cfg.budget_seconds / 4
    if cfg.warmup_steps is None:
        cfg = dataclasses.replace(cfg, warmup_steps=2 if dev.type == "cuda" else 1)
        runner.cfg = cfg
    records = []
    for entry, cls in resolved:
        base = {**entry.defaults(problem)}
        user = cfg.overrides.get(entry.name, {})
        tuning = None
        chosen: dict[str, Any] = {}
        est = entry.step_seconds(problem, batch, dev) if entry.step_seconds is not None else None
        if est is not None and est > cfg.budget_seconds:
            why = (f"not run, one step needs about {est:.0f} s here (estimate), more than the budget of "
                   f"{cfg.budget_seconds:g} s; raise --budget-seconds or lower --batch-size to run it")
            rec = runner.run(entry, cls, {**base, **user}, budget=cfg.budget_seconds, n_evals=cfg.n_evals,
                             label=entry.name, skip=why)
            records.append(rec)
            continue
        if cfg.tune:
            tuning = []
            seen: list[dict[str, Any]] = []
            for point in _grid(entry, cls):
                kw = {**base, **point, **user}
                if kw in seen:
                    continue
                seen.append(kw)
                label = f"tune {entry.name}"
                r = runner.run(entry, cls, kw, budget=tune_seconds, n_evals=1, label=label)
                tuning.append({"hyperparameters": r["hyperparameters"], "train_loss": r["final_train_loss"],
                               "steps": r["steps"], "status": r["status"], "_kwargs": kw})
            ok = [t for t in tuning if t["status"] == "ok" and t["train_loss"] is not None]
            if ok:
                chosen = min(ok, key=lambda t: t["train_loss"])["_kwargs"]
            for t in tuning:
                del t["_kwargs"]
        kwargs = chosen or {**base, **user}
        rec = runner.run(entry, cls, kwargs, budget=cfg.budget_seconds, n_evals=cfg.n_evals, label=entry.name)
        rec["tuning"] = tuning
        records.append(rec)

    reference = "adam" if "adam" in names else names[0]
    ref = next(r for r in records if r["name"] == reference)
    target = ref["final_train_loss"] if ref["status"] == "ok" else None  # no target from a failed reference
    if target is not None:
        for r in records:
            r["time_to_target"] = time_to_target(r["evals"]["seconds"], r["evals"]["train_loss"], target)
        t_ref = ref["time_to_target"]
        for r in records:
            if r["time_to_target"] is not None and t_ref:
                r["time_to_target_ratio"] = r["time_to_target"] / t_ref
    for r in records:  # JSON: non-finite -> null
        for part in ("curve", "evals"):
            for k, vals in r[part].items():
                r[part][k] = [_finite_or_none(v) if isinstance(v, float) else v for v in vals]

    return {
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(cfg.command),
        "device": _device_info(dev),
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "seed": cfg.seed,
        "problem": {
            "name": problem.name,
            "description": problem.description,
            "n_train": n_train,
            "n_test": int(problem.test_x.shape[0]),
            "layer_sizes": list(problem.layer_sizes),
            "loss": problem.loss,
            "data": data_source,
        },
        "budget": {
            "seconds": float(cfg.budget_seconds),
            "max_steps": cfg.max_steps,
            "warmup_steps": cfg.warmup_steps,
            "tune": bool(cfg.tune),
            "tune_seconds": float(tune_seconds) if cfg.tune else None,
        },
        "batch_size": batch,
        "evaluation": {
            "train_examples": int(runner.eval_train.shape[0]),
            "test_examples": int(runner.eval_test.shape[0]),
            "n_evals": cfg.n_evals,
        },
        "reference": reference,
        "target_train_loss": target,
        "optimizers": records,
    }


# ------------------------------------------------------------------------------------------------ outputs
def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "n/a"
    return format(v, ".4e") if abs(v) >= 1e6 else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a plain-text table (header lines, one row per optimizer, footnotes)."""
    p, b = results["problem"], results["budget"]
    ref, target = results["reference"], results["target_train_loss"]
    ev = results["evaluation"]
    limit = f"{b['seconds']:g} s" + (f" or {b['max_steps']} steps" if b["max_steps"] else "")
    lines = [
        f"{p['name']}: {p['n_train']} train / {p['n_test']} test, batch {results['batch_size']}, "
        f"{results['dtype']} on {results['device']['type']} ({results['device']['name']}), seed {results['seed']}, "
        f"budget {limit} per optimizer",
        f"target = {ref}'s final train loss {_fmt(target, '.4f')}; losses are means over the first "
        f"{ev['train_examples']} train / {ev['test_examples']} test examples",
        "",
    ]
    head = ["optimizer", "status", "steps", "ms/step", "train loss", "test loss", "t->target (s)", f"time/{ref}"]
    rows = []
    for r in results["optimizers"]:
        status = r["status"] + (f" ({r['skipped_steps']} skipped)" if r["skipped_steps"] else "")
        rows.append(
            [
                r["name"],
                status,
                str(r["steps"]),
                _fmt(r["ms_per_step"], ".1f"),
                _fmt(r["final_train_loss"], ".4f"),
                _fmt(r["final_test_loss"], ".4f"),
                _fmt(r["time_to_target"], ".2f"),
                _fmt(r["time_to_target_ratio"], ".2f"),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(line(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(row) for row in rows)
    notes = [f"  {r['name']}: {r['status']}: {r['error']}" for r in results["optimizers"] if r["error"]]
    lines.append("")
    lines.append(f"t->target: training-clock seconds until the train loss reaches the target; time/{ref} < 1 is "
                 f"faster than {ref}; n/a = not reached.")
    if notes:
        lines.append("problems:")
        lines.extend(notes)
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: training loss (log scale) vs training-clock seconds and vs steps, one colour per optimizer
    (lines: every step's minibatch loss; dots: evaluated train loss; dotted: the target)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(13, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    positive = False
    for i, r in enumerate(results["optimizers"]):
        color = f"C{i % 10}"
        c, e = r["curve"], r["evals"]
        label = r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        # step k's minibatch loss was computed at the parameters after k - 1 updates, i.e. at the clock
        # reading after step k - 1: plot it there, like the evaluations (parameters after `step` updates).
        at_t = [0.0, *c["seconds"][:-1]] if c["seconds"] else []
        at_s = [k - 1 for k in c["step"]]
        for ax, xs, ex in ((ax_t, at_t, e["seconds"]), (ax_s, at_s, e["step"])):
            ys = [float("nan") if v is None else v for v in c["train_loss"]]
            eys = [float("nan") if v is None else v for v in e["train_loss"]]
            ax.plot(xs, ys, color=color, lw=1.0, alpha=0.8, label=label)
            ax.plot(ex, eys, "o", color=color, ms=3.5)
            positive |= any(v > 0 for v in ys + eys if math.isfinite(v))
    target = results["target_train_loss"]
    finite = [v for r in results["optimizers"] for v in r["curve"]["train_loss"] + r["evals"]["train_loss"]
              if v is not None and v > 0]
    starts = [r["evals"]["train_loss"][0] for r in results["optimizers"] if r["evals"]["train_loss"]]
    starts = [v for v in starts if v is not None and v > 0]
    for ax in (ax_t, ax_s):
        if positive and finite and starts:  # blow-ups (reported as diverged) are clipped at the top
            ax.set_ylim(min(finite) * 0.9, max(starts) * 1.5)
        if target is not None:
            ax.axhline(target, color="0.4", ls=":", lw=1.0)
        if positive:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_xlabel("training-clock seconds")
    ax_s.set_xlabel("steps")
    ax_t.set_ylabel("training loss (lines: minibatch, dots: evaluated)")
    ax_s.legend(loc="upper right", fontsize=8)
    p = results["problem"]
    fig.suptitle(
        f"{p['name']} autoencoder, batch {results['batch_size']}, {results['dtype']} on "
        f"{results['device']['name']}; dotted: target ({results['reference']}'s final train loss)",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def save_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``results`` as strict JSON (``allow_nan=False``: non-finite values must already be null)."""
    import json

    path = Path(path)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path
