"""Backend selection for the fused ops: Triton kernels or the eager reference.

``FASTCURV_BACKEND`` chooses, read at every op call (so tests and users can switch at run time):

* ``auto`` (default): CUDA tensors run the Triton kernels (when triton is importable), everything else runs
  the eager reference in :mod:`fastcurv.reference`.
* ``triton``: always the Triton kernels. On a machine without CUDA they run under Triton's CPU interpreter;
  that needs ``TRITON_INTERPRET=1`` in the environment *before* triton is first imported, which
  :func:`configure_interpreter` (called by ``import fastcurv``) arranges when it can.
* ``reference``: always the eager reference.

:func:`use_backend` overrides the variable for a block of code (a context manager) — handy in tests.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch

_VALID = ("auto", "triton", "reference")
_override: str | None = None


def configure_interpreter() -> None:
    """Set ``TRITON_INTERPRET=1`` when the Triton backend is requested on a machine without CUDA.

    Must run before ``triton`` is imported (``import torch._dynamo`` imports it), so ``fastcurv/__init__``
    calls it first thing. ``torch.cuda.is_available()`` does not import triton.
    """
    if os.environ.get("FASTCURV_BACKEND", "auto") == "triton" and not torch.cuda.is_available():
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")


def requested() -> str:
    """The backend asked for: the active :func:`use_backend` override, else ``FASTCURV_BACKEND``."""
    name = _override if _override is not None else os.environ.get("FASTCURV_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"FASTCURV_BACKEND must be one of {_VALID}, got {name!r}")
    return name


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` can succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Decide, for an op whose main operand is ``t``, whether to run the Triton kernel.

    Raises ``RuntimeError`` with the remedy when the Triton backend is forced but cannot run.
    """
    name = requested()
    if name == "reference":
        return False
    if name == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FASTCURV_BACKEND=triton but triton is not installed (pip install triton)")
    if t.is_cuda:
        return True
    if t.device.type == "cpu" and interpreting():
        return True
    raise RuntimeError(
        "FASTCURV_BACKEND=triton on a CPU tensor needs Triton's interpreter: export TRITON_INTERPRET=1 "
        "before triton is imported (import fastcurv first, or set it in the environment)"
    )


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"auto"``, ``"triton"`` or ``"reference"``) inside a ``with`` block."""
    global _override
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
