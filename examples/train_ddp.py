"""Data-parallel training with a fastcurv optimizer: a small deep autoencoder under DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py                      # K-FAC, 3 epochs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --optimizer newton-cg --epochs 1

CPU processes use the gloo backend; with one GPU per process (``torchrun --nproc_per_node=<GPUs>``) NCCL.
Every optimizer is built from the model alone and trains with the same LBFGS-style closure. Every rank prints
nothing but rank 0, which prints the loss per epoch (the global mean for the Newton-type methods, rank 0's
local mean for the others) and the optimizer's health counters, and saves a checkpoint
whose optimizer state restores on any world size (the state is replicated). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG


def loss_fn(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli reconstruction loss: summed over pixels, mean over the (local) batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def make_optimizer(name: str, ddp: nn.Module) -> torch.optim.Optimizer:
    """The optimizer, built from the DDP wrapper alone (the layers are found inside ``.module``)."""
    if name == "kfac":
        return KFAC(ddp, lr=0.3, damping=0.3, distributed="owner")  # factorisations split over the ranks
    if name == "kbfgs":
        return KBFGS(ddp, lr=0.3, damping=0.7)
    if name == "kbfgsl":
        return KBFGSL(ddp, lr=0.3, damping=0.7)
    if name == "newton-cg":
        return NewtonCG(ddp, method="ggn", damping=1.0, max_cg_iters=10)
    if name == "block-hf":
        return BlockHF(ddp, damping=1.0, max_cg_iters=10)
    if name == "exact-newton":
        return ExactNewton(ddp, lr=0.5, damping=1.0)
    raise ValueError(f"unknown optimizer {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="kfac",
                    choices=["kfac", "kbfgs", "kbfgsl", "newton-cg", "block-hf", "exact-newton"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--checkpoint", default="checkpoint.pt", help="written by rank 0 at the end ('' = none)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    g = torch.Generator().manual_seed(0)  # the same data on every rank; the sampler splits it
    X = torch.sigmoid(4 * torch.randn(4096, 8, generator=g) @ torch.randn(8, 64, generator=g) / 8**0.5)
    data = TensorDataset(X)
    sampler = DistributedSampler(data, shuffle=True, drop_last=True)
    loader = DataLoader(data, batch_size=256, sampler=sampler)  # 256 per rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32),
                          nn.Tanh(), nn.Linear(32, 64)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = make_optimizer(args.optimizer, ddp)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for (x,) in loader:
            x = x.to(device)

            def closure() -> torch.Tensor:  # the torch.optim protocol, the same for every optimizer
                opt.zero_grad()
                loss = loss_fn(ddp(x), x)
                loss.backward()
                return loss

            # DDP (or, for the Newton-type methods, the optimizer) averages the gradients; the optimizer
            # reduces its curvature (statistics or products) over the ranks
            loss = opt.step(closure)
            total += float(loss)
            batches += 1
        if rank == 0:
            print(f"epoch {epoch}: mean loss {total / batches:.3f}  counters {opt.counters()}", flush=True)
    if rank == 0 and args.checkpoint:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.checkpoint)
    dist.barrier()  # every rank finishes before any tears its process group down (gloo aborts otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
