"""``fastcurv.optim._base.finite_flag`` (the optimizers' one-reduction finiteness check) agrees with
``isfinite(t).all()`` over every tensor: NaN or ±inf anywhere in any dtype, huge finite values (whose 2-norm
would overflow), empty / integer / None entries, complex tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcurv.optim._base import finite_flag

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4)), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    poison=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 19), st.sampled_from(["nan", "inf", "-inf"]))),
    huge=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_isfinite(shapes, dtypes, poison, huge, seed):
    g = torch.Generator().manual_seed(seed)
    ts = []
    for (r, c), dt in zip(shapes, dtypes):
        t = torch.randn(r, c, generator=g, dtype=torch.float64)
        if huge:
            t = t * torch.finfo(dt if not dt.is_complex else torch.float32).max / 4
        ts.append(t.to(dt))
    if poison is not None:
        i, j, v = poison
        t = ts[i % len(ts)]
        if t.numel():
            t.view(-1)[j % t.numel()] = float(v)
    expect = all(bool(torch.isfinite(t).all()) for t in ts)
    got = finite_flag(ts + [None, torch.ones(3, dtype=torch.int64)])
    assert got.dtype == torch.bool and got.dim() == 0
    assert bool(got) == expect


@pytest.mark.parametrize("ts", [[], [None], [torch.zeros(0)], [torch.ones(2, dtype=torch.int32)]])
def test_nothing_to_check_is_finite(ts):
    assert bool(finite_flag(ts))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 4097])
def test_poison_anywhere_in_vectorised_reductions(dtype, n):
    """NaN / ±inf at the first, a middle, and the last element (SIMD head, body and tail of the CPU
    reduction), in a contiguous tensor and in a strided view of one, is found."""
    g = torch.Generator().manual_seed(n)
    for pos in sorted({0, n // 2, n - 1}):
        for v in ("nan", "inf", "-inf"):
            t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
            t[pos] = float(v)
            assert not bool(finite_flag([torch.ones(3, dtype=dtype), t]))
            wide = torch.zeros(n, 3, dtype=dtype)
            wide[:, 1] = t
            assert not bool(finite_flag([wide[:, 1]])), (pos, v)
        assert bool(finite_flag([torch.randn(n, generator=g, dtype=torch.float64).to(dtype)]))
