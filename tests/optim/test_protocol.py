"""The torch.optim contract, the same for all six optimizers: built from the model alone, trained with
``step(closure)`` (LBFGS-style or forward-only), gradients accumulated before the step kept (or refused),
``add_param_group`` refused, floats written by schedulers accepted without recompiles, a second optimizer on
the same model, and one rule for layers that fall back."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.optim import EKFAC, KBFGS, KBFGSL, KFAC, SOAP, BlockHF, ExactNewton, NewtonCG

D = torch.float64

#: every optimizer, built from the model alone (only hyperparameters)
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "kfac": lambda m: KFAC(m, lr=0.1, damping=0.1, compile=False),
    "kbfgs": lambda m: KBFGS(m, lr=0.1, damping=0.3, compile=False),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.1, damping=0.3, compile=False),
    "newton_cg": lambda m: NewtonCG(m, damping=1.0, max_cg_iters=5),
    "newton_cg_db": lambda m: NewtonCG(m, method="double-backward", damping=1.0, max_cg_iters=5),
    "newton_cg_ggn": lambda m: NewtonCG(m, method="ggn", damping=1.0, max_cg_iters=5),
    "block_hf": lambda m: BlockHF(m, damping=1.0, max_cg_iters=5),
    "exact_newton": lambda m: ExactNewton(m, lr=0.5, damping=1.0),
    "soap": lambda m: SOAP(m, lr=1e-2),
    "ekfac": lambda m: EKFAC(m, lr=0.1, damping=1.0),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def _data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _lbfgs_closure(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("style", ["lbfgs", "forward"])
def test_built_from_the_model_alone_and_trained_with_a_closure(name: str, style: str) -> None:
    model = _model()
    opt = OPTIMIZERS[name](model)
    x, y = _data()
    first = F.cross_entropy(model(x), y).item()
    closure = _lbfgs_closure(opt, model, x, y) if style == "lbfgs" else (lambda: F.cross_entropy(model(x), y))
    for _ in range(4):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert opt.steps == 4 and opt.skipped_steps == 0
    assert F.cross_entropy(model(x), y).item() < first


@pytest.mark.parametrize(
    "make",
    [
        lambda m, lf: NewtonCG(m, lf, damping=0.5, max_cg_iters=6),
        lambda m, lf: NewtonCG(m, lf, method="double-backward", damping=0.5, max_cg_iters=6),
        lambda m, lf: NewtonCG(m, lf, method="ggn", damping=0.5, max_cg_iters=6),
        lambda m, lf: BlockHF(m, lf, damping=0.5, max_cg_iters=6),
        lambda m, lf: ExactNewton(m, lf, lr=0.5, damping=0.5),
    ],
    ids=["complex-step", "double-backward", "ggn", "block_hf", "exact_newton"],
)
def test_closure_replay_matches_the_loss_fn_batch_path(make) -> None:
    """The curvature products replay the user's closure with the parameters substituted: the same steps as
    the ``loss_fn=``/``batch=`` path (which calls ``loss_fn(model(x), y)`` directly)."""
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = make(m1, F.cross_entropy), make(m2, None)
    for k in range(3):
        x, y = _data(seed=10 + k)
        o1.step(batch=(x, y))
        o2.step(_lbfgs_closure(o2, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kfac_pools_gradients_and_statistics_over_accumulated_micro_batches() -> None:
    """Lightning's ``accumulate_grad_batches=2``: the first micro-batch's closure runs outside the step (it
    zeroes and backpropagates loss/2), the second runs inside ``step`` without zeroing. The step equals one
    step on the concatenated batch (each micro-batch loss is divided by the number of micro-batches)."""
    x, y = _data(32)
    m1, m2 = _model(), _model()
    full = KFAC(m1, lr=0.2, damping=0.1, compile=False)
    acc = KFAC(m2, lr=0.2, damping=0.1, compile=False)
    full.step(lambda: F.cross_entropy(m1(x), y))

    def micro(i: int, zero: bool):
        def closure():
            if zero:
                acc.zero_grad()
            loss = F.cross_entropy(m2(x[16 * i:16 * (i + 1)]), y[16 * i:16 * (i + 1)]) / 2
            loss.backward()
            return loss

        return closure

    micro(0, zero=True)()  # outside the step
    acc.step(micro(1, zero=False))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for lay in m1:
        if isinstance(lay, nn.Linear):
            i = list(m1).index(lay)
            for k in ("A", "G"):
                torch.testing.assert_close(full.state[lay.weight][k], acc.state[m2[i].weight][k], rtol=1e-10, atol=1e-13)


def test_kfac_forward_only_closure_does_not_accumulate_its_own_previous_gradients() -> None:
    """A forward-only closure needs no zero_grad: the gradients the previous step left are not a user's
    accumulation (same result as zeroing before every step)."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = KFAC(m1, compile=False), KFAC(m2, compile=False)
    for _ in range(3):
        o1.step(lambda: F.cross_entropy(m1(x), y))
        o2.zero_grad()
        o2.step(lambda: F.cross_entropy(m2(x), y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "kfac"])
