"""Helpers for tests that run an agent or a client in a child process."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    """The first line a child process writes (the rest of that chunk is dropped)."""
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]
