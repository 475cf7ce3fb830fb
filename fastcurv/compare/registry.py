"""The optimizers ``fastcurv compare`` knows: how each is built, its default hyperparameters and grid, and the
resolution of a name (a registry name or a dotted path to any optimizer class, :mod:`fastcurv.compare.peers`).

The defaults, the grids of ``--tune`` and the sweeps that chose the CURVES values are documented in
docs/compare.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastcurv.compare import peers
from fastcurv.compare.errors import CompareError, one_line
from fastcurv.data import Problem

__all__ = [
    "CURVES_DEFAULTS",
    "EXACT_NEWTON_SECONDS_PER_UNIT",
    "REGISTRY",
    "OptimizerEntry",
    "accepted_kwargs",
    "available_optimizers",
    "default_optimizers",
    "entry_arguments",
    "normalize_name",
    "resolve",
]

#: heavyball PSGDKron's learning rate on CURVES (docs/compare.md, "Peers")
PSGD_LR = 3e-3

#: :func:`_exact_newton_seconds`: CPU seconds per unit of N * sum(d_out^3) (measured on CURVES, 1 thread)
EXACT_NEWTON_SECONDS_PER_UNIT = 1.4e-10


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one optimizer of the comparison.

    Attributes:
        name: registry name (lower case, e.g. ``"kbfgs"``), or the dotted path it was selected by.
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
        from_params: built from ``model.parameters()`` and stepped as ``zero_grad(); closure().backward();
            step()`` (torch.optim and other first-order optimizers) instead of built from the model and
            stepped with the closure (fastcurv optimizers).
        compile_switch: ``enabled -> context manager`` for optimizers with a global compile setting
            (heavyball): construction and every step run inside it. Such an optimizer takes the extra argument
            ``compile`` (``True``, ``False`` or ``"auto"``, the default: compile on CUDA only, as fastcurv's
            optimizers do); it is consumed here, never passed to the constructor.
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
    from_params: bool = False
    compile_switch: Callable[[bool], contextlib.AbstractContextManager[Any]] | None = None

    @property
    def is_torch(self) -> bool:
        """Whether this is a plain ``torch.optim`` optimizer (built from parameters, stepped the usual way)."""
        return self.target.startswith("torch.optim:")


#: Defaults chosen for the embedded CURVES problem by the sweep of docs/compare.md (other problems keep the
#: paper's / torch's values): ``{registry name: constructor kwargs}``.
CURVES_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 3e-3},
    "adamw": {"lr": 3e-3, "weight_decay": 1e-2},
    "soap": {"lr": 1e-2},
    "psgd": {"lr": PSGD_LR},
    "fc-soap": {"lr": 1e-2, "betas": (0.9, 0.95), "precondition_frequency": 2, "weight_decay": 0.01},
    "ekfac": {"lr": 0.3, "damping": 3.0},
    "kbfgs": {"lr": 0.3, "damping": 0.7},
    "kbfgsl": {"lr": 0.3, "damping": 0.7},
}


def _on_curves(name: str, otherwise: dict[str, Any]) -> Callable[[Problem], dict[str, Any]]:
    """Defaults function: :data:`CURVES_DEFAULTS` ``[name]`` on CURVES, ``otherwise`` on other problems."""
    return lambda problem: dict(CURVES_DEFAULTS[name] if problem.name == "curves" else otherwise)


def _kfac_defaults(problem: Problem) -> dict[str, Any]:
    lik = {"bce": "bernoulli", "ce": "categorical"}.get(problem.loss, "gaussian")
    return {"fisher": "sampled", "likelihood": lik}


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
                       _on_curves("adam", {"lr": 1e-3}), _product(lr=(3e-4, 1e-3, 3e-3)), from_params=True),
        OptimizerEntry("adamw", "torch.optim:AdamW",
                       "torch.optim.AdamW, lr 3e-3 on curves (Adam's), else 1e-3; weight_decay 1e-2",
                       _on_curves("adamw", {"lr": 1e-3, "weight_decay": 1e-2}), _product(lr=(3e-4, 1e-3, 3e-3)),
                       from_params=True),
        OptimizerEntry("soap", "heavyball:SOAP", "heavyball SOAP (Vyas et al. 2024), lr 1e-2 on curves (swept)",
                       _on_curves("soap", {}), _product(lr=(3e-3, 1e-2, 3e-2)), from_params=True,
                       compile_switch=peers.heavyball_compile),
        OptimizerEntry("psgd", "heavyball:PSGDKron",
                       f"heavyball PSGDKron (Kronecker PSGD, Li 2018), lr {PSGD_LR:g} on curves",
                       _on_curves("psgd", {}), None, from_params=True, compile_switch=peers.heavyball_compile),
        OptimizerEntry("kfac", "fastcurv.optim:KFAC", "K-FAC (Martens & Grosse 2015), sampled Fisher",
                       _kfac_defaults, _product(lr=(0.3, 1.0), damping=(0.3, 3.0)), closure_output=True),
        OptimizerEntry("fc-soap", "fastcurv.optim:SOAP",
                       "fastcurv's SOAP (Adam in Shampoo's eigenbasis, Vyas et al. 2024); on curves lr 1e-2, "
                       "betas (0.9, 0.95), refresh every 2 steps (bench/test_bench_race.py)",
                       _on_curves("fc-soap", {}), _product(lr=(3e-3, 1e-2, 2e-2))),
        OptimizerEntry("ekfac", "fastcurv.optim:EKFAC", "EKFAC (George et al. 2018); on curves lr 0.3, damping 3",
                       _on_curves("ekfac", {}), _product(lr=(0.3, 1.0), damping=(1.0, 3.0, 10.0))),
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

#: Optimizers that run when none are named: the Adam baseline, heavyball's SOAP and PSGD when heavyball is
#: installed (``pip install fastcurv[peers]``) and every fastcurv optimizer that imports.
_DEFAULT_NAMES = ("adam", "soap", "psgd", "fc-soap", "kfac", "kbfgs", "kbfgsl", "newton-cg", "block-hf", "exact-newton")


def _import_target(target: str) -> type:
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ImportError(f"{module} has no attribute {attr}") from None


def normalize_name(name: str) -> str:
    """A selection name as the comparison keys it: registry names in lower case, dotted paths as given."""
    text = name.strip()
    return text if peers.is_dotted(text) else text.lower()


def resolve(name: str) -> tuple[OptimizerEntry, type]:
    """The registry entry and the optimizer class for ``name``: a registry name, or a dotted path to an
    optimizer class (a class of a registry entry is built as that entry; see :mod:`fastcurv.compare.peers`).

    Raises:
        CompareError: unknown name, a class that cannot be imported, or a dotted path that does not name an
            optimizer class (one line, with the reason).
    """
    key = normalize_name(name)
    if key not in REGISTRY:
        if peers.is_dotted(key):
            return _resolve_dotted(key)
        raise CompareError(f"unknown optimizer {name!r}; known optimizers: {', '.join(REGISTRY)}, or a dotted "
                           f"path to an optimizer class such as torch.optim.AdamW")
    entry = REGISTRY[key]
    try:
        cls = _import_target(entry.target)
    except Exception as e:  # ImportError, or an error raised while importing the module
        dotted = entry.target.replace(":", ".")
        hint = " (pip install 'fastcurv[peers]')" if entry.target.startswith("heavyball:") else ""
        raise CompareError(
            f"optimizer {key!r} ({dotted}) is not available in this installation{hint}: {one_line(e)}"
        ) from None
    return entry, cls


def _resolve_dotted(path: str) -> tuple[OptimizerEntry, type]:
    target, cls = peers.import_dotted(path)
    for entry in REGISTRY.values():
        if entry.target == target or peers.registered_class(entry.target) is cls:
            return dataclasses.replace(entry, name=path, summary=f"{path} (as {entry.name})"), cls
    if peers.is_curvature_optimizer(cls):
        accepted = accepted_kwargs(cls) or []
        entry = OptimizerEntry(path, target, path, loss_arg=(lambda p: p.loss_fn) if "loss_fn" in accepted else None,
                               batch_step=peers.takes_batch(cls))
    else:
        switch = peers.heavyball_compile if target.startswith("heavyball") else None
        entry = OptimizerEntry(path, target, path, from_params=True, compile_switch=switch)
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


def accepted_kwargs(cls: type) -> list[str] | None:
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


def entry_arguments(entry: OptimizerEntry, cls: type) -> list[str] | None:
    """The settings an entry accepts: its constructor's keyword arguments (:func:`accepted_kwargs`) plus
    ``compile`` for an entry with a compile switch; ``None`` when the constructor's cannot be decided."""
    accepted = accepted_kwargs(cls)
    if accepted is None:
        return None
    return accepted + ["compile"] if entry.compile_switch is not None and "compile" not in accepted else accepted
