"""Outputs of a comparison besides the JSON: the plain-text table and the PNG plot (both from the results
dict alone, so a saved JSON can be redrawn)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot"]


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "n/a"
    return format(v, ".4e") if abs(v) >= 1e6 else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a plain-text table (header lines, one row per optimizer, footnotes)."""
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
    head = ["optimizer", "status", "steps", "ms/step", "train loss", "test loss", "t->target (s)", f"time/{ref}"]
    rows = []
    for r in results["optimizers"]:
        status = r["status"] + (f" ({r['skipped_steps']} skipped)" if r["skipped_steps"] else "")
        rows.append(
            [
                r["name"],
                status,
                str(r["steps"]),
                _fmt(r["ms_per_step"], ".1f"),
                _fmt(r["final_train_loss"], ".4f"),
                _fmt(r["final_test_loss"], ".4f"),
                _fmt(r["time_to_target"], ".2f"),
                _fmt(r["time_to_target_ratio"], ".2f"),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(line(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(row) for row in rows)
    notes = [f"  {r['name']}: {r['status']}: {r['error']}" for r in results["optimizers"] if r["error"]]
    lines.append("")
    lines.append(f"t->target: training-clock seconds until the train loss reaches the target; time/{ref} < 1 is "
                 f"faster than {ref}; n/a = not reached.")
    if notes:
        lines.append("problems:")
        lines.extend(notes)
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: training loss (log scale) vs training-clock seconds and vs steps, one colour per optimizer
    (lines: every step's minibatch loss; dots: evaluated train loss; dotted: the target)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(13, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    positive = False
    for i, r in enumerate(results["optimizers"]):
        color = f"C{i % 10}"
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
        f"{p['name']} autoencoder, batch {results['batch_size']}, {results['dtype']} on "
        f"{results['device']['name']}; dotted: target ({results['reference']}'s final train loss)",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, format="png")
    return path
