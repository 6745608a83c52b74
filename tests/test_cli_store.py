"""The claim store on the command line: ``--claim-store``, ``SHERI_CLAIM_STORE``,
``[agent] claim_store``, checked at start by ``agent``, ``swarm``, ``submit --wait`` and
``monitor`` against a real redis-server (with ``requirepass``) and a throw-away
PostgreSQL database; its password never shown."""

from __future__ import annotations

import re
import signal
from typing import TYPE_CHECKING

import pytest
import trio
from store_helpers import free_port, pg_url, throwaway_database
from test_cli import _swarm, agent, sheri, sheri_run, stop

from sheri_trio.cli._submit import _stored_elsewhere
from sheri_trio.stores import BrokerStore
from sheri_trio.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sheri_trio.testing import MosquittoBroker


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that requires a password (``requirepass``)."""
    with RedisServer(tmp_path_factory.mktemp("redis"), password=True) as server:
        yield server


@pytest.fixture
def pg_database() -> Iterator[str]:
    with throwaway_database() as name:
        yield name


def _errors(result_stderr: bytes) -> list[str]:
    return [
        line for line in result_stderr.decode().splitlines() if line.startswith("sheri: error:")
    ]


async def test_a_wrong_store_is_refused_at_start_by_every_command(
    broker: MosquittoBroker, locked_redis: RedisServer, tmp_path: Path
) -> None:
    """Wrong credentials, an unreachable store, a bad scheme, a password on the command
    line: one clear line each, a non-zero exit, never the password."""
    secret = locked_redis.password
    store = locked_redis.url()
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    with_password = store.replace("//", f"//:{secret}@")
    swarm = _swarm("store")
    on = ("--broker", broker.tcp_url, "--swarm", swarm)
    cases: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "agent wrong password": (
            ("agent", *on, "--claim-store", store),
            {"SHERI_CLAIM_STORE_PASSWORD": "not-" + secret},
        ),
        "agent no password": (("agent", *on, "--claim-store", store), {}),
        "swarm wrong password": (
            ("swarm", "--roles", "general", *on),
            {"SHERI_CLAIM_STORE": store.replace("//", f"//:not-{secret}@")},
        ),
        "submit wrong password": (
            ("submit", "testing.run", "--wait", *on, "--claim-store", store),
            {"SHERI_CLAIM_STORE_PASSWORD": "not-" + secret},
        ),
        "monitor wrong password": (
            ("monitor", *on, "--claim-store", store),
            {"SHERI_CLAIM_STORE_PASSWORD": "not-" + secret},
        ),
        "agent unreachable": (("agent", *on, "--claim-store", unreachable), {}),
        "monitor unreachable": (("monitor", *on, "--claim-store", unreachable), {}),
        "agent bad scheme": (("agent", *on, "--claim-store", "memcached://127.0.0.1/0"), {}),
        "submit password in the flag": (
            (
                "submit",
                "testing.run",
                "--wait",
                *on,
                "--claim-store",
                with_password,
            ),
            {},
        ),
    }
    results = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def run(name: str, args: tuple[str, ...], env: dict[str, str]) -> None:
                results[name] = await sheri_run(*args, cwd=tmp_path, **env)

            for name, (args, env) in cases.items():
                nursery.start_soon(run, name, args, env)
    for name, result in results.items():
        out = result.stdout.decode() + result.stderr.decode()
        assert secret not in out, name
        assert "Traceback" not in out, (name, out)
        (line,) = _errors(result.stderr)
        if "no password" in name:
            assert result.returncode == 1, (name, out)
            # the server's own words follow; they differ between redis-py versions (RESP2:
            # "Authentication required."; redis-py 8's HELLO: "HELLO must be called ...")
            assert "refused the credentials: " in line, (name, line)
            assert "check the claim store's user and password" in line, (name, line)
        elif "wrong password" in name:
            assert result.returncode == 1, (name, out)
            assert "refused the credentials" in line, (name, line)
            assert "check the claim store's user and password" in line, (name, line)
        elif "unreachable" in name:
            assert result.returncode == 1, (name, out)
            assert f"claim store {unreachable} is unreachable" in line, (name, line)
        elif "scheme" in name:
            assert result.returncode == 2, (name, out)
            assert line == (
                "sheri: error: --claim-store: unknown claim store 'memcached://127.0.0.1/0': "
                "use broker, redis://, rediss:// or postgresql://"
            )
        else:
            assert result.returncode == 2, (name, out)
            assert "is refused on the command line: put it in SHERI_CLAIM_STORE_PASSWORD" in line
    assert (
        "start-up step 'claim store' failed" in _errors(results["agent wrong password"].stderr)[0]
    )


async def test_an_agent_opens_its_store_as_a_start_up_step(
    broker: MosquittoBroker, locked_redis: RedisServer, tmp_path: Path
) -> None:
    """From ``[agent] claim_store`` and the password from the environment: the step is
    logged, the agent comes online (the default dispatch: it is the dispatcher, with the
    store's term) and leaves on SIGINT; the password is never printed."""
    (tmp_path / "sheri.toml").write_text(f'[agent]\nclaim_store = "{locked_redis.url()}"\n')
    env = {"SHERI_CLAIM_STORE_PASSWORD": locked_redis.password}
    with trio.fail_after(30):
        async with sheri(
            "agent", "--broker", broker.tcp_url, "--swarm", _swarm("step"), "--log-level",
            "debug", cwd=tmp_path, env=env,
        ) as out:  # fmt: skip
            await out.expect(r"start-up: claim store agent=")
            shown = f"redis://:***@127.0.0.1:{locked_redis.port}/0"  # the password hidden
            await out.expect(rf"claim store agent=\S+ url={re.escape(shown)}")
            await out.expect(r"info: online ")
            await out.expect(r"is the dispatcher of \S+ \(epoch 1\)")  # the store's first
            assert await stop(out, signal.SIGINT) == 0
    assert locked_redis.password not in out.text
    assert out.text.index("start-up: claim store") < out.text.index("start-up: probe")


async def test_postgres_store_at_start(
    broker: MosquittoBroker, pg_database: str, tmp_path: Path
) -> None:
    """A database that exists: online; one that does not: exit 1, naming it."""
    swarm = _swarm("pg")
    with trio.fail_after(30):
        missing = await sheri_run(
            "agent", "--broker", broker.tcp_url, "--swarm", swarm,
            "--claim-store", pg_url(pg_database + "_absent"), cwd=tmp_path,
        )  # fmt: skip
        async with sheri(
            "agent", "--broker", broker.tcp_url, "--swarm", swarm,
            "--claim-store", pg_url(pg_database), cwd=tmp_path,
        ) as out:  # fmt: skip
            await out.expect(r"info: online ")
            assert await stop(out, signal.SIGINT) == 0
    (line,) = _errors(missing.stderr)
    assert missing.returncode == 1
    assert f'database "{pg_database}_absent" does not exist' in line


async def test_submit_wait_with_a_store(
    broker: MosquittoBroker, locked_redis: RedisServer, tmp_path: Path
) -> None:
    swarm = _swarm("submit-store")
    url = locked_redis.url().replace("//", f"//:{locked_redis.password}@")
    with trio.fail_after(30):
        async with agent(broker, swarm, "testing", f"{swarm}-t1"):
            result = await sheri_run(
                "submit", "testing.run", "--wait", "--broker", broker.tcp_url,
                "--swarm", swarm, cwd=tmp_path, SHERI_CLAIM_STORE=url,
            )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert "complete: success" in result.stdout.decode()


async def test_submit_wait_accepts_only_the_outcome_the_store_accepted() -> None:
    store = BrokerStore("s")
    assert await _stored_elsewhere(store, "t1", 1, "a") == ""  # nothing stored yet
    assert await _stored_elsewhere(None, "t1", 1, "a") == ""  # no store
    await store.claim("t1", 1, "a", 30)
    assert await store.finish("t1", 1, "a", {"status": "success"})
    assert await _stored_elsewhere(store, "t1", 1, "a") == ""
    assert await _stored_elsewhere(store, "t1", 1, "b") == (
        "the claim store accepted attempt 1 by a"
    )