def test_methods_that_replay_the_closure_refuse_accumulated_gradients(name: str) -> None:
    model = _model()
    opt = OPTIMIZERS[name](model)
    x, y = _data()
    F.cross_entropy(model(x[:16]), y[:16]).backward()  # an accumulated micro-batch
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="accumulated"):
        opt.step(lambda: F.cross_entropy(model(x[16:]), y[16:]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()  # zeroed: the step goes on
    opt.step(lambda: F.cross_entropy(model(x[16:]), y[16:]))
    assert opt.steps == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_add_param_group_is_refused_with_the_remedy(name: str) -> None:
    model = _model()
    opt = OPTIMIZERS[name](model)
    with pytest.raises(ValueError, match=r"add_param_group.*build a new optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=D))]})
    assert len(opt.param_groups) == 1


#: (scheduler factory, hyperparameter it writes, whether it needs "momentum")
SCHEDULERS = {
    "OneCycleLR": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10), True),
    "CyclicLR": (lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1), True),
    "CosineAnnealingWarmRestarts": (lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2), False),
    "LambdaLR": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9**k), False),
    "SequentialLR": (
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o, [torch.optim.lr_scheduler.ConstantLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], [2]
        ),
        False,
    ),
    "ReduceLROnPlateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0), False),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["kfac", "kbfgs", "newton_cg", "block_hf", "exact_newton"])
def test_schedulers_with_default_arguments(name: str, sched: str) -> None:
    """Every scheduler drives every optimizer that has its hyperparameters; a float it writes (OneCycleLR's
    and CyclicLR's ``momentum``) is copied into the same 0-d tensor at the next step."""
    make, needs_momentum = SCHEDULERS[sched]
    model = _model()
    opt = OPTIMIZERS[name](model)
    if needs_momentum and "momentum" not in opt.defaults:
        pytest.skip("the scheduler's defaults cycle a momentum this optimizer does not have")
    tensors = {k: v for k, v in opt.param_groups[0].items() if isinstance(v, torch.Tensor)}
    s = make(opt)
    x, y = _data()
    for _ in range(4):
        written = {k: float(v) for k, v in opt.param_groups[0].items() if k in tensors}
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
        for k, t in tensors.items():  # the same tensor objects, holding what the scheduler wrote
            assert opt.param_groups[0][k] is t
            assert float(t) == written[k]
        s.step(float(loss)) if sched == "ReduceLROnPlateau" else s.step()
    assert opt.steps == 4


def test_float_momentum_from_onecycle_does_not_recompile_the_compiled_update() -> None:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = _model()
    opt = KFAC(model, lr=0.1, damping=0.1, inv_every=1, compile=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    assert isinstance(opt.param_groups[0]["momentum"], float)  # OneCycleLR wrote a float at construction
    x, y = _data()
    opt.step(lambda: F.cross_entropy(model(x), y))
    sched.step()
    opt.step(lambda: F.cross_entropy(model(x), y))
    sched.step()
    frames = counters["stats"]["unique_graphs"]
    assert frames > 0  # the update is compiled
    for _ in range(4):
        assert isinstance(opt.param_groups[0]["momentum"], float)
        opt.step(lambda: F.cross_entropy(model(x), y))
        sched.step()
    assert counters["stats"]["unique_graphs"] == frames  # new values, no new graph


def test_bad_value_written_into_param_groups_raises_before_any_change() -> None:
    model = _model()
    opt = KFAC(model, compile=False)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match="lr"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["kfac", "kbfgs", "kbfgsl"])
def test_second_optimizer_on_the_same_model_or_a_deepcopy(name: str) -> None:
    """A second ``Trainer.fit`` builds a second optimizer on the same model; a deepcopy of a trained model
    carries the swapped layers. The newest optimizer takes the layers over; the old one refuses to step."""
    model = _model()
    x, y = _data()
    first = OPTIMIZERS[name](model)
    first.step(lambda: F.cross_entropy(model(x), y))
    clone = copy.deepcopy(model)
    on_clone = OPTIMIZERS[name](clone)
    on_clone.step(lambda: F.cross_entropy(clone(x), y))
    first.step(lambda: F.cross_entropy(model(x), y))  # the original is independent of the copy
    second = OPTIMIZERS[name](model)
    second.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="taken over"):
        first.step(lambda: F.cross_entropy(model(x), y))
    assert first.steps == 2 and second.steps == 1 and on_clone.steps == 1


class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(i)))


@pytest.mark.parametrize("cls", [KFAC, KBFGS, KBFGSL, BlockHF])
def test_one_rule_for_layers_that_fall_back(cls) -> None:
    """Most parameter elements in the fallback: one UserWarning with the describe() table at construction;
    a model that is mostly preconditioned: no warning — the same rule for every optimizer with a fallback."""
    model = _Embedded()
    kw = dict(blocks=[model.out]) if cls is BlockHF else {}
    with pytest.warns(UserWarning, match=r"(?s)fallback rule.*emb\.weight.*fallback"):
        cls(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(_model())


@pytest.mark.parametrize("cls", [KFAC, KBFGS, KBFGSL])
def test_nothing_to_precondition_raises_for_every_optimizer(cls) -> None:
    with pytest.raises(ValueError, match="precondition"):
        cls(nn.Sequential(nn.LayerNorm(4)))


@pytest.mark.parametrize("name", ["kfac", "kbfgs", "newton_cg", "exact_newton"])
def test_a_closure_calling_torch_autograd_backward_is_not_backpropagated_twice(name: str) -> None:
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = OPTIMIZERS[name](m1), OPTIMIZERS[name](m2)

    def closure():
        o1.zero_grad()
        loss = F.cross_entropy(m1(x), y)
        torch.autograd.backward(loss)
        return loss

    for _ in range(2):
        o1.step(closure)
        o2.step(lambda: F.cross_entropy(m2(x), y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
