r"""Kronecker-factor update: :math:`A \leftarrow \beta A + \frac{1-\beta}{m} X^\top X` (SYRK + fused EMA).

Every test goes through the public ops (:func:`fastcurv.ops.kron_factor_update_` and its ``_foreach_``
twin) once per backend (fixture ``backend``) and is checked against :mod:`fastcurv.reference` (the spec)
and against invariants: exact symmetry, PSD preservation, the non-finite guard (A bitwise unchanged), the
per-layer guard of the grouped launch, and every validation error (raised before anything is written).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fastcurv import ops, reference
from fastcurv.kernels import kron_factor as kf

DIMS = (1, 7, 33, 64, 100, 257)  # straddle the 64/128 tile edges
BATCHES = (1, 5, 64, 130)  # straddle the BLOCK_K edges
DTYPES = (  # (A dtype, X dtype)
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
)


def _sym(d: int, dtype: torch.dtype, scale: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """An exactly symmetric PSD matrix of entries ~ ``scale``: triu of B Bᵀ / d mirrored, plus scale·I."""
    B = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = B @ B.T / d
    S = torch.triu(S) + torch.triu(S, 1).T + torch.eye(d, dtype=torch.float64)
    return (scale * S).to(device=device, dtype=dtype).contiguous()


def _batch(m: int, d: int, dtype: torch.dtype, scale: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (scale * torch.randn(m, d, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2  # float32: 2^-24, float64: 2^-53


def _bound(A0: torch.Tensor, X: torch.Tensor, beta: float, normalize: bool = True) -> torch.Tensor:
    r"""Elementwise bound on |op - reference|, valid for any summation order (Higham, Accuracy and Stability of
    Numerical Algorithms, §3.1).

    In A's dtype, with unit roundoff :math:`u` and :math:`\gamma_k = ku/(1-ku)`: an inner product of length
    :math:`m` has error :math:`\le \gamma_m (|X|^\top|X|)_{rc}`; the scale :math:`s` costs at most 3 roundings
    (the kernel's :math:`(1-\beta)\cdot\mathrm{fl}(1/m)`; the reference's :math:`(1-\beta)/m` 2), then
    :math:`s\cdot S`, :math:`\beta A` and their sum 1 each (the reference's :math:`(N+N^\top)/2` 1 in place of
    the kernel's third scale rounding), so each
    side is within :math:`\gamma_{m+6}(\beta|A| + |s|\,|X|^\top|X|)` of the exact value and the two within twice
    that. bf16/fp16 X: the products are exact in float32 (both sides upcast). TF32 on CUDA rounds each factor
    to 11 bits, adding :math:`(2u_{tf32} + u_{tf32}^2)|X|^\top|X|` to the kernel's side. A tiny absolute term
    covers results in the subnormal range.
    """
    m = X.shape[0]
    u = _unit_roundoff(A0.dtype)
    k = m + 6
    gamma = k * u / (1 - k * u)
    Xa = X.double().abs()
    P = Xa.T @ Xa
    s = (1 - beta) / m if normalize else 1 - beta
    mag = beta * A0.double().abs() + abs(s) * P
    bound = 2 * gamma * mag
    if A0.is_cuda and A0.dtype == torch.float32 and X.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        ut = 2.0**-11
        bound = bound + (2 * ut + ut * ut) * abs(s) * P * (1 + gamma)
    return (bound + k * torch.finfo(A0.dtype).tiny).to(A0.device)


def _assert_within_bound(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - expected.double()).abs()
    bad = err > bound.to(err.device)
    assert not bad.any(), (
        f"{int(bad.sum())} entries beyond the error bound; worst excess {(err / bound).max().item():.3g}x "
        f"(max error {err.max().item():.3g})"
    )


def _beta_arg(beta: float, as_tensor: bool, A: torch.Tensor) -> float | torch.Tensor:
    return torch.tensor(beta, dtype=A.dtype, device=A.device) if as_tensor else beta


@pytest.mark.parametrize("d", [1, 127, 128, 129, 257, 300, 385])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_gram_is_the_full_product(d, dtype):
    """The reference's block-triangle Gram (panels of ``SYRK_PANEL`` columns, lower blocks mirrored) is XᵀX:
    within the inner-product bound gamma_m |X|ᵀ|X| of the float64 product, entry for entry, on both sides of
    every panel edge (a wrong mirror or panel offset is off by O(1))."""
    g = torch.Generator().manual_seed(d)
    X = _batch(70, d, dtype, 1.0, g, torch.device("cpu"))
    got = reference._gram(X)
    exact = X.double().T @ X.double()
    u = _unit_roundoff(dtype)
    bound = 70 * u / (1 - 70 * u) * (X.double().abs().T @ X.double().abs()) + torch.finfo(dtype).tiny
    _assert_within_bound(got, exact, bound)


# --------------------------------------------------------------------------------------------------------
# values: against the reference, exact symmetry
# --------------------------------------------------------------------------------------------------------
@given(
    d=st.sampled_from(DIMS),
    m=st.sampled_from(BATCHES),
    dtypes=st.sampled_from(DTYPES),
    beta=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    beta_tensor=st.booleans(),
    a_exp=st.floats(-6, 6),
    x_exp=st.floats(-6, 6),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(d=257, m=130, dtypes=DTYPES[0], beta=0.95, beta_tensor=True, a_exp=3.0, x_exp=-3.0, normalize=True, seed=1)
@example(d=100, m=64, dtypes=DTYPES[2], beta=0.5, beta_tensor=False, a_exp=-3.0, x_exp=3.0, normalize=True, seed=2)
@example(d=257, m=130, dtypes=DTYPES[1], beta=0.9, beta_tensor=True, a_exp=6.0, x_exp=6.0, normalize=False, seed=3)
@example(d=65, m=5, dtypes=DTYPES[0], beta=0.0, beta_tensor=False, a_exp=-6.0, x_exp=-6.0, normalize=False, seed=4)
def test_matches_reference_and_symmetric(
    backend, device, d, m, dtypes, beta, beta_tensor, a_exp, x_exp, normalize, seed
):
    a_dtype, x_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    A = _sym(d, a_dtype, 10.0**a_exp, g, device)
    X = _batch(m, d, x_dtype, 10.0**x_exp, g, device)
    A0 = A.clone()
    expected = reference.kron_factor_update_(A0.clone(), X, beta, normalize=normalize)

    out = ops.kron_factor_update_(A, X, _beta_arg(beta, beta_tensor, A), normalize=normalize)

    assert out is A
    assert torch.equal(A, A.T), "A must stay exactly symmetric"
    _assert_within_bound(A, expected, _bound(A0, X, float(torch.tensor(beta, dtype=a_dtype)), normalize))
    if beta == 1.0:
        assert torch.equal(A, A0), "beta = 1 keeps A exactly"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unnormalized_is_shampoo_statistics(backend, device, dtype):
    """``normalize=False`` with ``X = G.T`` (a transposed view) is L <- beta L + (1 - beta) G G^T, and with
    ``X = G`` it is R <- beta R + (1 - beta) G^T G (the exact values, computed in float64)."""
    g = torch.Generator().manual_seed(11)
    G = _batch(70, 33, dtype, 1.0, g, device)  # an (out, in) gradient matrix
    L, R = _sym(70, dtype, 1.0, g, device), _sym(33, dtype, 1.0, g, device)
    L0, R0 = L.clone(), R.clone()
    ops.kron_factor_update_(L, G.T, 0.9, normalize=False)
    ops.kron_factor_update_(R, G, 0.9, normalize=False)
    b = float(torch.tensor(0.9, dtype=dtype))
    Gd = G.double()
    exact_L = b * L0.double() + (1 - b) * Gd @ Gd.T
    exact_R = b * R0.double() + (1 - b) * Gd.T @ Gd
    for got, A0, exact, X in ((L, L0, exact_L, G.T), (R, R0, exact_R, G)):
        assert torch.equal(got, got.T)
        _assert_within_bound(got, exact, _bound(A0, X, b, normalize=False) / 2)  # one side of the bound


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[3]], ids=["f32", "f64", "f32-f16"])
def test_preserves_psd(backend, device, dtypes):
    a_dtype, x_dtype = dtypes
    g = torch.Generator().manual_seed(4)
    d = 100
    A = _sym(d, a_dtype, 1.0, g, device)
    # The exact update of a matrix with smallest eigenvalue >= -e has smallest eigenvalue >= -beta e; the
    # computed one differs from it by E with |E| <= _bound / 2 elementwise (one side), and by Weyl's
    # inequality an eigenvalue moves by at most ||E||_2 <= ||E||_F. eigvalsh in float64 adds d u ||A||_2.
    e = 0.0
    for m, beta in ((5, 0.9), (1, 0.5), (130, 0.99), (5, 0.0)):  # ends rank 5: eigenvalues ~ 0
        X = _batch(m, d, x_dtype, 1.0, g, device)
        b = float(torch.tensor(beta, dtype=a_dtype))
        rounding = float(torch.linalg.norm(_bound(A, X, b) / 2))
        ops.kron_factor_update_(A, X, beta)
        ev = torch.linalg.eigvalsh(A.double())
        e = b * e + rounding
        assert ev.min().item() >= -(e + d * 2.0**-53 * ev.abs().max().item())
        assert torch.equal(A, A.T)


# --------------------------------------------------------------------------------------------------------
# the guard: non-finite X or beta, out-of-range tensor beta -> A bitwise unchanged
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[2]], ids=["f32", "f64", "f32-bf16"])
def test_nonfinite_x_leaves_A_unchanged(backend, device, dtypes, bad):
    a_dtype, x_dtype = dtypes
    g = torch.Generator().manual_seed(5)
    A = torch.randn(70, 70, generator=g).to(device=device, dtype=a_dtype)  # not symmetric: any write shows
    X = _batch(33, 70, x_dtype, 1.0, g, device)
    X[17, 69] = bad
    A0 = A.clone()
    ops.kron_factor_update_(A, X, 0.5)
    assert torch.equal(A, A0)


@pytest.mark.parametrize("beta", [math.nan, math.inf, -math.inf, -0.25, 1.5])
def test_bad_tensor_beta_leaves_A_unchanged(backend, device, beta):
    g = torch.Generator().manual_seed(6)
    A = torch.randn(40, 40, generator=g).to(device)
    X = _batch(9, 40, torch.float32, 1.0, g, device)
    A0 = A.clone()
    ops.kron_factor_update_(A, X, torch.tensor(beta, device=device))
    assert torch.equal(A, A0)


# --------------------------------------------------------------------------------------------------------
# foreach: one grouped launch, per-layer guard
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[2]], ids=["f32", "f64", "f32-bf16"])
@pytest.mark.parametrize("beta_tensor", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_foreach_matches_per_layer_reference(backend, device, dtypes, beta_tensor, normalize):
    a_dtype, x_dtype = dtypes
    g = torch.Generator().manual_seed(7)
    shapes = [(1, 3), (257, 5), (7, 130), (64, 64), (100, 1), (33, 70)]  # (d, m)
    As = [_sym(d, a_dtype, 10.0 ** (i - 2), g, device) for i, (d, _) in enumerate(shapes)]
    Xs = [_batch(m, d, x_dtype, 10.0 ** (1 - i), g, device) for i, (d, m) in enumerate(shapes)]
    Xs[2][0, 0] = math.nan  # only layer 2 is skipped
    A0s = [A.clone() for A in As]
    expected = [reference.kron_factor_update_(A.clone(), X, 0.8, normalize=normalize) for A, X in zip(A0s, Xs)]

    out = ops.kron_factor_update_foreach_(As, Xs, _beta_arg(0.8, beta_tensor, As[0]), normalize=normalize)

    assert len(out) == len(As) and all(o is A for o, A in zip(out, As))
    assert torch.equal(As[2], A0s[2])
    for A, A0, X, e in zip(As, A0s, Xs, expected):
        assert torch.equal(A, A.T)
        if A is not As[2]:
            assert not torch.equal(A, A0)
            _assert_within_bound(A, e, _bound(A0, X, float(torch.tensor(0.8, dtype=a_dtype)), normalize))


def test_foreach_empty_is_a_no_op(backend):
    assert ops.kron_factor_update_foreach_([], [], 0.5) == []


def test_triton_backend_runs_the_kernel(device, monkeypatch):
    """Guard against a silently-skipped kernel: the triton backend must reach the launcher."""
    import fastcurv

    calls = []
    launcher = kf.kron_factor_update
    monkeypatch.setattr(kf, "kron_factor_update", lambda *a: (calls.append(len(a[0])), launcher(*a))[1])
    g = torch.Generator().manual_seed(8)
    As = [_sym(7, torch.float32, 1.0, g, device) for _ in range(3)]
    Xs = [_batch(5, 7, torch.float32, 1.0, g, device) for _ in range(3)]
    with fastcurv.use_backend("triton"):
        ops.kron_factor_update_foreach_(As, Xs, 0.5)
    with fastcurv.use_backend("reference"):
        ops.kron_factor_update_(As[0], Xs[0], 0.5)
    assert calls == [3]


def test_tables_cached_but_pointers_current(device):
    """Same shapes reuse the tile table; fresh tensors of those shapes are still the ones updated."""
    import fastcurv

    g = torch.Generator().manual_seed(9)
    with fastcurv.use_backend("triton"):
        for _ in range(3):
            As = [_sym(d, torch.float64, 1.0, g, device) for d in (33, 100)]
            Xs = [_batch(5, d, torch.float64, 1.0, g, device) for d in (33, 100)]
            expected = [reference.kron_factor_update_(A.clone(), X, 0.3) for A, X in zip(As, Xs)]
            hits = kf._plan.cache_info().hits
            ops.kron_factor_update_foreach_(As, Xs, 0.3)
            for A, e in zip(As, expected):
                torch.testing.assert_close(A, e, rtol=1e-12, atol=1e-12)
        assert kf._plan.cache_info().hits == hits + 1


# --------------------------------------------------------------------------------------------------------
# validation: every error path raises before anything is written
# --------------------------------------------------------------------------------------------------------
def _single_cases(device):
    f32, f64 = torch.float32, torch.float64
    A = lambda d=4, dt=f32: torch.randn(d, d, dtype=dt, device=device)  # noqa: E731
    X = lambda m=3, d=4, dt=f32: torch.randn(m, d, dtype=dt, device=device)  # noqa: E731
    nonsym = torch.randn(4, 4, device=device)
    meta = torch.device("meta")
    return {
        "A-1d": (torch.randn(4, device=device), X(), 0.5, ValueError),
        "A-3d": (torch.randn(2, 4, 4, device=device), X(), 0.5, ValueError),
        "A-nonsquare": (torch.randn(4, 5, device=device), X(d=5), 0.5, ValueError),
        "X-1d": (A(), torch.randn(4, device=device), 0.5, ValueError),
        "X-3d": (A(), torch.randn(2, 3, 4, device=device), 0.5, ValueError),
        "X-d-mismatch": (A(), X(d=5), 0.5, ValueError),
        "X-empty-batch": (A(), X(m=0), 0.5, ValueError),
        "A-int": (torch.ones(4, 4, dtype=torch.int32, device=device), X(), 0.5, TypeError),
        "A-f16": (A(dt=torch.float16), X(dt=torch.float16), 0.5, TypeError),
        "A-bf16": (A(dt=torch.bfloat16), X(dt=torch.bfloat16), 0.5, TypeError),
        "X-f16-with-f64-A": (A(dt=f64), X(dt=torch.float16), 0.5, TypeError),
        "X-bf16-with-f64-A": (A(dt=f64), X(dt=torch.bfloat16), 0.5, TypeError),
        "X-f64-with-f32-A": (A(), X(dt=f64), 0.5, TypeError),
        "X-f32-with-f64-A": (A(dt=f64), X(), 0.5, TypeError),
        "X-int": (A(), torch.ones(3, 4, dtype=torch.int64, device=device), 0.5, TypeError),
        "X-other-device": (A(), torch.empty(3, 4, device=meta), 0.5, ValueError),
        "A-noncontiguous": (nonsym.T, X(), 0.5, ValueError),
        "A-not-tensor": (nonsym.tolist(), X(), 0.5, TypeError),
        "X-not-tensor": (A(), X().tolist(), 0.5, TypeError),
        "beta-negative": (A(), X(), -0.1, ValueError),
        "beta-above-one": (A(), X(), 1.0001, ValueError),
        "beta-nan": (A(), X(), math.nan, ValueError),
        "beta-inf": (A(), X(), math.inf, ValueError),
        "beta-str": (A(), X(), "0.5", TypeError),
        "beta-none": (A(), X(), None, TypeError),
        "beta-bool": (A(), X(), True, TypeError),
        "beta-list": (A(), X(), [0.5], TypeError),
        "beta-1d-tensor": (A(), X(), torch.tensor([0.5], device=device), ValueError),
        "beta-int-tensor": (A(), X(), torch.tensor(1, device=device), TypeError),
        "beta-other-device": (A(), X(), torch.tensor(0.5, device=meta), ValueError),
        "normalize-int": (A(), X(), 0.5, TypeError, {"normalize": 1}),
        "normalize-none": (A(), X(), 0.5, TypeError, {"normalize": None}),
        "normalize-tensor": (A(), X(), 0.5, TypeError, {"normalize": torch.tensor(True)}),
    }


_CASES = list(_single_cases(torch.device("cpu")))


@pytest.mark.parametrize("case", _CASES)
def test_single_errors_leave_A_unchanged(backend, device, case):
    A, X, beta, exc, *kw = _single_cases(device)[case]
    A0 = A.clone() if isinstance(A, torch.Tensor) else None
    with pytest.raises(exc, match=r"\b(A|X|beta|normalize)\b"):
        ops.kron_factor_update_(A, X, beta, **(kw[0] if kw else {}))
    if A0 is not None:
        assert torch.equal(A, A0)


def _foreach_cases(device):
    f32 = torch.float32
    good = lambda: ([torch.randn(4, 4, device=device), torch.randn(6, 6, device=device)],  # noqa: E731
                    [torch.randn(3, 4, device=device), torch.randn(2, 6, device=device)])
    cases = {}
    As, Xs = good()
    cases["length-mismatch"] = (As, Xs[:1], 0.5, ValueError)
    As, Xs = good()
    cases["As-a-tensor"] = (As[0], Xs, 0.5, TypeError)
    As, Xs = good()
    cases["Xs-a-tensor"] = (As, Xs[0], 0.5, TypeError)
    As, Xs = good()
    cases["Xs-entry-not-tensor"] = (As, [Xs[0], Xs[1].tolist()], 0.5, TypeError)
    As, Xs = good()
    Xs[1] = torch.randn(2, 5, device=device)
    cases["second-d-mismatch"] = (As, Xs, 0.5, ValueError)
    As, Xs = good()
    Xs[1] = torch.randn(0, 6, device=device)
    cases["second-empty-batch"] = (As, Xs, 0.5, ValueError)
    As, Xs = good()
    As[1], Xs[1] = As[1].double(), Xs[1].double()
    cases["mixed-A-dtypes"] = (As, Xs, 0.5, TypeError)
    As, Xs = good()
    Xs[1] = Xs[1].bfloat16()
    cases["mixed-X-dtypes"] = (As, Xs, 0.5, TypeError)
    As, Xs = good()
    As[1], Xs[1] = torch.empty(6, 6, device="meta"), torch.empty(2, 6, device="meta")
    cases["mixed-devices"] = (As, Xs, 0.5, ValueError)
    As, Xs = good()
    As[1] = torch.randn(6, 6, device=device).T
    cases["second-noncontiguous"] = (As, Xs, 0.5, ValueError)
    As, Xs = good()
    As[1] = torch.randn(6, 6, dtype=f32, device=device)[:, :5]
    cases["second-nonsquare"] = (As, Xs, 0.5, ValueError)
    As, Xs = good()
    cases["beta-out-of-range"] = (As, Xs, 2.0, ValueError)
    As, Xs = good()
    cases["beta-wrong-type"] = (As, Xs, "x", TypeError)
    As, Xs = good()
    cases["normalize-not-bool"] = (As, Xs, 0.5, TypeError, {"normalize": "yes"})
    return cases


@pytest.mark.parametrize("case", list(_foreach_cases(torch.device("cpu"))))
def test_foreach_errors_leave_As_unchanged(backend, device, case):
    As, Xs, beta, exc, *kw = _foreach_cases(device)[case]
    As_list = As if isinstance(As, list) else [As]
    A0s = [A.clone() for A in As_list if A.device.type != "meta"]
    with pytest.raises(exc, match=r"\b(As|Xs|beta|normalize)\b"):
        ops.kron_factor_update_foreach_(As, Xs, beta, **(kw[0] if kw else {}))
    for A, A0 in zip([A for A in As_list if A.device.type != "meta"], A0s):
        assert torch.equal(A, A0)
