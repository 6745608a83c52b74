"""Which claim store to use: its URL, TLS options and password (parsing only, no I/O
but reading a password file).

``broker`` | ``redis://[user@]host[:port][/db]`` | ``rediss://...`` |
``postgresql://[user@]host[:port]/database`` (``postgres://`` too).

The password never comes from the command line: a URL given as a flag that carries one
is refused. It comes from the environment (``SHERI_CLAIM_STORE`` holding the whole URL,
or ``SHERI_CLAIM_STORE_PASSWORD``) or from a file. It never appears in a ``repr``, a log
line or an error message: :func:`redact_url`, :meth:`StoreConfig.redact`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import unquote, urlsplit

from ._api import StoreConfigError, StoreKind

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = [
    "ENV_PASSWORD",
    "ENV_URL",
    "StoreConfig",
    "StoreSource",
    "StoreTLS",
    "parse_store_url",
    "redact_url",
    "resolve_store",
]

ENV_URL: Final = "SHERI_CLAIM_STORE"
ENV_PASSWORD: Final = "SHERI_CLAIM_STORE_PASSWORD"

StoreSource = Literal["flag", "config", "env"]
"""Where a URL came from: a command-line flag, the configuration file, the environment.
Only the environment may carry a password inside the URL."""

_SCHEMES: Final[dict[str, StoreKind]] = {
    "redis": "redis",
    "rediss": "redis",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}
_DEFAULT_PORTS: Final[dict[StoreKind, int]] = {"redis": 6379, "postgresql": 5432, "broker": 0}
_USERINFO_PASSWORD = re.compile(r"(?P<head>//[^/?#@:]*:)(?P<password>[^/?#]*)@")
_HINT: Final = f"put it in {ENV_PASSWORD}, in a password file, or the whole URL in {ENV_URL}"


def redact_url(url: str) -> str:
    """*url* with the password of its user information replaced by ``***``."""
    return _USERINFO_PASSWORD.sub(lambda m: f"{m['head']}***@", url)


@dataclass(frozen=True, slots=True)
class StoreTLS:
    """TLS for ``rediss://`` (always on) and ``postgresql://`` (on when any option is set).

    *ca_file*: the CA bundle that signed the server's certificate (default: the system's).
    *cert_file* / *key_file*: a client certificate. *insecure*: no certificate or host
    name check (tests only).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None or self.insecure


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """A parsed claim-store location. ``password`` is left out of ``repr``."""

    kind: StoreKind
    scheme: str = "broker"
    host: str = ""
    port: int = 0
    database: str = ""  # Redis: the db number; PostgreSQL: the database's name
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: StoreTLS = field(default_factory=StoreTLS)

    @property
    def url(self) -> str:
        """The location without the password (for logs and messages)."""
        if self.kind == "broker":
            return "broker"
        user = ""
        if self.username is not None:
            user = f"{self.username}:***@" if self.password else f"{self.username}@"
        elif self.password:
            user = ":***@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.database}"

    @property
    def use_tls(self) -> bool:
        return self.scheme == "rediss" or (self.kind == "postgresql" and self.tls.configured)

    def redact(self, text: str) -> str:
        """*text* with this store's password (and any URL's) replaced by ``***``."""
        if self.password:
            text = text.replace(self.password, "***")
        return redact_url(text)


BROKER: Final = StoreConfig(kind="broker")


def parse_store_url(
    url: str,
    *,
    source: StoreSource,
    tls: StoreTLS | None = None,
    password: str | None = None,
) -> StoreConfig:
    """Parse a claim-store URL that came from *source*.

    *password* (from the environment or a file) is used when the URL has none. Raises
    :class:`StoreConfigError` (with the URL redacted) for a bad URL or scheme, a
    password inside a URL that did not come from the environment, TLS options on a
    plain ``redis://``, or a TLS file that does not exist.
    """
    tls = tls if tls is not None else StoreTLS()
    shown = redact_url(url.strip())
    text = url.strip()
    if text in ("broker", "broker://"):
        if tls.configured:
            raise StoreConfigError("TLS options were given for the 'broker' claim store")
        return BROKER
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise StoreConfigError(f"bad claim-store URL {shown!r}: {redact_url(str(exc))}") from None
    kind = _SCHEMES.get(parts.scheme.lower())
    if kind is None:
        raise StoreConfigError(
            f"unknown claim store {shown!r}: use broker, redis://, rediss:// or postgresql://"
        )
    scheme = parts.scheme.lower()
    if parts.password is not None and parts.password != "":
        if source != "env":
            where = "on the command line" if source == "flag" else "in the configuration file"
            raise StoreConfigError(
                f"a password inside the claim-store URL {shown!r} is refused {where}: {_HINT}"
            )
        password = unquote(parts.password)
    if not parts.hostname:
        raise StoreConfigError(f"claim-store URL {shown!r} has no host")
    if parts.query or parts.fragment:
        raise StoreConfigError(
            f"claim-store URL {shown!r}: query options are not supported (TLS has its own options)"
        )
    path = parts.path.lstrip("/")
    if kind == "redis":
        database = path or "0"
        if not database.isdigit():
            raise StoreConfigError(f"claim-store URL {shown!r}: the Redis db must be a number")
        if tls.configured and scheme == "redis":
            raise StoreConfigError(f"TLS options need rediss://, not {shown!r}")
    else:
        database = unquote(path)
        if not database or "/" in database:
            raise StoreConfigError(f"claim-store URL {shown!r} needs /<database>")
    for name in ("ca_file", "cert_file", "key_file"):
        file: Path | None = getattr(tls, name)
        if file is not None and not file.is_file():
            raise StoreConfigError(f"claim-store TLS {name.replace('_', ' ')} {file} not found")
    if (tls.cert_file is None) != (tls.key_file is None):
        raise StoreConfigError("a claim-store client certificate needs both cert and key files")
    return StoreConfig(
        kind=kind,
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[kind],
        database=database,
        username=unquote(parts.username) if parts.username else None,
        password=password or None,
        tls=tls,
    )


def resolve_store(
    url: str | None = None,
    *,
    source: StoreSource = "flag",
    environ: Mapping[str, str] | None = None,
    password_file: Path | None = None,
    tls: StoreTLS | None = None,
) -> StoreConfig:
    """The claim store to use: *url* (from *source*), else ``$SHERI_CLAIM_STORE``, else
    ``broker``. The password: the one in ``$SHERI_CLAIM_STORE``'s URL, else
    ``$SHERI_CLAIM_STORE_PASSWORD``, else the first line of *password_file*."""
    env = os.environ if environ is None else environ
    if url is None and env.get(ENV_URL):
        url, source = env[ENV_URL], "env"
    if url is None:
        return parse_store_url("broker", source=source, tls=tls)
    password = env.get(ENV_PASSWORD) or None
    if password is None and password_file is not None:
        try:
            lines = password_file.read_text().splitlines()
        except OSError as exc:
            raise StoreConfigError(
                f"claim-store password file {password_file}: {exc.strerror}"
            ) from None
        password = lines[0] if lines else None
        if not password:
            raise StoreConfigError(f"claim-store password file {password_file} is empty")
    return parse_store_url(url, source=source, tls=tls, password=password)
