"""An agent's settings (:class:`AgentConfig`): plain data and its checks, no runtime.

``sheri_trio.config`` builds one from sheri.toml, the environment and flags; the agent
and its scheduler read it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from ..stores import StoreConfig
from ._protocol import AGENT_ID_RE, DEFAULT_SWARM, MAX_MESSAGE_BYTES, ROLES, Topics

__all__ = ["DISPATCH_MODES", "AgentConfig", "new_agent_id"]

#: the values of ``AgentConfig.dispatch``
DISPATCH_MODES: Final = ("broadcast", "dispatcher")


def new_agent_id() -> str:
    return f"sheri-ml-{secrets.token_hex(4)}"


@dataclass(slots=True)
class AgentConfig:
    role: str = "general"
    agent_id: str = field(default_factory=new_agent_id)
    swarm: str = DEFAULT_SWARM
    broker: str = "mqtt://localhost:1883"
    max_tasks: int = 4
    queue_limit: int = 1000
    overflow_limit: int = 100_000
    #: how many later submissions may go before a task this agent does not rank first for
    #: (rendezvous hashing; 0: plain arrival order)
    preference_window: int = 256
    heartbeat_interval: float = 10.0
    lease_time: float = 30.0
    grace_period: float = 10.0
    max_retries: int = 3
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 60.0
    default_timeout: float | None = 600.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_result_bytes: int = 64 * 1024
    state_retention: int = 86_400
    #: expiry (s) of the retained record of a finished task: how long a resubmitted id is
    #: recognised as done, and how many finished records the broker keeps (rate x this)
    final_retention: int = 3_600
    session_expiry: int = 3600
    keep_alive: int = 30
    #: the bound of each start-up step (None: the client's connect_timeout)
    startup_timeout: float | None = None
    #: how tasks reach agents: "dispatcher" (the default: one elected dispatcher;
    #: docs/dispatch.md) or "broadcast" (every agent sees every task; claims in the
    #: broker's order: the fallback, docs/protocol.md "Which rule")
    dispatch: str = "dispatcher"
    #: the session expiry of the dispatch connection (dispatcher mode): submissions wait
    #: in that session while no dispatcher is connected, for at most this long
    dispatch_session_expiry: int = 7 * 86_400
    #: the claim store (docs/stores.md): "broker", redis://, rediss:// or postgresql://,
    #: without a password (that comes from the environment or a password file)
    claim_store: str = "broker"
    #: the claim store's TLS: CA file, client certificate and key ("": none), no checks
    claim_store_ca: str = ""
    claim_store_cert: str = ""
    claim_store_key: str = ""
    claim_store_insecure: bool = False
    #: a file whose first line is the claim store's password ("": none)
    claim_store_password_file: str = ""
    #: the claim store resolved from the settings above and the environment (with its
    #: password, which its repr leaves out): what the agent opens
    store: StoreConfig = field(default_factory=lambda: StoreConfig(kind="broker"))
    check_duplicate: bool = True
    client_options: dict[str, Any] = field(default_factory=dict)
    executor_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`ValueError` ``"<field>: <reason>"`` for the first wrong setting
        (``sheri_trio.config`` puts the file and the table in front)."""
        if self.role not in ROLES:
            raise ValueError(f"role: unknown role {self.role!r}: choose one of {', '.join(ROLES)}")
        try:
            Topics(self.swarm)  # validates the name
        except ValueError as exc:
            raise ValueError(f"swarm: {exc}") from None
        if not AGENT_ID_RE.fullmatch(self.agent_id):
            raise ValueError(
                f"agent_id: invalid agent id {self.agent_id!r}: "
                "1-128 of letters, digits, '.', '_', '-'"
            )
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(
                f"dispatch: must be one of {', '.join(DISPATCH_MODES)}, got {self.dispatch!r}"
            )
        if self.max_tasks < 1:
            raise ValueError(f"max_tasks: must be at least 1, got {self.max_tasks}")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval: must be > 0, got {self.heartbeat_interval:g}")
        if self.lease_time <= self.heartbeat_interval:
            raise ValueError(
                "lease_time: must be longer than heartbeat_interval "
                f"({self.heartbeat_interval:g}), got {self.lease_time:g}"
            )
