"""Degenerate hyperparameters are rejected the same way by every optimizer that has them: a ValueError naming
the argument and its interval, before any state exists; the valid ends of the intervals are accepted."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fastcurv.optim import KBFGS, KBFGSL, KFAC, ExactNewton

OPTIMIZERS = {"KFAC": KFAC, "KBFGS": KBFGS, "KBFGSL": KBFGSL}

#: (name, degenerate value, why, the interval the message states)
DEGENERATE = [
    ("damping", 0.0, "singular factors: KFAC's weights reached 1e10 in 4 steps", "(0.0, inf)"),
    ("momentum", 1.0, "the momentum never leaves 0: nothing moves", "[0.0, 1.0)"),
    ("stat_decay", 1.0, "the factors never see the data", "[0.0, 1.0)"),
]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("cls", list(OPTIMIZERS))
@pytest.mark.parametrize("name,value,why,interval", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_values_raise_naming_the_argument(cls, name, value, why, interval):
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} must be finite and in {interval}")):
        OPTIMIZERS[cls](_mlp(), **{name: value})


@pytest.mark.parametrize("cls", ["KBFGS", "KBFGSL"])
def test_pair_decay_one_is_degenerate(cls):
    with pytest.raises(ValueError, match="pair_decay"):
        OPTIMIZERS[cls](_mlp(), pair_decay=1.0)


def test_kl_clip_zero_is_degenerate():
    with pytest.raises(ValueError, match=r"kl_clip must be finite and in \(0.0, inf\)"):
        KFAC(_mlp(), kl_clip=0.0)


@pytest.mark.parametrize("cls", list(OPTIMIZERS))
def test_the_valid_ends_are_accepted(cls):
    opt = OPTIMIZERS[cls](_mlp(), lr=0.0, momentum=0.0, stat_decay=0.0, weight_decay=0.0, damping=1e-12)
    assert float(opt.param_groups[0]["momentum"]) == 0.0


def test_exact_newton_damping_zero_is_the_pseudo_inverse():
    """ExactNewton's ρ = 0 is a defined method (the pseudo-inverse), so it stays allowed."""
    ExactNewton(_mlp(), "ce", damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        ExactNewton(_mlp(), "ce", damping=-1e-3)
