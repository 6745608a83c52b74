"""Shared fixtures: a real Mosquitto broker (see :mod:`sheri_trio.testing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from sheri_trio.testing import BridgedBrokers, MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for the whole session. Tests must not stop or restart it."""
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own, free to be stopped, killed or restarted."""
    with MosquittoBroker(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[BridgedBrokers]:
    """Two mosquittos, the second bridged to the first on ``#`` (issue 11's setup), the
    bridge already carrying messages both ways."""
    with BridgedBrokers(tmp_path / "bridged", tls=False) as pair:
        yield pair
