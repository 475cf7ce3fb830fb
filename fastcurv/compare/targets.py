"""Time to a target loss from a run's evaluations (the time-to-target columns of the table)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["time_to_target"]


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
