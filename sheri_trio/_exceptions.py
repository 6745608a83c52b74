"""Exception groups, flattened: the one helper every layer uses to unwrap them."""

from __future__ import annotations

__all__ = ["leaves"]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened (``exc`` if none)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
