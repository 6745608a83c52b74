"""``sheri.toml``: the agent's settings, the broker's, and the executors' tables.

Where each setting comes from, first match wins::

    command-line flag  >  environment variable  >  sheri.toml  >  built-in default

Environment variables: ``SHERI_BROKER``, ``SHERI_SWARM``, ``SHERI_ROLE``,
``SHERI_AGENT_ID``, ``SHERI_MAX_TASKS``, ``SHERI_DISPATCH`` (and ``SHERI_USERNAME`` /
``SHERI_PASSWORD`` for the broker's credentials, which keeps a password out of the process list),
``SHERI_CLAIM_STORE`` (the claim store's URL, which may carry its password) and
``SHERI_CLAIM_STORE_PASSWORD``: a claim store's password never comes from a flag.
The broker's user name and password are resolved each on its own, and the URL's user
information ranks between the environment and the file (:func:`credentials`)::

    --username / --password  >  SHERI_USERNAME / SHERI_PASSWORD  >  URL  >  [broker]

The file (``./sheri.toml``, or the path given with ``--config``)::

    [agent]                      # any field of AgentConfig that is a plain setting
    role = "testing"
    swarm = "opencto-dev"
    max_tasks = 4
    heartbeat_interval = 10.0
    startup_timeout = 10         # each start-up step (default: [broker] connect_timeout)

    [broker]
    url = "mqtts://broker.example:8883"
    username = "sheri"
    password = "..."
    ca_file = "ca.pem"           # relative paths are relative to the file
    connect_timeout = 10         # also bounds the CLI's waits for the broker's answers
    close_timeout = 5            # flushing and DISCONNECT when a client closes

    [dashboard]                  # sheri dashboard (flags override; token: SHERI_DASHBOARD_TOKEN)
    host = "127.0.0.1"
    port = 8080
    db = "~/.local/share/sheri/dashboard.sqlite3"
    retention = "7d"             # 30s, 15m, 12h, 7d, or seconds

    [deploy.api]                 # every other table goes to the executors, checked by
    command = ["make", "deploy"] # sheri_trio.executors.validate_executor_config

Everything is checked when the file is loaded; a mistake raises :class:`ConfigError`
whose message names the file, the key and the reason, e.g.
``sheri.toml: agent.max_tasks: must be an integer >= 1, got 'x'``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, get_type_hints

from ._checks import (
    Check,
    Invalid,
    boolean,
    check_table,
    choice,
    integer,
    number,
    shown,
    string,
)
from .executors import EXECUTOR_TABLES, validate_executor_config
from .mqtt import BrokerURL, LocalProtocolError, TLSOptions
from .stores import ENV_URL as STORE_ENV_URL
from .stores import StoreConfig, StoreConfigError, StoreSource, StoreTLS, resolve_store
from .swarm import (
    AGENT_ID_RE,
    DEFAULT_SWARM,
    DISPATCH_MODES,
    ROLES,
    SWARM_RE,
    AgentConfig,
    new_agent_id,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AGENT_CHECKS",
    "AGENT_KEYS",
    "DASHBOARD_KEYS",
    "DEFAULT_BROKER",
    "DEFAULT_FILE",
    "ENV_VARS",
    "NOT_AGENT_KEYS",
    "ConfigError",
    "Connection",
    "FileConfig",
    "build_agent_config",
    "connection_settings",
    "credentials",
    "duration",
    "load_config",
    "parse_config",
    "store_settings",
]

DEFAULT_FILE: Final = "sheri.toml"
DEFAULT_BROKER: Final = "mqtt://localhost:1883"

#: setting -> environment variable
ENV_VARS: Final = {
    "broker": "SHERI_BROKER",
    "swarm": "SHERI_SWARM",
    "role": "SHERI_ROLE",
    "agent_id": "SHERI_AGENT_ID",
    "max_tasks": "SHERI_MAX_TASKS",
    "dispatch": "SHERI_DISPATCH",
    "claim_store": STORE_ENV_URL,
    "username": "SHERI_USERNAME",
    "password": "SHERI_PASSWORD",
}

#: setting -> the command-line flag that sets it (for error messages)
FLAGS: Final = {
    "broker": "--broker",
    "swarm": "--swarm",
    "role": "--role",
    "agent_id": "--agent-id",
    "max_tasks": "--max-tasks",
    "dispatch": "--dispatch",
    "claim_store": "--claim-store",
    "claim_store_ca": "--claim-store-ca",
    "claim_store_cert": "--claim-store-cert",
    "claim_store_key": "--claim-store-key",
    "username": "--username",
    "password": "--password",
}


class ConfigError(ValueError):
    """Invalid configuration: the message names where the value came from and why."""


# ------------------------------------------------------------------- value checks
def _integer(low: int, high: int | None = None) -> Check:
    """An integer, or a string of one (from the environment, or the file)."""
    return integer(low, high, parse_text=True)


def _timeout(value: Any) -> float | None:
    """A positive number of seconds; 0 means no timeout (TOML has no null)."""
    seconds: float = number(0)(value)
    return seconds or None


_role = choice(*ROLES)


def _agent_id(value: Any) -> str:
    if not isinstance(value, str) or not AGENT_ID_RE.fullmatch(value):
        raise Invalid(f"must be 1-128 of letters, digits, '.', '_', '-', got {shown(value)}")
    return value


def _swarm(value: Any) -> str:
    if not isinstance(value, str) or not SWARM_RE.fullmatch(value):
        raise Invalid(
            "must be 1-4 '/'-separated levels of letters, digits, '.', '_', '-', "
            f"got {shown(value)}"
        )
    return value


def _broker_url(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a URL string such as 'mqtt://host:1883', got {shown(value)}")
    try:
        BrokerURL.parse(value)
    except LocalProtocolError as exc:
        # the parser's message already hides any password
        raise Invalid(str(exc).removeprefix("bad broker URL ")) from None
    return value


def _claim_store_in_file(value: Any) -> str:
    """A claim-store URL of ``[agent] claim_store`` (the file: no password inside)."""
    if not isinstance(value, str):
        raise Invalid(f"must be a URL string such as 'redis://host:6379/0', got {shown(value)}")
    try:
        resolve_store(value, source="config", environ={})
    except StoreConfigError as exc:
        raise Invalid(str(exc)) from None
    return value


#: AgentConfig fields that ``[agent]`` does not set, and where they come from instead
NOT_AGENT_KEYS: Final = {
    "client_options": "[broker], --username/--password and the URL",
    "executor_config": "the other tables of the file",
    "check_duplicate": "always on outside tests (the probe for a duplicate agent id)",
    "store": "resolved from the claim_store settings and the environment",
}

#: the checks of the settings that are more than their type
AGENT_CHECKS: Final[dict[str, Check]] = {
    "role": _role,
    "agent_id": _agent_id,
    "swarm": _swarm,
    "broker": _broker_url,
    "max_tasks": _integer(1),
    "queue_limit": _integer(1),
    "heartbeat_interval": number(0, exclusive=True),
    "lease_time": number(0, exclusive=True),
    "max_retries": _integer(0, 100),
    "max_message_bytes": _integer(1024),
    "max_result_bytes": _integer(1024),
    "state_retention": _integer(1),
    "final_retention": _integer(1),
    "keep_alive": _integer(0, 65535),
    "startup_timeout": number(0, exclusive=True),
    "dispatch": choice(*DISPATCH_MODES),
    "dispatch_session_expiry": _integer(1, 0xFFFF_FFFF),  # MQTT's session expiry interval
    "claim_store": _claim_store_in_file,
}

#: the check of a setting by its type (for the fields not in AGENT_CHECKS)
_TYPE_CHECKS: Final[dict[Any, Check]] = {
    int: _integer(0),
    float: number(0),
    float | None: _timeout,
    str: string,
    bool: boolean,
}


def _agent_keys() -> dict[str, Check]:
    """Every AgentConfig field but :data:`NOT_AGENT_KEYS`, with its check."""
    hints = get_type_hints(AgentConfig)
    keys: dict[str, Check] = {}
    for f in fields(AgentConfig):
        if f.name in NOT_AGENT_KEYS:
            continue
        check = AGENT_CHECKS.get(f.name) or _TYPE_CHECKS.get(hints[f.name])
        if check is None:  # a new field: give it a check, or list it in NOT_AGENT_KEYS
            raise TypeError(f"AgentConfig.{f.name}: no check for {hints[f.name]}")
        keys[f.name] = check
    return keys


#: ``[agent]``: every setting of AgentConfig, derived from its fields
AGENT_KEYS: Final = _agent_keys()

BROKER_KEYS: Final[dict[str, Check]] = {
    "url": _broker_url,
    "username": string,
    "password": string,
    "ca_file": string,
    "cert_file": string,
    "key_file": string,
    "insecure": boolean,
    "connect_timeout": number(0, exclusive=True),
    "close_timeout": number(0, exclusive=True),
}

_FILE_KEYS: Final = ("ca_file", "cert_file", "key_file")
#: ``[agent]`` keys that name files (relative to the file, checked when it is loaded)
_STORE_FILE_KEYS: Final = (
    "claim_store_ca",
    "claim_store_cert",
    "claim_store_key",
    "claim_store_password_file",
)

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(value: Any) -> float:
    """A positive duration: seconds (a number, or digits), or ``30s``, ``15m``, ``12h``,
    ``7d``, ``2w``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        unit = _UNITS.get(text[-1])
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            raise Invalid(
                f"must be a duration such as 30s, 15m, 12h or 7d, got {shown(value)}"
            ) from None
    else:
        raise Invalid(f"must be a duration such as 30s, 15m, 12h or 7d, got {shown(value)}")
    if not (seconds > 0 and seconds < float("inf")):
        raise Invalid(f"must be a positive duration, got {shown(value)}")
    return seconds


