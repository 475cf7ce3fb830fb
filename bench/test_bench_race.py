"""The race on CURVES (and on the transformer language model): steps and seconds to each loss level, per optimizer
(eigenbasis methods against AdamW and heavyball's SOAP).

Protocol: the generated CURVES autoencoder (:func:`fastcurv.data.load_problem`), batch 1000, float32, the same
initial weights (``problem.build_model(seed)``) and the same minibatch order for every optimizer (one seeded
permutation of the training set per epoch, consecutive slices; :class:`Batches`). The training clock counts only
the steps (forward, backward, update and reading the loss); the evaluated loss — the problem's loss on the first
``eval_size`` training images, computed between steps with the clock paused every ``eval_every`` steps — decides
when a level is reached ("steps to 100" = the first evaluated step whose loss is <= 100, and its clock time).

Run the full race (minutes on a CPU; prints a table and writes the JSON with every curve)::

    python -m bench.test_bench_race --steps 300 --out race.json
    python -m bench.test_bench_race --only soap_f2_0.01,hb_soap_1e-2 --steps 200
    python -m bench.test_bench_race --step-cost --only adamw_3e-3,hb_soap_1e-2,soap_f2_0.01   # ms/step, interleaved
    python -m bench.test_bench_race --problem lm --steps 300 --out race-lm.json   # the transformer (fastcurv.lm)

``--problem lm``: :func:`fastcurv.lm.load_lm` (``--size small``: 2 layers, width 128, context 64, batch 32
sequences; the loss is nats per character, levels :data:`LM_LEVELS`), the same protocol with the windows as the
minibatch rows; the evaluated loss is the mean over the first ``eval_size`` // 10 training windows. Learning rates
on the lm problem are the registry's names (chosen on CURVES), so the race there says how the CURVES settings
transfer, not what each optimizer can reach after tuning.

Under pytest (``--benchmark-disable`` or not, on CPU) a smoke race runs: 256 images, batch 64, 4 steps per
optimizer; with CUDA and the benchmark enabled the full race runs and ``extra_info`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fastcurv.data import Problem, load_problem

LEVELS = (150.0, 120.0, 100.0, 80.0)
#: loss levels (nats per character) of the lm problem: the uniform 96-symbol start is ln 96 = 4.56
LM_LEVELS = (3.0, 2.6, 2.4, 2.2)


class Batches:
    """Infinite minibatch stream: a seeded permutation per epoch, sliced into ``batch`` rows (last partial slice
    dropped) — the ``fastcurv compare`` protocol."""

    def __init__(self, x: Tensor, batch: int, seed: int) -> None:
        self.x, self.b = x, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):  # type: ignore[no-untyped-def]
        n = self.x.shape[0]
        while True:
            perm = torch.randperm(n, generator=self.gen)
            for i in range(0, n - self.b + 1, self.b):
                yield self.x[perm[i : i + self.b]]


def _fastcurv(cls_name: str, **kw: Any) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        import fastcurv.optim as fo

        return getattr(fo, cls_name)(model, **kw)

    make.closure = True  # type: ignore[attr-defined]
    return make


def _torch_adamw(lr: float) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)

    return make


def _heavyball(cls_name: str, lr: float) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # eager, like the other optimizers here (no inductor autotuning billed)
        return getattr(heavyball, cls_name)(model.parameters(), lr=lr)

    return make


def _heavyball_soap(lr: float) -> Callable[[nn.Module], Any]:
    return _heavyball("SOAP", lr)


def registry() -> dict[str, Callable[[nn.Module], Any]]:
    """name -> factory(model) -> optimizer; fastcurv ones take ``step(closure)``, the others the plain loop."""
    r: dict[str, Callable[[nn.Module], Any]] = {
        "adamw_3e-3": _torch_adamw(3e-3),
        "adamw_1e-3": _torch_adamw(1e-3),
        "hb_soap_1e-2": _heavyball_soap(1e-2),
        "hb_soap_3e-3": _heavyball_soap(3e-3),
        "hb_psgd_3e-3": _heavyball("PSGDKron", 3e-3),
        "kfac": _fastcurv("KFAC"),  # the class defaults
        "kbfgs_0.3_0.7": _fastcurv("KBFGS", lr=0.3, damping=0.7),
        "kbfgsl_0.3_0.7": _fastcurv("KBFGSL", lr=0.3, damping=0.7),
        "newton_cg": _fastcurv("NewtonCG"),  # the class defaults (closure replay)
        "block_hf": _fastcurv("BlockHF"),
    }
    for lr in (3e-3, 1e-2, 2e-2):
        r[f"soap_{lr:g}"] = _fastcurv("SOAP", lr=lr)
        r[f"soap_f2_{lr:g}"] = _fastcurv("SOAP", lr=lr, betas=(0.9, 0.95), precondition_frequency=2)
        r[f"soap_f1_{lr:g}"] = _fastcurv("SOAP", lr=lr, betas=(0.9, 0.95), precondition_frequency=1)
        r[f"soap_kfac_f2_{lr:g}"] = _fastcurv(
            "SOAP", lr=lr, betas=(0.9, 0.95), precondition_frequency=2, factors="kfac"
        )
        r[f"soap_kfac_{lr:g}"] = _fastcurv("SOAP", lr=lr, factors="kfac")
    for lr in (0.1, 0.3, 1.0):
        for damping in (1.0, 3.0, 10.0):
            r[f"ekfac_{lr:g}_{damping:g}"] = _fastcurv("EKFAC", lr=lr, damping=damping)
    return r


def run_one(
    name: str,
    make: Callable[[nn.Module], Any],
    problem: Problem,
    *,
    steps: int,
    batch: int,
    seed: int = 0,
    eval_every: int = 5,
    eval_size: int = 2000,
    levels: tuple[float, ...] = LEVELS,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one optimizer; returns its curves and the steps / seconds to each level."""
    model = problem.build_model(seed)
    opt = make(model)
    closure_api = getattr(make, "closure", False)
    xe, ye = problem.split(problem.train_x[:eval_size])
    stream = iter(Batches(problem.train_x, batch, seed))
    clock = 0.0
    curve: list[tuple[int, float, float]] = []  # (step, clock seconds, evaluated loss)
    mb: list[float] = []
    reached: dict[str, dict[str, float] | None] = {f"{lv:g}": None for lv in levels}
    status = "ok"

    def evaluate(k: int) -> None:
        with torch.no_grad():
            le = float(problem.loss_fn(model(xe), ye))
        curve.append((k, clock, le))
        if progress and k % 50 == 0:
            print(f"  {name}: step {k} loss {le:.2f} clock {clock:.1f}s", file=sys.stderr, flush=True)
        for lv in levels:
            key = f"{lv:g}"
            if reached[key] is None and le <= lv:
                reached[key] = {"steps": k, "seconds": clock}

    evaluate(0)
    for k in range(1, steps + 1):
        x, y = problem.split(next(stream))
        t0 = time.perf_counter()
        if closure_api:
            loss = opt.step(lambda: problem.loss_fn(model(x), y))
        else:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss_fn(model(x), y)
            loss.backward()
            opt.step()
        lv = float(loss.detach())
        clock += time.perf_counter() - t0
        mb.append(lv)
        if not math.isfinite(lv) or lv > 100 * max(curve[0][2], 1e-30):
            status = "diverged"
            evaluate(k)
            break
        if k % eval_every == 0 or k == steps:
            evaluate(k)
    best = min(curve, key=lambda c: c[2])
    return {
        "name": name,
        "status": status,
        "steps": len(mb),
        "ms_per_step": 1000 * clock / max(len(mb), 1),
        "reached": reached,
        "best_loss": best[2],
        "best_step": best[0],
        "curve": curve,
        "minibatch_loss": mb,
    }


