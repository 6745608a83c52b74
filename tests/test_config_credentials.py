"""The broker's user name and password: each field resolved on its own, one precedence
per field (flag > environment > URL > ``[broker]``), for every command."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from sheri_trio.cli._broker import BrokerArgs
from sheri_trio.config import (
    build_agent_config,
    connection_settings,
    credentials,
    load_config,
    parse_config,
)
from sheri_trio.mqtt import BrokerURL, ConnectError, open_client

if TYPE_CHECKING:
    from pathlib import Path

    from sheri_trio.testing import MosquittoBroker

#: the sources, highest precedence first
SOURCES = ("flag", "env", "url", "file")
#: what one source gives
GIVES = {
    "neither": (),
    "username": ("username",),
    "password": ("password",),
    "both": ("username", "password"),
}


def _resolve(gives: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The client options that ``connection_settings`` makes of what each source gives
    (source ``s`` gives user name ``s-user`` and password ``s-pass``)."""
    flag, env_, url, file = (gives[s] for s in SOURCES)
    env = {}
    if "username" in env_:
        env["SHERI_USERNAME"] = "env-user"
    if "password" in env_:
        env["SHERI_PASSWORD"] = "env-pass"
    userinfo = ""
    if url:
        userinfo = ("url-user" if "username" in url else "") + (
            ":url-pass" if "password" in url else ""
        )
        userinfo += "@"
    file_config = parse_config({"broker": {f: f"file-{f[:4]}" for f in file}})
    conn = connection_settings(
        file_config,
        env=env,
        broker=f"mqtt://{userinfo}h:1883",
        username="flag-user" if "username" in flag else None,
        password="flag-pass" if "password" in flag else None,
    )
    return conn.client_options


# The reported cases and their neighbours, spelled out: (flag, env, url, file) -> result.
NAMED = [
    # the file's user name with SHERI_PASSWORD (the bug: the file's half was dropped)
    (
        ("neither", "password", "neither", "username"),
        {"username": "file-user", "password": "env-pass"},
    ),
    # the URL's user with the file's password (the bug too)
    (
        ("neither", "neither", "username", "password"),
        {"username": "url-user", "password": "file-pass"},
    ),
    # the flag's user name with the file's password
    (
        ("username", "neither", "neither", "password"),
        {"username": "flag-user", "password": "file-pass"},
    ),
    # a password in the URL, a user name in the environment
    (
        ("neither", "username", "password", "neither"),
        {"username": "env-user", "password": "url-pass"},
    ),
    # every source gives both: the flag wins each field
    (("both", "both", "both", "both"), {"username": "flag-user", "password": "flag-pass"}),
    # the file gives both, the URL one: the URL's wins that field only
    (("neither", "neither", "password", "both"), {"username": "file-user", "password": "url-pass"}),
    (("neither", "neither", "neither", "both"), {"username": "file-user", "password": "file-pass"}),
    (("neither", "neither", "neither", "neither"), {}),
]


@pytest.mark.parametrize(("sources", "expected"), NAMED)
def test_each_field_comes_from_its_first_source(
    sources: tuple[str, str, str, str], expected: dict[str, str]
) -> None:
    assert _resolve({s: GIVES[g] for s, g in zip(SOURCES, sources, strict=True)}) == expected


@pytest.mark.parametrize("given", list(itertools.product(GIVES, repeat=len(SOURCES))), ids="-".join)
def test_every_combination_of_sources(given: tuple[str, ...]) -> None:
    """Each of the four sources gives a user name, a password, both or neither (256)."""
    gives = {s: GIVES[g] for s, g in zip(SOURCES, given, strict=True)}
    expected = {}
    for field, short in (("username", "user"), ("password", "pass")):
        first = next((s for s in SOURCES if field in gives[s]), None)
        if first is not None:
            expected[field] = f"{first}-{short}"
    assert _resolve(gives) == expected


def test_empty_environment_values_are_unset_and_url_fields_count_even_empty() -> None:
    file_broker = {"username": "file-user", "password": "file-pass"}
    env = {"SHERI_USERNAME": "", "SHERI_PASSWORD": ""}
    # an empty variable is no value: the file's are used
    assert credentials(BrokerURL.parse("mqtt://h"), file_broker, {}, env) == file_broker
    # "user:@" is an explicit empty password; ":pass@" has no user name
    assert credentials(BrokerURL.parse("mqtt://u:@h"), file_broker, {}, env) == {
        "username": "u",
        "password": "",
    }
    assert credentials(BrokerURL.parse("mqtt://:p@h"), file_broker, {}, env) == {
        "username": "file-user",
        "password": "p",
    }


def test_the_url_of_the_file_is_a_url_source(tmp_path: Path) -> None:
    """``[broker] url`` with a user ranks as the URL: above ``[broker] username``."""
    fc = parse_config(
        {"broker": {"url": "mqtt://url-user@h:1883", "username": "file-user", "password": "pw"}}
    )
    conn = connection_settings(fc, env={})
    assert conn.client_options == {"username": "url-user", "password": "pw"}


