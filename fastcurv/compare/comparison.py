"""The comparison driver: resolve the selection, tune (optional), run every optimizer, set the target and
assemble the results dict (the JSON of docs/compare.md)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import inspect
import platform
from typing import Any

import torch

from fastcurv.compare.config import CompareConfig
from fastcurv.compare.errors import CompareError
from fastcurv.compare.registry import OptimizerEntry, default_optimizers, normalize_name, resolve
from fastcurv.compare.runner import Runner
from fastcurv.compare.schema import SCHEMA_VERSION, finite_or_none
from fastcurv.compare.targets import add_baseline_targets, time_to_target
from fastcurv.data import Problem
from fastcurv.lm import LMProblem

__all__ = ["run_comparison"]


def _grid(entry: OptimizerEntry, cls: type, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's ``--tune`` grid; without one, lr x {1/3, 1, 3} of its default lr (``base``, else the
    class's), or the defaults alone when there is no lr."""
    if entry.grid is not None:
        return [dict(g) for g in entry.grid]
    lr = base.get("lr")
    if lr is None:
        try:
            lr = inspect.signature(cls).parameters["lr"].default
        except (KeyError, TypeError, ValueError):
            return [{}]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        return [{}]
    return [{"lr": lr / 3}, {"lr": float(lr)}, {"lr": lr * 3}]


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


def run_comparison(problem: Problem | LMProblem, cfg: CompareConfig, *, data_source: str | None = None) -> dict[str, Any]:
    """Run every selected optimizer on ``problem`` under ``cfg`` and return the results (the JSON dict of
    docs/compare.md; :func:`~fastcurv.compare.format_table`, :func:`~fastcurv.compare.plot` and
    :func:`~fastcurv.compare.save_json` consume it).

    Raises:
        CompareError: a bad setting or an unavailable optimizer (checked before any training).
    """
    cfg.validate()
    names = list(dict.fromkeys(normalize_name(n) for n in (cfg.optimizers or default_optimizers())))
    if not names:
        raise CompareError("no optimizer is available")
    resolved = [resolve(n) for n in names]
    dev = cfg.device
    n_train = problem.train_x.shape[0]
    batch = min(cfg.batch_size, n_train)
    rows = 10000 if dev.type == "cuda" else 2000
    if problem.name == "lm":  # a row is a window of block_size tokens
        rows = 1024 if dev.type == "cuda" else 128
    eval_size = cfg.eval_size if cfg.eval_size is not None else rows

    def to_dev(x: torch.Tensor) -> torch.Tensor:  # images take the run's dtype, token ids stay integers
        return x.to(device=dev, dtype=cfg.dtype) if x.is_floating_point() else x.to(device=dev)

    train_x = to_dev(problem.train_x)
    runner = Runner(
        problem=problem,
        cfg=cfg,
        train_x=train_x,
        eval_train=train_x[:eval_size],
        eval_test=to_dev(problem.test_x[:eval_size]),
        batch_size=batch,
    )
    tune_seconds = cfg.tune_seconds if cfg.tune_seconds is not None else cfg.budget_seconds / 4
    if cfg.warmup_steps is None:
        cfg = dataclasses.replace(cfg, warmup_steps=2 if dev.type == "cuda" else 1)
        runner.cfg = cfg
    records = []
    for entry, cls in resolved:
        base = {**entry.defaults(problem)}
        user = {k: v for name, kw in cfg.overrides.items() if normalize_name(name) == entry.name for k, v in kw.items()}
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
            for point in _grid(entry, cls, base):
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
                r[part][k] = [finite_or_none(v) if isinstance(v, float) else v for v in vals]
    baselines = add_baseline_targets(records)

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
        "baselines": baselines,
        "optimizers": records,
    }
