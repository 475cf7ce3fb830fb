"""Data-parallel training (fastcurv.distributed): 2 CPU processes on the gloo backend, DDP-wrapped models.

Process start-up is slow (a fresh interpreter imports torch and fastcurv), so one spawn runs every
equivalence / consistency / checkpoint check (`_job_main`) while the parent computes the single-process
references, and a second spawn checks that a failing rank makes the other fail instead of hanging.
Everything listens on 127.0.0.1 only, the process groups have short timeouts and every join is bounded.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastcurv import distributed as fdist
from fastcurv.optim import KBFGS, KBFGSL, KFAC, BlockHF, ExactNewton, NewtonCG

D64 = torch.float64
WORLD = 2
N_GLOBAL = 16
STEPS = 5
PG_TIMEOUT_S = 30  # gloo collectives give up after this (the failure test uses a shorter one)
JOIN_TIMEOUT_S = 150


# ============================================================================================================
# the problem: a small conv + linear net with a LayerNorm (fallback), float64
# ============================================================================================================
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(27, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(self.norm(torch.tanh(self.fc1(h))))


def _model(v: str = "kfac") -> nn.Module:
    torch.manual_seed(0)
    if v.startswith("exact"):  # ExactNewton: an nn.Sequential MLP (Flatten is allowed before the first Linear)
        return nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.Tanh(), nn.Linear(8, 6)).to(D64)
    return _Net().to(D64)


def _batches(nan_step: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(STEPS + 3):
        x = torch.randn(N_GLOBAL, 2, 5, 5, generator=g, dtype=D64)
        y = torch.randn(N_GLOBAL, 6, generator=g, dtype=D64)
        if k == nan_step:
            x[N_GLOBAL - 3, 0, 0, 0] = float("nan")  # a sample of rank 1's half
        out.append((x, y))
    return out


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1).mean()  # mean over the (local) batch: DDP averages -> global mean


VARIANTS = {
    "kfac": (KFAC, dict(lr=0.3, damping=0.1, inv_every=2)),
    "kfac_eigh_pi": (KFAC, dict(lr=0.3, damping=0.1, inv_every=2, inverse="eigh", damping_split="pi")),
    "kbfgs": (KBFGS, dict(lr=0.1, damping=0.3)),
    "kbfgsl": (KBFGSL, dict(lr=0.1, damping=0.3, history=3)),
    # the Newton-type methods step with batch=(x, y): curvature products (and CG) on the global batch
    "newton_cg": (NewtonCG, dict(loss_fn=_loss, lr=0.5, damping=1.0, max_cg_iters=8)),
    "newton_cg_ggn": (NewtonCG, dict(loss_fn=_loss, method="ggn", damping=0.3, max_cg_iters=8)),
    # (curvature_batch=0.5 would take the first half of each LOCAL batch: a different set than one process)
    "block_hf": (BlockHF, dict(loss_fn=_loss, damping=0.3, max_cg_iters=8)),
    "exact_newton": (ExactNewton, dict(loss_fn="mse", lr=0.5, damping=1.0)),
    "exact_newton_sum": (ExactNewton, dict(loss_fn=nn.MSELoss(reduction="sum"), lr=0.5, damping=1.0)),
}
#: optimizers checkpointed through torch.distributed.checkpoint in the 2-rank job
DCP = ("kfac", "kbfgsl", "newton_cg", "block_hf")
NEWTON = ("newton_cg", "newton_cg_ggn", "block_hf", "exact_newton", "exact_newton_sum")
#: cases also run with unequal local batches (rank 0: 10 samples, rank 1: 6); the Newton-type methods weight
#: their gradient, loss and curvature by the local batch sizes, so this equals one process too
UNEQUAL = ("newton_cg", "block_hf", "exact_newton", "exact_newton_sum")


def _make(v: str, net: nn.Module, **kw):
    cls, base = VARIANTS[v]
    return cls(net, **{**base, **kw})

#: cases run on 2 ranks and compared with one process: (variant, mode, plain loop, NaN batch, corrupt state)
CASES = [(v, mode, False, None, None) for v in VARIANTS for mode in ("replicate", "owner") if v not in NEWTON]
CASES += [(v, "replicate", False, None, None) for v in NEWTON]
CASES += [("newton_cg", "owner", False, None, None)]  # accepted; the same as replicate for these methods
CASES += [
    ("kfac", "replicate", True, None, None),  # plain loss.backward(); opt.step() loop
    ("kfac", "owner", False, 2, 3),  # NaN sample on rank 1 at step 2; NaN put into the state at step 3
    ("kbfgs", "replicate", False, 2, 3),
    ("kbfgsl", "owner", False, 2, 3),
    ("kfac", "replicate", False, "loss1", None),  # a NaN loss on rank 1 only (its gradients are finite)
    ("kbfgsl", "replicate", False, "loss1", None),
    ("newton_cg", "replicate", False, 2, None),  # a NaN sample on rank 1: every rank skips the step
    ("block_hf", "replicate", False, 2, None),
    ("exact_newton", "replicate", False, 2, None),
    ("newton_cg_ggn", "replicate", False, "loss1", None),
    ("exact_newton", "replicate", False, "loss1", None),
]


def _case_name(case: tuple) -> str:
    v, mode, plain, nan, bad = case
    return f"{v}-{mode}" + ("-plain" if plain else "") + (f"-nan{nan}-bad{bad}" if nan is not None else "")


def _corrupt(opt, kind: str) -> None:
    """Put a NaN into the first layer's state (a factor for K-FAC, H_g / the L-BFGS memory for K-BFGS)."""
    w = next(p for p in opt.param_groups[0]["params"] if p in opt._method)
    st = opt.state[w]
    key = "A" if "A_inv" in st or "QA" in st else ("H_g" if "H_g" in st else "lbfgs_left")
    st[key][0, 0] = float("nan")


