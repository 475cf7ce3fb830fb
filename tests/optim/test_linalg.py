"""The eigenbasis optimizers' eigendecomposition (fastcurv.optim._linalg): the float64 retry."""

from __future__ import annotations

import torch

from fastcurv.optim import _linalg


def test_nan_vectors_or_a_failure_in_float32_are_retried_in_float64(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, generator=g)
    M = X.T @ X
    want = torch.linalg.eigh(M.double())[1].float()
    real = torch.linalg.eigh
    for bad in ("nan", "raise"):

        def eigh(A, _bad=bad):  # type: ignore[no-untyped-def]
            if A.dtype == torch.float32:
                if _bad == "raise":
                    raise RuntimeError("linalg.eigh: the algorithm failed to converge")
                w, Q = real(A)
                return w, torch.full_like(Q, float("nan"))
            return real(A)

        monkeypatch.setattr(torch.linalg, "eigh", eigh)
        Q = _linalg.eigvecs(M)
        assert Q is not None and Q.dtype == torch.float32
        torch.testing.assert_close(Q, want, rtol=0, atol=0)
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: (_ for _ in ()).throw(RuntimeError("no")))
    assert _linalg.eigvecs(M) is None
