"""Parsing a claim store's URL, TLS options and password (no server needed)."""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheri_trio.stores import (
    ENV_PASSWORD,
    ENV_URL,
    StoreConfig,
    StoreConfigError,
    StoreTLS,
    parse_store_url,
    redact_url,
    resolve_store,
)

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("broker", StoreConfig(kind="broker")),
        (
            "redis://cache.example:6380/2",
            StoreConfig("redis", "redis", "cache.example", 6380, "2"),
        ),
        ("redis://localhost", StoreConfig("redis", "redis", "localhost", 6379, "0")),
        (
            "rediss://sheri@cache.example/0",
            StoreConfig("redis", "rediss", "cache.example", 6379, "0", "sheri"),
        ),
        (
            "postgresql://sheri@db.example:6543/claims",
            StoreConfig("postgresql", "postgresql", "db.example", 6543, "claims", "sheri"),
        ),
        (
            "postgres://db.example/claims",
            StoreConfig("postgresql", "postgres", "db.example", 5432, "claims"),
        ),
        ("redis://[::1]:7000/1", StoreConfig("redis", "redis", "::1", 7000, "1")),
    ],
)
def test_urls(url: str, expected: StoreConfig) -> None:
    assert parse_store_url(url, source="flag") == expected


def test_display_url_never_has_the_password() -> None:
    config = parse_store_url("redis://sheri@h:1/0", source="flag", password="s3cret")
    assert config.password == "s3cret"
    assert config.url == "redis://sheri:***@h:1/0"
    assert "s3cret" not in repr(config)
    assert config.redact("auth s3cret failed for redis://u:s3cret@h") == (
        "auth *** failed for redis://u:***@h"
    )
    assert parse_store_url("redis://[::1]:7000/1", source="flag").url == "redis://[::1]:7000/1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtt://h/0", "unknown claim store 'mqtt://h/0': use broker, redis://"),
        ("memcached://u:pw@h", "unknown claim store 'memcached://u:***@h'"),
        ("redis:///0", "has no host"),
        ("redis://h/zero", "the Redis db must be a number"),
        ("redis://h:99999/0", "bad claim-store URL"),
        ("redis://h/0?ssl=true", "query options are not supported"),
        ("postgresql://h", "needs /<database>"),
        ("postgresql://h/a/b", "needs /<database>"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(StoreConfigError, match=re.escape(message)):
        parse_store_url(url, source="env")


@pytest.mark.parametrize(
    ("source", "where"), [("flag", "on the command line"), ("config", "in the configuration file")]
)
def test_a_password_in_a_flag_url_is_refused(source: str, where: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        parse_store_url("redis://sheri:hunter2@h/0", source=source)  # type: ignore[arg-type]
    message = str(info.value)
    assert "hunter2" not in message
    assert where in message
    assert "redis://sheri:***@h/0" in message
    assert ENV_PASSWORD in message
    assert ENV_URL in message


def test_the_environment_url_may_carry_the_password() -> None:
    config = resolve_store(environ={ENV_URL: "postgresql://sheri:p%40ss@db/claims"})
    assert (config.kind, config.username, config.password) == ("postgresql", "sheri", "p@ss")
    assert config.url == "postgresql://sheri:***@db:5432/claims"


def test_password_sources_in_order(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file\nignored\n")
    url = "redis://h/0"
    assert resolve_store(url, environ={}, password_file=secret).password == "from-file"
    both = {ENV_PASSWORD: "from-env"}
    assert resolve_store(url, environ=both, password_file=secret).password == "from-env"
    env_url = {ENV_URL: "redis://:in-url@h/0", ENV_PASSWORD: "from-env"}
    assert resolve_store(environ=env_url).password == "in-url"
    assert resolve_store(url, environ={}).password is None
    # a flag beats the environment's URL
    assert resolve_store("broker", environ=env_url).kind == "broker"
    assert resolve_store(environ={}).kind == "broker"


def test_password_file_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match=r"password file .* No such file"):
        resolve_store("redis://h/0", environ={}, password_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(StoreConfigError, match="is empty"):
        resolve_store("redis://h/0", environ={}, password_file=empty)


def test_tls_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    tls = StoreTLS(ca_file=ca)
    assert parse_store_url("rediss://h/0", source="flag", tls=tls).use_tls
    assert not parse_store_url("redis://h/0", source="flag").use_tls
    assert parse_store_url("postgresql://h/d", source="flag", tls=tls).use_tls
    assert not parse_store_url("postgresql://h/d", source="flag").use_tls
    with pytest.raises(StoreConfigError, match="TLS options need rediss://"):
        parse_store_url("redis://h/0", source="flag", tls=tls)
    with pytest.raises(StoreConfigError, match="not found"):
        parse_store_url("rediss://h/0", source="flag", tls=StoreTLS(ca_file=tmp_path / "no"))
    with pytest.raises(StoreConfigError, match="both cert and key"):
        parse_store_url("rediss://h/0", source="flag", tls=StoreTLS(cert_file=ca))
    with pytest.raises(StoreConfigError, match="'broker'"):
        parse_store_url("broker", source="flag", tls=StoreTLS(insecure=True))


_PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + "!$&'()*+,;=-._~%", min_size=4)


@given(password=_PASSWORDS)
def test_redaction_hides_any_password(password: str) -> None:
    password = "Zq9" + password  # nothing else in a URL or a repr looks like it
    url = f"redis://sheri:{quote(password, safe='')}@h:1/0"
    assert quote(password, safe="") not in redact_url(url).replace("sheri", "")
    with pytest.raises(StoreConfigError) as info:
        parse_store_url(url, source="flag")
    assert quote(password, safe="") not in str(info.value).replace("sheri", "")
    config = parse_store_url(url, source="env")
    assert config.password == password
    assert password not in repr(config)


@given(text=st.text(max_size=80))
def test_any_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        config = parse_store_url(text, source="env")
    except StoreConfigError:
        return
    assert config.kind in ("broker", "redis", "postgresql")
