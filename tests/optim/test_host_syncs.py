"""Host reads inside a steady-state step (the precondition for running the step as a captured CUDA graph):
counted on the CPU by intercepting every device-to-host scalar read (``aten::_local_scalar_dense``: ``item``,
``bool``, ``float``, ``int``) and ``Tensor.tolist``. KFAC (between inverse refreshes) and KBFGS/KBFGSL read
exactly one flag vector per step — the finiteness/blow-up decision — and nothing else. The capture's
CPU-only deferred factor update (one counter read per flush, free on a CPU) is switched off here, as it is
on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastcurv import capture
from fastcurv.optim import KBFGS, KBFGSL, KFAC


@pytest.fixture(autouse=True)
def _as_on_cuda(monkeypatch):
    monkeypatch.setattr(capture, "_DEFER_DEVICES", ())


class _CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


def _count(step, monkeypatch) -> int:
    tolist = torch.Tensor.tolist
    n = [0]

    def counted(self):  # type: ignore[no-untyped-def]
        n[0] += 1
        return tolist(self)

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "tolist", counted)
        with _CountReads() as mode:
            step()
    return n[0] + mode.scalar_reads


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    return model, (lambda: F.mse_loss(model(x), y))


@pytest.mark.parametrize("blowup", [2.0, None], ids=["guard", "no-guard"])
def test_kfac_steady_state_step_reads_one_flag_vector(monkeypatch, blowup):
    model, closure = _setup()
    opt = KFAC(model, lr=0.1, damping=1.0, inv_every=5, compile=False, blowup_factor=blowup)
    for _ in range(7):  # past the k <= inv_every refreshes; step 7 refreshes nothing
        opt.step(closure)
    assert _count(lambda: opt.step(closure), monkeypatch) == 1
    assert opt.steps == 8 and opt.skipped_steps == 0
    # a refresh step adds the Cholesky status read (one, for all factors)
    opt.step(closure)
    opt.step(closure)
    assert opt.steps % 5 == 0
    assert _count(lambda: opt.step(closure), monkeypatch) == 2


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_kbfgs_steady_state_step_reads_one_flag_vector(monkeypatch, cls):
    model, closure = _setup()
    opt = cls(model, lr=0.1, damping=0.3, compile=False)
    for _ in range(3):
        opt.step(closure)
    assert _count(lambda: opt.step(closure), monkeypatch) == 1
    assert opt.steps == 4 and opt.skipped_steps == 0