def _state(opt) -> dict:
    params = opt.param_groups[0]["params"]
    return {(i, k): v.detach().clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}


def _run(
    case: tuple, net: nn.Module, rank: int | None, steps: int = STEPS, opt=None, start: int = 0,
    split: tuple[int, int] = (N_GLOBAL // WORLD, N_GLOBAL // WORLD), **kw,
):
    """``steps`` steps of ``case`` on ``net`` (DDP-wrapped when ``rank`` is given); ``rank`` None = one
    process on the whole batch, else the rank's part (``split``: the local batch sizes)."""
    v, mode, plain, nan, bad = case
    if opt is None:
        opt = _make(v, net, distributed=mode, **kw) if rank is not None else _make(v, net)
    batches = _batches(nan if isinstance(nan, int) else None)
    nan_loss = int(nan[4:]) if isinstance(nan, str) else None
    loss_fn = VARIANTS[v][1].get("loss_fn", _loss)
    loss_fn = _loss if isinstance(loss_fn, str) else loss_fn
    for k in range(start, start + steps):
        x, y = batches[k]
        if rank is not None:
            lo = sum(split[:rank])
            x, y = x[lo : lo + split[rank]], y[lo : lo + split[rank]]
        if k == bad:  # replicated corruption (e.g. a bad checkpoint): every rank repairs the same way
            _corrupt(opt, v)
        if plain:
            opt.zero_grad()
            _loss(net(x), y).backward()
            opt.step()
        elif k == nan_loss and rank in (None, 1):
            closure = lambda: loss_fn(net(x), y) + float("nan")  # noqa: E731  (only the loss value is NaN)
            opt.step(closure, batch=(x, y)) if v.startswith(("newton", "block")) else opt.step(closure)
        elif v in NEWTON:
            opt.step(batch=(x, y))
        else:
            opt.step(lambda: _loss(net(x), y))
    return opt


def _warm(v: str, net: nn.Module, rank: int | None):
    """An optimizer warm-started on two batches (the rank's halves), then 2 steps."""
    opt = _make(v, net) if rank is None else _make(v, net, distributed="replicate")
    n = N_GLOBAL // WORLD
    sl = slice(None) if rank is None else slice(rank * n, (rank + 1) * n)
    batches = _batches()
    opt.warm_start([lambda b=b: _loss(net(b[0][sl]), b[1][sl]) for b in batches[-2:]])
    return _run((v, "replicate", False, None, None), net, rank, steps=2, opt=opt)


def _lm(opt) -> list[torch.Tensor]:
    """The running Levenberg-Marquardt damping of NewtonCG / BlockHF (state outside ``opt.state``)."""
    return [opt.lm_damping.detach().clone().reshape(1)] if hasattr(opt, "lm_damping") else []


def _summary(opt) -> dict:
    return {
        "params": [p.detach().clone() for p in opt.param_groups[0]["params"]],
        "state": {**_state(opt), **{("lm", i): t for i, t in enumerate(_lm(opt))}},
        "counters": opt.counters(),
    }


# ============================================================================================================
# process plumbing
# ============================================================================================================
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, outdir: str, job: str, pg_timeout: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    out = Path(outdir)
    try:
        result = JOBS[job](rank, out)
        torch.save(result, out / f"result{rank}.pt")
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(3)  # no destroy_process_group: the peer may be gone
    dist.destroy_process_group()


def _start(job: str, outdir: Path, pg_timeout: float = PG_TIMEOUT_S) -> list:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, port, str(outdir), job, pg_timeout), daemon=True) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    return procs


