"""Outputs of a comparison besides the JSON: the plain-text table and the PNG plot (both from the results
dict alone, so a saved JSON can be redrawn; an older schema version is upgraded first)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastcurv.compare.schema import load_results

__all__ = ["format_table", "plot"]


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "n/a"
    return format(v, ".4e") if abs(v) >= 1e6 else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The comparison as plain text: header lines, one row per optimizer, then the time and steps of every
    optimizer to each baseline's final train loss, then footnotes."""
    results = load_results(results)
    p, b = results["problem"], results["budget"]
    ref, target = results["reference"], results["target_train_loss"]
    ev = results["evaluation"]
    limit = f"{b['seconds']:g} s" + (f" or {b['max_steps']} steps" if b["max_steps"] else "")
    lines = [
        f"{p['name']}: {p['n_train']} train / {p['n_test']} test, batch {results['batch_size']}, "
        f"{results['dtype']} on {results['device']['type']} ({results['device']['name']}), seed {results['seed']}, "
        f"budget {limit} per optimizer",
        f"target = {ref}'s final train loss {_fmt(target, '.4f')}; losses are means over the first "
        f"{ev['train_examples']} train / {ev['test_examples']} test examples",
        "",
    ]
    head = ["optimizer", "status", "precond.", "steps", "ms/step", "train loss", "test loss", "t->target (s)",
            f"time/{ref}"]
    rows = []
    for r in results["optimizers"]:
        status = r["status"] + (f" ({r['skipped_steps']} skipped)" if r["skipped_steps"] else "")
        rows.append(
            [
                r["name"],
                status,
                _share(r["preconditioned"]),
                str(r["steps"]),
                _fmt(r["ms_per_step"], ".1f"),
                _fmt(r["final_train_loss"], ".4f"),
                _fmt(r["final_test_loss"], ".4f"),
                _fmt(r["time_to_target"], ".2f"),
                _fmt(r["time_to_target_ratio"], ".2f"),
            ]
        )
    lines.extend(_grid_lines(head, rows, left=2))
    baselines = results["baselines"]
    if baselines:
        targets = ", ".join(f"{bl['name']} {_fmt(bl['target_train_loss'], '.4f')}" for bl in baselines)
        lines += ["", f"to each baseline's final train loss ({targets}):"]
        head = ["optimizer"] + [h for bl in baselines for h in (f"t->{bl['name']} (s)", f"steps->{bl['name']}")]
        rows = []
        for r in results["optimizers"]:
            cells = [r["name"]]
            for bl in baselines:
                to = r["to_baselines"].get(bl["name"]) or {}
                steps = to.get("steps")
                cells += [_fmt(to.get("seconds"), ".2f"), "n/a" if steps is None else str(steps)]
            rows.append(cells)
        lines.extend(_grid_lines(head, rows, left=1))
    notes = [f"  {r['name']}: {r['status']}: {r['error']}" for r in results["optimizers"] if r["error"]]
    lines.append("")
    lines.append("precond.: share of the trainable parameter elements a fastcurv optimizer preconditions (the rest "
                 "run its fallback; describe() lists them); n/a: not a fastcurv optimizer.")
    lines.append(f"t->target: training-clock seconds until the train loss reaches the target; time/{ref} < 1 is "
                 f"faster than {ref}; n/a = not reached.")
    if baselines:
        lines.append("t->B / steps->B: training-clock seconds / steps until the train loss reaches baseline B's final "
                     "train loss (interpolated between evaluations, steps rounded up).")
    if notes:
        lines.append("problems:")
        lines.extend(notes)
    return "\n".join(lines)


def _share(pre: dict[str, Any] | None) -> str:
    """The preconditioned share of the parameters, e.g. ``"98.4%"``; ``"n/a"`` for optimizers outside fastcurv."""
    if pre is None:
        return "n/a"
    return f"{100 * pre['share']:.1f}%"


def _grid_lines(head: list[str], rows: list[list[str]], *, left: int) -> list[str]:
    """Header, rule and rows as aligned columns (the first ``left`` columns left-aligned, the rest right)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: training loss (log scale) vs training-clock seconds and vs steps, one colour per optimizer
    (lines: every step's minibatch loss; dots: evaluated train loss; dotted: the target, in grey, and each
    baseline's final train loss, in the baseline's colour)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    results = load_results(results)
    fig = Figure(figsize=(13, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    positive = False
    colors = {r["name"]: f"C{i % 10}" for i, r in enumerate(results["optimizers"])}
    for r in results["optimizers"]:
        color = colors[r["name"]]
        c, e = r["curve"], r["evals"]
        label = r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        # step k's minibatch loss was computed at the parameters after k - 1 updates, i.e. at the clock
        # reading after step k - 1: plot it there, like the evaluations (parameters after `step` updates).
        at_t = [0.0, *c["seconds"][:-1]] if c["seconds"] else []
        at_s = [k - 1 for k in c["step"]]
        for ax, xs, ex in ((ax_t, at_t, e["seconds"]), (ax_s, at_s, e["step"])):
            ys = [float("nan") if v is None else v for v in c["train_loss"]]
            eys = [float("nan") if v is None else v for v in e["train_loss"]]
            ax.plot(xs, ys, color=color, lw=1.0, alpha=0.8, label=label)
            ax.plot(ex, eys, "o", color=color, ms=3.5)
            positive |= any(v > 0 for v in ys + eys if math.isfinite(v))
    target = results["target_train_loss"]
    finite = [v for r in results["optimizers"] for v in r["curve"]["train_loss"] + r["evals"]["train_loss"]
              if v is not None and v > 0]
    starts = [r["evals"]["train_loss"][0] for r in results["optimizers"] if r["evals"]["train_loss"]]
    starts = [v for v in starts if v is not None and v > 0]
    for ax in (ax_t, ax_s):
        if positive and finite and starts:  # blow-ups (reported as diverged) are clipped at the top
            ax.set_ylim(min(finite) * 0.9, max(starts) * 1.5)
        if target is not None:
            ax.axhline(target, color="0.4", ls=":", lw=1.0)
        for bl in results["baselines"]:
            if bl["name"] != results["reference"]:
                ax.axhline(bl["target_train_loss"], color=colors[bl["name"]], ls=":", lw=0.8, alpha=0.7)
        if positive:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_xlabel("training-clock seconds")
    ax_s.set_xlabel("steps")
    ax_t.set_ylabel("training loss (lines: minibatch, dots: evaluated)")
    ax_s.legend(loc="upper right", fontsize=8)
    p = results["problem"]
    fig.suptitle(
        f"{p['name']}, batch {results['batch_size']}, {results['dtype']} on "
        f"{results['device']['name']}; dotted: target ({results['reference']}'s final train loss)",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, format="png")
    return path
