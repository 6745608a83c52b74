"""``sheri.toml`` and the agent's settings: precedence, checks, error messages."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import TYPE_CHECKING

import pytest

from sheri_trio.config import (
    AGENT_CHECKS,
    AGENT_KEYS,
    NOT_AGENT_KEYS,
    ConfigError,
    FileConfig,
    build_agent_config,
    connection_settings,
    load_config,
    parse_config,
    store_settings,
)
from sheri_trio.mqtt import TLSOptions
from sheri_trio.swarm import AgentConfig

if TYPE_CHECKING:
    from pathlib import Path


def _write(tmp_path: Path, text: str, name: str = "sheri.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_precedence_flag_env_file_default(tmp_path: Path) -> None:
    _write(tmp_path, '[agent]\nrole = "testing"\nmax_tasks = 2\nswarm = "from-file"\n')
    file_config = load_config(cwd=tmp_path)
    env = {"SHERI_ROLE": "deployment", "SHERI_MAX_TASKS": "5"}
    flagged = build_agent_config(file_config, env=env, role="review", max_tasks=7)
    assert (flagged.role, flagged.max_tasks, flagged.swarm) == ("review", 7, "from-file")
    from_env = build_agent_config(file_config, env=env, role=None)
    assert (from_env.role, from_env.max_tasks) == ("deployment", 5)
    from_file = build_agent_config(file_config, env={})
    assert (from_file.role, from_file.max_tasks) == ("testing", 2)
    default = build_agent_config(load_config(cwd=tmp_path / "nowhere"), env={})
    assert (default.role, default.max_tasks, default.swarm) == ("general", 4, "opencto-dev")
    assert default.broker == "mqtt://localhost:1883"
    assert re.fullmatch(r"sheri-ml-[0-9a-f]{8}", default.agent_id)
    env_swarm = build_agent_config(file_config, env={"SHERI_SWARM": "env-swarm"})
    assert env_swarm.swarm == "env-swarm"


def test_config_broker_tls_credentials_and_executor_tables(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    _write(
        tmp_path,
        """
[agent]
heartbeat_interval = 0.5
default_timeout = 0

[broker]
url = "mqtts://broker.example:8883"
username = "file-user"
password = "file-pass"
ca_file = "ca.pem"
connect_timeout = 3

[deploy.api]
command = ["make", "deploy"]

