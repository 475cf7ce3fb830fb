"""Integration tests import third-party frameworks. The source tree's top-level ``kernels/`` directory (installed
as ``fastcurv.kernels``) has the import name of the PyPI package ``kernels`` that transformers imports when it
is installed; with the repository root on ``sys.path`` (``python -m pytest`` from the root) the directory would
shadow it. Import the installed package first, with the root out of the path, so ``sys.modules`` holds it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def _import_installed(name: str) -> None:
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # not installed: nothing can be shadowed
    finally:
        sys.path[:] = saved


if "kernels" not in sys.modules:
    _import_installed("kernels")
