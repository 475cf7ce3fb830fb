"""The documented examples run as documented: ``torchrun --standalone --nproc_per_node=2
examples/train_ddp.py`` (2 CPU processes, gloo), and the checkpoint rank 0 writes restores in one process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_ddp.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("train_ddp", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _teardown_abort(proc: subprocess.CompletedProcess) -> bool:
    """Every epoch was reported, then a rank died of SIGABRT in teardown (see the test)."""
    done = sum(ln.startswith("epoch") for ln in proc.stdout.splitlines()) == 2
    return done and "terminate called without an active exception" in proc.stderr + proc.stdout


@pytest.mark.parametrize("optimizer", ["kfac", "newton-cg"])
def test_torchrun_example_trains_and_its_checkpoint_restores(optimizer: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
        "--optimizer", optimizer, "--epochs", "2", "--checkpoint", str(ckpt),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and _teardown_abort(proc):
        # Seen about once in 10 runs on a loaded 2-core machine (never in 36 unloaded runs): a rank aborts in
        # gloo's C++ teardown *after* training finished ("terminate called without an active exception", a
        # joinable std::thread destroyed at exit; upstream, pytorch/pytorch#179291 discusses the same race).
        # Not fastcurv's; run once more so that CI reports real failures only.
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2, proc.stdout  # rank 0 only prints
    losses = [float(ln.split("mean loss")[1].split()[0]) for ln in lines]
    assert losses[1] < losses[0], losses  # it trains
    assert "'skipped_steps': 0" in lines[-1]

    # the replicated state saved by rank 0 restores in a single process (a different world size)
    ex = _example_module()
    sd = torch.load(ckpt, weights_only=False)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32),
                          nn.Tanh(), nn.Linear(32, 64))
    model.load_state_dict(sd["model"])
    opt = ex.make_optimizer(optimizer, model)
    opt.load_state_dict(sd["opt"])
    assert opt.counters() == sd["opt"]["fastcurv"]["counters"] and opt.counters()["steps"] == 16
    x = torch.sigmoid(torch.randn(32, 64, generator=torch.Generator().manual_seed(5)))
    before = ex.loss_fn(model(x), x).item()
    for _ in range(3):
        opt.step(lambda: ex.loss_fn(model(x), x))  # the same protocol for every optimizer
    assert ex.loss_fn(model(x), x).item() < before
