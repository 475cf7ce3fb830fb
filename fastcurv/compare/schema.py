"""The comparison's JSON: schema version, required keys, value conversion and writing.

The schema itself (every key and its meaning) is documented in docs/compare.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPTIMIZER_KEYS", "SCHEMA_VERSION", "TOP_LEVEL_KEYS", "save_json"]

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


def finite_or_none(v: float | None) -> float | None:
    """``v`` when it is a finite number, else ``None`` (JSON ``null``)."""
    return v if v is not None and math.isfinite(v) else None


def jsonable(v: Any) -> Any:
    """Hyperparameter / counter values as JSON-friendly scalars."""
    if isinstance(v, Tensor):
        return finite_or_none(float(v)) if v.numel() == 1 else repr(v)
    if isinstance(v, float):
        return finite_or_none(v)
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


def save_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``results`` as strict JSON (``allow_nan=False``: non-finite values must already be null)."""
    path = Path(path)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path