def _join(procs: list, timeout: float) -> tuple[list[int | None], bool]:
    """Wait for every process (bounded); kill the stragglers. Returns (exit codes, whether any was killed)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(10)
    return [p.exitcode for p in procs], bool(hung)


def _errors(outdir: Path) -> str:
    return "\n".join(f.read_text() for f in sorted(outdir.glob("error*.txt")))


# ============================================================================================================
# jobs (run in each rank)
# ============================================================================================================
def _job_main(rank: int, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    import warnings

    comm = fdist.communicator()
    assert comm is not None and comm.world_size == WORLD and comm.rank == rank
    res: dict = {"cases": {}, "diverge": {}}
    with warnings.catch_warnings(record=True) as caught:  # a group but no DDP wrapper: warned; "off": silent
        warnings.simplefilter("always")
        KFAC(_model())
        res["warned"] = [str(w.message) for w in caught]
        off = KBFGS(_model(), distributed="off")
        res["off"] = off._comm is None and len(caught) == 1
        # the Newton-type methods reduce their gradients themselves: no DDP wrapper needed (and no warning),
        # but the ranks must start from the same parameters
        NewtonCG(_model(), _loss)
        res["newton_plain_warned"] = len(caught) - 1
    model = _model()
    if rank == 1:
        with torch.no_grad():
            model.fc1.bias.add_(1.0)
    try:
        BlockHF(model, _loss)
        res["differ"] = "no error"
    except ValueError as e:
        res["differ"] = str(e)
    for case in CASES:
        name = _case_name(case)
        opt = _run(case, DDP(_model(case[0])), rank)
        ts = [p.detach() for p in opt.param_groups[0]["params"]] + list(_state(opt).values()) + _lm(opt)
        res["diverge"][name] = comm.max_abs_diff([t.double() for t in ts])
        res["counters_equal", name] = comm.max_abs_diff(
            [torch.tensor(list(opt.counters().values()), dtype=D64)]
        )
        res["cases"][name] = _summary(opt)
        if case[1:] == ("replicate", False, None, None):
            torch.save(opt.state_dict(), out / f"sd-{case[0]}-{rank}.pt")
    for v in UNEQUAL:  # rank 0 holds 10 samples, rank 1 holds 6; a plain (not DDP-wrapped) model for one
        net = _model(v) if v == "block_hf" else DDP(_model(v))
        opt = _run((v, "replicate", False, None, None), net, rank, split=(10, 6))
        res["cases"][f"{v}-unequal"] = _summary(opt)
    # torch.compile of the optimizer's update together with DDP (K-FAC's compiled phases, gloo)
    opt = _run(("kfac", "replicate", False, None, None), DDP(_model()), rank, compile=True)
    res["cases"]["kfac-compiled"] = _summary(opt)

    group = dist.new_group(ranks=list(range(WORLD)))  # an explicit process group
    for v in ("kfac", "kbfgsl"):
        opt = _run((v, "owner", False, None, None), DDP(_model(), process_group=group), rank, process_group=group)
        assert opt._comm is not None and opt._comm.group is group
        res["cases"][f"group-{v}"] = _summary(opt)

    for v in ("kfac", "kbfgs"):  # warm start: K-BFGS's forward-only passes run under DDP's no_sync
        res["cases"][f"warm-{v}"] = _summary(_warm(v, DDP(_model()), rank))

    # K-FAC with the sampled Fisher: every rank draws its own targets, the statistics are still reduced
    model = _model()
    net = DDP(model)
    opt = KFAC(net, lr=0.3, damping=0.1, inv_every=2, fisher="sampled", likelihood="gaussian", seed=7 + rank)
    x, y = _batches()[0]
    x, y = x[rank * 8 : rank * 8 + 8], y[rank * 8 : rank * 8 + 8]

    def closure():
        o = net(x)
        return _loss(o, y), o

    for _ in range(3):
        opt.step(closure)
    ts = [p.detach() for p in model.parameters()] + list(_state(opt).values())
    res["diverge"]["kfac-sampled"] = comm.max_abs_diff(ts)
    res["sampled_finite"] = all(bool(torch.isfinite(t).all()) for t in ts)

    # torch.distributed.checkpoint: save the optimizer state dict, load it into a fresh optimizer on each rank
    res["dcp"] = {}
    for v in DCP:
        case = (v, "owner", False, None, None)
        model = _model()
        net = DDP(model)
        opt = _run(case, net, rank, steps=3)
        ckpt = out / f"dcp-{v}"
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(ckpt))
        model2 = _model()
        model2.load_state_dict(model.state_dict())
        net2 = DDP(model2)
        opt2 = _make(v, net2, distributed="owner", lr=0.01)
        sd = {"optim": opt2.state_dict()}
        dcp.load(sd, checkpoint_id=str(ckpt))
        opt2.load_state_dict(sd["optim"])
        a, b = _state(opt), _state(opt2)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same &= opt.counters() == opt2.counters()
        same &= all(torch.equal(a, b) for a, b in zip(_lm(opt), _lm(opt2)))
        same &= float(opt2.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"])
        _run(case, net, rank, steps=2, opt=opt, start=3)  # both go on: identical steps
        _run(case, net2, rank, steps=2, opt=opt2, start=3)
        same &= all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
        res["dcp"][v] = same
    return res


def _job_raise(rank: int, out: Path) -> dict:
    """Rank 1 raises inside its closure at the third step; rank 0 is then left waiting in a collective."""
    model = _model()
    net = DDP(model)
    opt = KFAC(net, lr=0.3, damping=0.1)
    x, y = _batches()[0]
    for k in range(5):

        def closure():
            if rank == 1 and k == 2:
                raise RuntimeError("injected failure on rank 1")
            return _loss(net(x[rank * 8 : rank * 8 + 8]), y[rank * 8 : rank * 8 + 8])

        opt.step(closure)
    return {}


def _job_raise_newton(rank: int, out: Path) -> dict:
    """As ``_job_raise`` for NewtonCG: rank 0 is left in the optimizer's own gradient all-reduce."""
    net = DDP(_model())
    opt = NewtonCG(net, _loss, max_cg_iters=4)
    x, y = _batches()[0]
    x, y = x[rank * 8 : rank * 8 + 8], y[rank * 8 : rank * 8 + 8]
    for k in range(5):

        def closure():
            if rank == 1 and k == 2:
                raise RuntimeError("injected failure on rank 1")
            return _loss(net(x), y)

        opt.step(closure, batch=(x, y))
    return {}


