"""The comparison's JSON: schema version, required keys, value conversion, writing and reading back (older
versions are upgraded on reading).

The schema itself (every key and its meaning, and what changed between versions) is documented in
docs/compare.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastcurv.compare.errors import CompareError
from fastcurv.compare.targets import add_baseline_targets

__all__ = ["OPTIMIZER_KEYS", "SCHEMA_VERSION", "TOP_LEVEL_KEYS", "load_results", "save_json"]

SCHEMA_VERSION = 3
#: the keys of version 1 (files written before the per-baseline columns; :func:`load_results` upgrades them)
TOP_LEVEL_KEYS_V1 = frozenset(
    {
        "schema_version", "versions", "created", "command", "device", "dtype", "seed", "problem", "budget",
        "batch_size", "evaluation", "reference", "target_train_loss", "optimizers",
    }
)
OPTIMIZER_KEYS_V1 = frozenset(
    {
        "name", "class", "hyperparameters", "status", "error", "steps", "skipped_steps", "train_seconds",
        "wall_seconds", "ms_per_step", "final_train_loss", "final_test_loss", "time_to_target",
        "time_to_target_ratio", "curve", "evals", "counters", "tuning",
    }
)
TOP_LEVEL_KEYS = TOP_LEVEL_KEYS_V1 | {"baselines"}
OPTIMIZER_KEYS_V2 = OPTIMIZER_KEYS_V1 | {"baseline", "to_baselines"}
OPTIMIZER_KEYS = OPTIMIZER_KEYS_V2 | {"preconditioned"}
_KEYS = {
    1: (TOP_LEVEL_KEYS_V1, OPTIMIZER_KEYS_V1),
    2: (TOP_LEVEL_KEYS, OPTIMIZER_KEYS_V2),
    3: (TOP_LEVEL_KEYS, OPTIMIZER_KEYS),
}


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


def load_results(results: Any) -> dict[str, Any]:
    """Check a comparison read back from JSON and return it at the current :data:`SCHEMA_VERSION`.

    A version-1 dict gets the version-2 fields (``baselines``; per optimizer ``baseline`` and
    ``to_baselines``), computed from its evaluations; versions 1 and 2 get ``preconditioned`` = null (not
    recorded then) and ``schema_version`` 3. The argument is not modified.

    Raises:
        CompareError: not a comparison of a known schema version, or keys missing (one line).
    """
    version = results.get("schema_version") if isinstance(results, dict) else type(results).__name__
    if version not in _KEYS or isinstance(version, bool):
        known = ", ".join(str(v) for v in _KEYS)
        raise CompareError(f"not a fastcurv compare result with schema_version {known} (got {version!r})")
    top, per_opt = _KEYS[version]
    missing = top - set(results)
    if missing:
        raise CompareError(f"missing keys {sorted(missing)}")
    for r in results["optimizers"]:
        missing = per_opt - set(r)
        if missing:
            raise CompareError(f"optimizer {r.get('name')!r}: missing keys {sorted(missing)}")
    if version == SCHEMA_VERSION:
        return results
    out = json.loads(json.dumps(results))  # a deep copy: the caller's dict stays as read
    out["schema_version"] = SCHEMA_VERSION
    if version == 1:
        out["baselines"] = add_baseline_targets(out["optimizers"])
    for r in out["optimizers"]:
        r["preconditioned"] = None
    return out