[testing]
command = ["pytest", "-q"]
""",
    )
    fc = load_config(cwd=tmp_path)
    config = build_agent_config(fc, env={})
    assert config.broker == "mqtts://broker.example:8883"
    assert config.heartbeat_interval == 0.5
    assert config.default_timeout is None
    assert config.client_options == {
        "username": "file-user",
        "password": "file-pass",
        "tls": TLSOptions(ca_file=str(tmp_path / "ca.pem")),
        "connect_timeout": 3.0,
    }
    assert config.executor_config == {
        "deploy": {"api": {"command": ["make", "deploy"]}},
        "testing": {"command": ["pytest", "-q"]},
    }
    # credentials in the URL win over the file's; --username/--password over both
    # (each field on its own: tests/test_config_credentials.py)
    in_url = connection_settings(fc, env={}, broker="mqtt://u:p@h:1883")
    assert (in_url.client_options["username"], in_url.client_options["password"]) == ("u", "p")
    flags = connection_settings(fc, env={}, username="flag-user", password="flag-pass")
    assert flags.client_options["username"] == "flag-user"
    assert flags.client_options["password"] == "flag-pass"
    assert flags.display() == "mqtts://broker.example:8883"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nmax_task = 3\n", "sheri.toml: agent.max_task: unknown key"),
        ('[agent]\nmax_tasks = "x"\n', "sheri.toml: agent.max_tasks: must be an integer >= 1, got 'x'"),  # noqa: E501
        ("[agent]\nmax_tasks = 0\n", "sheri.toml: agent.max_tasks: must be an integer >= 1, got 0"),
        ('[agent]\nrole = "boss"\n', "sheri.toml: agent.role: must be one of general, deployment"),
        ("[agent]\nheartbeat_interval = -1\n", "sheri.toml: agent.heartbeat_interval: must be a number > 0"),  # noqa: E501
        ('[agent]\nbroker = "http://x"\n', "sheri.toml: agent.broker: 'http://x': scheme must be"),
        ("[broker]\ninsecure = 1\n", "sheri.toml: broker.insecure: must be true or false, got 1"),
        ('[broker]\nca_file = "missing.pem"\n', "sheri.toml: broker.ca_file: no such file"),
        ("[broker]\nport = 1883\n", "sheri.toml: broker.port: unknown key"),
        ('swarm = "x"\n', "sheri.toml: swarm: unknown top-level key"),
        ("[agent\n", "sheri.toml: not valid TOML"),
        ('[deploy.web]\ncommand = "make"\n', "sheri.toml: deploy.web.command: must be a list of"),
        ("[executors]\nsimulate = 1\n", "sheri.toml: executors.simulate: must be true or false"),
        ("[agent]\nheartbeat_interval = 5\nlease_time = 2\n", "sheri.toml: agent.lease_time: must be longer"),  # noqa: E501
    ],
)  # fmt: skip
def test_invalid_config_names_file_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value).startswith(message), str(info.value)


def test_invalid_env_and_flag_values_name_their_source() -> None:
    with pytest.raises(ConfigError, match=r"^SHERI_MAX_TASKS: must be an integer >= 1, got 'x'$"):
        build_agent_config(FileConfig(), env={"SHERI_MAX_TASKS": "x"})
    with pytest.raises(ConfigError, match=r"^--role: must be one of"):
        build_agent_config(FileConfig(), env={}, role="boss")
    with pytest.raises(ConfigError, match=r"^--agent-id: must be 1-128 of"):
        build_agent_config(FileConfig(), env={}, agent_id="a/b")


def test_config_start_up_and_close_bounds(tmp_path: Path) -> None:
    _write(tmp_path, "[agent]\nstartup_timeout = 2.5\n\n[broker]\nclose_timeout = 1\n")
    config = build_agent_config(load_config(cwd=tmp_path), env={})
    assert config.startup_timeout == 2.5
    assert config.client_options == {"close_timeout": 1.0}
    default = build_agent_config(FileConfig(), env={})
    assert default.startup_timeout is None  # each step: the connect_timeout
    assert "close_timeout" not in default.client_options  # the client's own default
    for text, message in (
        ("[agent]\nstartup_timeout = 0\n", "agent.startup_timeout: must be a number > 0, got 0"),
        ("[broker]\nclose_timeout = 'x'\n", "broker.close_timeout: must be a number > 0, got 'x'"),
    ):
        _write(tmp_path, text)
        with pytest.raises(ConfigError, match=rf"^sheri\.toml: {re.escape(message)}$"):
            load_config(cwd=tmp_path)


#: a valid value of each [agent] setting, none of them the default
AGENT_VALUES = {
    "role": "testing",
    "agent_id": "agent-7",
    "swarm": "elsewhere",
    "broker": "mqtt://broker.example:1884",
    "max_tasks": 2,
    "dispatch": "broadcast",  # the fallback; the default is "dispatcher"
    "dispatch_session_expiry": 120,
    "queue_limit": 20,
    "overflow_limit": 30,
    "preference_window": 4,
    "heartbeat_interval": 2.5,
    "lease_time": 9.0,
    "grace_period": 3.0,
    "max_retries": 5,
    "retry_initial_delay": 0.5,
    "retry_max_delay": 7.0,
    "default_timeout": 60.0,
    "max_message_bytes": 4096,
    "max_result_bytes": 2048,
    "state_retention": 600,
    "final_retention": 300,
    "session_expiry": 60,
    "keep_alive": 15,
    "startup_timeout": 4.0,
    # files that exist, given absolute (a relative path is made absolute at load)
    "claim_store": "rediss://claims@store.example:6380/1",
    "claim_store_ca": __file__,
    "claim_store_cert": __file__,
    "claim_store_key": __file__,
    "claim_store_insecure": True,
    "claim_store_password_file": __file__,
}


def test_every_agent_config_field_is_settable_from_the_agent_table_or_listed() -> None:
    names = {f.name for f in fields(AgentConfig)}
    assert set(AGENT_KEYS) == names - set(NOT_AGENT_KEYS)
    assert set(NOT_AGENT_KEYS) <= names
    assert set(AGENT_CHECKS) <= set(AGENT_KEYS)
    assert set(AGENT_VALUES) == set(AGENT_KEYS)
    defaults = AgentConfig()
    assert all(getattr(defaults, k) != v for k, v in AGENT_VALUES.items())
    config = build_agent_config(parse_config({"agent": AGENT_VALUES}), env={})
    assert {k: getattr(config, k) for k in AGENT_VALUES} == AGENT_VALUES


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("overflow_limit", -1, "must be an integer >= 0, got -1"),  # by its type
        ("grace_period", "x", "must be a number >= 0, got 'x'"),  # by its type
        ("keep_alive", 70000, "must be an integer within 0..65535, got 70000"),  # its own
    ],
)
def test_agent_settings_are_checked_by_type_or_by_their_own_check(
    key: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^sheri\.toml: agent\.{key}: {re.escape(reason)}"):
        parse_config({"agent": {key: value}})


def test_lease_longer_than_heartbeat_is_one_rule_wherever_the_values_come_from() -> None:
    """AgentConfig.validate holds it; the file's error and the built config's name it."""
    message = r"^sheri\.toml: agent\.lease_time: must be longer than heartbeat_interval \(40\)"
    with pytest.raises(ConfigError, match=message + r", got 30$"):  # against the default
        parse_config({"agent": {"heartbeat_interval": 40}})
    file_config = parse_config({"agent": {"heartbeat_interval": 5}}, name="a.toml")
    with pytest.raises(ConfigError, match=r"^a\.toml: agent\.lease_time: must be longer .*got 4$"):
        build_agent_config(file_config, env={}, lease_time=4)
    with pytest.raises(ValueError, match=r"^lease_time: must be longer than heartbeat_interval"):
        AgentConfig(heartbeat_interval=5, lease_time=5).validate()


# ------------------------------------------------------------------ claim store
def test_a_claim_store_in_either_dispatch_mode() -> None:
    """Dispatcher mode (the default) takes a claim store too (it was refused before the
    election and the assignments went through it)."""
    default = build_agent_config(env={}, claim_store="redis://h/0")
    assert (default.dispatch, default.store.kind) == ("dispatcher", "redis")
    default.validate()
    broadcast = build_agent_config(env={"SHERI_DISPATCH": "broadcast"}, claim_store="redis://h/0")
    assert (broadcast.dispatch, broadcast.store.kind) == ("broadcast", "redis")
    assert build_agent_config(env={}).store.kind == "broker"  # no store: the default


def test_claim_store_precedence_flag_env_file_default(tmp_path: Path) -> None:
    _write(tmp_path, '[agent]\nclaim_store = "redis://file-host:6379/0"\n')
    file_config = load_config(cwd=tmp_path)
    env = {"SHERI_CLAIM_STORE": "postgresql://sheri@env-host/claims"}
    flagged = build_agent_config(file_config, env=env, claim_store="redis://flag-host/2")
    assert (flagged.store.kind, flagged.store.host, flagged.store.database) == (
        "redis",
        "flag-host",
        "2",
    )
    assert flagged.claim_store == "redis://flag-host/2"
    from_env = build_agent_config(file_config, env=env)
    assert (from_env.store.kind, from_env.store.host) == ("postgresql", "env-host")
    from_file = build_agent_config(file_config, env={})
    assert (from_file.store.host, from_file.claim_store) == (
        "file-host",
        "redis://file-host:6379/0",
    )
    default = build_agent_config(FileConfig(), env={})
    assert (default.store.kind, default.claim_store) == ("broker", "broker")
    assert store_settings(file_config, env={}).host == "file-host"  # what submit/monitor use


def test_claim_store_password_from_the_environment_or_a_file_never_a_flag(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^--claim-store: a password inside .*refused on the "
        r"command line: put it in SHERI_CLAIM_STORE_PASSWORD",
    ) as caught:
        build_agent_config(env={}, claim_store="redis://:hunter22@h/0")
    assert "hunter22" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^sheri\.toml: agent\.claim_store: a password inside"):
        parse_config({"agent": {"claim_store": "redis://u:hunter22@h/0"}})
    # the whole URL in the environment may carry it; it stays out of repr and claim_store
    env_url = build_agent_config(env={"SHERI_CLAIM_STORE": "redis://u:hunter22@h/0"})
    assert env_url.store.password == "hunter22"
    assert "hunter22" not in repr(env_url)
    assert "hunter22" not in env_url.claim_store
    env_password = build_agent_config(
        env={"SHERI_CLAIM_STORE_PASSWORD": "hunter22"}, claim_store="redis://u@h/0"
    )
    assert env_password.store.password == "hunter22"
    (tmp_path / "store.pw").write_text("from-the-file\n")
    _write(
        tmp_path, '[agent]\nclaim_store = "redis://h/0"\nclaim_store_password_file = "store.pw"\n'
    )
    filed = build_agent_config(load_config(cwd=tmp_path), env={})
    assert filed.store.password == "from-the-file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('claim_store = "memcached://h"', "agent.claim_store: unknown claim store 'memcached://h'"),
        ("claim_store = 5", "agent.claim_store: must be a URL string"),
        ('claim_store_ca = "missing.pem"', "agent.claim_store_ca: no such file: "),
        ('claim_store_password_file = "nope"', "agent.claim_store_password_file: no such file"),
    ],
)
def test_bad_claim_store_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path, f"[agent]\n{text}\n")
    with pytest.raises(ConfigError, match=rf"^sheri\.toml: {re.escape(message)}"):
        load_config(cwd=tmp_path)


def test_claim_store_tls_files_are_relative_to_the_file_and_flags_win(tmp_path: Path) -> None:
    for name in ("ca.pem", "other-ca.pem"):
        (tmp_path / name).write_text("")
    _write(tmp_path, '[agent]\nclaim_store = "rediss://h:6380/0"\nclaim_store_ca = "ca.pem"\n')
    file_config = load_config(cwd=tmp_path)
    assert build_agent_config(file_config, env={}).store.tls.ca_file == tmp_path / "ca.pem"
    flagged = build_agent_config(file_config, env={}, claim_store_ca=str(tmp_path / "other-ca.pem"))
    assert flagged.store.tls.ca_file == tmp_path / "other-ca.pem"
    with pytest.raises(ConfigError, match=r"^--claim-store: TLS options need rediss://"):
        build_agent_config(file_config, env={}, claim_store="redis://h/0")
