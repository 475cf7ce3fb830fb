r"""Data-parallel training for the fastcurv optimizers: the only module that calls :mod:`torch.distributed`.

Optimizers stay single-process code; they hand this module the tensors to reduce or share, and it issues
few, bucketed collectives (one flat buffer per dtype). With no process group (or a group of one process)
:func:`communicator` returns ``None`` and the optimizers run exactly their single-process code (bitwise).

Scale of the per-sample gradient under DDP
------------------------------------------
Rank :math:`r` of :math:`W` sees a local batch of :math:`n_r` samples and its loss is the local mean
:math:`L_r = \frac1{n_r}\sum_{i\in B_r}\ell_i`. DDP averages gradients, :math:`\frac1W\sum_r\nabla L_r`,
which is the gradient of the mean over the global batch when the :math:`n_r` are equal. The capture builds
:math:`g_i = n_r\,\partial L_r/\partial h_i = \partial\ell_i/\partial h_i` with the **local** batch size
(``x.shape[0]`` of the forward call), i.e. the per-sample gradient, exactly what one process computes on
the whole batch (:math:`N\,\partial L/\partial h_i` with :math:`N=\sum_r n_r` and :math:`L` the global
mean). So nothing is rescaled; using the global batch size instead would scale :math:`G` by :math:`W^2`.
The statistics are row means, so the global statistic is the row-count-weighted mean of the local ones:

.. math::
    A = \frac{\sum_r n^A_r A_r}{\sum_r n^A_r},\qquad \bar h = \frac{\sum_r n^h_r \bar h_r}{\sum_r n^h_r},
    \ \dots

which :meth:`Communicator.weighted_mean_` computes with one all-reduce per dtype (sums of
:math:`n_r A_r`, and of the int64 counters). It is the statistic of the concatenated global batch even
when the local batches differ in size (then DDP's gradient is a mean of means, not the global mean; the
statistics are still exact).

Work assignment (KAISA's idea)
------------------------------
``distributed="replicate"`` (default): every rank computes every inverse / factor update from the same
reduced statistics (no further communication; ranks stay bitwise identical because they run the same
deterministic code on the same bits). ``distributed="owner"``: each expensive per-layer task gets one owner
rank (:func:`assign_owners`, greedy longest-processing-time by cost, :math:`d^3` for factorisations,
:math:`d^2` for BFGS updates); owners compute their tasks and :meth:`Communicator.share_from_owners_`
distributes the results with one ``all_gather`` per dtype (bitwise copies, so ranks stay identical).

Newton-type methods
-------------------
``NewtonCG``, ``BlockHF`` and ``ExactNewton`` reduce their own gradients (inside DDP's ``no_sync``),
curvature-vector products and losses, weighted by the local batch sizes (:meth:`Communicator.all_reduce_sum_`
and, overlapped with computation, :meth:`Communicator.start_sum_`): see their module docstrings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "MODES",
    "Communicator",
    "PendingSum",
    "communicator",
    "assign_owners",
    "unwrap",
    "no_sync",
    "is_ddp",
]

#: Values of the optimizers' ``distributed=`` argument.
MODES: tuple[str, ...] = ("replicate", "owner", "off")


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    r"""Owner rank of each task: greedy longest-processing-time scheduling.

    Tasks are taken by decreasing cost (ties: lower index first) and each goes to the rank with the least
    total cost so far (ties: lower rank). Deterministic, so every rank computes the same assignment. The
    makespan is at most :math:`\tfrac43` of the optimum (Graham's bound).

    Args:
        costs: non-negative cost of each task (e.g. :math:`d^3` of a factor to invert).
        world_size: number of ranks :math:`W \ge 1`.

    Returns:
        ``owners[i]`` in ``range(world_size)`` for each task ``i``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += float(costs[i])
    return owners


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`torch.nn.parallel.DistributedDataParallel` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model.module``), or ``model`` itself."""
    return model.module if is_ddp(model) else model


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """``model.no_sync()`` for a DDP wrapper (backward passes inside do not all-reduce gradients), else a
    no-op context. K-BFGS runs its second evaluation (which only needs the layers' output gradients, not
    parameter gradients) inside it."""
    return model.no_sync() if is_ddp(model) else contextlib.nullcontext()


def _by_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


class PendingSum:
    """Handle of a background sum started by :meth:`Communicator.start_sum_`."""

    def __init__(self, works: list[Any], jobs: list[tuple[list[Tensor], Tensor]]) -> None:
        self._works, self._jobs = works, jobs

    def wait(self) -> None:
        """Wait for the collectives and copy the sums into the tensors (idempotent)."""
        for w in self._works:
            if w is not None:
                w.wait()
        for ts, buf in self._jobs:
            off = 0
            for t in ts:
                n = t.numel()
                t.copy_(buf[off : off + n].view_as(t))
                off += n
        self._works, self._jobs = [], []


class Communicator:
    r"""Collectives on the optimizer state over one process group (built by :func:`communicator`).

    Attributes:
        group: the process group (None = the default group).
        rank, world_size: this process's rank in ``group`` and the group's size (> 1).
        mode: ``"replicate"`` or ``"owner"`` (see the module docstring).
    """

    def __init__(self, group: Any, mode: str) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.mode = mode

    @property
    def owner_mode(self) -> bool:
        return self.mode == "owner"

    # -------------------------------------------------------------------------------------- reductions
    def _wait(self, works: list[Any]) -> None:
        for w in works:
            if w is not None:
                w.wait()

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """In place: every tensor becomes its sum over the ranks. One flattened all-reduce per dtype/device
        (issued asynchronously, then waited on together)."""
        self.start_sum_(tensors).wait()

    def start_sum_(self, tensors: Sequence[Tensor]) -> PendingSum:
        """Start :meth:`all_reduce_sum_` without waiting: the collectives run in the background (gloo's
        worker threads, NCCL's stream) while the caller computes; :meth:`PendingSum.wait` writes the sums
        into ``tensors``, which must not be read or written before that. Used to overlap a block's reduction
        with the next block's curvature product."""
        works, jobs = [], []
        for idx in _by_dtype(tensors).values():
            ts = [tensors[i] for i in idx]
            buf = torch.cat([t.reshape(-1) for t in ts]) if len(ts) > 1 else ts[0].reshape(-1).clone()
            works.append(dist.all_reduce(buf, group=self.group, async_op=True))
            jobs.append((ts, buf))
        return PendingSum(works, jobs)

    def weighted_mean_(
        self,
        means: Sequence[Tensor],
        weights: Sequence[Tensor],
        counters: Sequence[Tensor] = (),
    ) -> None:
        r"""In place: each ``means[i]`` (a mean over ``weights[i]`` rows on this rank) becomes the mean over
        all ranks' rows, :math:`\bar x = \sum_r w_r\bar x_r / \sum_r w_r` (unchanged zeros when no rank has
        rows); every counter in ``weights`` and ``counters`` (int64, summed once even if listed twice)
        becomes its sum over ranks. A non-finite statistic on one rank makes the result non-finite on every
        rank. One all-reduce per dtype.
        """
        if len(means) != len(weights):
            raise ValueError(f"means and weights must have the same length, got {len(means)} and {len(weights)}")
        ints: list[Tensor] = []
        seen: set[int] = set()
        for c in list(weights) + list(counters):
            if id(c) not in seen:
                seen.add(id(c))
                ints.append(c)
        scaled = [m * w.to(m.dtype).reshape(()) for m, w in zip(means, weights)]
        self.all_reduce_sum_(scaled + ints)
        for m, w, s in zip(means, weights, scaled):
            tot = w.to(m.dtype).reshape(())
            m.copy_(torch.where(tot > 0, s / torch.clamp(tot, min=1), torch.zeros_like(s)))

    def all_true(self, flags: Tensor) -> Tensor:
        """Consensus on a bool vector: entry ``i`` is True iff it is True on every rank (one all-reduce).
        The optimizers pass their finiteness flags through it, so every rank takes the same branch (skip,
        repair, update) even when only one rank saw a non-finite value."""
        bad = (~flags.bool()).to(torch.int32)
        dist.all_reduce(bad, group=self.group)
        return bad == 0

    def all_sum_ints(self, values: Sequence[int]) -> list[int]:
        """Sum of host integers (e.g. counter increments made only on owner ranks) over the ranks."""
        if not values:
            return []
        t = torch.tensor(list(values), dtype=torch.int64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.tolist()]

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -------------------------------------------------------------------------------------- owner mode
    def owners(self, costs: Sequence[float]) -> list[int]:
        """:func:`assign_owners` over this group's size."""
        return assign_owners(costs, self.world_size)

    def share_from_owners_(self, tensors: Sequence[Tensor], owners: Sequence[int]) -> None:
        r"""In place: every rank's ``tensors[i]`` becomes owner ``owners[i]``'s (bitwise).

        Each rank packs the tensors it owns into one flat buffer per dtype (padded to the longest rank's),
        one ``all_gather`` per dtype exchanges them, and each rank unpacks the others' — as cheap as one
        broadcast per owner, in one collective.
        """
        if len(tensors) != len(owners):
            raise ValueError(f"tensors and owners must have the same length, got {len(tensors)} and {len(owners)}")
        W = self.world_size
        works, jobs = [], []
        for idx in _by_dtype(tensors).values():
            sizes = [0] * W
            for i in idx:
                sizes[owners[i]] += tensors[i].numel()
            width = max(sizes)
            if width == 0:
                continue
            t0 = tensors[idx[0]]
            mine = [tensors[i].reshape(-1) for i in idx if owners[i] == self.rank]
            send = torch.zeros(width, dtype=t0.dtype, device=t0.device)
            if mine:
                flat = torch.cat(mine)
                send[: flat.numel()] = flat
            recv = [torch.empty(width, dtype=t0.dtype, device=t0.device) for _ in range(W)]
            works.append(dist.all_gather(recv, send, group=self.group, async_op=True))
            jobs.append((idx, recv))
        self._wait(works)
        for idx, recv in jobs:
            offs = [0] * W
            for i in idx:
                r, t = owners[i], tensors[i]
                n = t.numel()
                if r != self.rank:
                    t.copy_(recv[r][offs[r] : offs[r] + n].view_as(t))
                offs[r] += n

    # -------------------------------------------------------------------------------------- checks
    def max_abs_diff(self, tensors: Sequence[Tensor]) -> float:
        r""":math:`\max_{r,i}\lVert t_i^{(r)} - t_i^{(0)}\rVert_\infty`: how far the ranks' copies of
        ``tensors`` are from rank 0's (0.0 = bitwise identical, inf where a difference is NaN). For tests and
        health checks (e.g. after loading a checkpoint); one broadcast per dtype and one all-reduce."""
        ref = [t.detach().clone() for t in tensors]
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for idx in _by_dtype(ref).values():
            flat = torch.cat([ref[i].reshape(-1) for i in idx])
            dist.broadcast(flat, src=src, group=self.group)
            off = 0
            for i in idx:
                n = ref[i].numel()
                ref[i] = flat[off : off + n].view_as(ref[i])
                off += n
        diffs = [(t.detach().double() - r.double()).abs().max().cpu() for t, r in zip(tensors, ref) if t.numel()]
        diffs = [torch.nan_to_num(d, nan=float("inf")) for d in diffs]
        m = torch.stack(diffs).max().reshape(1) if diffs else torch.zeros(1, dtype=torch.float64)
        m = m.to(self._device())
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return float(m)

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, mode={self.mode!r})"


def communicator(distributed: str = "replicate", group: Any = None) -> Communicator | None:
    """The :class:`Communicator` an optimizer uses, or None for single-process behaviour.

    Args:
        distributed: ``"replicate"`` (default), ``"owner"`` or ``"off"`` (ignore any process group: each
            process optimises on its own statistics).
        group: a process group, or None for the default group. Detected with
            ``torch.distributed.is_initialized()``; None is returned when the package is unavailable, no
            group is initialised, ``distributed="off"``, or the group has one process (so one process runs
            the plain single-process code, bitwise).
    """
    if distributed not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {distributed!r}")
    if distributed == "off":
        return None
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return Communicator(group, distributed)