#: ``[dashboard]``: ``sheri dashboard``'s settings (its flags override them)
DASHBOARD_KEYS: Final[dict[str, Check]] = {
    "host": string,
    "port": integer(0, 65535),
    "db": string,
    "retention": duration,
}


# ---------------------------------------------------------------------- the file
@dataclass(frozen=True, slots=True)
class FileConfig:
    """A checked ``sheri.toml`` (empty when there is none)."""

    name: str = DEFAULT_FILE  # how to call the file in messages
    path: Path | None = None  # None: no file was read
    agent: dict[str, Any] = field(default_factory=dict)
    broker: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the other top-level tables
    dashboard: dict[str, Any] = field(default_factory=dict)


def load_config(
    path: str | os.PathLike[str] | None = None, *, cwd: Path | None = None
) -> FileConfig:
    """Read and check ``path``, or ``sheri.toml`` in ``cwd`` if it exists.

    A path given explicitly must exist. Raises :class:`ConfigError`.
    """
    if path is None:
        candidate = (cwd or Path.cwd()) / DEFAULT_FILE
        if not candidate.is_file():
            return FileConfig()
        name, file = DEFAULT_FILE, candidate
    else:
        name = os.fspath(path)
        file = Path(path)
        if cwd is not None and not file.is_absolute():
            file = cwd / file
        if not file.is_file():
            raise ConfigError(f"{name}: no such file")
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    return parse_config(data, name=name, path=file.resolve())


