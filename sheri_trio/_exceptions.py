"""Exception groups, flattened: the one helper every layer uses to unwrap them."""

from __future__ import annotations

import trio

__all__ = ["leaves", "real_errors"]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened (``exc`` if none)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def real_errors(exc: BaseException) -> list[BaseException]:
    """:func:`leaves` but the ``trio.Cancelled`` that only accompany the real errors."""
    return [leaf for leaf in leaves(exc) if not isinstance(leaf, trio.Cancelled)]
