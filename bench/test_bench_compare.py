"""End-to-end benchmark: time to target loss on CURVES, per optimizer.

The target is Adam's final training loss after the budget (the ``fastcurv compare`` protocol,
docs/compare.md); ``extra_info`` records, per optimizer, the training-clock seconds to reach it, the ratio to
Adam's time, the seconds and steps to each baseline's final loss (Adam, and heavyball's SOAP and PSGD when
heavyball is installed), the final train/test losses, steps and ms/step. Run on a GPU::

    python -m pytest bench/test_bench_compare.py --benchmark-json=compare.json

Sizes: the original CURVES (20,000 training images, batch 1000) with ``FASTCURV_BENCH_BUDGET`` seconds per
optimizer (default 20) when CUDA is present and the benchmark is enabled; otherwise (CPU, or
``--benchmark-disable`` as in CI) a smoke run on 256 images, batch 64, 3 steps per optimizer.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcurv import compare as cmp
from fastcurv.data import load_problem

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.benchmark(group="compare_curves")
def test_bench_time_to_target_curves(benchmark) -> None:
    full = HAS_CUDA and not benchmark.disabled
    if full:
        problem = load_problem("curves", seed=0)
        cfg = cmp.CompareConfig(
            budget_seconds=float(os.environ.get("FASTCURV_BENCH_BUDGET", "20")),
            batch_size=1000,
            device=torch.device("cuda"),
            progress=False,
        )
    else:
        problem = load_problem("curves", n_train=256, n_test=64, seed=0)
        cfg = cmp.CompareConfig(budget_seconds=600, max_steps=3, batch_size=64, warmup_steps=0, n_evals=1,
                                progress=False)
    results: dict = {}

    def run() -> None:
        results.clear()
        results.update(cmp.run_comparison(problem, cfg))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    recs = results["optimizers"]
    assert recs[0]["name"] == "adam" and results["target_train_loss"] is not None
    assert all(r["status"] != "error" for r in recs), [(r["name"], r["error"]) for r in recs]
    info = benchmark.extra_info
    info["device"] = results["device"]["name"]
    info["problem"] = f"curves n_train={results['problem']['n_train']} batch={results['batch_size']}"
    info["budget_s"] = results["budget"]["seconds"]
    info["target_train_loss"] = results["target_train_loss"]
    for r in recs:
        n = r["name"]
        info[f"{n}_time_to_target_s"] = r["time_to_target"]
        info[f"{n}_time_ratio_vs_adam"] = r["time_to_target_ratio"]
        info[f"{n}_final_train_loss"] = r["final_train_loss"]
        info[f"{n}_final_test_loss"] = r["final_test_loss"]
        info[f"{n}_steps"] = r["steps"]
        info[f"{n}_ms_per_step"] = r["ms_per_step"]
        info[f"{n}_status"] = r["status"]
        for b, to in r["to_baselines"].items():
            info[f"{n}_seconds_to_{b}_final_loss"] = to["seconds"]
            info[f"{n}_steps_to_{b}_final_loss"] = to["steps"]
    for b in results["baselines"]:
        info[f"{b['name']}_final_train_loss_target"] = b["target_train_loss"]
