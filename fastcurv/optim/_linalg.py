"""Symmetric eigendecomposition for the eigenbasis optimizers, robust to LAPACK's float32 failures."""

from __future__ import annotations

import torch
from torch import Tensor


def eigvecs(M: Tensor) -> Tensor | None:
    """Eigenvectors of the symmetric ``M`` (columns, ascending eigenvalues), retried in float64 when LAPACK raises
    or returns non-finite vectors (seen without an exception for float32 factors of layers behind many dead
    ReLUs); None when both fail. Returned in ``M``'s dtype."""
    for dt in (M.dtype, torch.float64):
        try:
            Q = torch.linalg.eigh(M.to(dt))[1]
        except RuntimeError:
            continue
        if bool(torch.isfinite(Q).all()):
            return Q.to(M.dtype)
    return None
