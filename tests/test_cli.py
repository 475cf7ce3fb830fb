"""End-to-end tests of ``fastcurv compare`` / ``fastcurv plot`` (fastcurv.cli + the fastcurv.compare package).

Runs are tiny (digits or a shrunken CURVES, a few steps bounded by ``--max-steps`` with a generous time
budget, so they do not depend on the machine's speed). No timing is asserted.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from fastcurv import cli
from fastcurv import compare as cmp
from fastcurv.data import load_problem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The JSON schema, spelled out here (not imported) so that any change to it fails this test.
TOP_KEYS_V1 = {
    "schema_version", "versions", "created", "command", "device", "dtype", "seed", "problem", "budget",
    "batch_size", "evaluation", "reference", "target_train_loss", "optimizers",
}
OPT_KEYS_V1 = {
    "name", "class", "hyperparameters", "status", "error", "steps", "skipped_steps", "train_seconds",
    "wall_seconds", "ms_per_step", "final_train_loss", "final_test_loss", "time_to_target",
    "time_to_target_ratio", "curve", "evals", "counters", "tuning",
}
TOP_KEYS = TOP_KEYS_V1 | {"baselines"}  # schema_version 2
OPT_KEYS_V2 = OPT_KEYS_V1 | {"baseline", "to_baselines"}
OPT_KEYS = OPT_KEYS_V2 | {"preconditioned"}  # schema_version 3
TINY = ["--max-steps", "3", "--budget-seconds", "300", "--warmup-steps", "1", "--evals", "2"]


def _check_outputs(out: Path, problem: str, names: list[str]) -> dict:
    """The three files exist and are readable; returns the JSON."""
    png = out / f"compare-{problem}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    res = json.loads((out / f"compare-{problem}.json").read_text())  # strict JSON: no NaN tokens
    assert set(res) == TOP_KEYS
    assert res["schema_version"] == 3
    assert [r["name"] for r in res["optimizers"]] == names
    for r in res["optimizers"]:
        assert set(r) == OPT_KEYS, r["name"]
        assert set(r["curve"]) == {"step", "seconds", "train_loss"}
        assert set(r["evals"]) == {"step", "seconds", "train_loss", "test_loss"}
    assert set(res["versions"]) == {"fastcurv", "torch", "triton", "python"}
    assert set(res["problem"]) == {"name", "description", "n_train", "n_test", "layer_sizes", "loss", "data"}
    assert set(res["budget"]) == {"seconds", "max_steps", "warmup_steps", "tune", "tune_seconds"}
    assert set(res["evaluation"]) == {"train_examples", "test_examples", "n_evals"}
    assert (out / f"compare-{problem}.txt").read_text().strip()
    return res


# ---------------------------------------------------------------------------------------------- main job
def test_compare_end_to_end_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = cmp.default_optimizers()
    assert names[0] == "adam" and {"kfac", "kbfgs", "kbfgsl"} <= set(names)
    rc = cli.main(["compare", "--problem", "digits", "--out", str(tmp_path), "--seed", "3", *TINY])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    header = next(ln for ln in cap.out.splitlines() if ln.startswith("optimizer"))
    for col in ("status", "steps", "ms/step", "train loss", "test loss", "t->target", "time/adam"):
        assert col in header
    rows = {ln.split()[0]: ln.split() for ln in cap.out.splitlines() if ln.split() and ln.split()[0] in names}
    assert set(rows) == set(names)

    res = _check_outputs(tmp_path, "digits", names)
    assert res["seed"] == 3 and res["problem"]["name"] == "digits" and res["dtype"] == "float32"
    assert res["budget"]["max_steps"] == 3 and res["reference"] == "adam"
    assert res["command"][:2] == ["fastcurv", "compare"]
    recs = res["optimizers"]
    for r in recs:
        assert r["status"] == "ok", (r["name"], r["error"])
        assert r["steps"] == 3 and r["curve"]["step"] == [1, 2, 3]
        assert r["evals"]["step"][0] == 0 and r["evals"]["step"][-1] == 3
        assert r["final_train_loss"] == r["evals"]["train_loss"][-1]
        assert r["hyperparameters"]["lr"] > 0
        assert all(b >= a for a, b in zip(r["curve"]["seconds"], r["curve"]["seconds"][1:]))
    # Fairness: same initialisation (identical step-0 evaluation) and same first minibatch (identical first loss).
    first_eval = {r["evals"]["train_loss"][0] for r in recs}
    first_batch = {r["curve"]["train_loss"][0] for r in recs}
    assert len(first_eval) == 1 and len(first_batch) == 1
    adam = recs[0]
    assert res["target_train_loss"] == adam["final_train_loss"]
    assert adam["time_to_target"] is not None and adam["time_to_target_ratio"] == pytest.approx(1.0)
    # Every baseline (Adam, and heavyball's SOAP / PSGD when installed) sets a target; the table has its columns.
    baselines = [r["name"] for r in recs if not r["class"].startswith("fastcurv.")]
    assert [b["name"] for b in res["baselines"]] == baselines and baselines[0] == "adam"
    assert res["baselines"][0]["target_train_loss"] == adam["final_train_loss"]
    for r in recs:
        assert r["baseline"] == (r["name"] in baselines) and set(r["to_baselines"]) == set(baselines)
    assert adam["to_baselines"]["adam"]["seconds"] == adam["time_to_target"]
    assert 0 < adam["to_baselines"]["adam"]["steps"] <= 3
    second = cap.out.splitlines()[cap.out.splitlines().index(header) + 1:]
    head2 = next(ln for ln in second if ln.startswith("optimizer"))
    for b in baselines:
        assert f"t->{b} (s)" in head2 and f"steps->{b}" in head2
    by_name = {r["name"]: r for r in recs}
    assert by_name["kfac"]["hyperparameters"]["fisher"] == "sampled"
    assert by_name["kbfgs"]["hyperparameters"]["lr"] == pytest.approx(0.3)  # the paper's default
    assert by_name["kbfgs"]["hyperparameters"]["damping"] == pytest.approx(0.3)

    # The JSON is enough to redraw: `fastcurv plot` reprints the table and writes a PNG.
    redrawn = tmp_path / "redrawn.png"
    assert cli.main(["plot", str(tmp_path / "compare-digits.json"), "-o", str(redrawn)]) == 0
    assert redrawn.read_bytes()[:8] == PNG_MAGIC
    assert header in capsys.readouterr().out


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """Once through the installed console script (as a user runs it), on a shrunken CURVES."""
    exe = shutil.which("fastcurv", path=str(Path(sys.executable).parent)) or shutil.which("fastcurv")
    assert exe, "the `fastcurv` console script is not installed: pip install -e ."
    cmd = [exe, "compare", "--problem", "curves", "--n-train", "64", "--n-test", "32", "--batch-size", "32",
           "--optimizers", "adam,kbfgs", "--no-progress", "--out", str(tmp_path / "res"), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer" in proc.stdout and "kbfgs" in proc.stdout
    res = _check_outputs(tmp_path / "res", "curves", ["adam", "kbfgs"])
    assert res["problem"]["n_train"] == 64 and res["batch_size"] == 32
    assert all(r["status"] == "ok" and r["steps"] == 3 for r in res["optimizers"])


def test_json_roundtrip_of_python_api_and_warmup_does_not_change_the_run(tmp_path: Path) -> None:
    """run_comparison's dict is strict JSON, and the warm-up (throwaway copy) leaves the timed run unchanged."""
    problem = load_problem("digits", n_train=200, n_test=50)
    runs = []
    for warm in (0, 2):
        cfg = cmp.CompareConfig(optimizers=["adam", "kbfgs"], budget_seconds=300, max_steps=3, batch_size=50,
                                warmup_steps=warm, n_evals=1, progress=False)
        runs.append(cmp.run_comparison(problem, cfg))
    for a, b in zip(runs[0]["optimizers"], runs[1]["optimizers"]):
        assert a["curve"]["train_loss"] == b["curve"]["train_loss"], a["name"]
        assert a["evals"]["train_loss"] == b["evals"]["train_loss"], a["name"]
    text = json.dumps(runs[1], allow_nan=False)
    assert set(json.loads(text)) == TOP_KEYS
    assert "adam" in cmp.format_table(json.loads(text))
    assert cmp.plot(json.loads(text), tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_tune_picks_best_grid_point(tmp_path: Path) -> None:
    problem = load_problem("digits", n_train=200, n_test=50)
    cfg = cmp.CompareConfig(optimizers=["adam"], budget_seconds=300, tune_seconds=300, max_steps=2,
                            batch_size=50, warmup_steps=0, n_evals=1, tune=True, progress=False)
    res = cmp.run_comparison(problem, cfg)
    rec = res["optimizers"][0]
    grid = rec["tuning"]
    assert [t["hyperparameters"]["lr"] for t in grid] == [3e-4, 1e-3, 3e-3]
    best = min(grid, key=lambda t: t["train_loss"])
    assert rec["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
    assert res["budget"]["tune"] is True and res["budget"]["tune_seconds"] == 300


# ---------------------------------------------------------------------------------------------- failures
class _NaNOptimizer:
    """Test double: steps like SGD, then returns a NaN loss and poisons the parameters at step 2."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.01) -> None:
        self.params = list(model.parameters())
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.k = 0

    def step(self, closure):
        self.k += 1
        loss = closure()
        if self.k >= 2:
            with torch.no_grad():
                self.params[0].fill_(float("nan"))
            return torch.tensor(float("nan"))
        return loss.detach()


class _BlowUpOptimizer(_NaNOptimizer):
    """Test double: a finite but exploding loss (1e4 x) from step 2 on."""

    def step(self, closure):
        self.k += 1
        loss = closure().detach()
        return loss * 1e4 if self.k >= 2 else loss


class _RaisingOptimizer(_NaNOptimizer):
    def step(self, closure):
        raise RuntimeError("boom\nsecond line")


def test_nonfinite_and_crashing_optimizers_do_not_kill_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cmp.REGISTRY, "nan-opt", cmp.OptimizerEntry("nan-opt", f"{__name__}:_NaNOptimizer", "test"))
    monkeypatch.setitem(cmp.REGISTRY, "boom-opt", cmp.OptimizerEntry("boom-opt", f"{__name__}:_RaisingOptimizer", "t"))
    monkeypatch.setitem(cmp.REGISTRY, "big-opt", cmp.OptimizerEntry("big-opt", f"{__name__}:_BlowUpOptimizer", "t"))
    rc = cli.main(["compare", "--problem", "digits", "--n-train", "200", "--n-test", "50", "--batch-size", "50",
                   "--optimizers", "adam,nan-opt,boom-opt,big-opt", "--no-progress", "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads((tmp_path / "compare-digits.json").read_text())
    st = {r["name"]: r for r in res["optimizers"]}
    assert st["adam"]["status"] == "ok" and st["adam"]["steps"] == 3
    assert st["nan-opt"]["status"] == "diverged" and st["nan-opt"]["steps"] == 2
    assert "non-finite" in st["nan-opt"]["error"]
    assert st["nan-opt"]["final_train_loss"] is None and st["nan-opt"]["curve"]["train_loss"][1] is None
    assert st["boom-opt"]["status"] == "error" and "RuntimeError: boom second line" in st["boom-opt"]["error"]
    assert st["nan-opt"]["time_to_target"] is None
    assert st["big-opt"]["status"] == "diverged" and st["big-opt"]["steps"] == 2 and "initial" in st["big-opt"]["error"]
    assert st["big-opt"]["final_train_loss"] is not None  # the parameters are fine; only the run was stopped
    row = next(ln for ln in out.splitlines() if ln.startswith("nan-opt"))
    assert "diverged" in row and "n/a" in row
    assert any(ln.startswith("boom-opt") and "error" in ln for ln in out.splitlines())


def test_time_to_target_interpolation() -> None:
    t = [0.0, 1.0, 2.0, 3.0]
    losses = [10.0, 5.0, 1.0, 0.5]
    assert cmp.time_to_target(t, losses, 10.0) == 0.0
    assert cmp.time_to_target(t, losses, 5.0) == pytest.approx(1.0)
    assert cmp.time_to_target(t, losses, math.sqrt(5.0)) == pytest.approx(1.5)  # halfway in log(loss)
    assert cmp.time_to_target(t, losses, 0.1) is None
    assert cmp.time_to_target(t, [10.0, None, 1.0, 0.5], 5.0) == pytest.approx(2.0)  # no bridge across a gap


def test_data_order_is_seeded_and_covers_each_epoch() -> None:
    x = torch.arange(10.0).unsqueeze(1)
    a = [b.squeeze(1).tolist() for b, _ in zip(cmp.runner._Batches(x, 3, seed=5), range(6))]
    b = [b.squeeze(1).tolist() for b, _ in zip(cmp.runner._Batches(x, 3, seed=5), range(6))]
    c = [b.squeeze(1).tolist() for b, _ in zip(cmp.runner._Batches(x, 3, seed=6), range(6))]
    assert a == b and a != c
    epoch = sorted(v for batch in a[:3] for v in batch)  # 3 batches of 3 per epoch, last partial one dropped
    assert len(set(epoch)) == 9 and all(len(batch) == 3 for batch in a)


# ---------------------------------------------------------------------------------------------- bad arguments
def _unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        cmp.REGISTRY, "newton-cg", cmp.OptimizerEntry("newton-cg", "fastcurv.optim:NoSuchOptimizer", "missing")
    )


BAD = {
    "unknown optimizer": (["--optimizers", "adam,sgdx"], "unknown optimizer 'sgdx'"),
    "unknown problem": (["--problem", "cifar"], "unknown problem"),
    "negative budget": (["--budget-seconds", "-5"], "--budget-seconds"),
    "zero budget": (["--budget-seconds", "0"], "--budget-seconds"),
    "mnist without data": (["--problem", "mnist"], "mnist"),
    "missing data file": (["--problem", "faces", "--data", "/nonexistent/faces.npz"], "does not exist"),
    "unreadable data file": (["--problem", "mnist", "--data", "{garbage}"], "unreadable"),
    "bad batch size": (["--batch-size", "0"], "--batch-size"),
    "bad device": (["--device", "tpu"], "--device"),
    "malformed setting": (["--set", "kfac.lr"], "--set"),
    "unknown setting key": (["--optimizers", "adam,kbfgs", "--set", "kbfgs.lrr=0.1"], "no argument 'lrr'"),
    "setting for unselected optimizer": (["--optimizers", "adam", "--set", "kfac.lr=1"], "kfac"),
    "n-train too large": (["--problem", "digits", "--n-train", "5000"], "n_train"),
    "unavailable optimizer": (["--optimizers", "newton-cg"], "not available"),
    "dotted path, no such class": (["--optimizers", "adam,torch.optim.AdamX"],
                                   "argument --optimizers: optimizer 'torch.optim.AdamX': module torch.optim has no"),
    "dotted path, no such module": (["--optimizers", "nosuchpkg.Opt"],
                                    "argument --optimizers: optimizer 'nosuchpkg.Opt'"),
    "dotted path, not an optimizer": (["--optimizers", "torch.nn.Linear"], "'torch.nn.Linear' is not an optimizer"),
    "setting for a dotted path, unknown key": (
        ["--optimizers", "torch.optim.AdamW", "--set", "torch.optim.AdamW.lrr=1"],
        "argument --set: torch.optim.AdamW has no argument 'lrr'",
    ),
    "unknown command": (None, "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_give_one_line_and_nonzero_exit(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args, expected = BAD[case]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    _unavailable(monkeypatch)
    if args is None:
        argv = ["frobnicate"]
    else:
        argv = ["compare", "--out", str(tmp_path / "out"), *[a.replace("{garbage}", str(garbage)) for a in args]]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc != 0
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("fastcurv: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in cap.err and cap.out == ""
    assert not (tmp_path / "out" / "compare-mnist.json").exists()


def test_unavailable_optimizer_is_skipped_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _unavailable(monkeypatch)
    assert "newton-cg" not in cmp.default_optimizers()
    assert "newton-cg" not in cmp.available_optimizers()
    with pytest.raises(cmp.CompareError, match="fastcurv.optim.NoSuchOptimizer"):
        cmp.resolve("newton-cg")


def test_public_names_of_the_former_module_import_from_the_package() -> None:
    """fastcurv.compare was one module; every name it exported still imports from the package, and each file
    of the package does one job (the engine) while argument parsing stays in fastcurv.cli."""
    import importlib

    former = ["OPTIMIZER_KEYS", "REGISTRY", "SCHEMA_VERSION", "TOP_LEVEL_KEYS", "CompareConfig", "CompareError",
              "OptimizerEntry", "available_optimizers", "default_optimizers", "format_table", "plot", "resolve",
              "run_comparison", "save_json", "time_to_target", "CURVES_DEFAULTS", "DEFAULT_BUDGET_SECONDS",
              "EXACT_NEWTON_SECONDS_PER_UNIT", "MAX_NONFINITE", "BLOWUP"]
    mod = importlib.import_module("fastcurv.compare")
    assert all(hasattr(mod, n) for n in former) and set(former) <= set(mod.__all__)
    assert all(hasattr(mod, n) for n in mod.__all__)
    for sub in ("registry", "peers", "config", "runner", "targets", "comparison", "report", "schema", "errors"):
        assert "argparse" not in importlib.import_module(f"fastcurv.compare.{sub}").__dict__, sub
    assert cmp.CompareError is cmp.errors.CompareError and issubclass(cmp.CompareError, ValueError)


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--budget-seconds" in out and "heavyball.SOAP" in out and "docs/compare.md" in out
    assert cli.main(["--version"]) == 0
    assert "fastcurv" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- defaults and guards
def test_curves_defaults_come_from_the_sweep_and_other_problems_keep_the_papers() -> None:
    """CURVES gets the swept defaults (docs/compare.md); digits keeps the paper's / torch's."""
    curves = load_problem("curves", n_train=8, n_test=4)
    digits = load_problem("digits", n_train=8, n_test=4)
    for name, kw in cmp.CURVES_DEFAULTS.items():
        assert cmp.REGISTRY[name].defaults(curves) == kw
    assert cmp.REGISTRY["kbfgs"].defaults(curves) == {"lr": 0.3, "damping": 0.7}
    assert cmp.REGISTRY["kbfgs"].defaults(curves)["damping"] <= 1.0  # damping > 1 is unsafe by construction
    assert cmp.REGISTRY["kbfgs"].defaults(digits) == {} and cmp.REGISTRY["adam"].defaults(digits) == {"lr": 1e-3}


def test_too_slow_optimizer_is_skipped_and_failed_reference_gives_no_target(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = load_problem("digits", n_train=60, n_test=20)
    monkeypatch.setattr(cmp.registry, "EXACT_NEWTON_SECONDS_PER_UNIT", 1.0)  # every exact-newton step "takes" ages
    monkeypatch.setitem(cmp.REGISTRY, "big-opt", cmp.OptimizerEntry("big-opt", f"{__name__}:_BlowUpOptimizer", "t"))
    cfg = cmp.CompareConfig(optimizers=["big-opt", "exact-newton"], budget_seconds=300, max_steps=3, batch_size=20,
                            warmup_steps=0, n_evals=1, progress=False)
    res = cmp.run_comparison(problem, cfg)
    big, en = res["optimizers"]
    assert en["status"] == "skipped" and en["steps"] == 0 and en["evals"]["step"] == [] and "budget" in en["error"]
    assert big["status"] == "diverged" and res["reference"] == "big-opt"
    assert res["target_train_loss"] is None and big["time_to_target"] is None  # a blown-up run sets no target
    table = cmp.format_table(json.loads(json.dumps(res, allow_nan=False)))
    assert "skipped" in table and "exact-newton" in table


# ---------------------------------------------------------------------------------------------- peers and dotted paths
def _tiny_run(names: list[str], overrides: dict | None = None, problem: str = "digits") -> dict:
    prob = load_problem(problem, n_train=120, n_test=40)
    cfg = cmp.CompareConfig(optimizers=names, budget_seconds=300, max_steps=3, batch_size=40, warmup_steps=1,
                            n_evals=1, overrides=overrides or {}, progress=False)
    return cmp.run_comparison(prob, cfg)


def test_the_record_says_which_share_of_the_parameters_each_optimizer_preconditions() -> None:
    """``preconditioned`` counts the parameters a fastcurv optimizer does not leave to its fallback (from the
    optimizer's own partition, as ``describe()`` prints it); other optimizers get null, shown as n/a."""
    res = _tiny_run(["adam", "kfac"])
    adam, kfac = res["optimizers"]
    assert adam["preconditioned"] is None
    model = load_problem("digits", n_train=120, n_test=40).build_model(0)
    total = sum(p.numel() for p in model.parameters())
    pre = kfac["preconditioned"]
    assert pre["of_elements"] == total and pre["of_tensors"] == len(list(model.parameters()))
    assert pre == {"elements": total, "of_elements": total, "share": 1.0, "tensors": pre["of_tensors"],
                   "of_tensors": pre["of_tensors"]}  # an MLP: every weight and bias is in a K-FAC layer
    table = cmp.format_table(res)
    assert "precond." in table and "100.0%" in table and "n/a" in table.splitlines()[5]


def test_dotted_paths_build_any_optimizer_class_and_registry_classes_as_their_entry() -> None:
    """A dotted path naming a registry entry's class runs exactly as that entry (same defaults, same curve); any
    other optimizer class is built from model.parameters(); --set-style overrides reach it by its path."""
    res = _tiny_run(["adam", "torch.optim.Adam", "torch.optim.SGD"], {"torch.optim.SGD": {"lr": 0.05}})
    adam, dotted_adam, sgd = res["optimizers"]
    assert [r["status"] for r in res["optimizers"]] == ["ok"] * 3
    assert dotted_adam["name"] == "torch.optim.Adam" and dotted_adam["class"] == "torch.optim.Adam"
    assert dotted_adam["curve"]["train_loss"] == adam["curve"]["train_loss"]
    assert dotted_adam["hyperparameters"]["lr"] == adam["hyperparameters"]["lr"]
    assert sgd["class"] == "torch.optim.SGD" and sgd["hyperparameters"]["lr"] == pytest.approx(0.05)
    assert sgd["curve"]["train_loss"][0] == adam["curve"]["train_loss"][0]  # same init, same first minibatch
    assert sgd["curve"]["train_loss"] != adam["curve"]["train_loss"]


def test_dotted_path_cli_with_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["compare", "--problem", "digits", "--n-train", "120", "--n-test", "40", "--batch-size", "40",
                   "--optimizers", "adam,torch.optim.AdamW", "--set", "torch.optim.AdamW.lr=0.01", "--no-progress",
                   "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    res = _check_outputs(tmp_path, "digits", ["adam", "torch.optim.AdamW"])
    adamw = res["optimizers"][1]
    assert adamw["status"] == "ok" and adamw["hyperparameters"]["lr"] == pytest.approx(0.01)
    assert any(ln.startswith("torch.optim.AdamW") for ln in out.splitlines())


def test_dotted_setting_parses_at_the_last_dot() -> None:
    assert cli._setting("heavyball.SOAP.lr=3e-3") == ("heavyball.SOAP", "lr", 3e-3)
    assert cli._setting("KFAC.damping=1") == ("kfac", "damping", 1)  # registry names are case-insensitive


def test_adamw_on_curves_uses_adams_swept_lr() -> None:
    curves = load_problem("curves", n_train=8, n_test=4)
    entry, _ = cmp.resolve("torch.optim.AdamW")
    assert entry.name == "torch.optim.AdamW" and entry.defaults(curves) == {"lr": 3e-3, "weight_decay": 1e-2}


def test_without_heavyball_the_peers_are_left_out_of_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "heavyball", None)  # import heavyball -> ImportError
    names = cmp.default_optimizers()
    assert "soap" not in names and "psgd" not in names and names[0] == "adam"
    with pytest.raises(cmp.CompareError, match=r"not available.*fastcurv\[peers\]"):
        cmp.resolve("soap")
    with pytest.raises(cmp.CompareError, match="heavyball.SOAP"):
        cmp.resolve("heavyball.SOAP")


def test_heavyball_peers_run_with_the_same_protocol() -> None:
    """SOAP and PSGD are in the default selection right after Adam, run uncompiled on the CPU (compile="auto"),
    and heavyball.SOAP by dotted path is the registry's soap. Skipped when heavyball is not installed."""
    hb_utils = pytest.importorskip("heavyball.utils")
    assert cmp.default_optimizers()[:3] == ["adam", "soap", "psgd"]
    mode = hb_utils.compile_mode
    res = _tiny_run(["adam", "soap", "psgd", "heavyball.SOAP"], problem="curves")
    assert hb_utils.compile_mode == mode  # the compile switch restores heavyball's global setting
    recs = {r["name"]: r for r in res["optimizers"]}
    for name, cls in (("soap", "heavyball.SOAP"), ("psgd", "heavyball.PSGDKron"), ("heavyball.SOAP", "heavyball.SOAP")):
        r = recs[name]
        assert r["status"] == "ok" and r["steps"] == 3, (name, r["error"])
        assert r["class"] == cls and r["hyperparameters"]["compile"] is False
        assert r["curve"]["train_loss"][0] == recs["adam"]["curve"]["train_loss"][0]
    assert recs["soap"]["hyperparameters"]["lr"] == pytest.approx(1e-2)  # the CURVES default
    assert recs["psgd"]["hyperparameters"]["lr"] == pytest.approx(cmp.CURVES_DEFAULTS["psgd"]["lr"])
    assert recs["heavyball.SOAP"]["curve"]["train_loss"] == recs["soap"]["curve"]["train_loss"]


def test_settings_of_optimizers_built_from_parameters_are_checked_before_training() -> None:
    cfg = cmp.CompareConfig(optimizers=["torch.optim.SGD"], overrides={"torch.optim.SGD": {"lr": -1.0}})
    with pytest.raises(cmp.CompareError, match="torch.optim.SGD: bad setting: ValueError: Invalid learning rate"):
        cfg.validate()


def test_heavyball_compile_setting_is_checked_before_training() -> None:
    pytest.importorskip("heavyball")
    cfg = cmp.CompareConfig(optimizers=["soap"], overrides={"soap": {"compile": "maybe"}})
    with pytest.raises(cmp.CompareError, match="soap.compile must be True, False or 'auto'"):
        cfg.validate()
    cmp.CompareConfig(optimizers=["soap"], overrides={"soap": {"compile": True, "lr": 1e-3}}).validate()


# ---------------------------------------------------------------------------------------------- baseline targets
def _record(name: str, cls: str, steps: list[int], secs: list[float], losses: list, status: str = "ok") -> dict:
    return {"name": name, "class": cls, "status": status, "final_train_loss": losses[-1],
            "evals": {"step": steps, "seconds": secs, "train_loss": losses, "test_loss": losses}}


def test_time_and_steps_to_each_baselines_final_loss() -> None:
    recs = [
        _record("adam", "torch.optim.Adam", [0, 10, 20], [0.0, 1.0, 2.0], [100.0, 50.0, 40.0]),
        _record("soap", "heavyball.SOAP", [0, 5, 10], [0.0, 2.0, 4.0], [100.0, 40.0, 10.0]),
        _record("sgd", "torch.optim.SGD", [0, 10], [0.0, 1.0], [100.0, None], status="diverged"),
        _record("kfac", "fastcurv.optim.KFAC", [0, 4, 8], [0.0, 3.0, 6.0], [100.0, 40.0, 30.0]),
    ]
    baselines = cmp.targets.add_baseline_targets(recs)
    assert baselines == [{"name": "adam", "target_train_loss": 40.0}, {"name": "soap", "target_train_loss": 10.0}]
    adam, soap, sgd, kfac = recs
    assert [r["baseline"] for r in recs] == [True, True, True, False]  # a failed baseline sets no target
    assert adam["to_baselines"] == {"adam": {"seconds": 2.0, "steps": 20}, "soap": {"seconds": None, "steps": None}}
    assert kfac["to_baselines"]["adam"] == {"seconds": 3.0, "steps": 4}
    # soap reaches adam's 40 exactly at its second evaluation, its own 10 at its last
    assert soap["to_baselines"] == {"adam": {"seconds": 2.0, "steps": 5}, "soap": {"seconds": 4.0, "steps": 10}}
    assert sgd["to_baselines"]["adam"] == {"seconds": None, "steps": None}
    # between evaluations: linear in log(loss), the same rule for seconds and steps (rounded up to a whole step)
    for target, secs, steps in ((40.0, 0.5, 5), (50.0, 0.5 * math.log(3.2) / math.log(4.0), 5)):
        r = _record("x", "torch.optim.SGD", [0, 10], [0.0, 1.0], [160.0, 10.0])
        cmp.targets.add_baseline_targets([r, _record("b", "torch.optim.SGD", [0], [0.0], [target])])
        assert r["to_baselines"]["b"] == {"seconds": pytest.approx(secs), "steps": steps}


def test_schema_1_files_still_load_and_redraw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A comparison saved before the baseline columns (schema_version 1) is upgraded on reading: ``fastcurv plot``
    redraws it and prints the new table; the upgrade gives the fields a current run writes."""
    res = _tiny_run(["adam", "kbfgs"])
    v1 = json.loads(json.dumps(res, allow_nan=False))
    del v1["baselines"]
    for r in v1["optimizers"]:
        del r["baseline"], r["to_baselines"]
    for r in v1["optimizers"]:
        del r["preconditioned"]
    v1["schema_version"] = 1
    assert set(v1) == TOP_KEYS_V1 and all(set(r) == OPT_KEYS_V1 for r in v1["optimizers"])
    up = cmp.load_results(v1)
    expect = json.loads(json.dumps(res, allow_nan=False))
    for r in expect["optimizers"]:  # not recorded before version 3
        r["preconditioned"] = None
    assert up == expect and v1["schema_version"] == 1  # argument untouched
    v2 = {**json.loads(json.dumps(res, allow_nan=False)), "schema_version": 2}
    for r in v2["optimizers"]:
        del r["preconditioned"]
    assert cmp.load_results(v2) == expect
    path = tmp_path / "old.json"
    path.write_text(json.dumps(v1))
    assert cli.main(["plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "t->adam (s)" in out and "steps->adam" in out and (tmp_path / "old.png").read_bytes()[:8] == PNG_MAGIC
    for bad, match in (({**v1, "schema_version": 7}, "schema_version 1, 2, 3"), ({"schema_version": 2}, "missing keys")):
        path.write_text(json.dumps(bad))
        assert cli.main(["plot", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastcurv: error:") and match in err and len(err.strip().splitlines()) == 1


def test_compare_runs_the_language_model_problem(tmp_path: Path) -> None:
    """--problem lm: token windows keep their integer dtype, inputs and targets are shifted by one token, the
    sequence-batch default applies, K-FAC samples categorical targets, and a method that cannot run the
    transformer is reported in the table, not fatal."""
    rc = cli.main(["compare", "--problem", "lm", "--optimizers", "adam,kfac,exact-newton", "--out", str(tmp_path),
                   "--budget-seconds", "30", "--max-steps", "2", "--eval-size", "4", "--evals", "1",
                   "--warmup-steps", "0", "--no-progress"])
    assert rc == 0
    res = _check_outputs(tmp_path, "lm", ["adam", "kfac", "exact-newton"])
    assert res["problem"]["name"] == "lm" and res["problem"]["loss"] == "ce" and res["batch_size"] == 32
    by = {r["name"]: r for r in res["optimizers"]}
    assert by["adam"]["status"] == "ok" and by["adam"]["steps"] == 2
    assert by["kfac"]["status"] == "ok" and by["kfac"]["hyperparameters"]["likelihood"] == "categorical"
    assert by["exact-newton"]["status"] == "error" and "MLP" in by["exact-newton"]["error"]
    first = by["adam"]["evals"]["train_loss"][0]
    assert abs(first - math.log(96)) < 0.3  # GPT-2 initialisation: about uniform over the 96 characters
