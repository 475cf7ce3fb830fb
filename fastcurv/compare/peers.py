"""Optimizers from outside fastcurv in the comparison: any optimizer class named by a dotted path
(``torch.optim.AdamW``, ``heavyball.SOAP``), and heavyball's compile switch.

A dotted path that names the class of a registry entry (``torch.optim.Adam``, ``heavyball.SOAP``,
``fastcurv.optim.KFAC``) is built exactly as that entry (same defaults, grid and stepping; only its name
is the path). Any other class is built from ``model.parameters()`` and stepped as ``zero_grad();
closure().backward(); step()`` — or, for a :class:`fastcurv.optim.CurvatureOptimizer` subclass, built from
the model and stepped as ``step(closure)`` (with ``batch=(x, x)`` and the problem's ``loss_fn`` when its
``step`` / constructor take them). The rules and the heavyball compile policy are in docs/compare.md.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

from fastcurv.compare.errors import CompareError, one_line

__all__ = ["heavyball_compile", "import_dotted", "is_dotted"]


def is_dotted(name: str) -> bool:
    """Whether ``name`` is a dotted path (``module.Class``) rather than a registry name."""
    return "." in name.strip()


def import_dotted(path: str) -> tuple[str, type]:
    """Import the optimizer class named by ``path`` (``package.module.Class``, the longest importable module
    prefix wins); returns ``("module:Class", class)``.

    Raises:
        CompareError: the path does not name an importable class with a ``step`` method (one line, naming
            the path and the reason).
    """
    text = path.strip()
    parts = text.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise CompareError(f"optimizer {path!r} is neither a registry name nor a dotted path module.Class")
    err: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as e:
            err = e
            if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            break  # the module exists but one of its own imports is missing
        except Exception as e:  # an error raised while importing the module
            err = e
            break
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise CompareError(
                f"optimizer {path!r}: module {module} has no attribute {'.'.join(parts[cut:])}"
            ) from None
        if not isinstance(obj, type) or not callable(getattr(obj, "step", None)):
            raise CompareError(f"optimizer {path!r} is not an optimizer class (a class with a step method)")
        return f"{module}:{'.'.join(parts[cut:])}", obj
    raise CompareError(f"optimizer {path!r} cannot be imported: {one_line(err) if err else 'no module'}")


def registered_class(target: str) -> type | None:
    """The class of a registry target ``"module:Class"`` when its module is already imported, else None
    (used to recognise a dotted path that names a registry entry's class under another module path)."""
    module, _, attr = target.partition(":")
    mod = sys.modules.get(module)
    obj = getattr(mod, attr, None) if mod is not None else None
    return obj if isinstance(obj, type) else None


def is_curvature_optimizer(cls: type) -> bool:
    """Whether ``cls`` is a fastcurv optimizer built from the model (``fastcurv.optim.CurvatureOptimizer``)."""
    from fastcurv.optim import CurvatureOptimizer

    return issubclass(cls, CurvatureOptimizer)


def takes_batch(cls: type) -> bool:
    """Whether ``cls.step`` takes the minibatch (``step(closure, batch=...)``)."""
    try:
        return "batch" in inspect.signature(cls.step).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def heavyball_compile(enabled: bool) -> Iterator[None]:
    """Run heavyball's fused functions compiled (``enabled``: heavyball's own default, ``torch.compile``
    with its ``heavyball.utils.compile_mode``) or eagerly (``compile_mode = None`` for the duration, which
    heavyball checks at every call); the previous setting is restored on exit."""
    import heavyball.utils as hu

    saved = hu.compile_mode
    if not enabled:
        hu.compile_mode = None
    try:
        yield
    finally:
        hu.compile_mode = saved
