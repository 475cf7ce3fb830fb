"""Time and steps to a target loss from a run's evaluations: the time-to-target column (the reference's
final loss) and the columns "time / steps to each baseline's final loss" of the table (docs/compare.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["add_baseline_targets", "is_baseline", "time_to_target"]


def time_to_target(seconds: Sequence[float], losses: Sequence[float | None], target: float) -> float | None:
    r"""Training-clock time at which ``losses`` (evaluated at ``seconds``) first reach ``target``.

    Linear interpolation in :math:`\log L` between the last evaluation above the target and the first one at
    or below it (plain linear when a loss is not positive); ``None`` when never reached. Any increasing
    abscissa works the same way: with the evaluations' step counts it gives the steps to the target.
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


def is_baseline(record: dict[str, Any]) -> bool:
    """Whether an optimizer record is a baseline: an optimizer from outside fastcurv (its class is not in the
    ``fastcurv`` package: Adam, AdamW, heavyball's SOAP and PSGD, any dotted path outside fastcurv)."""
    return not str(record.get("class", "")).startswith("fastcurv.")


def add_baseline_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``baseline`` and ``to_baselines`` on every record (in place) and return the top-level
    ``baselines`` list: each baseline that ended ``"ok"`` with a finite final train loss, in run order, as
    ``{"name", "target_train_loss"}``; ``to_baselines[name] = {"seconds", "steps"}`` are the training-clock
    seconds and the steps at which a record's evaluated train loss first reaches that loss (interpolated as
    :func:`time_to_target`, the steps then rounded up to a whole step; ``None``: not reached)."""
    baselines = [
        {"name": r["name"], "target_train_loss": r["final_train_loss"]}
        for r in records
        if is_baseline(r) and r["status"] == "ok" and r["final_train_loss"] is not None
    ]
    for r in records:
        r["baseline"] = is_baseline(r)
        ev = r["evals"]
        r["to_baselines"] = {
            b["name"]: {
                "seconds": time_to_target(ev["seconds"], ev["train_loss"], b["target_train_loss"]),
                "steps": _whole(time_to_target(ev["step"], ev["train_loss"], b["target_train_loss"])),
            }
            for b in baselines
        }
    return baselines


def _whole(steps: float | None) -> int | None:
    """An interpolated step count rounded up to a whole step (a rounding error below 1e-9 is not a step)."""
    return None if steps is None else max(0, math.ceil(steps - 1e-9))
