"""fastcurv's optimizers under PyTorch Lightning's automatic optimization (``pip install .[integration]``;
skipped without ``lightning``): each of the six trains from ``configure_optimizers`` with Lightning's own
closure, ``accumulate_grad_batches`` pools micro-batches (K-FAC) or is refused loudly (the methods that
replay the closure), a scheduler drives a hyperparameter, and a checkpoint resumes bit for bit."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG  # noqa: E402

D = torch.float64
MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.1, damping=0.1, compile=False),
    "kbfgs": lambda m: KBFGS(m, lr=0.1, damping=0.3, compile=False),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.1, damping=0.3, compile=False),
    "newton_cg": lambda m: NewtonCG(m, method="ggn", damping=1.0, max_cg_iters=5),
    "block_hf": lambda m: BlockHF(m, damping=1.0, max_cg_iters=5),
    "exact_newton": lambda m: ExactNewton(m, lr=0.5, damping=1.0),
}


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=D)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=D)).argmax(1)
    return TensorDataset(x, y)


class Module(L.LightningModule):
    def __init__(self, opt: str, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
        self.opt, self.scheduler = opt, scheduler
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        opt = MAKERS[self.opt](self)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(  # writes a float momentum where there is one
            opt, max_lr=0.2, total_steps=8, cycle_momentum="momentum" in opt.defaults
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(**kw) -> L.Trainer:  # noqa: ANN003
    base = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1, limit_train_batches=8,
    )
    return L.Trainer(**{**base, **kw})


def _fit(module: Module, batch_size: int = 8, ckpt_path: str | None = None, **kw) -> L.Trainer:  # noqa: ANN003
    trainer = _trainer(**kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, DataLoader(_data(), batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("opt", list(MAKERS))
def test_automatic_optimization_trains_with_every_optimizer(opt: str) -> None:
    module = Module(opt)
    x, y = _data().tensors
    before = F.cross_entropy(module(x), y).item()
    trainer = _fit(module)
    optimizer = trainer.optimizers[0]
    assert optimizer.steps == 8 and optimizer.skipped_steps == 0
    assert F.cross_entropy(module(x), y).item() < before


def test_accumulate_grad_batches_pools_micro_batches_under_kfac() -> None:
    """accumulate_grad_batches=2 with batches of 8 gives the steps of batches of 16 (Lightning divides each
    micro-batch loss by 2; K-FAC pools the gradients and its statistics)."""
    acc, full = Module("kfac"), Module("kfac")
    _fit(acc, batch_size=8, accumulate_grad_batches=2)
    _fit(full, batch_size=16, limit_train_batches=4)
    for a, b in zip(acc.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opt", ["kbfgs", "newton_cg", "exact_newton"])
def test_accumulate_grad_batches_is_refused_by_methods_that_replay_the_closure(opt: str) -> None:
    with pytest.raises(ValueError, match="accumulated"):
        _fit(Module(opt), accumulate_grad_batches=2)


@pytest.mark.parametrize("opt", ["kfac", "kbfgs", "newton_cg"])
def test_scheduler_through_the_trainer(opt: str) -> None:
    module = Module(opt, scheduler=True)
    trainer = _fit(module)
    group = trainer.optimizers[0].param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and trainer.optimizers[0].steps == 8
    assert float(group["lr"]) == pytest.approx(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])


@pytest.mark.parametrize("opt", ["kfac", "kbfgs", "block_hf"])
def test_checkpoint_and_resume_through_the_trainer(opt: str, tmp_path) -> None:  # noqa: ANN001
    """One epoch of 4 steps, a checkpoint, then a new module and optimizer resumed from it for the second
    epoch: the same parameters as two uninterrupted epochs."""
    straight = Module(opt)
    _fit(straight, max_epochs=2, limit_train_batches=4)
    first = Module(opt)
    trainer = _fit(first, limit_train_batches=4)
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Module(opt)
    trainer = _fit(resumed, max_epochs=2, limit_train_batches=4, ckpt_path=str(ckpt))
    assert trainer.optimizers[0].steps == 8
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("opt", ["kfac", "kbfgs"])
def test_a_second_fit_on_the_same_module_or_a_deepcopy(opt: str) -> None:
    """A second Trainer.fit builds a second optimizer on the same module (it takes the captured layers over);
    so does a fit on a deepcopy of a trained module."""
    module = Module(opt)
    _fit(module, limit_train_batches=2)
    clone = copy.deepcopy(module)
    assert _fit(module, limit_train_batches=2).optimizers[0].steps == 2
    assert _fit(clone, limit_train_batches=2).optimizers[0].steps == 2
