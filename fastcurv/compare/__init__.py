"""The deep-autoencoder optimizer comparison behind ``fastcurv compare`` (argument parsing lives in
:mod:`fastcurv.cli`; this package is the engine).

The protocol (same initialisation, same minibatch order, training clock, warm-up outside the clock,
evaluations, divergence rules), the default hyperparameters with the sweep that chose them, the ``--tune``
grids and the JSON schema are documented in docs/compare.md.

Modules, one job each:

* :mod:`~fastcurv.compare.registry` — the optimizers the comparison knows and how each is built;
* :mod:`~fastcurv.compare.peers` — optimizers from outside fastcurv: dotted paths, heavyball's compile switch;
* :mod:`~fastcurv.compare.config` — :class:`CompareConfig`, the settings of one comparison;
* :mod:`~fastcurv.compare.runner` — one optimizer's timed run (data order, clock, evaluations, divergence);
* :mod:`~fastcurv.compare.targets` — time and steps to a target loss (the reference's, each baseline's);
* :mod:`~fastcurv.compare.comparison` — :func:`run_comparison`, the driver that assembles the results;
* :mod:`~fastcurv.compare.report` — the table and the plot;
* :mod:`~fastcurv.compare.schema` — the JSON's version, keys, writer and reader (upgrades older versions);
* :mod:`~fastcurv.compare.errors` — :class:`CompareError`.
"""

from fastcurv.compare.comparison import run_comparison
from fastcurv.compare.config import DEFAULT_BUDGET_SECONDS, CompareConfig
from fastcurv.compare.errors import CompareError
from fastcurv.compare.registry import (
    CURVES_DEFAULTS,
    EXACT_NEWTON_SECONDS_PER_UNIT,
    REGISTRY,
    OptimizerEntry,
    available_optimizers,
    default_optimizers,
    normalize_name,
    resolve,
)
from fastcurv.compare.report import format_table, plot
from fastcurv.compare.runner import BLOWUP, MAX_NONFINITE
from fastcurv.compare.schema import OPTIMIZER_KEYS, SCHEMA_VERSION, TOP_LEVEL_KEYS, load_results, save_json
from fastcurv.compare.targets import time_to_target

__all__ = [
    "BLOWUP",
    "CURVES_DEFAULTS",
    "DEFAULT_BUDGET_SECONDS",
    "EXACT_NEWTON_SECONDS_PER_UNIT",
    "MAX_NONFINITE",
    "OPTIMIZER_KEYS",
    "REGISTRY",
    "SCHEMA_VERSION",
    "TOP_LEVEL_KEYS",
    "CompareConfig",
    "CompareError",
    "OptimizerEntry",
    "available_optimizers",
    "default_optimizers",
    "normalize_name",
    "format_table",
    "load_results",
    "plot",
    "resolve",
    "run_comparison",
    "save_json",
    "time_to_target",
]
