r"""Complex-perturbed matmuls: ``ops.complex_matmul`` / ``ops.complex_linear`` against :mod:`fastcurv.reference`.

Every test runs on both backends (fixture ``backend``): the Triton kernel (interpreted on CPU) and the eager
reference. Values are compared with an elementwise floating-point error bound,
``|C - C_exact| <= 2 (K + 2) eps * (|A_r||B_r| + |A_i||B_i| + |b|)`` (and likewise for the imaginary plane),
where ``C_exact`` is the reference evaluated in float64 — tight enough that a wrong sign, a dropped or an
extra product fails, and exact zero where a plane must be exactly zero.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import fastcurv
from fastcurv import ops, reference

SIZES = (1, 7, 33, 100, 257)
ALL_COEFS = list(itertools.product((-1, 0, 1), repeat=4))
DTYPES = (torch.float32, torch.float64)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
SCALES = (1e-3, 1.0, 1e3)
MAX_MNK = 1_000_000  # keeps an interpreted example well under a second


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _make(rows: int, cols: int, layout: str, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A (rows, cols) random tensor with the requested memory layout (the view is taken last, so it survives)."""
    r = lambda *shape: scale * torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    if layout == "contiguous":
        t = r(rows, cols)
    elif layout == "transposed":  # a .t() view, strides (1, rows)
        t = r(cols, rows).t()
    elif layout == "strided":  # every other column of a wider matrix, strides (2 cols, 2)
        t = r(rows, 2 * cols)[:, ::2]
    elif layout == "expanded":  # one row broadcast: strides (0, 1)
        t = r(1, cols).expand(rows, cols)
    else:
        raise AssertionError(layout)
    assert t.shape == (rows, cols) and (layout == "contiguous") == t.is_contiguous() or min(rows, cols) == 1
    return t


def _exact_and_bound(a, a_im, b, b_im, coef, bias, bias_im):  # type: ignore[no-untyped-def]
    """The reference in float64 and the matching elementwise bound built from absolute values."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ab = lambda t: None if t is None else t.double().abs()  # noqa: E731
    exact = reference.complex_matmul(up(a), up(a_im), up(b), up(b_im), coef, up(bias), up(bias_im))
    acoef = tuple(abs(c) for c in coef)
    bound = reference.complex_matmul(ab(a), ab(a_im), ab(b), ab(b_im), acoef, ab(bias), ab(bias_im))
    return exact, bound


def _assert_within(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, k: int, dtype: torch.dtype) -> None:
    assert out.shape == exact.shape and out.dtype == dtype
    tol = 2 * (k + 2) * torch.finfo(dtype).eps * bound
    err = (out.double() - exact).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} entries off: worst err {err[bad].max():.3e}, "
        f"tol there {tol[bad][err[bad].argmax()]:.3e}"
    )


def _linear_bound(x, x_im, w, w_im, b, b_im, dual):  # type: ignore[no-untyped-def]
    """complex_linear's exact value (float64 reference) and error bound, on 2-d views of x."""
    fl = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    tr = lambda t: None if t is None else t.t()  # noqa: E731
    coef = (1, 0 if dual else -1, 1, 1)
    return _exact_and_bound(fl(x), fl(x_im), w.t(), tr(w_im), coef, b, b_im)


