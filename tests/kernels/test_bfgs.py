r"""Double-damped BFGS: :func:`fastcurv.ops.damped_bfgs_update_` (and ``_foreach_``) and ``damped_pair``.

Every update test goes through the public ops once per backend (fixture ``backend``) and is checked
against :mod:`fastcurv.reference` (the spec) and against the invariants of docs/algorithms.md §6 (items 1, 2, 10):
the damped pair is valid for any :math:`(s, y)`; :math:`H` stays bitwise symmetric and positive definite over
many updates and satisfies the secant condition :math:`H^+\tilde y = \tilde s`; every skip rule leaves
:math:`H` bitwise unchanged and returns False; the grouped (foreach) launch matches the per-layer reference
and skips per layer; every validation error is raised before anything is written.

Tolerance of the value comparison. Two correct implementations differ by rounding, which the damping
scalars (:math:`\theta_1`, :math:`\theta_2`, :math:`\rho`) can amplify when dot products cancel. So the
allowed difference is measured on the spec itself: ``noise`` = how much the reference moves when the same
problem is posed with permuted coordinates (another summation order), plus ``eps`` times the a-priori bound
:math:`\max|H| + |c|\max|\tilde s|^2 + 2|\rho|\max|\tilde s|\max|u|` (the size of the terms being summed).
A wrong kernel misses by O(bound), far outside ``16·(noise + eps·bound)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fastcurv import ops, reference

SIZES = (1, 7, 33, 100, 257)  # straddle the 16/64/128 block edges
DTYPES = (torch.float32, torch.float64)
MU2S = (None, 0.5, 1.5)  # mu2 > 1 gives theta2 < 0 (docs/algorithms.md §1.3)


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _spd(n: int, dtype: torch.dtype, scale: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """A bitwise-symmetric SPD matrix of entries ~ ``scale`` (eigenvalues >= 0.1·scale)."""
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    S = B @ B.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    S = torch.triu(S) + torch.triu(S, 1).T
    return (scale * S).to(device=device, dtype=dtype).contiguous()


def _vec(n: int, dtype: torch.dtype, scale: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (scale * torch.randn(n, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: ``torch.equal`` on it is bitwise equality (NaN payloads included)."""
    return t.view(torch.int64 if t.element_size() == 8 else torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _reference(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, **kw) -> tuple[torch.Tensor, bool]:
    R = H.clone()
    ok = reference.damped_bfgs_update_(R, s, y, **kw)
    return R, bool(ok)


def _bound(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, *, mu1, mu2, **_) -> float:
    """The a-priori bound of the update (the magnitude of the summed terms), in float64."""
    H, s, y = H.double(), s.double(), y.double()
    st_, yt = reference.damped_pair(s, y, H @ y, mu1=mu1, mu2=mu2)
    u = H @ yt
    rho = 1 / torch.dot(st_, yt)
    c = rho * rho * torch.dot(yt, u) + rho
    ms = st_.abs().max()
    b = H.abs().max() + c.abs() * ms**2 + 2 * rho.abs() * ms * u.abs().max()
    return float(b) if math.isfinite(float(b)) else 0.0


def _noise(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, R: torch.Tensor, **kw) -> float:
    """How much the reference result ``R`` moves under a permutation of the coordinates (a rounding estimate)."""
    n = H.shape[0]
    p = torch.arange(n - 1, -1, -1, device=H.device).roll(n // 3)
    Rp, _ = _reference(H[p][:, p].contiguous(), s[p].contiguous(), y[p].contiguous(), **kw)
    back = torch.empty_like(Rp)
    back[p[:, None], p[None, :]] = Rp
    return float((R.double() - back.double()).abs().max())


def _assert_matches(K: torch.Tensor, H0: torch.Tensor, s: torch.Tensor, y: torch.Tensor, R: torch.Tensor, **kw) -> None:
    """``K`` (an op's result) against ``R`` (the reference's) from ``H0``, within the tolerance above."""
    eps = torch.finfo(H0.dtype).eps
    tol = 16 * (_noise(H0, s, y, R, **kw) + eps * _bound(H0, s, y, **kw))
    err = float((K.double() - R.double()).abs().max())
    assert err <= tol, f"max |kernel - reference| = {err:.3e} > {tol:.3e}"


def _gn_arg(gn: float | None, as_tensor: bool, H: torch.Tensor) -> float | torch.Tensor | None:
    if gn is None or not as_tensor:
        return gn
    return torch.tensor(gn, dtype=H.dtype, device=H.device)


# --------------------------------------------------------------------------------------------------------
# values: against the reference; exact symmetry; the skip decision
# --------------------------------------------------------------------------------------------------------
@given(
    n=st.sampled_from(SIZES),
    dtype=st.sampled_from(DTYPES),
    log_scales=st.tuples(*(st.floats(-3, 3) for _ in range(3))),
    mu1=st.sampled_from((None, 0.2)),
    mu2=st.sampled_from(MU2S),
    gn=st.sampled_from((None, 1.0, 1e12)),
    gn_tensor=st.booleans(),
    negative=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=257, dtype=torch.float64, log_scales=(3.0, -3.0, 3.0), mu1=0.2, mu2=0.5, gn=1.0, gn_tensor=True,
         negative=True, seed=1)  # fmt: skip
@example(n=100, dtype=torch.float32, log_scales=(-3.0, 3.0, -3.0), mu1=None, mu2=None, gn=None, gn_tensor=False,
         negative=False, seed=2)  # fmt: skip
def test_update_matches_reference(backend, device, n, dtype, log_scales, mu1, mu2, gn, gn_tensor, negative, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ss_, ys_ = (10.0**e for e in log_scales)
    H0 = _spd(n, dtype, hs, g, device)
    s = _vec(n, dtype, ss_, g, device)
    y = _vec(n, dtype, ys_, g, device)
    if negative:  # s^T y < 0: skipped without damping, damped into a valid pair otherwise
        y = -(ys_ / ss_) * s + 0.1 * y
    kw = dict(mu1=mu1, mu2=mu2, grad_norm=gn)
    H = H0.clone()
    ok = ops.damped_bfgs_update_(H, s, y, mu1=mu1, mu2=mu2, grad_norm=_gn_arg(gn, gn_tensor, H))
    R, ok_ref = _reference(H0, s, y, **kw)
    assert ok.shape == () and ok.dtype == torch.bool and ok.device == H.device
    assert bool(ok) == ok_ref
    assert _same_bits(H, H.T), "H+ must stay bitwise symmetric"
    if ok_ref:
        _assert_matches(H, H0, s, y, R, **kw)
    else:
        assert _same_bits(H, H0)


# --------------------------------------------------------------------------------------------------------
# invariant 1: the damped pair is valid for any (s, y)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [reference.damped_pair, ops.damped_pair], ids=["reference", "ops"])
@given(
    n=st.sampled_from(SIZES),
    dtype=st.sampled_from(DTYPES),
    case=st.sampled_from(("random", "negative", "zero_y", "aligned")),
    mu1=st.floats(0.01, 0.99),
    mu2=st.sampled_from((math.sqrt(1e-3), math.sqrt(0.3), 1.0, math.sqrt(3.0))),
    log_scales=st.tuples(*(st.floats(-3, 3) for _ in range(3))),
    seed=st.integers(0, 2**31 - 1),
)
def test_damped_pair_invariants(fn, device, n, dtype, case, mu1, mu2, log_scales, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ss_, ys_ = (10.0**e for e in log_scales)
    H = _spd(n, dtype, hs, g, device)
    s = _vec(n, dtype, ss_, g, device)
    y = {
        "random": lambda: _vec(n, dtype, ys_, g, device),
        "negative": lambda: -(ys_ / ss_) * s,
        "zero_y": lambda: torch.zeros_like(s),
        "aligned": lambda: (ys_ / ss_) * s,
    }[case]()
    Hy = H @ y
    s_t, y_t = fn(s, y, Hy, mu1=mu1, mu2=mu2)
    if case == "zero_y":  # y = 0: y^T H y = 0 and s~ = s (the cross-multiplied test avoids 0/0)
        assert _same_bits(s_t, s)
    d = lambda a, b: float(torch.dot(a.double(), b.double()))  # noqa: E731
    nrm = lambda a: float(a.double().norm())  # noqa: E731
    gam = 8 * (n + 2) * torch.finfo(dtype).eps  # a dot product's relative rounding, with margin

    # Powell: s~^T y >= mu1 y^T H y, equality when damped, s~ = s (bitwise) when not
    sy, yHy = d(s, y), d(y, Hy)
    tol1 = gam * (nrm(s) * nrm(y) + nrm(Hy) * nrm(y)) + 1e-300
    assert d(s_t, y) >= mu1 * yHy - tol1
    if sy < mu1 * yHy - tol1:
        assert abs(d(s_t, y) - mu1 * yHy) <= tol1
    elif sy >= mu1 * yHy + tol1:
        assert _same_bits(s_t, s)

    # Levenberg-Marquardt: s~^T y~ >= mu2 s~^T s~ > 0, equality when damped, y~ = y when not
    sty, sts = d(s_t, y), d(s_t, s_t)
    if not bool(torch.isfinite(y_t).all()):
        # the one exception (of the spec and of the official code alike): with mu2 > 1 and s~^T y = s~^T s~
        # (e.g. y = s), theta2 = (1 - mu2) s~^T s~ / 0; the pair is non-finite and the BFGS update skips
        assert mu2 > 1 and abs(sts - sty) <= gam * sts, "only the 0/0 of theta2 may make the pair non-finite"
        return
    theta2 = (1 - mu2) * sts / (sts - sty) if sts != sty else 1.0
    tol2 = gam * ((abs(theta2) * nrm(y) + abs(1 - theta2) * nrm(s_t)) * nrm(s_t) + mu2 * sts) + 1e-300
    assert d(s_t, y_t) >= mu2 * sts - tol2
    assert d(s_t, y_t) > 0 and sts > 0
    if sty < mu2 * sts - tol2:
        assert abs(d(s_t, y_t) - mu2 * sts) <= tol2
    elif sty >= mu2 * sts + tol2:
        assert _same_bits(y_t, y)


@pytest.mark.parametrize("fn", [reference.damped_pair, ops.damped_pair], ids=["reference", "ops"])
def test_damped_pair_stages_off_pass_through(fn, device):
    g = torch.Generator().manual_seed(0)
    H = _spd(9, torch.float64, 1.0, g, device)
    s, y = _vec(9, torch.float64, 1.0, g, device), -_vec(9, torch.float64, 1.0, g, device)
    s1, y1 = fn(s, y, H @ y, mu1=None, mu2=None)
    assert _same_bits(s1, s) and _same_bits(y1, y)
    s2, y2 = fn(s, y, H @ y, mu1=None, mu2=0.5)
    assert _same_bits(s2, s) and float(torch.dot(s2, y2)) == pytest.approx(0.5 * float(torch.dot(s, s)), rel=1e-12)
    s3, y3 = fn(s, -y, H @ -y, mu1=0.2, mu2=None)
    assert _same_bits(y3, -y)


# --------------------------------------------------------------------------------------------------------
# invariant 2: symmetric positive definite over many updates; the secant condition
# --------------------------------------------------------------------------------------------------------
def test_many_updates_stay_spd_symmetric_and_secant(backend, device):
    """Random pairs (any sign of s^T y, y = 0 and y = -s included, scales 1e-3..1e3) through double damping.

    1,000 updates per layer, except under Triton's CPU interpreter (slow): 120 grouped calls over both layers.
    """
    g = torch.Generator().manual_seed(7)
    sizes = (5, 17)
    steps = 120 if backend == "triton" and device.type == "cpu" else 1000
    Hs = [torch.eye(n, dtype=torch.float64, device=device) for n in sizes]
    worst = 0.0
    for k in range(steps):
        ss, ys, pairs = [], [], []
        for H, n in zip(Hs, sizes):
            s = _vec(n, torch.float64, 10.0 ** (6 * torch.rand(1, generator=g).item() - 3), g, device)
            y = _vec(n, torch.float64, 10.0 ** (6 * torch.rand(1, generator=g).item() - 3), g, device)
            if k % 7 == 3:
                y = torch.zeros_like(y)
            elif k % 5 == 1:
                y = -s
            ss.append(s)
            ys.append(y)
            pairs.append(reference.damped_pair(s, y, H @ y, mu1=0.2, mu2=0.5))
        applied = ops.damped_bfgs_update_foreach_(Hs, ss, ys, mu1=0.2, mu2=0.5)
        assert bool(applied.all()), f"step {k}: a doubly damped pair must always be applied"
        for H, (s_t, y_t) in zip(Hs, pairs):
            assert _same_bits(H, H.T), f"step {k}: H lost bitwise symmetry"
            worst = max(worst, float((H @ y_t - s_t).norm() / s_t.norm()))
        if k % 50 == 49 or k == steps - 1:
            for H in Hs:
                assert float(torch.linalg.eigvalsh(H).min()) > 0, f"step {k}: H is not positive definite"
    assert worst <= 1e-10, f"secant condition H+ y~ = s~: worst relative residual {worst:.3e}"


# --------------------------------------------------------------------------------------------------------
# skip rules: H bitwise unchanged, False returned
# --------------------------------------------------------------------------------------------------------
SKIPS = (
    "negative_curvature_undamped",
    "zero_y_undamped",
    "curvature_test",
    "nan_s",
    "inf_y",
    "nan_H_lower",
    "inf_H",
    "nan_grad_norm",
    "bound_overflow",
    "bound_overflow_finite_entries",
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SKIPS)
def test_skip_leaves_H_bitwise_unchanged(backend, device, case, dtype):
    n = 33
    g = torch.Generator().manual_seed(3)
    H = _spd(n, dtype, 1.0, g, device)
    s = _vec(n, dtype, 1.0, g, device)
    y = s + 0.1 * _vec(n, dtype, 1.0, g, device)  # a healthy pair: s^T y > 0
    kw: dict = dict(mu1=0.2, mu2=0.5)
    if case == "negative_curvature_undamped":
        y, kw = -y, dict(mu1=None, mu2=None)
    elif case == "zero_y_undamped":
        y, kw = torch.zeros_like(y), dict(mu1=None, mu2=None)
    elif case == "curvature_test":  # s~^T y~ <= tol * s~^T s~ * |g|
        kw["grad_norm"] = 1e12
    elif case == "nan_s":
        s[5] = float("nan")
    elif case == "inf_y":
        y[n - 1] = float("inf")
    elif case == "nan_H_lower":  # only the lower triangle, which the rank-2 kernel never reads
        H[n - 1, 0] = float("nan")
    elif case == "inf_H":
        H[7, 7] = float("inf")
    elif case == "nan_grad_norm":
        kw["grad_norm"] = torch.tensor(float("nan"), dtype=dtype, device=device)
    elif case == "bound_overflow":  # finite H and pair, but the update overflows
        big = 2e38 if dtype == torch.float32 else 1e308
        H = big * torch.eye(n, dtype=dtype, device=device)
        s = torch.zeros(n, dtype=dtype, device=device)
        s[0] = 1.0
        y = s.clone()
        kw = dict(mu1=None, mu2=None)
    elif case == "bound_overflow_finite_entries":
        # H = diag(big, h, 1, ...), s = y = e_1: c = h + 1, rho = 1, u = h e_1, so every entry of H+ is finite
        # (H+_11 = 1 in exact arithmetic) but the a-priori bound big + (h + 1) + 2h overflows, and only because
        # of max|H| = big: the spec skips
        big, h = (3e38, 1e38) if dtype == torch.float32 else (1.5e308, 5e307)
        H = torch.eye(n, dtype=dtype, device=device)
        H[0, 0], H[1, 1] = big, h
        s = torch.zeros(n, dtype=dtype, device=device)
        s[1] = 1.0
        y = s.clone()
        kw = dict(mu1=None, mu2=None)
    H0 = H.clone()
    _, ok_ref = _reference(H0, s, y, **kw)
    assert not ok_ref, "the scenario must be a skip under the spec"
    ok = ops.damped_bfgs_update_(H, s, y, **kw)
    assert ok.dtype == torch.bool and not bool(ok)
    assert _same_bits(H, H0)


# --------------------------------------------------------------------------------------------------------
# foreach: mixed sizes, per-layer skips, grad_norms in every accepted form
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mu1, mu2, gn_form, dtype",
    [
        (0.2, 0.5, "tensor", torch.float32),
        (None, None, "floats", torch.float64),
        (None, 0.5, "tensors", torch.float32),
        (0.2, None, "none", torch.float64),
    ],
)
def test_foreach_mixed_sizes_matches_per_layer(backend, device, dtype, mu1, mu2, gn_form):
    """Every launch path (2 or 3 kernels) on five layers straddling the block edges; the update of each layer
    must equal the single-layer reference, with skips per layer (non-finite y, curvature test, s^T y < 0)."""
    g = torch.Generator().manual_seed(11)
    sizes = (1, 7, 33, 65, 130)
    Hs = [_spd(n, dtype, 10.0 ** (i - 2), g, device) for i, n in enumerate(sizes)]
    gns = [1.0, 2.0, 1e12, 0.5, 1.0]  # layer 2 fails the curvature test (when grad_norms are given)
    for rnd in range(2):  # the second round reuses the cached launch tables
        ss = [_vec(n, dtype, 10.0 ** (1 - i), g, device) for i, n in enumerate(sizes)]
        ys = [s + 0.5 * _vec(n, dtype, float(s.abs().max()), g, device) for s, n in zip(ss, sizes)]
        ys[3] = -ys[3]  # negative curvature: skipped when undamped
        ys[1][0] = float("nan")  # non-finite: skipped in every configuration
        if gn_form == "tensor":
            grad_norms = torch.tensor(gns, dtype=dtype, device=device)
        elif gn_form == "floats":
            grad_norms = gns
        elif gn_form == "tensors":
            grad_norms = [torch.tensor(v, dtype=dtype, device=device) for v in gns]
        else:
            grad_norms = None
        kws = [dict(mu1=mu1, mu2=mu2, grad_norm=None if grad_norms is None else gns[i]) for i in range(len(sizes))]
        H0s = [H.clone() for H in Hs]
        refs = [_reference(H0, s, y, **kw) for H0, s, y, kw in zip(H0s, ss, ys, kws)]
        applied = ops.damped_bfgs_update_foreach_(Hs, ss, ys, mu1=mu1, mu2=mu2, grad_norms=grad_norms)
        assert applied.shape == (len(sizes),) and applied.dtype == torch.bool
        assert applied.tolist() == [ok for _, ok in refs], f"round {rnd}"
        assert not applied[1]
        for H, H0, s, y, kw, (R, ok) in zip(Hs, H0s, ss, ys, kws, refs):
            assert _same_bits(H, H.T)
            if ok:
                _assert_matches(H, H0, s, y, R, **kw)
            else:
                assert _same_bits(H, H0)


def test_foreach_empty(backend):
    out = ops.damped_bfgs_update_foreach_([], [], [], mu1=0.2, mu2=0.5)
    assert out.shape == (0,) and out.dtype == torch.bool


# --------------------------------------------------------------------------------------------------------
# validation: every error path raises before anything is written
# --------------------------------------------------------------------------------------------------------
def _single(H=None, s=None, y=None, **kw):
    def call(T):
        args = dict(H=T["H"], s=T["s"], y=T["y"])
        args.update({k: v(T) for k, v in dict(H=H, s=s, y=y).items() if v is not None})
        kw.setdefault("mu2", 0.5)
        return ops.damped_bfgs_update_(args["H"], args["s"], args["y"], **kw)

    return call


def _foreach(fix, **kw):
    def call(T):
        Hs, ss, ys = [T["H"], T["H2"]], [T["s"], T["s2"]], [T["y"], T["y2"]]
        Hs, ss, ys = fix(Hs, ss, ys, T)
        kw.setdefault("mu2", 0.5)
        return ops.damped_bfgs_update_foreach_(Hs, ss, ys, **kw)

    return call


def _meta(shape, dtype=torch.float64):
    return torch.empty(shape, dtype=dtype, device="meta")


def _layer1(lists, f):
    """The (Hs, ss, ys) lists with ``f`` applied to every tensor of layer 1."""
    return tuple(xs[:1] + [f(xs[1])] for xs in lists[:3])


ERRORS = {
    # _check_bfgs
    "H_int": (TypeError, _single(H=lambda T: T["H"].to(torch.int64))),
    "H_bf16": (TypeError, _single(H=lambda T: T["H"].to(torch.bfloat16))),
    "H_not_tensor": (TypeError, _single(H=lambda T: T["H"].tolist())),
    "H_1d": (ValueError, _single(H=lambda T: T["H"][0])),
    "H_not_square": (ValueError, _single(H=lambda T: T["H"][:, :3])),
    "H_noncontiguous": (ValueError, _single(H=lambda T: T["Hw"][::2, ::2])),
    "s_shape": (ValueError, _single(s=lambda T: T["s"][:3])),
    "y_2d": (ValueError, _single(y=lambda T: T["y"][None])),
    "s_dtype": (TypeError, _single(s=lambda T: T["s"].float())),
    "y_device": (ValueError, _single(y=lambda T: _meta(T["y"].shape))),
    "s_not_tensor": (TypeError, _single(s=lambda T: 1.0)),
    # _scalar_arg
    "mu1_str": (TypeError, _single(mu1="0.2")),
    "mu1_bool": (TypeError, _single(mu1=True)),
    "mu1_above_1": (ValueError, _single(mu1=1.5)),
    "mu1_negative": (ValueError, _single(mu1=-0.1)),
    "mu1_nan": (ValueError, _single(mu1=float("nan"))),
    "mu1_1d_tensor": (ValueError, _single(mu1=torch.tensor([0.2]))),
    "mu1_int_tensor": (TypeError, _single(mu1=torch.tensor(1))),
    "mu2_negative": (ValueError, _single(mu2=-1.0)),
    "mu2_other_device": (ValueError, _single(mu2=_meta(()))),
    "tol_negative": (ValueError, _single(curvature_tol=-1e-4)),
    "tol_none": (TypeError, _single(curvature_tol=None)),
    "grad_norm_negative": (ValueError, _single(grad_norm=-1.0)),
    "grad_norm_vector": (ValueError, _single(grad_norm=torch.ones(2))),
    # foreach: lists, lengths, mixed layers, grad_norms (layer 0 is valid and must stay unchanged)
    "Hs_tensor": (TypeError, _foreach(lambda Hs, ss, ys, T: (T["H"], ss, ys))),
    "Hs_item_not_tensor": (TypeError, _foreach(lambda Hs, ss, ys, T: (Hs[:1] + [None], ss, ys))),
    "length_mismatch": (ValueError, _foreach(lambda Hs, ss, ys, T: (Hs, ss[:1], ys))),
    "mixed_dtypes": (TypeError, _foreach(lambda *a: _layer1(a, lambda t: t.float()))),
    "mixed_devices": (ValueError, _foreach(lambda *a: _layer1(a, lambda t: _meta(t.shape)))),
    "layer1_s_shape": (ValueError, _foreach(lambda Hs, ss, ys, T: (Hs, ss[:1] + [ss[0]], ys))),
    "layer1_empty": (
        ValueError,
        _foreach(lambda Hs, ss, ys, T: (Hs[:1] + [T["H"][:0, :0]], ss[:1] + [T["s"][:0]], ys[:1] + [T["y"][:0]])),
    ),
    "grad_norms_shape": (ValueError, _foreach(lambda *a: a[:3], grad_norms=torch.ones(3))),
    "grad_norms_length": (ValueError, _foreach(lambda *a: a[:3], grad_norms=[1.0])),
    "grad_norms_negative": (ValueError, _foreach(lambda *a: a[:3], grad_norms=[1.0, -1.0])),
    "grad_norms_str": (TypeError, _foreach(lambda *a: a[:3], grad_norms=[1.0, "1"])),
    "foreach_mu1_above_1": (ValueError, _foreach(lambda *a: a[:3], mu1=2.0)),
    # damped_pair
    "pair_s_int": (TypeError, lambda T: ops.damped_pair(T["s"].long(), T["y"], T["y"], mu2=0.5)),
    "pair_Hy_shape": (ValueError, lambda T: ops.damped_pair(T["s"], T["y"], T["y"][:2], mu2=0.5)),
    "pair_y_dtype": (TypeError, lambda T: ops.damped_pair(T["s"], T["y"].float(), T["y"], mu2=0.5)),
    "pair_mu1_range": (ValueError, lambda T: ops.damped_pair(T["s"], T["y"], T["y"], mu1=-1.0, mu2=0.5)),
    "pair_mu2_negative": (ValueError, lambda T: ops.damped_pair(T["s"], T["y"], T["y"], mu2=-0.5)),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_raise_before_writing(backend, device, case):
    exc, call = ERRORS[case]
    g = torch.Generator().manual_seed(5)
    T = {
        "H": _spd(6, torch.float64, 1.0, g, device),
        "H2": _spd(4, torch.float64, 1.0, g, device),
        "Hw": _spd(12, torch.float64, 1.0, g, device),
        "s": _vec(6, torch.float64, 1.0, g, device),
        "y": _vec(6, torch.float64, 1.0, g, device).abs(),
        "s2": _vec(4, torch.float64, 1.0, g, device),
        "y2": _vec(4, torch.float64, 1.0, g, device),
    }
    T["y"] = T["y"] * T["s"].sign()  # s^T y > 0: a valid call would update H
    before = {k: v.clone() for k, v in T.items()}
    with pytest.raises(exc):
        call(T)
    for k in T:
        assert _same_bits(T[k], before[k]), f"{k} was modified"
