"""The capture's deferred factor and mean updates (eager CPU: rows kept, one foreach SYRK when a factor is read) gives
the statistics of the immediate update: one pass, several passes before a read (gradient accumulation), a
read between passes (beta = n_before / n), a layer called twice per forward, and a reset that drops
pending rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv import capture
from fastcurv.capture import Capture

D64 = torch.float64


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3, bias=False)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))  # self.a called twice


def _run(defer: bool, script: str, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(capture, "_DEFER_DEVICES", ("cpu",) if defer else ())
    torch.manual_seed(0)
    model = _Shared().to(D64)
    cap = Capture(model, dtype=D64)
    g = torch.Generator().manual_seed(1)
    out: list[torch.Tensor] = []
    for op in script:
        if op == "p":  # one forward/backward pass
            x = torch.randn(int(torch.randint(3, 9, (), generator=g)), 5, generator=g, dtype=D64)
            F.mse_loss(model(x), torch.zeros(x.shape[0], 3, dtype=D64)).backward()
        elif op == "r":  # read the factors
            out += [t.clone() for st in cap.layers for t in (st.A, st.G, st.a_mean, st.h_mean, st.g_mean, st.n_A, st.n_G, st.n_a, st.n_g)]
        elif op == "z":
            cap.reset()
        elif op == "g":
            cap.reset("G")
    out += [t.clone() for st in cap.layers for t in (st.A, st.G, st.a_mean, st.h_mean, st.g_mean, st.n_A, st.n_G, st.n_a, st.n_g)]
    assert not cap._state.pending and not cap._state.pending_means
    cap.remove()
    return out


@pytest.mark.parametrize("script", ["p", "ppp", "prp", "prpzp", "pgp", "pp r pz"])
def test_deferred_equals_immediate(script, monkeypatch):
    a = _run(True, script.replace(" ", ""), monkeypatch)
    b = _run(False, script.replace(" ", ""), monkeypatch)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)


def test_rows_are_pending_until_read(monkeypatch):
    monkeypatch.setattr(capture, "_DEFER_DEVICES", ("cpu",))
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(D64)
    cap = Capture(model, dtype=D64)
    F.mse_loss(model(torch.randn(6, 4, dtype=D64)), torch.zeros(6, 2, dtype=D64)).backward()
    assert len(cap._state.pending) == 4  # A and G of both layers, not reduced yet
    assert len(cap._state.pending_means) == 6  # a_mean, h_mean, g_mean of both layers
    assert int(cap.layers[0].n_A) == 6  # counters are current
    assert float(cap.layers[1].A[-1, -1]) == 1.0  # reading reduces everything (homogeneous coordinate)
    assert not cap._state.pending and not cap._state.pending_means
    cap.remove()