def test_every_command_resolves_them_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """agent (build_agent_config), submit/tasks/monitor/cancel/retry (BrokerArgs.link),
    swarm (BrokerArgs.connection) and demo (connection_settings) share the rule."""
    fc = parse_config({"broker": {"url": "mqtt://h:1883", "username": "file-user"}})
    monkeypatch.setenv("SHERI_PASSWORD", "env-pass")
    expected = {"username": "file-user", "password": "env-pass"}
    assert BrokerArgs().connection(fc).client_options == expected
    assert build_agent_config(fc, role="testing").client_options == expected
    assert connection_settings(fc).client_options == expected
    flagged = BrokerArgs(username="flag-user").connection(fc)
    assert flagged.client_options == {"username": "flag-user", "password": "env-pass"}


# ------------------------------------------------------------- a real mosquitto
def _toml(tmp_path: Path, url: str, **broker: str) -> Path:
    lines = [f'url = "{url}"', *(f'{k} = "{v}"' for k, v in broker.items())]
    path = tmp_path / "sheri.toml"
    path.write_text("[broker]\nconnect_timeout = 5\n" + "\n".join(lines) + "\n")
    return path


def _cases(broker: MosquittoBroker) -> list[tuple[str, str, dict[str, str], dict[str, str]]]:
    """(name, URL, [broker] keys, environment)"""
    bare = broker.url("mqtt", credentials=False)
    user, pw = broker.username, broker.password
    with_user = f"mqtt://{user}@{bare.removeprefix('mqtt://')}"
    return [
        ("file-user_env-password", bare, {"username": user}, {"SHERI_PASSWORD": pw}),
        ("url-user_file-password", with_user, {"password": pw}, {}),
        (
            "env-password-over-file",
            bare,
            {"username": user, "password": "wrong"},
            {"SHERI_PASSWORD": pw},
        ),
        ("url-password-over-file", broker.tcp_url, {"username": user, "password": "wrong"}, {}),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "file-user_env-password",
        "url-user_file-password",
        "env-password-over-file",
        "url-password-over-file",
    ],
)
async def test_a_mosquitto_with_a_password_file_accepts_the_combined_credentials(
    broker: MosquittoBroker, tmp_path: Path, name: str
) -> None:
    ((url, keys, env),) = [c[1:] for c in _cases(broker) if c[0] == name]
    fc = load_config(_toml(tmp_path, url, **keys))
    for conn in (
        connection_settings(fc, env=env),
        build_agent_config(fc, env=env, role="testing"),
    ):
        options = conn.client_options
        with trio.fail_after(10):
            async with open_client(conn.broker, **options) as client:
                await client.publish(f"creds/{name}", b"in", qos=1)


async def test_a_mosquitto_refuses_a_half_given_alone(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The control: the file's user name without any password is refused."""
    fc = load_config(_toml(tmp_path, broker.url("mqtt", credentials=False), username="sheri"))
    conn = connection_settings(fc, env={})
    assert conn.client_options == {"username": "sheri", "connect_timeout": 5.0}
    with trio.fail_after(10), pytest.raises(ConnectError) as refused:
        async with open_client(conn.broker, **conn.client_options):
            pass
    assert refused.value.reason_code in (0x86, 0x87)


async def _sheri(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHERI_")}
    return await trio.run_process(
        [sys.executable, "-m", "sheri_trio", *args],
        capture_stdout=True,
        capture_stderr=True,
        stdin=subprocess.DEVNULL,
        check=False,
        cwd=cwd,
        env={**clean, **env},
    )


async def test_the_commands_combine_the_file_user_with_sheri_password(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    _toml(tmp_path, broker.url("mqtt", credentials=False), username=broker.username)
    swarm = ("--swarm", "creds-cli")
    with trio.fail_after(60):
        tasks = await _sheri(tmp_path, "tasks", *swarm, SHERI_PASSWORD=broker.password)
        # someone subscribes to the submissions, so the broker takes them
        async with (
            open_client(broker.tcp_url) as watcher,
            watcher.subscribe("creds-cli/tasks/new", qos=1) as submissions,
        ):
            submit = await _sheri(
                tmp_path, "submit", "testing.run", *swarm, SHERI_PASSWORD=broker.password
            )
            assert submit.returncode == 0, submit.stderr.decode()
            assert b"testing.run" in (await submissions.receive()).payload
        refused = await _sheri(tmp_path, "tasks", *swarm, SHERI_PASSWORD="wrong-Pass")
    assert tasks.returncode == 0, tasks.stderr.decode()
    err = refused.stderr.decode()
    assert refused.returncode == 1, err
    assert "check the user name and password" in err
    assert "wrong-Pass" not in err
