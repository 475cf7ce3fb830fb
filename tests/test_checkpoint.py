"""Checkpoints: resuming from ``state_dict`` mid-run reproduces the uninterrupted run bitwise (float64, CPU) for
every covered optimizer and option that keeps extra state (inverse kinds, sampled Fisher's generator, KL
clip, the AdamW fallback, warm start, a wrapped-around L-BFGS memory), with an LR scheduler in the loop.
Distributed checkpoints (each rank's state identical, 2 ranks -> 1 process, torch.distributed.checkpoint)
are checked in tests/test_distributed.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from fastcurv.optim import KBFGS, KBFGSL, KFAC

D64 = torch.float64
K = 5  # steps before the checkpoint, and after it


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(27, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1)))))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().to(D64)


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(12, 2, 5, 5, generator=g, dtype=D64), torch.randn(12, 6, generator=g, dtype=D64)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1).mean()


#: name -> (constructor with the run's hyperparameters, sampled Fisher?, warm start?)
CASES = {
    "kfac-cholesky": (lambda m, **o: KFAC(m, **{**dict(lr=0.3, damping=0.1, inv_every=3), **o}), False, False),
    "kfac-eigh-exact-sampled-klclip": (
        lambda m, **o: KFAC(
            m,
            **{
                **dict(lr=0.3, damping=0.1, inv_every=3, inverse="eigh", damping_split="exact", kl_clip=0.01),
                **dict(fisher="sampled", likelihood="gaussian", seed=3),
                **o,
            },
        ),
        True,
        False,
    ),
    "kfac-pi-adamw-fallback": (
        lambda m, **o: KFAC(m, **{**dict(lr=0.3, damping=0.1, damping_split="pi", fallback="adamw"), **o}),
        False,
        False,
    ),
    "kbfgs": (lambda m, **o: KBFGS(m, **{**dict(lr=0.1, damping=0.3), **o}), False, False),
    "kbfgs-warm-adamw-fallback": (
        lambda m, **o: KBFGS(m, **{**dict(lr=0.1, damping=0.3, fallback="adamw"), **o}), False, True
    ),
    "kbfgsl-wrapped-memory": (lambda m, **o: KBFGSL(m, **{**dict(lr=0.1, damping=0.3, history=3), **o}), False, False),
}


def _closure(model, k: int, sampled: bool):
    x, y = _batch(k)

    def closure():
        out = model(x)
        return (_loss(out, y), out) if sampled else _loss(out, y)

    return closure


def _steps(model, opt, sched, sampled: bool, ks: range) -> None:
    for k in ks:
        opt.step(_closure(model, k, sampled))
        sched.step()


def _state(opt) -> dict:
    return {(i, k): v for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("name", CASES)
def test_resume_from_state_dict_is_bitwise_the_uninterrupted_run(name):
    make, sampled, warm = CASES[name]

    def fresh(seed: int = 0, **override):
        model = _model(seed)
        opt = make(model, **override)
        if warm:
            opt.warm_start([_closure(model, k, False) for k in (50, 51)])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    ref_model, ref, ref_sched = fresh()
    _steps(ref_model, ref, ref_sched, sampled, range(2 * K))

    model, opt, sched = fresh()
    _steps(model, opt, sched, sampled, range(K))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    # a different initialisation and different hyperparameters: everything must come from the checkpoint
    model2, opt2, sched2 = fresh(seed=7, lr=0.05, damping=1.5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.counters() == opt.counters() and opt2.steps == K
    _steps(model2, opt2, sched2, sampled, range(K, 2 * K))

    for (n, p), q in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    a, b = _state(ref), _state(opt2)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for k, v in ref.param_groups[0].items():
        if k != "params":
            w = opt2.param_groups[0][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k
    assert ref.counters() == opt2.counters()


def test_state_dict_has_a_fixed_structure_from_construction():
    """Every state tensor exists before the first step (the fallback's too), so a freshly built optimizer's
    state dict can receive a checkpoint in place (what torch.distributed.checkpoint.load does)."""
    for name, (make, sampled, _) in CASES.items():
        model = _model()
        opt = make(model)
        keys0 = {k: (v.shape, v.dtype) for k, v in _state(opt).items()}
        assert opt.fallback_params() and all(opt.state[p] for p in opt.fallback_params()), name
        opt.step(_closure(model, 0, sampled))
        keys1 = {k: (v.shape, v.dtype) for k, v in _state(opt).items()}
        assert keys0 == keys1, name
