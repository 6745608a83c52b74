"""sheri_trio._exceptions: exception groups flattened, and their real errors."""

from __future__ import annotations

import trio

from sheri_trio._exceptions import leaves, real_errors


def _cancelled() -> trio.Cancelled:
    """A real ``trio.Cancelled`` (it cannot be constructed directly)."""
    caught: list[trio.Cancelled] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep_forever()
            except trio.Cancelled as exc:
                caught.append(exc)
                raise

    trio.run(main)
    return caught[0]


def test_leaves_flatten_nested_groups_in_order() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    group = BaseExceptionGroup("outer", [a, BaseExceptionGroup("inner", [b, c])])
    assert leaves(group) == [a, b, c]
    assert leaves(a) == [a]


def test_real_errors_leave_out_the_cancellations_beside_them() -> None:
    error = OSError("connection reset")
    group = BaseExceptionGroup("loops", [_cancelled(), BaseExceptionGroup("x", [error])])
    assert real_errors(group) == [error]
    assert real_errors(BaseExceptionGroup("only", [_cancelled()])) == []
