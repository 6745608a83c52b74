"""The peer table: who is in the swarm, with which role, and when we last heard of them.

Pure bookkeeping, no I/O, no clock: callers pass ``now``. Fed from ``agents/register``,
``agents/heartbeat``, ``agents/shutdown`` and the retained ``agents/{id}/status``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["Peer", "PeerTable", "PresenceKind", "rendezvous_score"]


class PresenceKind(enum.Enum):
    """What a presence message says of its agent."""

    ALIVE = "alive"  # a heartbeat or a registration
    LEFT = "left"  # agents/shutdown: a graceful exit
    STATUS = "status"  # the retained agents/{id}/status (online or offline)


@dataclass(slots=True)
class Peer:
    role: str | None
    online: bool
    last_seen: float
    #: its slots, from its register (``max_tasks``) or heartbeat (``capacity``); None: unknown
    max_tasks: int | None = None
    #: it announced its shutdown (``agents/shutdown``): gone for sure, unlike ``online``
    #: False from a last will (docs/protocol.md, "Sessions, presence and absence")
    left: bool = False


def rendezvous_score(key: str) -> int:
    """The weight of ``"{task_id}/{agent_id}"`` in the claim preference (a real hash:
    crc32 is linear, so ids that differ in one character would all rank alike)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class PeerTable:
    """Every agent one agent knows of, itself included."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.peers: dict[str, Peer] = {}

    def __getitem__(self, agent_id: str) -> Peer:
        return self.peers[agent_id]

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self.peers

    def get(self, agent_id: str) -> Peer | None:
        return self.peers.get(agent_id)

    def values(self) -> Any:
        return self.peers.values()

    def items(self) -> Any:
        return self.peers.items()

    def observe(
        self,
        agent_id: str,
        kind: PresenceKind,
        now: float,
        *,
        role: str | None = None,
        online: bool = True,
        max_tasks: int | None = None,
    ) -> bool:
        """Record a presence message; True when it says the agent is gone for sure: it
        announced its shutdown. An offline status (its last will) only marks it offline
        (given nothing new, shown offline); it is not a takeover: mosquitto publishes
        every client's will when the broker stops, so a will is also what a restart of
        the broker looks like. Its tasks are taken over when its lease runs out (no sign
        of it for the lease time), or when a new process of it registers.
        ``max_tasks`` (from a register or heartbeat) is kept until a later one says
        otherwise."""
        peer = self.peers.get(agent_id)
        if kind is PresenceKind.ALIVE:
            if peer is None:
                self.peers[agent_id] = Peer(role, True, now, max_tasks)
            else:
                peer.role, peer.online, peer.last_seen, peer.left = role, True, now, False
                if max_tasks is not None:
                    peer.max_tasks = max_tasks
            return False
        if kind is PresenceKind.LEFT:
            if peer is not None:
                peer.online, peer.left = False, True
                return True
            return False
        if peer is None:
            self.peers[agent_id] = Peer(role, online, now)
        else:
            peer.online = online
            if online:
                peer.last_seen, peer.left = now, False
            else:
                # its slots are unknown until its next register or heartbeat: a new
                # process's online status comes before its register, and what it were
                # given then, its register would take over (it holds nothing before)
                peer.max_tasks = None
        return False

    def online_ids(self) -> list[str]:
        return [a for a, p in self.peers.items() if p.online]

    def anyone_eligible(self, roles: Collection[str], assigned_to: str | None) -> bool:
        """Whether an online agent may take a task for ``roles`` (and ``assigned_to``)."""
        for agent_id, peer in self.peers.items():
            if not peer.online:
                continue
            if assigned_to is not None and agent_id != assigned_to:
                continue
            if peer.role in roles:
                return True
        return False

    def is_reporter(
        self, roles: Collection[str] | None = None, assigned_to: str | None = None
    ) -> bool:
        """Whether we are the one agent that reports what belongs to nobody: the smallest
        online id (with ``roles``: among the online agents that may take such a task,
        which are the ones that know it)."""
        ids = self.online_ids()
        if roles is not None:
            ids = [
                a
                for a in ids
                if self.peers[a].role in roles and (assigned_to is None or assigned_to == a)
            ]
        return min(ids, default=self.me) >= self.me

    def preferred(self, task_id: str, roles: Collection[str] | None) -> bool:
        """Whether we rank first for this task among the online agents that may take it
        (rendezvous hashing on task id and agent id: every agent computes the same
        answer). ``roles=None``: any role may take it."""
        task = task_id + "/"
        mine = rendezvous_score(task + self.me)
        for agent_id, peer in self.peers.items():
            if (
                peer.online
                and (roles is None or peer.role in roles)
                and agent_id != self.me
                and rendezvous_score(task + agent_id) > mine
            ):
                return False
        return True

    def lease_expired(self, agent_id: str, since: float, now: float, lease: float) -> bool:
        """Whether the holder ``agent_id`` (holding since ``since``) is gone: shut down,
        or silent for ``lease`` seconds (offline by its will or not: see :meth:`observe`)."""
        peer = self.peers.get(agent_id)
        last = max(since, peer.last_seen if peer else 0.0)
        return (peer is not None and peer.left) or now - last >= lease

    def view(self, now: float) -> list[dict[str, Any]]:
        """The other agents, as monitoring.alerts sees them."""
        return [
            {
                "agent_id": agent_id,
                "role": peer.role,
                "online": peer.online,
                "last_seen_age": round(now - peer.last_seen, 3),
            }
            for agent_id, peer in self.peers.items()
            if agent_id != self.me
        ]
