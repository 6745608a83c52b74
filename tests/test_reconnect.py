"""The backoff of the one reconnect loop (the loop itself: tests/test_client_scripted.py)."""

from __future__ import annotations

import pytest

from sheri_trio.mqtt import ClientOptions
from sheri_trio.mqtt._reconnect import backoff_delay


@pytest.mark.parametrize(
    ("attempt", "cap"), [(1, 0.1), (2, 0.2), (3, 0.4), (9, 25.6), (10, 30), (11, 30)]
)
def test_delay_is_drawn_from_half_the_cap_to_the_cap(attempt: int, cap: float) -> None:
    options = ClientOptions()  # 0.1 s doubling up to 30 s
    delays = [backoff_delay(options, attempt) for _ in range(200)]
    assert all(cap / 2 <= d <= cap for d in delays)
    assert max(delays) - min(delays) > cap / 10  # jittered, not constant


def test_a_very_long_outage_does_not_overflow() -> None:
    """Regression: 2 ** attempt as a float overflowed after ~1030 attempts (~8.5 h
    of retrying every 30 s), and the OverflowError stopped the client."""
    delay = backoff_delay(ClientOptions(), 5000)
    assert 15 <= delay <= 30
