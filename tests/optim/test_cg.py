"""The truncated CG shared by NewtonCG and BlockHF (fastcurv.optim._cg): exactness on SPD systems, the
disturbing-direction exit, Martens' relative-progress stop, block independence, warm starts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastcurv.optim._cg import EXIT_CODES, Segments, truncated_cg

DT = torch.float64


def _spd(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    ev = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return (q * ev) @ q.T


def _block_matvec(mats: list[torch.Tensor], seg: Segments, log: list | None = None):
    def mv(v: torch.Tensor, active) -> torch.Tensor:
        parts = v.split(seg.sizes)
        out = [m @ p for m, p in zip(mats, parts)]
        if log is not None:
            log.append((v.clone(), torch.cat(out)))
        return torch.cat(out)

    return mv


@given(
    sizes=st.lists(st.sampled_from([1, 2, 7, 33]), min_size=1, max_size=4),
    lam=st.sampled_from([0.0, 1e-3, 1.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_cg_reaches_the_direct_solve_on_random_spd_blocks(sizes, lam, scale, seed):
    """B independent SPD blocks solved together equal torch.linalg.solve of each (H_b + λI) x = c."""
    gen = torch.Generator().manual_seed(seed)
    mats = [scale * _spd(n, 50.0, gen) for n in sizes]
    seg = Segments(sizes)
    c = torch.randn(seg.n, generator=gen, dtype=DT) * scale
    res = truncated_cg(_block_matvec(mats, seg), c, seg, shift=lam, max_iters=3 * max(sizes) + 5, tol=1e-13)
    assert res.finite
    eye = [torch.eye(m.shape[0], dtype=DT) for m in mats]
    direct = torch.cat([torch.linalg.solve(m + lam * e, cb) for m, e, cb in zip(mats, eye, c.split(sizes))])
    assert torch.allclose(res.x, direct, rtol=1e-8, atol=1e-10 * direct.abs().max())
    assert all(e == "converged" for e in res.exits), res.exits
    # the tracked quantities are those of the returned x
    for b, (m, xb, cb) in enumerate(zip(mats, res.x.split(sizes), c.split(sizes))):
        assert res.cx[b] == pytest.approx(float(cb @ xb), rel=1e-9, abs=1e-12)
        assert res.xHx[b] == pytest.approx(float(xb @ m @ xb), rel=1e-7, abs=1e-9 * scale)


def test_blocks_are_independent_of_each_other():
    """Solving blocks together gives each block what solving it alone gives, with per-block iteration counts."""
    gen = torch.Generator().manual_seed(1)
    sizes = [5, 12, 3]
    mats = [_spd(n, c, gen) for n, c in zip(sizes, (10.0, 1e3, 2.0))]
    seg = Segments(sizes)
    c = torch.randn(seg.n, generator=gen, dtype=DT)
    lam = 0.1
    together = truncated_cg(_block_matvec(mats, seg), c, seg, shift=lam, max_iters=40, tol=1e-10)
    u = torch.finfo(DT).eps / 2
    for b, (m, cb) in enumerate(zip(mats, c.split(sizes))):
        s1 = Segments([sizes[b]])
        alone = truncated_cg(_block_matvec([m], s1), cb, s1, shift=lam, max_iters=40, tol=1e-10)
        # Both runs solve the same system A x = c_b (A = H_b + λI) but may round differently (BLAS picks its
        # kernel by size and alignment, so a block's products need not be bitwise equal to the block alone's).
        # Bound for any summation order: ||x_t - x_a|| <= ||A^{-1}|| (||r_t|| + ||r_a||) with the true
        # residuals r = c - A x, each computed with an error of at most gamma_{n+1} (|A||x| + |c|).
        a = m + lam * torch.eye(sizes[b], dtype=DT)
        xt, xa = together.x.split(sizes)[b], alone.x
        n = sizes[b] + 1
        gam = n * u / (1 - n * u)
        res = [float(torch.linalg.norm(cb - a @ x) + gam * torch.linalg.norm(a.abs() @ x.abs() + cb.abs())) for x in (xt, xa)]
        bound = (res[0] + res[1]) / float(torch.linalg.eigvalsh(a)[0])
        assert float(torch.linalg.norm(xt - xa)) <= bound
        assert bound <= 1e-8 * float(torch.linalg.norm(xa))  # both converged: the comparison is not vacuous
        # The stop test compares a rounded residual with a threshold, so a last-ulp difference may move the stop
        # by one iteration; a block coupled to the others would stop with them (checked below) or differ in x.
        assert abs(together.iterations[b] - alone.iterations[0]) <= 1
        assert together.exits[b] == alone.exits[0]
    assert len(set(together.iterations)) > 1  # the blocks really stopped at different iterations


def _indefinite(n: int, n_neg: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    ev = torch.cat([torch.linspace(1.0, 5.0, n - n_neg, dtype=DT), -torch.linspace(0.5, 2.0, n_neg, dtype=DT)])
    return (q * ev) @ q.T


@pytest.mark.parametrize("seed", range(6))
def test_negative_curvature_exit_fires_exactly_when_pHp_is_nonpositive(seed):
    """On an indefinite H (eps = 0, λ = 0) the solve stops at the first direction with p^T H p <= 0 and not
    before: every earlier direction had positive curvature, and the returned x is the iterate before it."""
    gen = torch.Generator().manual_seed(seed)
    n = 12
    H = _indefinite(n, 3, gen)
    seg = Segments([n])
    c = torch.randn(n, generator=gen, dtype=DT)
    log: list = []
    res = truncated_cg(_block_matvec([H], seg, log), c, seg, max_iters=50, tol=1e-14)
    curv = [float(p @ hp) for p, hp in log]
    first_bad = next(i for i, k in enumerate(curv) if k <= 0.0)  # CG on an indefinite H must meet one
    assert len(curv) == first_bad + 1  # no product after the disturbing direction
    assert all(k > 0 for k in curv[:first_bad])
    if first_bad == 0:
        assert res.exits == ["steepest_descent"]
    else:
        assert res.exits == ["negative_curvature"]
        assert res.iterations == [first_bad]
        # the returned iterate is the CG iterate after first_bad steps: rerun capped there
        capped = truncated_cg(_block_matvec([H], seg), c, seg, max_iters=first_bad, tol=1e-14)
        assert capped.exits == ["max_iters"]
        assert torch.allclose(res.x, capped.x, rtol=1e-12, atol=1e-14)
    p, hp = log[-1]
    assert res.curvature[0] == pytest.approx(float(p @ hp) / float(p @ p), rel=1e-12)


def test_disturbing_direction_at_first_iteration_returns_scaled_steepest_descent():
    """p0 = c with c^T H c = 0 exactly (eps = 0 fires on zero too): x = t c, t = |c|^2/(|c^T H c| + λ|c|^2)."""
    H = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    c = torch.tensor([2.0, 0.0], dtype=DT)
    seg = Segments([2])
    for lam, t in ((0.0, 1.0), (0.5, 4.0 / (0.5 * 4.0))):
        res = truncated_cg(_block_matvec([H], seg), c, seg, shift=lam, max_iters=10)
        assert res.exits == ["steepest_descent"]
        assert torch.allclose(res.x, t * c)
        assert res.iterations == [0]
    # strictly negative first curvature: t uses |c^T H c|
    Hn = -torch.eye(2, dtype=DT) * 3.0
    res = truncated_cg(_block_matvec([Hn], seg), c, seg, shift=1.0, max_iters=10)
    assert res.exits == ["steepest_descent"]
    assert torch.allclose(res.x, c * (4.0 / (12.0 + 4.0)))
    # with eps > 0 a small positive curvature counts as disturbing as well
    Hs = torch.eye(2, dtype=DT) * 1e-3
    assert truncated_cg(_block_matvec([Hs], seg), c, seg, eps=1e-2, max_iters=10).exits == ["steepest_descent"]
    assert truncated_cg(_block_matvec([Hs], seg), c, seg, eps=1e-4, max_iters=10).exits == ["converged"]


def test_spd_system_never_triggers_the_disturbing_exit():
    gen = torch.Generator().manual_seed(3)
    H = _spd(20, 1e4, gen)
    seg = Segments([20])
    c = torch.randn(20, generator=gen, dtype=DT)
    res = truncated_cg(_block_matvec([H], seg), c, seg, max_iters=200, tol=1e-12)
    assert res.exits == ["converged"]


def test_martens_relative_progress_stop_matches_its_definition():
    """q_i (the damped model after i iterations) from capped reruns; the solve must stop at the first i with
    i > k = max(10, i // 10), q_i < 0 and (q_i - q_{i-k}) / q_i < progress_tol."""
    gen = torch.Generator().manual_seed(4)
    n = 150
    H = _spd(n, 1e6, gen)  # ill-conditioned: slow, steady progress
    seg = Segments([n])
    c = torch.randn(n, generator=gen, dtype=DT)
    mv = _block_matvec([H], seg)
    tol = 0.1  # stops after ~90 iterations here (k = max(10, i // 10) grows past 10)
    res = truncated_cg(mv, c, seg, max_iters=400, progress_tol=tol)
    assert res.exits == ["progress"]
    stop = res.iterations[0]
    assert stop > 10
    q = [0.0] + [float(truncated_cg(mv, c, seg, max_iters=i).model_value[0]) for i in range(1, stop + 1)]

    def fires(i: int) -> bool:
        k = max(10, i // 10)
        return i > k and q[i] < 0 and (q[i] - q[i - k]) / q[i] < tol

    assert fires(stop)
    assert not any(fires(i) for i in range(1, stop))
    assert float(res.model_value[0]) == pytest.approx(q[stop], rel=1e-10)


def test_warm_start_and_zero_right_hand_side():
    gen = torch.Generator().manual_seed(5)
    H = _spd(9, 10.0, gen)
    seg = Segments([9])
    c = torch.randn(9, generator=gen, dtype=DT)
    exact = torch.linalg.solve(H, c)
    # starting at the solution: converged after the one product that forms the residual
    res = truncated_cg(_block_matvec([H], seg), c, seg, x0=exact.clone(), max_iters=5, tol=1e-10)
    assert res.exits == ["converged"] and res.iterations == [0] and res.matvecs == 1
    assert torch.allclose(res.x, exact)
    # a warm start still converges to the same solution
    res = truncated_cg(_block_matvec([H], seg), c, seg, x0=0.3 * exact, max_iters=30, tol=1e-12)
    assert torch.allclose(res.x, exact, rtol=1e-9, atol=1e-12)
    # zero right-hand side: x = 0 with no product at all
    res = truncated_cg(_block_matvec([H], seg), torch.zeros(9, dtype=DT), seg, max_iters=5)
    assert res.exits == ["converged"] and res.matvecs == 0 and bool((res.x == 0).all())


def test_nonfinite_curvature_aborts():
    seg = Segments([3])
    res = truncated_cg(lambda v, a: v * float("nan"), torch.ones(3, dtype=DT), seg, max_iters=5)
    assert not res.finite


def test_bad_input():
    seg = Segments([3])
    mv = _block_matvec([torch.eye(3, dtype=DT)], seg)
    c = torch.ones(3, dtype=DT)
    with pytest.raises(TypeError, match="1-D floating"):
        truncated_cg(mv, torch.ones(3, 1, dtype=DT), seg)
    with pytest.raises(TypeError, match="1-D floating"):
        truncated_cg(mv, torch.ones(3, dtype=torch.int64), seg)
    with pytest.raises(ValueError, match="segments cover 3"):
        truncated_cg(mv, torch.ones(4, dtype=DT), seg)
    with pytest.raises(ValueError, match="max_iters"):
        truncated_cg(mv, c, seg, max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        truncated_cg(mv, c, seg, tol=-1.0)
    with pytest.raises(ValueError, match="eps"):
        truncated_cg(mv, c, seg, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        truncated_cg(mv, c, seg, eps="0")
    with pytest.raises(ValueError, match="progress_tol"):
        truncated_cg(mv, c, seg, progress_tol=-1e-4)
    with pytest.raises(ValueError, match="x0"):
        truncated_cg(mv, c, seg, x0=torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="shift"):
        truncated_cg(mv, c, seg, shift=torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="sizes"):
        Segments([3, 0])
    assert set(EXIT_CODES) == {"max_iters", "converged", "progress", "negative_curvature", "steepest_descent"}
