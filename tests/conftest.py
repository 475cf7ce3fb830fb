"""Fixtures for tests/: device and backend selection. The environment is fixed in the root conftest.py."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on natively: CUDA when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["triton", "reference"])
def backend(request: pytest.FixtureRequest):
    """Run a test once per backend (``FASTCURV_BACKEND`` forced through :func:`fastcurv.use_backend`)."""
    import fastcurv

    with fastcurv.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

