"""The comparison's one error type and its one-line message format."""

from __future__ import annotations


class CompareError(ValueError):
    """A comparison cannot be set up (unknown or unavailable optimizer, bad setting); one-line message."""


def one_line(e: BaseException | str) -> str:
    """``e`` as one line of at most ~300 characters (``Type: message`` for an exception)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}"
    return text[:300] + ("..." if len(text) > 300 else "")