# --------------------------------------------------------------------------------------------------------
# complex_matmul
# --------------------------------------------------------------------------------------------------------
@given(
    M=st.sampled_from(SIZES),
    N=st.sampled_from(SIZES),
    K=st.sampled_from(SIZES),
    dtype=st.sampled_from(DTYPES),
    coef=st.sampled_from(ALL_COEFS),
    planes=st.tuples(*[st.booleans()] * 4),  # a_im, b_im, bias, bias_im present
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 4),  # a, a_im, b, b_im
    scales=st.tuples(*[st.sampled_from(SCALES)] * 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_complex_matmul_matches_reference(backend, device, M, N, K, dtype, coef, planes, layouts, scales, seed):
    assume(M * N * K <= MAX_MNK)
    torch.manual_seed(seed)
    has_ai, has_bi, has_bias, has_bias_im = planes
    a = _make(M, K, layouts[0], dtype, device, scales[0])
    a_im = _make(M, K, layouts[1], dtype, device, scales[1]) if has_ai else None
    b = _make(K, N, layouts[2], dtype, device, scales[2])
    b_im = _make(K, N, layouts[3], dtype, device, scales[3]) if has_bi else None
    bias = _make(1, N, "strided", dtype, device, scales[0])[0] if has_bias else None
    bias_im = _make(1, N, "contiguous", dtype, device, scales[3])[0] if has_bias_im else None

    re, im = ops.complex_matmul(a, a_im, b, b_im, coef, bias, bias_im)

    (ex_re, ex_im), (bd_re, bd_im) = _exact_and_bound(a, a_im, b, b_im, coef, bias, bias_im)
    assert re.is_contiguous() and im.is_contiguous() and re.device == a.device
    _assert_within(re, ex_re, bd_re, K, dtype)
    _assert_within(im, ex_im, bd_im, K, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_complex_matmul_each_plane_strided(backend, device, dtype):
    """Each plane in turn gets each non-contiguous layout (the others contiguous): catches a stride mix-up."""
    M, K, N = 33, 100, 7
    shapes = {"a": (M, K), "a_im": (M, K), "b": (K, N), "b_im": (K, N), "bias": (1, N), "bias_im": (1, N)}
    for plane, layout in itertools.product(shapes, LAYOUTS[1:]):
        t = {n: _make(*s, layout if n == plane else "contiguous", dtype, device) for n, s in shapes.items()}
        t["bias"], t["bias_im"] = t["bias"][0], t["bias_im"][0]
        args = (t["a"], t["a_im"], t["b"], t["b_im"], (1, -1, 1, 1), t["bias"], t["bias_im"])
        re, im = ops.complex_matmul(*args)
        (ex_re, ex_im), (bd_re, bd_im) = _exact_and_bound(*args)
        _assert_within(re, ex_re, bd_re, K, dtype)
        _assert_within(im, ex_im, bd_im, K, dtype)


def test_complex_matmul_every_coef_pattern(backend, device):
    """All 81 coefficient patterns at one odd shape, with sign-sensitive exact checks (float64)."""
    M, K, N = 7, 33, 9
    a, a_im = torch.randn(M, K, dtype=torch.float64, device=device), torch.randn(M, K, dtype=torch.float64, device=device)
    b, b_im = torch.randn(N, K, dtype=torch.float64, device=device).t(), torch.randn(K, N, dtype=torch.float64, device=device)
    products = {"rr": a @ b, "ii": a_im @ b_im, "ir": a_im @ b, "ri": a @ b_im}
    for coef in ALL_COEFS:
        c_rr, c_ii, c_ir, c_ri = coef
        re, im = ops.complex_matmul(a, a_im, b, b_im, coef)
        torch.testing.assert_close(re, c_rr * products["rr"] + c_ii * products["ii"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(im, c_ir * products["ir"] + c_ri * products["ri"], rtol=1e-12, atol=1e-12)
        if c_rr == c_ii == 0:
            assert (re == 0).all()
        if c_ir == c_ri == 0:
            assert (im == 0).all()


def test_complex_matmul_is_the_complex_product(backend, device):
    """(1, -1, 1, 1) is A B and (1, 1, 1, -1) is A conj(B), against torch complex128."""
    a, a_im = _make(33, 100, "contiguous", torch.float64, device), _make(33, 100, "strided", torch.float64, device)
    b, b_im = _make(100, 7, "transposed", torch.float64, device), _make(100, 7, "contiguous", torch.float64, device)
    A, B = torch.complex(a, a_im), torch.complex(b, b_im)
    for coef, want in (((1, -1, 1, 1), A @ B), ((1, 1, 1, -1), A @ B.conj())):
        re, im = ops.complex_matmul(a, a_im, b, b_im, coef)
        torch.testing.assert_close(torch.complex(re, im), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 5, 0), (4, 0, 3)], ids=["M=0", "N=0", "K=0"])
def test_complex_matmul_empty(backend, device, shape):
    M, K, N = shape
    a, a_im = torch.randn(M, K, device=device), torch.randn(M, K, device=device)
    b, b_im = torch.randn(K, N, device=device), torch.randn(K, N, device=device)
    bias, bias_im = torch.randn(N, device=device), torch.randn(N, device=device)
    re, im = ops.complex_matmul(a, a_im, b, b_im, (1, -1, 1, 1), bias, bias_im)
    assert re.shape == im.shape == (M, N)
    torch.testing.assert_close(re, bias.expand(M, N), rtol=0, atol=0)  # K = 0: only the bias survives
    torch.testing.assert_close(im, bias_im.expand(M, N), rtol=0, atol=0)


def test_int64_indexing_path(monkeypatch, device):
    """The int64 index variant (taken for > 2^31-element operands) computes the same result."""
    from fastcurv.kernels import complex_linear as ck

    a, a_im = _make(33, 100, "transposed", torch.float64, device), _make(33, 100, "contiguous", torch.float64, device)
    b, b_im = _make(100, 7, "strided", torch.float64, device), _make(100, 7, "contiguous", torch.float64, device)
    want = ck.complex_matmul(a, a_im, b, b_im, coef=(1, -1, 1, 1))
    monkeypatch.setattr(ck, "_INT32_LIMIT", 0)
    got = ck.complex_matmul(a, a_im, b, b_im, coef=(1, -1, 1, 1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got[0], a @ b - a_im @ b_im, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# complex_linear: values
# --------------------------------------------------------------------------------------------------------
@given(
    lead=st.sampled_from([(), (1,), (7,), (3, 5)]),
    fin=st.sampled_from(SIZES[:4]),
    fout=st.sampled_from(SIZES[:4]),
    dtype=st.sampled_from(DTYPES),
    planes=st.tuples(*[st.booleans()] * 4),  # x_im, weight_im, bias, bias_im
    dual=st.booleans(),
    scale=st.sampled_from(SCALES),
    seed=st.integers(0, 2**31 - 1),
)
@example(lead=(3, 5), fin=1, fout=1, dtype=torch.float64, planes=(True, True, False, False), dual=True, scale=1e-3, seed=0)
def test_complex_linear_matches_complex128(backend, device, lead, fin, fout, dtype, planes, dual, scale, seed):
    torch.manual_seed(seed)
    kw = dict(dtype=dtype, device=device)
    x, w = scale * torch.randn(*lead, fin, **kw), torch.randn(fout, fin, **kw)
    x_im = torch.randn(*lead, fin, **kw) if planes[0] else None
    w_im = scale * torch.randn(fout, fin, **kw) if planes[1] else None
    b = torch.randn(fout, **kw) if planes[2] else None
    b_im = torch.randn(fout, **kw) if planes[3] else None

    y, y_im = ops.complex_linear(x, x_im, w, w_im, b, b_im, dual=dual)
    assert y.shape == y_im.shape == (*lead, fout) and y.dtype == y_im.dtype == dtype

    # torch complex128: plain transpose .T (not the conjugate transpose .mH). dual drops x_im W_im^T: the
    # oracle never forms that product (adding it back would cancel and leave a rounding error of the order
    # of u |x_im||W_im|, which the bound of the dual result, built without |x_im||W_im|, does not cover),
    # it splits X into its real-plane and tangent-plane parts instead.
    z = lambda re, im: torch.complex(re.double(), torch.zeros_like(re.double()) if im is None else im.double())  # noqa: E731
    W = z(w, w_im)
    if dual and x_im is not None:
        want = z(x, None) @ W.T + 1j * (x_im.double() @ w.double().T)
    else:
        want = z(x, x_im) @ W.T
    if b is not None or b_im is not None:
        want = want + z(torch.zeros(fout, **kw) if b is None else b, b_im)
    (_, _), (bd_re, bd_im) = _linear_bound(x, x_im, w, w_im, b, b_im, dual)
    _assert_within(y.reshape(-1, fout), want.real.reshape(-1, fout), bd_re, fin, dtype)
    _assert_within(y_im.reshape(-1, fout), want.imag.reshape(-1, fout), bd_im, fin, dtype)


def test_no_conjugation(backend, device):
    """The weight is transposed, never conjugate-transposed: matches X W^T, not X W^H."""
    x, x_im = torch.randn(5, 33, dtype=torch.float64, device=device), torch.randn(5, 33, dtype=torch.float64, device=device)
    w, w_im = torch.randn(7, 33, dtype=torch.float64, device=device), torch.randn(7, 33, dtype=torch.float64, device=device)
    y, y_im = ops.complex_linear(x, x_im, w, w_im)
    X, W = torch.complex(x, x_im), torch.complex(w, w_im)
    got = torch.complex(y, y_im)
    torch.testing.assert_close(got, X @ W.T, rtol=1e-12, atol=1e-12)
    assert (got - X @ W.mH).abs().max() > 1.0  # the conjugate-transpose answer is far away


def test_dual_drops_exactly_the_tangent_product(backend, device):
    kw = dict(dtype=torch.float64, device=device)
    x, x_im, w, w_im = torch.randn(2, 9, 33, **kw), torch.randn(2, 9, 33, **kw), torch.randn(7, 33, **kw), torch.randn(7, 33, **kw)
    b, b_im = torch.randn(7, **kw), torch.randn(7, **kw)
    y, y_im = ops.complex_linear(x, x_im, w, w_im, b, b_im)
    yd, yd_im = ops.complex_linear(x, x_im, w, w_im, b, b_im, dual=True)
    torch.testing.assert_close(yd, F.linear(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yd - y, F.linear(x_im, w_im), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yd_im, y_im, rtol=1e-13, atol=1e-13)  # Im is the same in both modes


# --------------------------------------------------------------------------------------------------------
# complex step: a 1e-20 imaginary perturbation survives (and Gauss's 3-multiplication form would lose it)
# --------------------------------------------------------------------------------------------------------
def _gauss_3m_linear(x, x_im, w, w_im, b=None, b_im=None, *, dual=False):  # type: ignore[no-untyped-def]
    """Gauss's 3-multiplication complex product (a + ib)(c + id): k1 = c(a + b), k2 = a(d - c), k3 = b(c + d),
    Re = k1 - k3, Im = k1 + k2. Here only to show that the complex-step check below catches it."""
    a, bb = x, torch.zeros_like(x) if x_im is None else x_im
    c, d = w.t(), torch.zeros_like(w).t() if w_im is None else w_im.t()
    k1, k2, k3 = (a + bb) @ c, a @ (d - c), bb @ (c + d)
    return k1 - k3, k1 + k2


def _complex_step_error(linear, device: torch.device) -> float:
    """Relative error of Im/h against the exact directional derivative, h = 1e-20, float64."""
    h = 1e-20
    kw = dict(dtype=torch.float64, device=device)
    x, u, w, v = torch.randn(33, 100, **kw), torch.randn(33, 100, **kw), torch.randn(7, 100, **kw), torch.randn(7, 100, **kw)
    _, im = linear(x, h * u, w, h * v)
    want = u @ w.T + x @ v.T
    return float((im / h - want).norm() / want.norm())


def test_complex_step_perturbation_survives(backend, device):
    assert _complex_step_error(ops.complex_linear, device) < 1e-12
    # the same check fails for Gauss's form: its imaginary part is rounding noise
    assert _complex_step_error(_gauss_3m_linear, device) > 0.5


def test_complex_step_weight_only(backend, device):
    """Real input, imaginary weight 1e-20 V: Im / 1e-20 = x V^T and Re is exactly the real layer."""
    kw = dict(dtype=torch.float64, device=device)
    x, w, v = torch.randn(4, 5, 100, **kw), torch.randn(7, 100, **kw), torch.randn(7, 100, **kw)
    y, y_im = ops.complex_linear(x, None, w, 1e-20 * v)
    torch.testing.assert_close(y_im / 1e-20, x @ v.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------------------
# complex_linear: gradients
# --------------------------------------------------------------------------------------------------------
NAMES = ("x", "x_im", "weight", "weight_im", "bias", "bias_im")


def _linear_inputs(device, lead=(2,), fin=3, fout=4, dtype=torch.float64):  # type: ignore[no-untyped-def]
    kw = dict(dtype=dtype, device=device)
    return [
        torch.randn(*lead, fin, **kw),
        torch.randn(*lead, fin, **kw),
        torch.randn(fout, fin, **kw),
        torch.randn(fout, fin, **kw),
        torch.randn(fout, **kw),
        torch.randn(fout, **kw),
    ]


@pytest.mark.parametrize("dual", [False, True], ids=["exact", "dual"])
def test_gradcheck_every_input(backend, device, dual):
    inputs = [t.requires_grad_() for t in _linear_inputs(device)]
    fn = lambda *t: ops.complex_linear(*t, dual=dual)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dual", [False, True], ids=["exact", "dual"])
@pytest.mark.parametrize(
    "wanted",
    [("x",), ("x_im",), ("weight",), ("weight_im",), ("bias", "bias_im"), ("x", "weight"), ("x_im", "weight_im", "bias_im")],
    ids=lambda w: "+".join(w),
)
def test_grad_subsets(backend, device, dual, wanted):
    """Gradients w.r.t. a subset of the planes (needs_input_grad paths) equal the reference's autograd."""
    base = _linear_inputs(device, lead=(3, 5), fin=33, fout=7)
    inputs = [t.clone().requires_grad_(n in wanted) for n, t in zip(NAMES, base)]
    ref_inputs = [t.clone().requires_grad_(n in wanted) for n, t in zip(NAMES, base)]
    g, g_im = torch.randn(3, 5, 7, dtype=torch.float64, device=device), torch.randn(3, 5, 7, dtype=torch.float64, device=device)

    def grads(fn, leaves):  # type: ignore[no-untyped-def]
        outs = [(o, c) for o, c in zip(fn(*leaves, dual=dual), (g, g_im)) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in outs], [t for t in leaves if t.requires_grad], [c for _, c in outs])

    got = grads(ops.complex_linear, inputs)
    want = grads(reference.complex_linear, ref_inputs)
    assert len(got) == len(wanted)
    for name, a, b in zip(wanted, got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("missing", [("x_im",), ("weight_im",), ("x_im", "weight_im", "bias", "bias_im")], ids=str)
def test_grad_with_missing_planes(backend, device, missing):
    base = _linear_inputs(device, lead=(7,), fin=33, fout=9)
    inputs = [None if n in missing else t.clone().requires_grad_() for n, t in zip(NAMES, base)]
    ref_inputs = [None if n in missing else t.clone().requires_grad_() for n, t in zip(NAMES, base)]
    y, y_im = ops.complex_linear(*inputs)
    (y.square().sum() + (y * y_im).sum()).backward()
    ry, ry_im = reference.complex_linear(*ref_inputs)
    (ry.square().sum() + (ry * ry_im).sum()).backward()
    for name, a, b in zip(NAMES, inputs, ref_inputs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad of {name}: {m}")


def test_backward_skips_unrequested_planes(backend, device, monkeypatch):
    """Only x requires grad: one backward launch, and its imaginary-plane products are compiled out."""
    if backend != "triton":
        pytest.skip("inspects the Triton launcher's calls")
    from fastcurv.kernels import complex_linear as ck

    calls: list[tuple[int, ...]] = []
    real = ck.complex_matmul

    def spy(*args, coef, **kw):  # type: ignore[no-untyped-def]
        calls.append(tuple(coef))
        return real(*args, coef=coef, **kw)

    monkeypatch.setattr(ck, "complex_matmul", spy)
    x, x_im, w, w_im, b, b_im = _linear_inputs(device)
    x.requires_grad_()
    y, y_im = ops.complex_linear(x, x_im, w, w_im, b, b_im)
    calls.clear()
    (y.sum() + y_im.sum()).backward()  # expanded (stride-0) cotangents go in without copies
    assert calls == [(1, 1, 0, 0)]
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ w + torch.ones_like(y_im) @ w_im, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# validation: every bad input raises before anything runs
# --------------------------------------------------------------------------------------------------------
def _mm_cases():  # type: ignore[no-untyped-def]
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    meta = torch.randn(4, 5, device="meta")
    return [
        ("a not a tensor", lambda: ops.complex_matmul(a.tolist(), None, b, None), TypeError),
        ("b not a tensor", lambda: ops.complex_matmul(a, None, 1.0, None), TypeError),
        ("a integer", lambda: ops.complex_matmul(a.long(), None, b.long(), None), TypeError),
        ("a bfloat16", lambda: ops.complex_matmul(a.bfloat16(), None, b.bfloat16(), None), TypeError),
        ("a 1-d", lambda: ops.complex_matmul(a[0], None, b, None), ValueError),
        ("b 3-d", lambda: ops.complex_matmul(a, None, b[None], None), ValueError),
        ("inner mismatch", lambda: ops.complex_matmul(a, None, b[:3], None), ValueError),
        ("b dtype", lambda: ops.complex_matmul(a, None, b.double(), None), TypeError),
        ("a_im dtype", lambda: ops.complex_matmul(a, a.double(), b, None), TypeError),
        ("a_im shape", lambda: ops.complex_matmul(a, a[:2], b, None), ValueError),
        ("b_im shape", lambda: ops.complex_matmul(a, None, b, b.t()), ValueError),
        ("a_im not a tensor", lambda: ops.complex_matmul(a, 0.0, b, None), TypeError),
        ("b device", lambda: ops.complex_matmul(a, None, meta, None), ValueError),
        ("b_im device", lambda: ops.complex_matmul(a, None, b, meta), ValueError),
        ("bias shape", lambda: ops.complex_matmul(a, None, b, None, bias=torch.randn(4)), ValueError),
        ("bias 2-d", lambda: ops.complex_matmul(a, None, b, None, bias=torch.randn(1, 5)), ValueError),
        ("bias_im shape", lambda: ops.complex_matmul(a, None, b, None, bias_im=torch.randn(6)), ValueError),
        ("bias_im dtype", lambda: ops.complex_matmul(a, None, b, None, bias_im=torch.randn(5).double()), TypeError),
        ("coef length", lambda: ops.complex_matmul(a, None, b, None, (1, -1, 1)), ValueError),
        ("coef value", lambda: ops.complex_matmul(a, None, b, None, (1, -2, 1, 1)), ValueError),
        ("coef float", lambda: ops.complex_matmul(a, None, b, None, (1, 0.5, 1, 1)), ValueError),
    ]


def _lin_cases():  # type: ignore[no-untyped-def]
    x, w, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    return [
        ("x not a tensor", lambda: ops.complex_linear(x.tolist(), None, w, None), TypeError),
        ("weight not a tensor", lambda: ops.complex_linear(x, None, "w", None), TypeError),
        ("x integer", lambda: ops.complex_linear(x.long(), None, w, None), TypeError),
        ("x 0-d", lambda: ops.complex_linear(torch.tensor(1.0), None, w, None), ValueError),
        ("weight 1-d", lambda: ops.complex_linear(x, None, w[0], None), ValueError),
        ("weight 3-d", lambda: ops.complex_linear(x, None, w[None], None), ValueError),
        ("in_features mismatch", lambda: ops.complex_linear(x, None, w[:, :3], None), ValueError),
        ("weight dtype", lambda: ops.complex_linear(x, None, w.double(), None), TypeError),
        ("x_im dtype", lambda: ops.complex_linear(x, x.double(), w, None), TypeError),
        ("x_im shape", lambda: ops.complex_linear(x, x[0], w, None), ValueError),
        ("weight_im shape", lambda: ops.complex_linear(x, None, w, w[:4]), ValueError),
        ("weight_im dtype", lambda: ops.complex_linear(x, None, w, w.double()), TypeError),
        ("bias shape", lambda: ops.complex_linear(x, None, w, None, torch.randn(4)), ValueError),
        ("bias dtype", lambda: ops.complex_linear(x, None, w, None, b.double()), TypeError),
        ("bias_im shape", lambda: ops.complex_linear(x, None, w, None, b, torch.randn(5, 1)), ValueError),
        ("weight device", lambda: ops.complex_linear(x, None, w.to("meta"), None), ValueError),
        ("bias_im device", lambda: ops.complex_linear(x, None, w, None, None, b.to("meta")), ValueError),
    ]


@pytest.mark.parametrize("name, call, exc", _mm_cases(), ids=[c[0] for c in _mm_cases()])
def test_complex_matmul_rejects(backend, name, call, exc, monkeypatch):
    _forbid_launch(monkeypatch)
    with pytest.raises(exc):
        call()


@pytest.mark.parametrize("name, call, exc", _lin_cases(), ids=[c[0] for c in _lin_cases()])
def test_complex_linear_rejects(backend, name, call, exc, monkeypatch):
    _forbid_launch(monkeypatch)
    with pytest.raises(exc):
        call()


def _forbid_launch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Make any call that gets past validation fail loudly (so the error must come from the checks)."""
    from fastcurv.kernels import complex_linear as ck

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("validation let a bad input through to the kernel/reference")

    monkeypatch.setattr(ck, "complex_matmul", boom)
    monkeypatch.setattr(reference, "complex_matmul", boom)
    monkeypatch.setattr(reference, "complex_linear", boom)


def test_backend_fixture_is_active(backend, device):
    """Guard against a silently inert fixture: the requested backend is the one in force."""
    assert fastcurv._backend.requested() == backend