JOBS = {"main": _job_main, "raise": _job_raise, "raise-newton_cg": _job_raise_newton}


# ============================================================================================================
# tests
# ============================================================================================================
@pytest.mark.filterwarnings("ignore:.*corrupted from outside the step:RuntimeWarning")
def test_two_ranks_equal_one_process_and_never_diverge(tmp_path: Path) -> None:
    procs = _start("main", tmp_path)
    try:  # the single-process references are computed while the ranks run
        refs = {_case_name(c): _summary(_run(c, _model(c[0]), None)) for c in CASES}
        warm = {f"warm-{v}": _summary(_warm(v, _model(), None)) for v in ("kfac", "kbfgs")}
        # checkpoints: continue rank 1's replicated state in one process == the uninterrupted single run
        cont = {}
        for v in VARIANTS:
            case = (v, "replicate", False, None, None)
            ref = _run(case, _model(v), None, steps=STEPS + 2)
            cont[v] = (case, ref)
    finally:
        codes, hung = _join(procs, JOIN_TIMEOUT_S)
    assert not hung and codes == [0, 0], f"exit codes {codes}, hung={hung}\n{_errors(tmp_path)}"
    res = [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(WORLD)]

    for name, ref in refs.items():
        assert res[0]["diverge"][name] == 0.0, f"{name}: ranks diverged by {res[0]['diverge'][name]}"
        assert res[0]["counters_equal", name] == 0.0, name
        got = res[1]["cases"][name]
        for p, q in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        assert got["state"].keys() == ref["state"].keys()
        for k, t in ref["state"].items():
            torch.testing.assert_close(got["state"][k], t, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {k}: {m}")
            assert torch.isfinite(got["state"][k]).all()
        assert got["counters"] == ref["counters"], name
        if "loss" in name:
            assert got["counters"]["skipped_steps"] == 1 and got["counters"]["state_resets"] == 0, name
        elif "nan" in name and "bad3" in name:  # K-FAC repairs a bad factor in the step, K-BFGS skips it too
            assert got["counters"]["skipped_steps"] == (1 if "kfac" in name else 2), name
            assert got["counters"]["state_resets"] == 1, name
        elif "nan" in name:  # a NaN sample on rank 1 only: every rank skipped that step
            assert got["counters"]["skipped_steps"] == 1 and got["counters"]["steps"] == STEPS - 1, name

    more = {f"{v}-unequal": refs[f"{v}-replicate"] for v in UNEQUAL}
    more["kfac-compiled"] = refs["kfac-replicate"]
    for name, ref in more.items():  # unequal local batches, and compile + DDP: still the one-process run
        for r in range(WORLD):
            got = res[r]["cases"][name]
            for p, q in zip(got["params"], ref["params"]):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} rank {r}: {m}")
            assert got["state"].keys() == ref["state"].keys(), name
            for k, t in ref["state"].items():
                torch.testing.assert_close(got["state"][k], t, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
            assert got["counters"] == ref["counters"], name

    for v in ("kfac", "kbfgsl"):
        warm[f"group-{v}"] = refs[f"{v}-owner"]
    for name, ref in warm.items():
        got = res[1]["cases"][name]
        for p, q in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        for k, t in ref["state"].items():
            torch.testing.assert_close(got["state"][k], t, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {k}: {m}")
    assert res[0]["diverge"]["kfac-sampled"] == 0.0 and res[0]["sampled_finite"]
    assert len(res[0]["warned"]) == 1 and "DistributedDataParallel" in res[0]["warned"][0] and res[0]["off"]
    assert res[0]["newton_plain_warned"] == 0
    assert "start from different parameters" in res[0]["differ"] and "different" in res[1]["differ"], res[0]["differ"]
    for r in range(WORLD):
        assert res[r]["dcp"] == {v: True for v in DCP}, res[r]["dcp"]

    for v, (case, ref) in cont.items():
        sds = [torch.load(tmp_path / f"sd-{v}-{r}.pt", weights_only=False) for r in range(WORLD)]
        a, b = sds
        assert a["fastcurv"]["counters"] == b["fastcurv"]["counters"]
        for i in a["state"]:
            for k in a["state"][i]:
                assert torch.equal(a["state"][i][k], b["state"][i][k]), (v, i, k)  # every rank holds the same
        model = _model(v)
        with torch.no_grad():
            for p, q in zip(model.parameters(), res[1]["cases"][_case_name(case)]["params"]):
                p.copy_(q)
        opt = _make(v, model)
        opt.load_state_dict(b)  # saved by 2 ranks, loaded in 1 process
        _run(case, model, None, steps=2, opt=opt, start=STEPS)
        for p, q in zip(model.parameters(), ref.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("job", ["raise", "raise-newton_cg"])
def test_failing_rank_makes_the_other_fail_not_hang(tmp_path: Path, job: str) -> None:
    procs = _start(job, tmp_path, pg_timeout=5)
    codes, hung = _join(procs, 60)
    assert not hung, "a rank hung instead of failing"
    assert codes[1] != 0 and codes[0] != 0, codes
    errs = {r: (tmp_path / f"error{r}.txt").read_text() for r in range(WORLD)}
    assert "injected failure on rank 1" in errs[1]
    assert "Traceback" in errs[0] and "injected" not in errs[0]


# ------------------------------------------------------------------------------------------------------------
# single-process pieces: owner assignment, group detection, world size 1 is bitwise the plain code
# ------------------------------------------------------------------------------------------------------------
def test_assign_owners_is_balanced_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(0, 12, (1,), generator=g))
        w = int(torch.randint(1, 5, (1,), generator=g))
        costs = (torch.randint(1, 50, (n,), generator=g).double() ** 3).tolist()
        owners = fdist.assign_owners(costs, w)
        assert owners == fdist.assign_owners(list(costs), w)
        assert all(0 <= r < w for r in owners) and len(owners) == n
        load = [sum(c for c, r in zip(costs, owners) if r == k) for k in range(w)]
        if costs:  # list-scheduling bound: makespan <= total / W + max cost
            assert max(load) <= sum(costs) / w + max(costs) + 1e-9
        if n >= w:
            assert all(x > 0 for x in load)  # LPT never leaves a rank idle when there are enough tasks
    assert fdist.assign_owners([8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [0] + [1] * 8
    with pytest.raises(ValueError, match="world_size"):
        fdist.assign_owners([1.0], 0)


def test_group_detection_and_world_size_one_is_bitwise_single_process() -> None:
    assert not dist.is_initialized()
    assert fdist.communicator() is None and fdist.communicator("owner") is None
    with pytest.raises(ValueError, match="distributed must be one of"):
        fdist.communicator("sharded")
    with pytest.raises(ValueError, match="distributed must be one of"):
        KFAC(_model(), distributed="sharded")
    with pytest.raises(ValueError, match="not initialized"):
        fdist.communicator("replicate", group=object())
    assert fdist.unwrap(_model()).__class__ is _Net and not fdist.is_ddp(_model())

    case = ("kbfgsl", "owner", False, None, None)
    alone = _summary(_run(case, _model(), None, steps=3))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        assert fdist.communicator() is None  # one process: the plain code path
        model = _model()
        net = DDP(model)  # wrapped: the layers are found inside .module, pass 2 runs under no_sync
        opt = _make("kbfgsl", net, distributed="owner")
        assert opt._comm is None and "module.fc1" in opt.describe()
        batches = _batches()
        for k in range(3):
            x, y = batches[k]
            opt.step(lambda: _loss(net(x), y))
        got = _summary(opt)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(p, q) for p, q in zip(got["params"], alone["params"]))
    assert all(torch.equal(got["state"][k], alone["state"][k]) for k in alone["state"])
    assert got["counters"] == alone["counters"]
