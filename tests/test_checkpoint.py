"""Checkpoints: resuming from ``state_dict`` mid-run reproduces the uninterrupted run bitwise (float64, CPU) for
every optimizer — K-FAC, K-BFGS, K-BFGS(L), NewtonCG (complex-step and GGN products), BlockHF and ExactNewton
— and every option that keeps extra state (inverse kinds, sampled Fisher's generator, KL clip, the AdamW
fallback, warm start, a wrapped-around L-BFGS memory, the Newton–Krylov methods' running Levenberg–Marquardt
damping and counters, BlockHF's CG warm start ``delta``), with an LR scheduler in the loop.
Distributed checkpoints (each rank's state identical, 2 ranks -> 1 process, torch.distributed.checkpoint)
are checked in tests/test_distributed.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG

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


def _assert_bitwise_same(ref_model, ref, model2, opt2) -> None:
    """Parameters, every state tensor (and its dtype) and every hyperparameter are bitwise equal."""
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


def _restore_into(fresh, model, opt, sched):
    """Round-trip model, optimizer and scheduler state through ``torch.save`` / ``torch.load`` into
    ``fresh(seed=7, lr=0.05, damping=1.5)`` (another initialisation and other hyperparameters), returned."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2, opt2, sched2 = fresh(seed=7, lr=0.05, damping=1.5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    return model2, opt2, sched2


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
    # a different initialisation and different hyperparameters: everything must come from the checkpoint
    model2, opt2, sched2 = _restore_into(fresh, model, opt, sched)
    assert opt2.counters() == opt.counters() and opt2.steps == K
    _steps(model2, opt2, sched2, sampled, range(K, 2 * K))

    _assert_bitwise_same(ref_model, ref, model2, opt2)
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


