"""Compatibility of the kernels with the Triton versions fastcurv meets (3.6 on the GPU machines, 3.9 in CI).

Triton 3.6's CPU interpreter converts a scalar tensor to a Python ``int`` with ``int(handle.data)``, where
every scalar is a shape-``(1,)`` numpy array; numpy >= 2.4 refuses that conversion ("only 0-dimensional
arrays can be converted to Python scalars"), so *every* kernel loop with a run-time bound
(``for k in range(0, n, B)`` with ``n`` loaded or passed as an argument) fails there. Triton 3.9's
interpreter squeezes the array first. :func:`patch_interpreter` installs that same conversion in the
interpreter of an older Triton. It changes nothing when Triton compiles for a GPU (the native path never
goes through the interpreter), and nothing on a Triton whose interpreter already squeezes.

The alternative — loops bounded only by constexprs, masking the tail — would cost the native kernels the
software pipelining of run-time bounded loops or wasted iterations, so the kernels keep their loops.
"""

from __future__ import annotations

import os

__all__ = ["patch_interpreter"]

_DONE = False


def patch_interpreter() -> None:
    """Make ``tensor.__index__`` squeeze its shape-(1,) handle under Triton's interpreter (idempotent)."""
    global _DONE
    if _DONE or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    _DONE = True
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without an interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - the interpreter was reorganised: nothing to patch
        return

    def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
