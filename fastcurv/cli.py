"""The ``fastcurv`` command line (console script ``fastcurv = fastcurv.cli:main``).

Subcommands:

* ``fastcurv compare`` — the deep-autoencoder optimizer comparison (engine: :mod:`fastcurv.compare`):
  trains every selected optimizer from the same initialisation on the same minibatch order under the same
  training-clock budget, prints a table, writes ``compare-<problem>.png`` / ``.json`` / ``.txt`` to ``--out``.
* ``fastcurv plot RESULTS.json`` — redraw the PNG (and reprint the table) from a saved comparison.

Argument errors and data problems end with exit status 2 and one line on stderr (no traceback); an
interrupted run (Ctrl-C) with 130.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

PROG = "fastcurv"


class _UsageError(Exception):
    """An argument error, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` that raises instead of printing the usage block and exiting (one-line errors)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _setting(text: str) -> tuple[str, str, Any]:
    """``OPT.KEY=VALUE`` -> (opt, key, value); OPT is a registry name or a dotted path (the key is after the
    last dot); VALUE is a Python literal (number, bool, string, tuple)."""
    from fastcurv.compare import normalize_name

    head, eq, raw = text.partition("=")
    opt, dot, key = head.rpartition(".")
    if not eq or not dot or not opt.strip() or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER.KEY=VALUE (e.g. kfac.damping=1.0), got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return normalize_name(opt), key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastcurv`` (subcommands ``compare`` and ``plot``)."""
    from fastcurv import __version__
    from fastcurv.compare import DEFAULT_BUDGET_SECONDS

    parser = _Parser(
        prog=PROG,
        description="fastcurv: second-order optimizers for PyTorch on fused Triton ops.",
    )
    parser.add_argument("--version", action="version", version=f"fastcurv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser(
        "compare",
        help="compare optimizers on a deep-autoencoder problem (table, PNG, JSON)",
        description=(
            "Train each optimizer on the same deep autoencoder from the same initialisation, on the same "
            "minibatch order, under the same training-clock budget; print a table and write "
            "compare-<problem>.png/.json/.txt to --out. See docs/compare.md for the protocol, the "
            "default hyperparameters and the JSON schema."
        ),
    )
    c.add_argument("--problem", default="curves",
                   help="curves (generated, default), digits (scikit-learn, tiny), mnist or faces (need --data), "
                        "or lm (a character-level transformer language model on Python's standard library)")
    c.add_argument("--size", default="small", choices=("small", "medium", "large"),
                   help="size of the lm problem's transformer (default small: sized for a CPU; larger for a GPU)")
    c.add_argument("--data", default=None, metavar="PATH",
                   help="data file for mnist/faces (or a real CURVES file): .npz with x_train/x_test, MNIST idx "
                        "files, or the original .mat (needs scipy)")
    c.add_argument("--optimizers", default=None, metavar="LIST",
                   help="comma-separated registry names or dotted paths to optimizer classes (e.g. "
                        "adam,torch.optim.AdamW,heavyball.SOAP), or 'all' (default: adam, heavyball's soap and "
                        "psgd when heavyball is installed, and every fastcurv optimizer available: "
                        "fc-soap,kfac,kbfgs,kbfgsl,newton-cg,block-hf,exact-newton; also: adamw, ekfac)")
    c.add_argument("--budget-seconds", type=_positive_float, default=DEFAULT_BUDGET_SECONDS, metavar="S",
                   help=f"training-clock seconds per optimizer (default {DEFAULT_BUDGET_SECONDS:g})")
    c.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="also stop each optimizer after N steps")
    c.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="minibatch size (default 1000, the papers', for the autoencoders; 32 sequences for lm; "
                        "clamped to n_train)")
    c.add_argument("--n-train", type=_positive_int, default=None, metavar="N",
                   help="training examples (default: the problem's, 20000 for curves)")
    c.add_argument("--n-test", type=_positive_int, default=None, metavar="N",
                   help="test examples (default: the problem's, 10000 for curves)")
    c.add_argument("--eval-size", type=_positive_int, default=None, metavar="N",
                   help="examples of each split used to evaluate train/test loss (default 2000 on CPU, 10000 on GPU)")
    c.add_argument("--evals", type=_positive_int, default=10, metavar="K",
                   help="evaluations per run besides step 0 (default 10)")
    c.add_argument("--warmup-steps", type=_nonneg_int, default=None, metavar="N",
                   help="untimed steps on a throwaway copy before each run (compilation, autotuning; "
                        "default 2 on GPU, 1 on CPU)")
    c.add_argument("--tune", action="store_true",
                   help="first try a small built-in grid per optimizer (short runs) and keep the best train loss")
    c.add_argument("--tune-seconds", type=_positive_float, default=None, metavar="S",
                   help="budget of each --tune run (default: a quarter of --budget-seconds)")
    c.add_argument("--set", type=_setting, action="append", default=[], metavar="OPT.KEY=VALUE", dest="settings",
                   help="override a constructor argument, e.g. --set kbfgs.lr=0.1 or --set heavyball.SOAP.lr=3e-3 "
                        "(repeatable; heavyball optimizers also take compile=True/False/'auto')")
    c.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu, cuda, cuda:N")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default float32")
    c.add_argument("--seed", type=_nonneg_int, default=0, help="initialisation / data order / data seed (default 0)")
    c.add_argument("--out", default="results", metavar="DIR", help="output directory (default results/)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("plot", help="redraw the PNG and reprint the table from a saved comparison JSON",
                       description="Redraw the PNG and reprint the table of a saved `fastcurv compare` JSON.")
    p.add_argument("json", metavar="RESULTS.json")
    p.add_argument("-o", "--output", default=None, metavar="PNG", help="default: the JSON's path with .png")
    return parser


def _resolve_device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise _UsageError(f"argument --device: unknown device {text!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _UsageError(f"argument --device: {text} requested but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _UsageError(f"argument --device: {text} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise _UsageError(f"argument --device: unsupported device {text!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from fastcurv import compare as cmp
    from fastcurv.data import ProblemError, load_problem

    names = None
    if args.optimizers is not None:
        names = [cmp.normalize_name(n) for n in args.optimizers.split(",") if n.strip()]
        if names == ["all"]:
            names = cmp.available_optimizers()
        if not names:
            raise _UsageError("argument --optimizers: empty list")
        names = list(dict.fromkeys(names))
        for name in names:
            try:
                cmp.resolve(name)
            except cmp.CompareError as e:
                raise _UsageError(f"argument --optimizers: {' '.join(str(e).split())}") from None
    overrides: dict[str, dict[str, Any]] = {}
    for opt, key, value in args.settings:
        overrides.setdefault(opt, {})[key] = value
    cfg = cmp.CompareConfig(
        optimizers=names,
        budget_seconds=args.budget_seconds,
        max_steps=args.max_steps,
        batch_size=args.batch_size or 1000,
        seed=args.seed,
        device=_resolve_device(args.device),
        dtype=getattr(torch, args.dtype),
        eval_size=args.eval_size,
        n_evals=args.evals,
        warmup_steps=args.warmup_steps,
        tune=args.tune,
        tune_seconds=args.tune_seconds,
        overrides=overrides,
        progress=not args.no_progress,
        command=["fastcurv", *argv],
    )
    if cfg.optimizers is None:
        cfg.optimizers = cmp.default_optimizers()
    try:  # optimizers resolve, settings name selected optimizers: before any data is loaded
        cfg.validate()
    except cmp.CompareError as e:
        where = "argument --set: " if args.settings else ""
        raise _UsageError(where + " ".join(str(e).split())) from None
    try:
        if args.problem.strip().lower() == "lm":
            from fastcurv.lm import load_lm

            if args.data is not None:
                raise ProblemError("lm: the corpus is Python's standard library; do not pass --data")
            problem = load_lm(args.size)
            cfg.batch_size = args.batch_size or problem.batch_size
        else:
            problem = load_problem(args.problem, data=args.data, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    except ProblemError as e:
        hint = " (on the command line: --data PATH)" if args.data is None and "data=" in str(e) else ""
        raise _UsageError(" ".join(str(e).split()) + hint) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _UsageError(f"argument --out: cannot create {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise _UsageError(f"argument --out: {out} is not a directory")
    print(problem.description, file=sys.stderr)
    results = cmp.run_comparison(problem, cfg, data_source=args.data)
    table = cmp.format_table(results)
    print(table)
    stem = out / f"compare-{problem.name}"
    try:
        json_path = cmp.save_json(results, stem.with_suffix(".json"))
        png_path = cmp.plot(results, stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(table + "\n")
    except OSError as e:
        print(f"{PROG}: error: cannot write results to {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"\nwrote {png_path}, {json_path}, {stem.with_suffix('.txt')}")
    return 0 if any(r["status"] != "error" for r in results["optimizers"]) else 1


def _plot(args: argparse.Namespace) -> int:
    import json

    from fastcurv import compare as cmp

    src = Path(args.json)
    try:
        results = json.loads(src.read_text())
    except OSError as e:
        raise _UsageError(f"cannot read {src}: {e.strerror or e}") from None
    except ValueError as e:
        raise _UsageError(f"{src} is not JSON: {' '.join(str(e).split())}") from None
    try:  # an older schema version is upgraded (the file is not rewritten)
        results = cmp.load_results(results)
    except cmp.CompareError as e:
        raise _UsageError(f"{src}: {e}") from None
    dest = Path(args.output) if args.output else src.with_suffix(".png")
    print(cmp.format_table(results))
    try:
        cmp.plot(results, dest)
    except OSError as e:
        print(f"{PROG}: error: cannot write {dest}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"\nwrote {dest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return the exit status.

    Exit status: 0 success; 1 nothing could run or the results could not be written; 2 bad arguments or
    data (one line on stderr); 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "compare":
            return _compare(args, argv)
        return _plot(args)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # CompareError and other setting errors raised before training
        from fastcurv.compare import CompareError

        if isinstance(e, CompareError):
            print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