def race(
    names: list[str] | None = None,
    *,
    steps: int = 300,
    batch: int | None = None,
    n_train: int | None = None,
    seed: int = 0,
    eval_every: int = 5,
    eval_size: int = 2000,
    progress: bool = False,
    problem_name: str = "curves",
    size: str = "small",
) -> dict[str, Any]:
    """Run the race on ``problem_name`` (``"curves"`` or ``"lm"``); ``batch`` None = the problem's (1000 images,
    or the lm size's sequences)."""
    torch.manual_seed(seed)
    levels = LEVELS
    if problem_name == "lm":
        from fastcurv.lm import load_lm

        problem: Any = load_lm(size)
        batch = batch or problem.batch_size
        eval_size = max(eval_size // 10, 1)
        levels = LM_LEVELS
        desc = f"lm size={size} windows={problem.train_x.shape[0]} batch={batch} float32"
    else:
        problem = load_problem("curves", seed=seed, n_train=n_train, n_test=64 if n_train else None)
        batch = batch or 1000
        desc = f"curves n_train={problem.train_x.shape[0]} batch={batch} float32"
    reg = registry()
    names = list(reg) if names is None else names
    out: dict[str, Any] = {
        "problem": desc,
        "levels": list(levels),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [],
    }
    for n in names:
        try:
            r = run_one(n, reg[n], problem, steps=steps, batch=batch, seed=seed, eval_every=eval_every,
                        eval_size=eval_size, levels=levels, progress=progress)
        except ImportError as e:  # an optional peer (heavyball) not installed
            r = {"name": n, "status": f"skipped: {e}"}
        out["results"].append(r)
        if progress:
            print(table([r], levels), file=sys.stderr, flush=True)
    return out


def step_cost(names: list[str], *, rounds: int = 5, steps_per_round: int = 10, batch: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Milliseconds per step of each optimizer in its steady state, measured interleaved in one process (every
    round runs ``steps_per_round`` consecutive steps of each optimizer in turn; median over rounds), and the ratio
    to the first name's. ``steps_per_round`` a multiple of the refresh periods amortises the basis refreshes."""
    problem = load_problem("curves", seed=seed, n_train=5000, n_test=64)
    reg = registry()
    runs = []
    for n in names:
        model = problem.build_model(seed)
        opt = reg[n](model)
        runs.append((n, model, opt, getattr(reg[n], "closure", False), iter(Batches(problem.train_x, batch, seed))))

    def one(model: nn.Module, opt: Any, closure_api: bool, x: Tensor) -> None:
        if closure_api:
            float(opt.step(lambda: problem.loss_fn(model(x), x)))
        else:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss_fn(model(x), x)
            loss.backward()
            opt.step()
            float(loss.detach())

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 is the warm-up (first steps, first eigendecompositions)
        for n, model, opt, capi, it in runs:
            xs = [next(it) for _ in range(steps_per_round)]
            t0 = time.perf_counter()
            for x in xs:
                one(model, opt, capi, x)
            if r:
                times[n].append((time.perf_counter() - t0) / steps_per_round)
    med = {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}
    return {n: {"ms_per_step": 1000 * med[n], "ratio": med[n] / med[names[0]]} for n in names}


def table(results: list[dict[str, Any]], levels: tuple[float, ...] = LEVELS) -> str:
    head = "| optimizer | " + " | ".join(f"to {lv:g}: steps / s" for lv in levels) + " | best loss | ms/step |"
    lines = [head, "|" + "---|" * (len(levels) + 3)]
    for r in results:
        if "reached" not in r:
            lines.append(f"| {r['name']} | {r['status']} |")
            continue
        cells = []
        for lv in levels:
            hit = r["reached"][f"{lv:g}"]
            cells.append("—" if hit is None else f"{hit['steps']} / {hit['seconds']:.1f}")
        lines.append(
            f"| {r['name']} | " + " | ".join(cells)
            + f" | {r['best_loss']:.{1 if r['best_loss'] > 10 else 3}f} after {r['best_step']} ({r['status']}) | {r['ms_per_step']:.0f} |"
        )
    return "\n".join(lines)


@pytest.mark.benchmark(group="race_curves")
def test_bench_race_curves(benchmark) -> None:
    full = torch.cuda.is_available() and not benchmark.disabled
    smoke = ["adamw_3e-3", "hb_soap_1e-2", "soap_f2_0.01", "soap_kfac_f2_0.01", "ekfac_0.3_3"]
    kw: dict[str, Any] = (
        dict(steps=300) if full
        else dict(names=smoke, steps=4, batch=64, n_train=256, eval_every=2, eval_size=64)
    )
    res: dict[str, Any] = {}

    def run() -> None:
        res.clear()
        res.update(race(**kw))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    ok = [r for r in res["results"] if "reached" in r]
    assert ok and all(r["status"] == "ok" for r in ok), [(r["name"], r["status"]) for r in res["results"]]
    assert all(len(r["curve"]) >= 2 and math.isfinite(r["best_loss"]) for r in ok)
    for r in ok:
        for lv, hit in r["reached"].items():
            benchmark.extra_info[f"{r['name']}_steps_to_{lv}"] = None if hit is None else hit["steps"]
            benchmark.extra_info[f"{r['name']}_seconds_to_{lv}"] = None if hit is None else hit["seconds"]
        benchmark.extra_info[f"{r['name']}_best_loss"] = r["best_loss"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated names (default: all); --list shows them")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=None, help="default: 1000 images (curves), the size's (lm)")
    ap.add_argument("--problem", choices=("curves", "lm"), default="curves")
    ap.add_argument("--size", default="small", help="lm only: small | medium | large")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON file for the results and curves")
    ap.add_argument("--step-cost", action="store_true", help="only measure ms/step, interleaved (first name = 1.0)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(registry()))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.only.split(",") if a.only else None
    if a.step_cost:
        cost = step_cost(names or list(registry()), rounds=a.rounds, batch=a.batch or 1000, seed=a.seed)
        print("| optimizer | ms/step | / first |\n|---|---|---|")
        for n, c in cost.items():
            print(f"| {n} | {c['ms_per_step']:.1f} | {c['ratio']:.2f} |")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"step_cost": cost, "command": " ".join(sys.argv), "threads": torch.get_num_threads()}, f)
        return
    res = race(names, steps=a.steps, batch=a.batch, seed=a.seed, eval_every=a.eval_every, progress=True,
               problem_name=a.problem, size=a.size)
    res["command"] = " ".join(sys.argv)
    print(table(res["results"], tuple(res["levels"])))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