def parse_config(
    data: Mapping[str, Any], *, name: str = DEFAULT_FILE, path: Path | None = None
) -> FileConfig:
    """Check the contents of a ``sheri.toml`` (already parsed)."""
    agent: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    dashboard: dict[str, Any] = {}
    base = path.parent if path is not None else Path.cwd()
    for key, value in data.items():
        if key == "dashboard":
            try:
                dashboard.update(check_table(value, key, DASHBOARD_KEYS))
            except Invalid as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if "db" in dashboard:
                db = Path(dashboard["db"]).expanduser()
                dashboard["db"] = str(db if db.is_absolute() else base / db)
        elif key in ("agent", "broker"):
            keys = AGENT_KEYS if key == "agent" else BROKER_KEYS
            try:
                (agent if key == "agent" else broker).update(check_table(value, key, keys))
            except Invalid as exc:
                raise ConfigError(f"{name}: {exc}") from None
        elif isinstance(value, dict) or key in EXECUTOR_TABLES:
            extra[key] = value  # the executors' (checked below), or another tool's table
        else:
            raise ConfigError(
                f"{name}: {key}: unknown top-level key (settings belong in a table: "
                "[agent], [broker], [dashboard], or a table for the executors)"
            )
    try:
        validate_executor_config(extra, source=name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in _FILE_KEYS:
        if key in broker:
            file = Path(broker[key]).expanduser()
            if not file.is_absolute():
                file = base / file
            if not file.is_file():
                raise ConfigError(f"{name}: broker.{key}: no such file: {file}")
            broker[key] = str(file)
    for key in _STORE_FILE_KEYS:
        if agent.get(key):
            file = Path(agent[key]).expanduser()
            if not file.is_absolute():
                file = base / file
            if not file.is_file():
                raise ConfigError(f"{name}: agent.{key}: no such file: {file}")
            agent[key] = str(file)
    if "key_file" in broker and "cert_file" not in broker:
        raise ConfigError(f"{name}: broker.key_file: needs broker.cert_file as well")
    if "url" in broker and "broker" in agent and broker["url"] != agent["broker"]:
        raise ConfigError(f"{name}: agent.broker: conflicts with broker.url; set only one of them")
    _validate(AgentConfig(**agent), name)  # the rules between settings
    return FileConfig(
        name=name, path=path, agent=agent, broker=broker, extra=extra, dashboard=dashboard
    )


# ------------------------------------------------------------------ precedence
_MISSING: Final = object()


def _pick(
    setting: str,
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
    check: Check,
    file_value: Any = _MISSING,
) -> tuple[bool, Any]:
    """(found, value) for one setting: flag > environment > file. Checks the winner."""
    flag = overrides.get(setting)
    if flag is not None:
        try:
            return True, check(flag)
        except Invalid as exc:
            raise ConfigError(f"{FLAGS.get(setting, setting)}: {exc}") from None
    var = ENV_VARS.get(setting)
    if var is not None and env.get(var):
        try:
            return True, check(env[var])
        except Invalid as exc:
            raise ConfigError(f"{var}: {exc}") from None
    if file_value is not _MISSING:
        return True, file_value  # checked when the file was loaded
    return False, None


def credentials(
    url: BrokerURL,
    file_broker: Mapping[str, Any],
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
) -> dict[str, str]:
    """The broker's ``username`` and ``password`` (the client options), each field on its own.

    For each field, first match wins: flag (``--username``/``--password``) > environment
    (``SHERI_USERNAME``/``SHERI_PASSWORD``, empty counts as unset) > the URL's user
    information (wherever the URL came from) > ``[broker] username``/``password``. So a
    user name in the file combines with ``SHERI_PASSWORD``, a user in the URL with a
    password in the file. A field no source gives is left out (the client sends none).
    """
    found: dict[str, str] = {}
    for key, in_url in (("username", url.username), ("password", url.password)):
        fallback = in_url if in_url is not None else file_broker.get(key, _MISSING)
        got, value = _pick(key, overrides, env, string, fallback)
        if got:
            found[key] = value
    return found


@dataclass(frozen=True, slots=True)
class Connection:
    """Where to connect and how: for agents and for the CLI's own clients."""

    broker: str
    swarm: str
    client_options: dict[str, Any]

    def display(self) -> str:
        """The broker URL, without its password."""
        return BrokerURL.parse(self.broker).display()


def connection_settings(
    file_config: FileConfig,
    *,
    env: Mapping[str, str] | None = None,
    broker: str | None = None,
    swarm: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Connection:
    """Broker URL, swarm and client options (credentials, TLS, timeout), by precedence.

    Credentials: see :func:`credentials` (each field on its own).
    """
    env = os.environ if env is None else env
    overrides = {"broker": broker, "swarm": swarm, "username": username, "password": password}
    file_url = file_config.broker.get("url", file_config.agent.get("broker", _MISSING))
    _, url = _pick("broker", overrides, env, _broker_url, file_url)
    url = url or DEFAULT_BROKER
    _, swarm_name = _pick("swarm", overrides, env, _swarm, file_config.agent.get("swarm", _MISSING))
    swarm_name = swarm_name or DEFAULT_SWARM

    b = file_config.broker
    options: dict[str, Any] = credentials(BrokerURL.parse(url), b, overrides, env)
    if any(key in b for key in (*_FILE_KEYS, "insecure")):
        options["tls"] = TLSOptions(
            ca_file=b.get("ca_file"),
            cert_file=b.get("cert_file"),
            key_file=b.get("key_file"),
            insecure=b.get("insecure", False),
        )
    for key in ("connect_timeout", "close_timeout"):
        if key in b:
            options[key] = b[key]
    return Connection(url, swarm_name, options)


def store_settings(
    file_config: FileConfig,
    *,
    env: Mapping[str, str] | None = None,
    claim_store: str | None = None,
    claim_store_ca: str | None = None,
    claim_store_cert: str | None = None,
    claim_store_key: str | None = None,
) -> StoreConfig:
    """The claim store to use (docs/stores.md), by precedence: ``--claim-store`` >
    ``SHERI_CLAIM_STORE`` > ``[agent] claim_store`` > ``broker``; the TLS files: flag >
    file. The password: in ``SHERI_CLAIM_STORE``'s URL, else
    ``SHERI_CLAIM_STORE_PASSWORD``, else ``[agent] claim_store_password_file``; a
    password inside ``--claim-store`` (or the file's URL) is refused. Raises
    :class:`ConfigError` naming where the bad value came from.
    """
    env = os.environ if env is None else env
    a = file_config.agent
    url: str | None
    source: StoreSource
    if claim_store is not None:
        url, source, where = claim_store, "flag", FLAGS["claim_store"]
    elif env.get(STORE_ENV_URL):
        url, source, where = env[STORE_ENV_URL], "env", STORE_ENV_URL
    elif a.get("claim_store"):
        url, source, where = a["claim_store"], "config", f"{file_config.name}: agent.claim_store"
    else:
        url, source, where = None, "config", f"{file_config.name}: agent"

    def path(flag: str | None, key: str) -> Path | None:
        value = flag if flag is not None else a.get(key)
        return Path(value).expanduser() if value else None

    tls = StoreTLS(
        ca_file=path(claim_store_ca, "claim_store_ca"),
        cert_file=path(claim_store_cert, "claim_store_cert"),
        key_file=path(claim_store_key, "claim_store_key"),
        insecure=bool(a.get("claim_store_insecure", False)),
    )
    try:
        return resolve_store(
            url or "broker",
            source=source,
            environ={k: v for k, v in env.items() if k != STORE_ENV_URL},  # url decided above
            password_file=path(None, "claim_store_password_file"),
            tls=tls,
        )
    except StoreConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_agent_config(
    file_config: FileConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """An :class:`AgentConfig` from flags (``overrides``), environment and file.

    ``overrides`` are the command line's values (None: not given): ``role``,
    ``agent_id``, ``swarm``, ``broker``, ``max_tasks``, ``username``, ``password``, or
    any other :data:`AGENT_KEYS` setting. Raises :class:`ConfigError`.
    """
    file_config = file_config or FileConfig()
    env = os.environ if env is None else env
    unknown = set(overrides) - set(AGENT_KEYS) - {"username", "password"}
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    conn = connection_settings(
        file_config,
        env=env,
        broker=overrides.get("broker"),
        swarm=overrides.get("swarm"),
        username=overrides.get("username"),
        password=overrides.get("password"),
    )
    store_flags = {k: overrides.get(k) for k in _STORE_FLAG_KEYS}
    store = store_settings(file_config, env=env, **store_flags)
    values: dict[str, Any] = {}
    for key, check in AGENT_KEYS.items():
        if key in ("broker", "swarm", *_STORE_FLAG_KEYS):
            continue
        found, value = _pick(key, overrides, env, check, file_config.agent.get(key, _MISSING))
        if found:
            values[key] = value
    for key in _STORE_FLAG_KEYS:  # as resolved: flag, environment (the URL) or file
        value = store_flags[key] if store_flags[key] is not None else file_config.agent.get(key)
        if value is not None:
            values[key] = value
    if store.kind == "broker":
        values["claim_store"] = "broker"
    elif store_flags["claim_store"] is None and env.get(STORE_ENV_URL):
        values["claim_store"] = store.url  # from the environment: shown without its password
    config = AgentConfig(
        broker=conn.broker,
        swarm=conn.swarm,
        client_options=dict(conn.client_options),
        executor_config=dict(file_config.extra),
        store=store,
        **values,
    )
    if not config.agent_id:
        config.agent_id = new_agent_id()
    _validate(config, file_config.name)
    return config


#: the claim-store settings with a command-line flag (store_settings resolves them)
_STORE_FLAG_KEYS: Final = ("claim_store", "claim_store_ca", "claim_store_cert", "claim_store_key")


def _validate(config: AgentConfig, name: str) -> None:
    """:meth:`AgentConfig.validate` (its rules between settings, e.g. lease_time >
    heartbeat_interval; each value alone was checked already), naming file and key."""
    try:
        config.validate()
    except ValueError as exc:
        raise ConfigError(f"{name}: agent.{exc}") from None
