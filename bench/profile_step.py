r"""Where the time of one steady-state training step goes: a ``torch.profiler`` breakdown per optimizer.

Problem: the CURVES autoencoder (784-400-200-100-50-25-6, mirrored; :func:`fastcurv.data.load_problem`),
batch 1000, float32, one process. Optimizers: ``torch.optim.AdamW`` (``foreach=True``, the baseline), KFAC
(empirical and sampled Fisher), KBFGS, KBFGSL and NewtonCG, each at its class defaults (NewtonCG with the
problem's loss). Each optimizer first runs ``WARMUP`` steps (KFAC: past its ``inv_every`` schedule, so the
profiled steps are steady-state steps without an inverse refresh), then ``PROFILED`` steps are profiled
(``with_stack=True``) and reported per step; KFAC's inverse refresh is timed on its own and reported at its
amortised rate (÷ ``inv_every``).

Every outermost ATen / custom op of the profile (descending through autograd-engine, Python-frame and
other wrapper events) is put in one *source* — ``capture`` (:mod:`fastcurv.capture`, including its backward
tap), ``backward`` (the autograd engine), ``forward`` (the model and its loss), ``update`` (the optimizer's
own code) — by the innermost enclosing frame, and one *kind*:

========================  =================================================================================
kind                      ops
========================  =================================================================================
GEMM                      mm, addmm, bmm, baddbmm, matmul, linear, addmv, mv, dot
factor op                 ``fastcurv::*`` custom ops (the SYRK ``kron_factor_update_foreach_``, BFGS updates)
factorisation             ``linalg_*``, cholesky, inverse
finiteness                isfinite, all, any, and the elementwise ops under them
host sync                 item, _local_scalar_dense, is_nonzero, tolist reads (on a CPU this is the read itself)
allocation                empty, empty_like, empty_strided, zeros, zeros_like, ones, full, eye
copy                      copy_, clone, to, _to_copy, contiguous, cat, stack
elementwise / other       everything else
========================  =================================================================================

``python`` is the step's wall time under the profiler minus the time inside outermost ops: per-layer Python
loops, autograd bookkeeping and the profiler's own cost. ``dispatch (est.)`` is the number of outermost ops
times the measured cost of dispatching a trivial op (``torch.add`` of two 1-element tensors), an estimate of
the fixed per-call overhead hidden in the op times. The profiler inflates small ops, so the un-profiled median
step time and its ratio to AdamW are printed too.

Run: ``OMP_NUM_THREADS=1 python bench/profile_step.py [--threads 1] [--out bench/results/profile_cpu.md]``.

Before/after: ``--compare-with DIR`` (DIR = the root of another fastcurv source tree, e.g. ``git archive`` of an
older commit) skips the profile and times, interleaved in this one process, AdamW and every optimizer both
from this tree and from DIR's ``fastcurv.capture`` and ``fastcurv.optim`` (the rest of the package is shared,
so the two trees must agree on ``fastcurv.ops``), and prints each one's median step / AdamW.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from fastcurv.data import load_problem

BATCH = 1000
WARMUP = {"adamw": 3, "kfac": 22, "kfac-sampled": 22, "kbfgs": 3, "kbfgsl": 3, "newton-cg": 2}
PROFILED = 3

KINDS = ("GEMM", "factor op", "factorisation", "finiteness", "host sync", "allocation", "copy", "elementwise/other")
SOURCES = ("forward", "backward", "capture", "update")

_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv",
         "aten::mv", "aten::dot", "aten::_addmm_activation"}
_FINITE = {"aten::isfinite", "aten::all", "aten::any", "aten::_foreach_norm"}
_SYNC = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
_ALLOC = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::ones",
          "aten::ones_like", "aten::full", "aten::full_like", "aten::eye", "aten::new_empty", "aten::new_zeros"}
_COPY = {"aten::copy_", "aten::clone", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::cat", "aten::stack",
         "aten::_foreach_copy_"}


def kind_of(name: str) -> str:
    if name in _GEMM:
        return "GEMM"
    if name.startswith("fastcurv::"):
        return "factor op"
    if name.startswith("aten::linalg_") or "cholesky" in name or name == "aten::inverse":
        return "factorisation"
    if name in _FINITE:
        return "finiteness"
    if name in _SYNC:
        return "host sync"
    if name in _ALLOC:
        return "allocation"
    if name in _COPY:
        return "copy"
    return "elementwise/other"


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "fastcurv::", "prims::"))


def _source_of_frame(name: str) -> str | None:
    """The source a Python-frame event (``with_stack``: ``path(line): function``) sets for the ops under it."""
    if "fastcurv/capture.py" in name:
        return "capture"
    if "torch/nn/modules/" in name or "torch/nn/functional.py" in name or "fastcurv/data.py" in name:
        return "forward"  # the model (and its loss) called from inside an optimizer's step
    if "fastcurv/optim/" in name or "torch/optim/" in name or "fastcurv/hvp.py" in name or "complex_step" in name:
        return "update"
    return None


def breakdown(prof: Any, n_steps: int) -> tuple[dict[tuple[str, str], float], int, float]:
    """(source, kind) -> ms per step, number of outermost ops per step, ms per step inside outermost ops.

    The source of an op is set by the innermost enclosing Python frame: fastcurv's capture, the model or
    its loss (``torch.nn``, ``fastcurv.data``: forward), fastcurv's optimizers or ``torch.optim`` (update);
    ops under the autograd engine are ``backward`` unless inside the capture's tap; else ``forward``. NewtonCG's
    curvature products (complex-step forward/backward through ``fastcurv.hvp``) count as update unless a
    ``torch.nn`` frame is closer."""
    table: dict[tuple[str, str], float] = defaultdict(float)
    count = 0
    inside = 0.0

    def walk(ev: Any, src: str) -> None:
        nonlocal count, inside
        name = ev.name
        if _is_op(name):
            table[(src, kind_of(name))] += ev.cpu_time_total / 1e3
            count += 1
            inside += ev.cpu_time_total / 1e3
            return
        if "_GTap" in name:
            src = "capture"
        elif name.startswith("autograd::engine") and src != "capture":
            src = "backward"
        else:
            src = _source_of_frame(name) or src
        for c in ev.cpu_children:
            walk(c, src)

    for ev in prof.events():
        if ev.cpu_parent is None:
            walk(ev, "forward")
    return {k: v / n_steps for k, v in table.items()}, count // n_steps, inside / n_steps


def dispatch_cost() -> float:
    """Seconds to dispatch one trivial op (median of 5 x 2000 calls)."""
    a, b = torch.ones(1), torch.ones(1)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(2000):
            torch.add(a, b)
        ts.append((time.perf_counter() - t0) / 2000)
    return statistics.median(ts)


def load_optim_from(tree: str) -> Any:
    """The ``fastcurv.optim`` package (with its own ``fastcurv.capture``) of another source tree, loaded next
    to this tree's (which stays in ``sys.modules``)."""
    import fastcurv
    import fastcurv.optim  # noqa: F401  (this tree's, loaded first)

    def ours(k: str) -> bool:
        return k == "fastcurv.capture" or k == "fastcurv.optim" or k.startswith("fastcurv.optim.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    fastcurv.__path__.insert(0, f"{tree}/fastcurv")
    try:
        import importlib

        other = importlib.import_module("fastcurv.optim")
    finally:
        fastcurv.__path__.pop(0)
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return other


def make_steppers(names: list[str], optim: Any = None) -> dict[str, tuple[Callable[[], None], Any]]:
    """name -> (one training step, the optimizer), each on its own copy of the CURVES autoencoder; the
    optimizer classes from ``optim`` (default :mod:`fastcurv.optim`)."""
    if optim is None:
        import fastcurv.optim as optim
    KBFGS, KBFGSL, KFAC, NewtonCG = optim.KBFGS, optim.KBFGSL, optim.KFAC, optim.NewtonCG

    p = load_problem("curves", n_train=BATCH * 4, n_test=10)
    x = p.train_x[:BATCH].contiguous()
    out: dict[str, tuple[Callable[[], None], Any]] = {}
    for name in names:
        model = p.build_model(seed=0)
        if name == "adamw":
            opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                p.loss_fn(model(x), x).backward()
                opt.step()
        elif name in ("kfac", "kfac-sampled"):
            kw = dict(fisher="sampled", likelihood="bernoulli", seed=0) if name == "kfac-sampled" else {}
            opt = KFAC(model, **kw)
            sampled = name == "kfac-sampled"

            def step(model=model, opt=opt, sampled=sampled) -> None:
                def closure():
                    out = model(x)
                    loss = p.loss_fn(out, x)
                    return (loss, out) if sampled else loss

                opt.step(closure)
        elif name in ("kbfgs", "kbfgsl"):
            opt = (KBFGS if name == "kbfgs" else KBFGSL)(model)

            def step(model=model, opt=opt) -> None:
                opt.step(lambda: p.loss_fn(model(x), x))
        elif name == "newton-cg":
            opt = NewtonCG(model, p.loss_fn)

            def step(model=model, opt=opt) -> None:
                opt.step(batch=(x, x))
        else:
            raise ValueError(name)
        out[name] = (step, opt)
    return out


def interleaved_medians(steppers: dict[str, tuple[Callable[[], None], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per step of each stepper, timed in interleaved rounds (one step each per round)."""
    ts: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, (step, _) in steppers.items():
            t0 = time.perf_counter()
            step()
            ts[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (un-profiled)")
    ap.add_argument("--optimizers", default="adamw,kfac,kfac-sampled,kbfgs,kbfgsl,newton-cg")
    ap.add_argument("--out", default=None, help="write the markdown report here (default: stdout only)")
    ap.add_argument("--label", default="", help="a line saying what this run measures (e.g. the commit)")
    ap.add_argument("--compare-with", default=None, help="another source tree: interleaved before/after ratios")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    if args.compare_with:
        return compare(names, args)
    steppers = make_steppers(names)
    for name, (step, _) in steppers.items():
        for _ in range(WARMUP.get(name, 3)):
            step()
    med = interleaved_medians(steppers, args.rounds)
    t_disp = dispatch_cost()

    lines = [
        "# One steady-state training step, by source and kind (ms per step)",
        "",
        args.label,
        "",
        f"CURVES autoencoder, batch {BATCH}, float32, {args.threads} thread(s), torch {torch.__version__}; "
        f"un-profiled medians of {args.rounds} interleaved rounds; profile: mean of {PROFILED} steps "
        f"(with_stack). Trivial-op dispatch: {t_disp * 1e6:.1f} us.",
        "",
        "| optimizer | step ms (un-profiled) | / AdamW | profiled ms | " + " | ".join(SOURCES)
        + " | python | ops/step | dispatch est. ms |",
        "|---|---|---|---|" + "---|" * len(SOURCES) + "---|---|---|",
    ]
    kind_lines = ["| optimizer | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    base = med.get("adamw")
    extras: list[str] = []
    for name, (step, opt) in steppers.items():
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            t0 = time.perf_counter()
            for _ in range(PROFILED):
                step()
            wall = (time.perf_counter() - t0) / PROFILED * 1e3
        table, nops, inside = breakdown(prof, PROFILED)
        by_src = {s: sum(v for (src, _), v in table.items() if src == s) for s in SOURCES}
        by_kind = {k: sum(v for (_, kk), v in table.items() if kk == k) for k in KINDS}
        ratio = f"{med[name] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {med[name] * 1e3:.1f} | {ratio} | {wall:.1f} | "
            + " | ".join(f"{by_src[s]:.1f}" for s in SOURCES)
            + f" | {wall - inside:.1f} | {nops} | {nops * t_disp * 1e3:.1f} |"
        )
        kind_lines.append(f"| {name} | " + " | ".join(f"{by_kind[k]:.1f}" for k in KINDS) + " |")
        if name.startswith("kfac") and hasattr(opt, "_refresh_inverses"):
            t0 = time.perf_counter()
            with torch.no_grad():
                opt._refresh_inverses(opt._layers)
            t = (time.perf_counter() - t0) * 1e3
            extras.append(f"- {name}: one inverse refresh {t:.1f} ms, amortised over inv_every={opt.inv_every}: "
                          f"{t / opt.inv_every:.2f} ms per step (not in the profiled steps)")
    report = "\n".join(lines + ["", "By kind (ms per step, all sources):", ""] + kind_lines + [""] + extras) + "\n"
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return report


def compare(names: list[str], args: argparse.Namespace) -> str:
    """Median step / AdamW of each optimizer from this tree ("after") and from ``--compare-with`` ("before"),
    all interleaved in one process."""
    other = load_optim_from(args.compare_with)
    steppers = {f"{n} (this tree)": s for n, s in make_steppers(names).items()}
    steppers.update({f"{n} ({args.compare_with})": s for n, s in make_steppers(
        [n for n in names if n != "adamw"], other).items()})
    for name, (step, _) in steppers.items():
        for _ in range(WARMUP.get(name.split(" ")[0], 3)):
            step()
    med = interleaved_medians(steppers, args.rounds)
    base = med["adamw (this tree)"]
    lines = [
        f"Interleaved before/after, CURVES autoencoder, batch {BATCH}, float32, {args.threads} thread(s), "
        f"{args.rounds} rounds; median step ms and / AdamW. {args.label}",
        "",
        "| optimizer | step ms | / AdamW |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v * 1e3:.1f} | {v / base:.2f} |" for k, v in sorted(med.items())]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
