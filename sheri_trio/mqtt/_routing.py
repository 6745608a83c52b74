"""Which subscriptions a message goes to, and the messages that have none yet.

One :class:`Router` per client, shared by both backends.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._api import Subscription
    from ._session import Message

__all__: list[str] = []  # shared by the backends, not public

log = logging.getLogger("sheri_trio.mqtt")


def settle(
    message: Message,
    manual: bool,
    *,
    ack_later: Callable[[Message], None],
    ack_now: Callable[[tuple[int, int]], object],
) -> None:
    """Decide who acknowledges a held QoS 1 message (both backends).

    ``manual``: the application, at ``message.ack()`` (which calls ``ack_later``);
    else the client, now (``ack_now(ack_id)``), and the message stays settled: a later
    subscription cannot take it over. A message already settled, or not held, is left.
    """
    ack_id = message.ack_id
    if ack_id is None or message.needs_ack:
        return
    if manual:
        message.wait_for_ack(ack_later)
    else:
        ack_now(ack_id)
        message.ack_id = None


class Router:
    """Which subscriptions a message goes to, and the messages that have none yet.

    Messages are routed by their subscription identifiers, or by topic when they carry
    none of ours (mosquitto 2.0.11 loses the ids of messages it queued across a
    restart). A message no subscription wants waits in a bounded backlog (``orphans``)
    for the ``subscribe()`` it may belong to: after a reconnect, queued messages can
    arrive before our resubscription is confirmed. Shared by every backend.
    """

    def __init__(self, orphan_buffer: int) -> None:
        self.by_id: dict[int, Subscription] = {}
        self.subs: list[Subscription] = []
        self.orphans: deque[Message] = deque(maxlen=max(orphan_buffer, 1))
        self.dropped = 0  # orphans pushed out of a full backlog

    def add(self, sub_id: int, sub: Subscription) -> None:
        self.by_id[sub_id] = sub
        self.subs.append(sub)

    def remove(self, sub_id: int, sub: Subscription) -> None:
        self.by_id.pop(sub_id, None)
        self.subs.remove(sub)

    def targets(self, message: Message) -> list[Subscription]:
        ids = message.packet.subscription_ids
        if ids:
            by_id = self.by_id
            targets = [by_id[i] for i in ids if i in by_id]
            if targets:
                return targets
        return [s for s in self.subs if s.matches(message.topic)]

    def park(self, message: Message) -> None:
        """Keep a message that no subscription wants (the oldest goes when full)."""
        if len(self.orphans) == self.orphans.maxlen:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: no log flood
                log.warning(
                    "no subscription for %r and the backlog is full: dropped (%d dropped so far)",
                    message.topic,
                    self.dropped,
                )
        self.orphans.append(message)

    def replay(self, sub: Subscription) -> list[Message]:
        """Hand a new subscription the parked messages it matches (as many as fit).

        Returns the messages handed over (the caller settles their acknowledgement).
        """
        if not self.orphans:
            return []
        keep: deque[Message] = deque(maxlen=self.orphans.maxlen)
        replayed: list[Message] = []
        for message in self.orphans:
            if sub.matches(message.topic):
                try:
                    if sub.deliver_nowait(message):
                        replayed.append(message)
                except trio.WouldBlock:
                    keep.append(message)
            else:
                keep.append(message)
        self.orphans = keep
        return replayed

    @property
    def manual(self) -> int:
        """How many live subscriptions acknowledge manually."""
        return sum(1 for s in self.subs if s.manual_ack)