# ------------------------------------------------------------------------------------------------------------
# the Newton-type optimizers: step(closure, batch=(x, y)) / ExactNewton's step(closure)
# ------------------------------------------------------------------------------------------------------------
def _mlp(seed: int = 0) -> nn.Sequential:
    """ExactNewton's model kind: an ``nn.Sequential`` of Linear + elementwise activations (no conv, no norm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.Tanh(), nn.Linear(8, 6)).to(D64)


#: name -> (model builder, optimizer constructor with the run's hyperparameters)
NEWTON_CASES = {
    "newton_cg-complex-step": (
        _model, lambda m, **o: NewtonCG(m, _loss, **{**dict(lr=1.0, damping=0.3, max_cg_iters=8), **o})
    ),
    "newton_cg-ggn": (
        _model,
        lambda m, **o: NewtonCG(m, _loss, **{**dict(lr=1.0, damping=0.3, max_cg_iters=8, method="ggn"), **o}),
    ),
    "block_hf-half-curvature-batch": (
        _model,
        lambda m, **o: BlockHF(m, _loss, **{**dict(lr=1.0, damping=0.3, curvature_batch=0.5, max_cg_iters=10), **o}),
    ),
    "block_hf-partial-blocks-adamw-fallback": (  # norm and fc2 outside every block: AdamW state is saved too
        _model,
        lambda m, **o: BlockHF(
            m, _loss, **{**dict(lr=1.0, damping=0.3, curvature_batch=0.5, max_cg_iters=10, blocks=[m.conv, m.fc1]), **o}
        ),
    ),
    "exact_newton": (_mlp, lambda m, **o: ExactNewton(m, "mse", **{**dict(lr=0.5, damping=0.3), **o})),
}


@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread (several times faster on a loaded 2-core CI machine, same results)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _newton_steps(model, opt, sched, ks: range) -> None:
    for k in ks:
        x, y = _batch(k)
        if isinstance(opt, ExactNewton):  # closure or batch, not both: the closure protocol here
            opt.step(lambda: _loss(model(x), y))
        else:  # gradient from the closure, curvature on the batch (BlockHF: its first half)
            opt.step(lambda: _loss(model(x), y), batch=(x, y))
        sched.step()


def _lm(opt) -> torch.Tensor | None:
    return opt.lm_damping.clone() if hasattr(opt, "lm_damping") else None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NEWTON_CASES)
def test_newton_resume_from_state_dict_is_bitwise_the_uninterrupted_run(name):
    build, make = NEWTON_CASES[name]

    def fresh(seed: int = 0, **override):
        model = build(seed)
        opt = make(model, **override)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    ref_model, ref, ref_sched = fresh()
    _newton_steps(ref_model, ref, ref_sched, range(2 * K))

    model, opt, sched = fresh()
    _newton_steps(model, opt, sched, range(K))
    assert opt.counters()["steps"] == K
    assert float(opt.param_groups[0]["lr"]) == float(sched.get_last_lr()[0]) < float(sched.base_lrs[0])  # halved
    lam = _lm(opt)
    if lam is not None:  # the running damping has moved away from the constructor's value: it must be saved
        assert float(lam) != 0.3
    if isinstance(opt, BlockHF):
        assert all(opt.state[p]["delta"].abs().sum() > 0 for blk in opt.blocks for p in blk)
    # a different initialisation and different hyperparameters: everything must come from the checkpoint
    model2, opt2, sched2 = _restore_into(fresh, model, opt, sched)
    assert opt2.counters() == opt.counters() and opt2.steps == K
    if lam is not None:
        assert opt2.lm_damping.dtype == D64 and torch.equal(opt2.lm_damping, lam)
    _newton_steps(model2, opt2, sched2, range(K, 2 * K))

    _assert_bitwise_same(ref_model, ref, model2, opt2)
    if lam is not None:
        assert torch.equal(ref.lm_damping, opt2.lm_damping)
    assert ref.counters() == opt2.counters() and ref.skipped_steps == 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_newton_load_state_dict_rejects_a_bad_lm_damping(bad):
    """The running damping is shared code (NewtonCG and BlockHF): checked on NewtonCG."""
    name = "newton_cg-complex-step"
    build, make = NEWTON_CASES[name]
    model = build(0)
    opt = make(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _newton_steps(model, opt, sched, range(2))
    sd = opt.state_dict()
    sd["fastcurv"]["lm_damping"] = torch.tensor(bad, dtype=D64)
    lam, counters, state = opt.lm_damping.clone(), opt.counters(), {k: v.clone() for k, v in _state(opt).items()}
    with pytest.raises(ValueError, match="lm_damping"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.lm_damping, lam) and opt.counters() == counters
    assert all(torch.equal(v, _state(opt)[k]) for k, v in state.items())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NEWTON_CASES)
def test_newton_state_dict_has_a_fixed_structure_from_construction(name):
    """As for K-FAC / K-BFGS: BlockHF's warm start and the running damping exist before the first step (what
    torch.distributed.checkpoint's in-place load needs), and a checkpoint taken before any step resumes
    bitwise too."""
    build, make = NEWTON_CASES[name]
    model = build(0)
    opt = make(model)

    def structure(o) -> dict:
        sd = o.state_dict()
        flat = {(i, k): (v.shape, v.dtype) for i, st in sd["state"].items() for k, v in st.items()}
        lm = sd["fastcurv"].get("lm_damping")
        flat["lm"] = None if lm is None else (lm.shape, lm.dtype)
        return flat

    keys0 = structure(opt)
    if isinstance(opt, BlockHF):
        assert all(("delta" in opt.state[p]) for p in opt._flat.params)
    if not isinstance(opt, ExactNewton):
        assert keys0["lm"] == ((), D64)
    sd0 = copy.deepcopy(opt.state_dict())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _newton_steps(model, opt, sched, range(2))
    assert structure(opt) == keys0, name

    model2 = build(0)  # resume from the pre-step checkpoint: the same two steps
    opt2 = make(model2, lr=0.05)
    opt2.load_state_dict(sd0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    _newton_steps(model2, opt2, sched2, range(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters())), name
