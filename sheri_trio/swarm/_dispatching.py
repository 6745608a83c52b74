"""The elected dispatcher's trio shell, and the election (docs/dispatch.md).

:class:`DispatcherShell` runs one term of the sans-IO :class:`~._dispatcher.Dispatcher`
over the dispatch session (client id ``sheri-dispatch.{swarm}``, ``clean_start=False``, a
long session expiry, ``manual_ack``, a will that sets the retained ``dispatch/status``
offline): it publishes the status online, reads the retained custody records (on the
agent's own connection, see :meth:`DispatcherShell.run`), then one task takes the
session's messages in batches, hands each to :meth:`Dispatcher.receive`, carries the
commands out in order, asks for :meth:`Dispatcher.assignments`, runs
:meth:`Dispatcher.check_leases` on time, and acknowledges the batch.

**Pipelining.** Every publish of a batch goes out with ``wait_ack=False`` except the
last, which is awaited; then the batch's messages are acknowledged, in the order they
came. The session sends publishes in the order they were made (also when it resends them
after a reconnect) and a broker sends its PUBACKs in the order the PUBLISHes came (MQTT 5
§4.6; mosquitto handles one connection's packets one after the other), so the last
PUBACK means every earlier publish has been handled, and a :class:`WriteRecord` is
stored before anything published after it is: the barrier the core asks for, at one
round trip per batch instead of one per record. What this gives up: a publish the broker
*refuses* (a PUBACK >= 0x80: ACL, quota, size) is not seen unless it is the awaited one
(then it is logged as an error); the guarantee is the broker's order, not its answers.

:class:`Candidate` is the election: it follows the retained ``dispatch/status`` on the
agent's connection; while it says offline (or nothing, or online from an earlier process
of this very agent), it waits a short random delay, takes this process's turn (the
candidates of one process stand one at a time, until the term says online), looks
again (a marker round trip through its own subscription), and runs a term. The broker
allows one connection per client id: a later candidate takes the session over
(DISCONNECT 0x8E), and the one taken over steps down and follows again; it never
reconnects to fight back. A term ends cleanly when the candidate is cancelled (the
agent leaves): status offline, DISCONNECT, both within :data:`CLOSE_TIMEOUT`.

**With a claim store** (docs/stores.md, "Dispatcher mode"): a candidate stands only with
a term from the store (:meth:`Candidate._store_term`; its epoch is the term's), renews it
every heartbeat interval and steps down when the store refuses the renewal or does not
answer for a whole lease (:meth:`Candidate._keep_term`, :attr:`TermEnd.DEPOSED`); each
assignment is first a :class:`~._dispatcher.StoreAssign`, and the shell asks the store for
a round's assignments (the consecutive ones of a command list) in one
:meth:`~sheri_trio.stores.ClaimStore.claim_many`: one round trip
(:meth:`DispatcherShell._store_assign_all`); nothing new is assigned while the store does
not answer.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import secrets
from typing import TYPE_CHECKING, Any, Final

import trio
from trio.lowlevel import RunVar

from ..mqtt import (
    AckTimeout,
    ClientClosed,
    MQTTError,
    PublishError,
    SessionTakenOver,
    Will,
    open_client,
)
from ..stores import ClaimRequest, StoreUnavailable, Verdict
from ._dispatcher import (
    Ack,
    Dispatcher,
    ForwardCancel,
    PublishStoredOutcome,
    RecordState,
    SendAssignment,
    SendRevocation,
    StoreAssign,
    WriteRecord,
    latest_records,
)
from ._divergence import DivergenceWatch
from ._messages import Messages, encode
from ._protocol import BadMessage, Topics, decode_envelope
from ._scheduler import ClearPending, ReportError, SendCancelReply, SendFailed, SendPending
from ._startup import publish_json, read_retained, startup_timeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..mqtt import Client, Message, Subscription
    from ..stores import ClaimStore, Hold, Leadership, StoredOutcome
    from ._config import AgentConfig
    from ._dispatcher import DispatchCommand

__all__ = ["Candidate", "DispatcherShell", "TermEnd", "dispatch_client_id", "run_candidate"]

log = logging.getLogger("sheri_trio.dispatch")

#: how long ending a term may take (status offline, DISCONNECT): the agent's graceful
#: shutdown waits at most this long for its dispatcher
CLOSE_TIMEOUT: Final = 2.0
#: the most messages handed to the core in one batch (one PUBACK wait, one ack round)
BATCH: Final = 1024
#: a candidate's random delay before it looks again and connects (seconds)
ELECTION_DELAY: Final = (0.05, 0.5)
#: after a term, the least wait before standing again (a taker says online meanwhile)
HANDOVER_GRACE: Final = 0.25
#: the dispatch connection's Will Delay Interval (s): a session taken over within it (the
#: same client id, clean_start=False) never publishes the earlier connection's will
#: (MQTT 5 §3.1.3.2.2), so a takeover does not say "offline" to every candidate (each of
#: which would then stand again: 1,000 candidates starting at once kept taking the session
#: from each other); a dispatcher that dies is declared offline this much later
WILL_DELAY: Final = 2


#: per trio run, one semaphore per (broker, swarm): the candidates of one process stand one
#: at a time, from "vacant" until their term's status is online (or the term ended). A
#: swarm started in one process (``sheri swarm``, hundreds of agents) would otherwise see
#: every candidate find the place vacant at once and take the session from each other: an
#: election storm that no random delay of a fixed length prevents at that size, because the
#: broker's round trip grows with the load the start itself makes. Across processes the
#: random delay still spreads them; at most one per process stands at once.
_STANDING: RunVar[dict[tuple[str, str], trio.Semaphore]] = RunVar("sheri_trio_standing")


def _standing_turn(config: AgentConfig) -> trio.Semaphore:
    """This process's turn to stand for dispatcher of ``config.swarm`` on its broker."""
    try:
        table = _STANDING.get()
    except LookupError:
        table = {}
        _STANDING.set(table)
    key = (str(config.broker), config.swarm)
    turn = table.get(key)
    if turn is None:
        turn = table[key] = trio.Semaphore(1)
    return turn


def dispatch_client_id(swarm: str) -> str:
    """``sheri-dispatch.{swarm}``, a swarm's '/' written ':' (a swarm name has no ':',
    so two swarms never share the id)."""
    return "sheri-dispatch." + swarm.replace("/", ":")


class TermEnd(enum.Enum):
    """Why a term ended."""

    STOPPED = "stopped"  # the agent leaves: status offline, DISCONNECT
    TAKEN_OVER = "taken over"  # DISCONNECT 0x8E: another candidate connected with our id
    LOST = "lost"  # the connection broke (a broker restart, or a takeover told no more)
    FAILED = "failed"  # the dispatch connection failed, or the records could not be read
    #: with a claim store: it gave no term (another candidate's is live, or it did not
    #: answer); nothing was connected
    NO_TERM = "no term"
    #: with a claim store: the term could not be renewed (it lapsed, or the store did not
    #: answer for a whole lease): the dispatcher stepped down
    DEPOSED = "deposed"


#: the name of the dispatcher's leadership in a claim store
LEADER_NAME: Final = "dispatcher"


class DispatcherShell:
    """One term of the dispatcher: the core's commands carried out over ``client`` (the
    dispatch session), the records read over ``reader`` (any other connection)."""

    def __init__(
        self,
        config: AgentConfig,
        client: Client,
        reader: Client,
        epoch: int,
        store: ClaimStore | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.reader = reader
        self.epoch = epoch
        #: the claim store that decides each assignment (None: the broker's order)
        self.store = store
        #: the store did not answer: no new assignments until it does (no fallback)
        self._store_down = False
        self._store_trouble = trio.Event()
        self.me = config.agent_id
        self.role = config.role
        self.topics = Topics(config.swarm)
        self.messages = Messages(config.agent_id, config.role)
        self.core = Dispatcher(config)
        assert (store is None) == (not self.core.store_mode), "a store with its config"
        #: the last publish, held back: the one a batch's end awaits
        self._held: tuple[str, bytes, bool, int | None] | None = None
        #: an awaited PUBACK did not come (AckTimeout): the next batch awaits a marker
        self._unconfirmed = False
        self._marker = self.topics.sync_marker(self.me, "dispatch")
        self.batches = 0
        self.records_loaded = 0
        #: called once the term's status is online (the candidate's turn ends then)
        self.on_online: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the term
    async def run(self) -> None:
        """Subscribe, announce the term, load the records, then serve until the session
        ends.

        The session's subscription is made first, so nothing published from then on is
        missed even on a first term (the status says online only then); its messages
        wait (unacknowledged, hence bounded by the broker's in-flight window) while the
        records are read. The records come over ``reader``: on the dispatch session the
        held messages would fill that window and the retained ones could never arrive.
        """
        t = self.topics
        filters = (
            t.tasks_new,
            t.tasks_assigned,
            t.tasks_complete,
            t.tasks_failed,
            t.tasks_released,
            t.tasks_cancel,
            t.agents_register,
            t.agents_heartbeat,
            t.agents_shutdown,
            t.agents_status_all,
        )
        # no_local: our own tasks/failed would only come back as an echo.
        # retain_handling=1: the retained statuses only with a new subscription. On a
        # resumed session its queue has every status since the last term, and the
        # broker sends the retained copies after that queue: stale news then, which
        # took over tasks given since (mosquitto publishes every client's will as it
        # stops: after a restart each agent's status is its will until it says online).
        async with self.client.subscribe(
            *filters, qos=1, no_local=True, retain_handling=1
        ) as messages:
            # online once subscribed: from then on nothing published is missed
            status = self.messages.dispatch_status(self.epoch, "online")
            online = encode(self.me, self.role, status)
            await self.client.publish(t.dispatch_status, online, qos=1, retain=True)
            if self.on_online is not None:
                self.on_online()
            await self._load_records()
            await self._carry_out_all(self.core.assignments(trio.current_time()))
            await self._confirm()
            log.info("%s is the dispatcher of %s (epoch %d)", self.me, t.swarm, self.epoch)
            await self._serve(messages)

    async def _load_records(self) -> None:
        bound = startup_timeout(self.config)
        sync = self.topics.sync_marker(self.me, secrets.token_hex(4))
        with trio.fail_after(bound) as scope:

            def renew() -> None:
                scope.deadline = trio.current_time() + bound

            retained = await read_retained(
                self.reader, sync, self.topics.tasks_state_all, progress=renew
            )
        now = trio.current_time()
        for message in retained:
            try:
                commands = self.core.on_state(decode_envelope(message.payload).payload, now)
            except BadMessage as exc:
                log.debug("ignored task record %s: %s", message.topic, exc.reason)
                continue
            self.records_loaded += 1
            await self._carry_out_all(commands)
        log.info(
            "dispatcher %s: %d task records loaded (%d live)",
            self.me,
            self.records_loaded,
            len(self.core.jobs),
        )

    async def _serve(self, messages: Subscription) -> None:
        """The one task that decides, over one channel: the session's messages in
        batches (from :meth:`_pump`) and the lease checks (from :meth:`_tick`), so
        their commands never interleave. Returns when the session's subscription ends
        (the client stopped: e.g. taken over)."""
        send, receive = trio.open_memory_channel["list[Message] | None"](4)
        async with trio.open_nursery() as nursery, receive:
            # the pump ends the term's loops once the subscription ends: a PUBACK that
            # _confirm waits for never comes from a stopped client
            nursery.start_soon(self._pump, messages, send, nursery.cancel_scope)
            nursery.start_soon(self._tick, send.clone())
            if self.store is not None:
                nursery.start_soon(self._watch_store, self.store, send.clone())
            core = self.core
            next_view = trio.current_time()
            async for item in receive:
                now = trio.current_time()
                if item is None:
                    await self._carry_out_all(core.check_leases(now))
                    batch: list[Message] = []
                    if now >= next_view:  # what monitoring.alerts reads in dispatch mode
                        next_view = now + self.config.heartbeat_interval
                        await self._send(
                            self.topics.dispatch_view,
                            core.swarm_view(now, self.epoch),
                            retain=True,
                            expiry=max(1, math.ceil(3 * self.config.heartbeat_interval)),
                        )
                else:
                    batch = item
                commands: list[DispatchCommand] = []
                for message in batch:
                    commands += core.receive(message.topic, message.payload, now)
                if not self._store_down:  # no new assignments without the store
                    commands += core.assignments(now)
                # the batch is acknowledged only after all of it: a record superseded
                # within it (queued, then assigned) need not go out
                await self._carry_out_all(latest_records(commands))
                await self._confirm()
                for message in batch:  # in the order they came (MQTT 5 §4.6)
                    message.ack()
                self.batches += 1

    async def _pump(
        self,
        messages: Subscription,
        send: trio.MemorySendChannel[list[Message] | None],
        loops: trio.CancelScope,
    ) -> None:
        """Everything already delivered, as one batch. Only this task waits on the
        subscription, and nobody cancels that wait but the term's end (a receive
        cancelled under a deadline can lose the message it took)."""
        async with send:
            while True:
                try:
                    batch = [await messages.receive()]
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    loops.cancel()
                    return
                try:
                    while len(batch) < BATCH:
                        batch.append(messages.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    pass
                await send.send(batch)

    async def _watch_store(
        self, store: ClaimStore, send: trio.MemorySendChannel[list[Message] | None]
    ) -> None:
        """Once the store stopped answering: wait until it does, then a round (the
        assignments resume)."""
        async with send:
            while True:
                await self._store_trouble.wait()
                await store.wait_available()
                self._store_trouble = trio.Event()
                self._store_down = False
                log.warning("dispatcher %s: claim store available again", self.me)
                await send.send(None)

    def _store_unavailable(self, exc: StoreUnavailable) -> None:
        if not self._store_down:
            self._store_down = True
            self._store_trouble.set()
            log.error("dispatcher %s: claim store unavailable: no new assignments (%s)",
                      self.me, exc)  # fmt: skip

    async def _store_assign_all(self, commands: list[StoreAssign]) -> None:
        """Ask the store for the attempts of ``commands`` (a round's assignments), each for
        its agent, in one :meth:`~sheri_trio.stores.ClaimStore.claim_many` (one round
        trip); then each verdict goes to the core in the commands' order, what it gives
        carried out before the next (:meth:`_store_verdict`): the publishes are in the
        order that one claim after the other gave. No answer: every command of the batch
        goes back to the core (:meth:`Dispatcher.on_store_unavailable`)."""
        store, core = self.store, self.core
        assert store is not None
        if self._store_down:  # the rest of a round the store did not answer
            for command in commands:
                core.on_store_unavailable(command)
            return
        lease = self.config.lease_time
        requests = [
            ClaimRequest(c.task_id, c.attempt, c.agent_id, lease, takeover=c.takeover)
            for c in commands
        ]
        try:
            verdicts = await store.claim_many(requests)
        except StoreUnavailable as exc:
            for command in commands:
                core.on_store_unavailable(command)
            self._store_unavailable(exc)
            return
        for command, verdict in zip(commands, verdicts, strict=True):
            await self._store_verdict(command, verdict)

    async def _store_verdict(self, command: StoreAssign, verdict: Verdict) -> None:
        """The store's ``verdict`` on ``command`` to the core (after a refusal, with the
        store's hold and outcome, read one by one: refusals are rare), and what it gives
        carried out. A refusal whose reads find the store gone goes back to the core (as
        does the rest of the batch's refusals); a ``WON`` needs no read and goes out."""
        store, core = self.store, self.core
        assert store is not None
        hold: Hold | None = None
        outcome: StoredOutcome | None = None
        if verdict is not Verdict.WON:
            if self._store_down:  # an earlier refusal's reads found the store gone
                core.on_store_unavailable(command)
                return
            task_id = command.task_id
            try:
                hold = await store.hold(task_id)
                if verdict is Verdict.FINISHED or (hold is not None and hold.finished):
                    outcome = await store.outcome(task_id)
            except StoreUnavailable as exc:
                core.on_store_unavailable(command)
                self._store_unavailable(exc)
                return
        now = trio.current_time()
        verdict_commands = core.on_store_verdict(command, verdict, now, hold=hold, outcome=outcome)
        await self._carry_out_all(verdict_commands)

    async def _tick(self, send: trio.MemorySendChannel[list[Message] | None]) -> None:
        """Every ``lease_time / 4``: a lease check."""
        period = max(self.config.lease_time / 4, 0.01)
        async with send:
            while True:
                await trio.sleep(period)
                await send.send(None)

    # ------------------------------------------------------------- the commands
    async def _carry_out_all(self, commands: list[DispatchCommand]) -> None:
        """``commands`` in order; consecutive :class:`StoreAssign` commands (a round's
        assignments) go to the store as one batch (:meth:`_store_assign_all`)."""
        batch: list[StoreAssign] = []
        for command in commands:
            if isinstance(command, StoreAssign):
                batch.append(command)
                continue
            if batch:
                await self._store_assign_all(batch)
                batch = []
            await self._carry_out(command)
        if batch:
            await self._store_assign_all(batch)

    async def _carry_out(self, command: DispatchCommand) -> None:
        t, m = self.topics, self.messages
        if isinstance(command, Ack):
            return  # the batch is acknowledged at its end, after its PUBACKs
        if isinstance(command, WriteRecord):
            record = m.task_record(
                command.task_id,
                command.state.value,
                command.attempt,
                command.agent_id,
                command.task,
            )
            state_topic = t.task_state(command.task_id)
            live = command.state in (RecordState.QUEUED, RecordState.ASSIGNED, RecordState.CLAIMED)
            expiry = self.config.state_retention if live else self.config.final_retention
            await self._send(state_topic, record, retain=True, expiry=expiry)
        elif isinstance(command, StoreAssign):
            await self._store_assign_all([command])
        elif isinstance(command, PublishStoredOutcome):
            log.warning("dispatcher %s: publishing the stored outcome of %s again",
                        self.me, command.task_id)  # fmt: skip
            topic = t.tasks_complete if command.success else t.tasks_failed
            await self._send(topic, command.outcome)
        elif isinstance(command, SendAssignment):
            payload = m.assignment(command.task, command.attempt, self.epoch)
            await self._send(t.agent_inbox(command.agent_id), payload)
        elif isinstance(command, SendRevocation):
            payload = m.revocation(
                command.task_id, command.attempt, command.reason.value, self.epoch
            )
            await self._send(t.agent_inbox(command.agent_id), payload)
        elif isinstance(command, ForwardCancel):
            payload = m.inbox_cancel(command.task_id, command.attempt, self.epoch)
            await self._send(t.agent_inbox(command.agent_id), payload)
        elif isinstance(command, SendFailed):
            payload = m.failed(command.spec, command.attempt, command.error, command.reason)
            await self._send(t.tasks_failed, payload)
            if command.clear_marker:
                await self._send(t.task_pending(command.spec.task_id), b"", retain=True)
        elif isinstance(command, SendPending):
            pending = t.task_pending(command.task_id)
            expiry = self.config.state_retention
            await self._send(pending, command.submission, retain=True, expiry=expiry)
        elif isinstance(command, ClearPending):
            await self._send(t.task_pending(command.task_id), b"", retain=True)
        elif isinstance(command, ReportError):
            payload = m.error_report(command.topic, command.reason, command.size, command.task_id)
            await self._send(t.errors, payload)
        elif isinstance(command, SendCancelReply):
            payload = m.cancel_reply(
                command.request_id,
                command.task_id,
                command.result.value,
                command.scope,
                state=command.state,
                holder=command.holder,
                attempt=command.attempt,
            )
            await self._send(t.tasks_cancel_reply, payload)

    async def _send(
        self,
        topic: str,
        payload: dict[str, Any] | bytes,
        *,
        retain: bool = False,
        expiry: int | None = None,
    ) -> None:
        """Publish in order; the previous publish goes out now, this one is held back
        for :meth:`_confirm` to await (or for the next one to push out). ``bytes`` go as
        they are (an empty retained payload clears a retained message)."""
        data = payload if isinstance(payload, bytes) else encode(self.me, self.role, payload)
        held, self._held = self._held, (topic, data, retain, expiry)
        if held is not None:
            await self._publish(held, wait_ack=False)

    async def _confirm(self) -> None:
        """Return once every publish made so far has its PUBACK (see the module's
        docstring): the held-back last one is awaited; after an AckTimeout, a marker
        behind everything, until one is acknowledged."""
        pending, self._held = self._held, None
        if pending is None:
            if not self._unconfirmed:
                return
            pending = (self._marker, b"", False, None)
        while True:
            try:
                await self._publish(pending, wait_ack=True)
            except AckTimeout as exc:
                log.warning("dispatcher %s: %s; waiting again behind a marker", self.me, exc)
                self._unconfirmed = True
                pending = (self._marker, b"", False, None)
                continue
            except PublishError as exc:  # handled (and refused): later PUBACKs are in order
                log.error("dispatcher %s: %s", self.me, exc)
            self._unconfirmed = False
            return

    async def _publish(self, item: tuple[str, bytes, bool, int | None], *, wait_ack: bool) -> None:
        topic, data, retain, expiry = item
        await publish_json(
            self.client, topic, data, retain=retain, expiry=expiry, wait_ack=wait_ack
        )


class Candidate:
    """One agent's candidacy: follow ``dispatch/status`` on ``client`` (the agent's own
    connection), run a term whenever it is vacant, until :meth:`stop` (a term then ends
    cleanly, within :data:`CLOSE_TIMEOUT`)."""

    def __init__(
        self,
        config: AgentConfig,
        client: Client,
        *,
        delay: tuple[float, float] = ELECTION_DELAY,
        store: ClaimStore | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.delay = delay
        #: the claim store that gives the terms (None: the broker's one connection per
        #: client id decides); its terms' epochs are the dispatcher's epochs
        self.store = store
        #: why the term in progress was deposed by the store (None: it was not)
        self._deposed: str | None = None
        #: the store refused us a term, or did not answer, since our last one (logged once)
        self._refused = False
        self.me = config.agent_id
        self.topics = Topics(config.swarm)
        self.messages = Messages(config.agent_id, config.role)
        #: the latest retained dispatch/status (None: none seen)
        self.status: dict[str, Any] | None = None
        #: the highest epoch seen
        self.epoch = 0
        #: the highest epoch seen online: an offline status of an earlier term (its will,
        #: come late) does not make the place vacant again
        self.online_epoch = 0
        #: the epoch of the term in progress (an online status of ours with another epoch
        #: is from a term that is over, or from an earlier process of this agent: stale)
        self.my_epochs: set[int] = set()
        #: the shell of the term in progress (None: following)
        self.shell: DispatcherShell | None = None
        self.terms: list[tuple[int, TermEnd]] = []
        self._changed = trio.Event()
        #: ``{swarm}/+/status``, not the status topic itself: a client's second
        #: subscription to a filter replaces its first at the broker (MQTT), and the
        #: agent on this connection may subscribe to ``dispatch/status`` of its own.
        #: Not ``dispatch/+`` either: that would bring every agent the dispatcher's
        #: ``dispatch/view`` (the whole swarm, every heartbeat interval: O(n^2) bytes)
        self._status_filter = self.topics.statuses_one_level
        self._sync_topic = self.topics.sync_marker(self.me, "election-" + secrets.token_hex(3))
        self._sync_seen = 0
        self._sync_sent = 0
        self._failures = 0
        self._stopping = trio.Event()
        #: set when :meth:`run` has returned
        self.stopped = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._work: trio.CancelScope | None = None
        #: a second dispatcher in office while we are (issue 11: the broker keeps no
        #: single order, e.g. a bridge or a cluster)
        self.divergence = DivergenceWatch(self.me)

    @property
    def dispatching(self) -> bool:
        return self.shell is not None

    # --------------------------------------------------------------- following
    def vacancy(self) -> str | None:
        """Why the dispatcher's place is free (None: someone holds it)."""
        s = self.status
        if s is None:
            return "no dispatcher status"
        if s.get("status") != "online":
            epoch = s.get("epoch")
            if isinstance(epoch, int) and epoch < self.online_epoch:
                return None  # the will of a term that a later one replaced
            return "dispatcher offline" + (f" ({s['agent_id']})" if s.get("agent_id") else "")
        if s.get("agent_id") == self.me and s.get("epoch") not in self.my_epochs:
            return "our own online status, of a term that is over"
        return None

    async def _follow(self, statuses: Subscription) -> None:
        async for message in statuses:
            if message.topic == self._sync_topic:
                try:
                    self._sync_seen = max(self._sync_seen, int(message.payload))
                except ValueError:
                    pass
            elif message.topic != self.topics.dispatch_status:
                continue
            elif not message.payload:
                self.status = None
            else:
                try:
                    self.status = decode_envelope(message.payload).payload
                except BadMessage:
                    continue
                epoch = self.status.get("epoch")
                if isinstance(epoch, int) and not isinstance(epoch, bool):
                    self.epoch = max(self.epoch, epoch)
                    if self.status.get("status") == "online":
                        self.online_epoch = max(self.online_epoch, epoch)
                    await self._check_second_leader(self.status, epoch)
            self._changed.set()

    async def _check_second_leader(self, status: dict[str, Any], epoch: int) -> None:
        """Another dispatcher says it is online while we serve a term: two leaders,
        unless it took our session over (one broker): that ends our term, so the incident
        counts once our dispatch session answers a publish after it."""
        shell, other = self.shell, status.get("agent_id")
        if shell is None or status.get("status") != "online" or not isinstance(other, str):
            return
        topic = self.topics.dispatch_status
        for report in self.divergence.on_leader(other, epoch, my_epoch=shell.epoch, topic=topic):
            marker = self.topics.sync_marker(self.me, "leader-check")
            with trio.move_on_after(startup_timeout(self.config)) as bound:
                try:
                    await shell.client.publish(marker, b"", qos=1)  # its PUBACK: still ours
                except MQTTError:
                    return  # taken over: our term is ending, not an incident
            if bound.cancelled_caught or shell is not self.shell:
                return
            log.error("%s: %s (agent=%s epoch=%d)", self.me, report.message, self.me, shell.epoch)
            if report.publish:
                payload = encode(self.me, self.config.role, self.messages.divergence_report(report))
                await self.client.publish(self.topics.errors, payload, qos=1, wait_ack=False)

    async def _look_again(self) -> None:
        """Wait until every status the broker had before now has reached us."""
        self._sync_sent += 1
        mark = self._sync_sent
        # wait_ack=False: what counts is the marker coming back, whenever the broker is
        # up again (a PUBACK wait would end in AckTimeout during a broker's restart)
        await self.client.publish(self._sync_topic, str(mark).encode(), qos=1, wait_ack=False)
        while self._sync_seen < mark:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        """Wait for the next change. Several tasks may wait at once (the loop of
        :meth:`_run` and a :meth:`_look_again` of a leader check or a caller): only the
        first to wake replaces the event, else a later waker would drop a change that came
        in between (the waiter of the new event would then sleep through it)."""
        changed = self._changed
        await changed.wait()
        if self._changed is changed:
            self._changed = trio.Event()

    # ------------------------------------------------------------------ running
    async def run(
        self, *, task_status: trio.TaskStatus[Candidate] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow, and run a term whenever the place is vacant, until :meth:`stop`
        (or cancelled: then a term's connection just drops, and its will says offline)."""
        try:
            await self._run(task_status)
        finally:
            self.stopped.set()

    async def _run(self, task_status: trio.TaskStatus[Candidate]) -> None:
        with trio.CancelScope() as self._scope:
            if self._stopping.is_set():
                self._scope.cancel()
            async with (
                self.client.subscribe(
                    self._status_filter, self._sync_topic, qos=1, manual_ack=False
                ) as statuses,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(self._follow, statuses)
                await self._look_again()  # the retained status, if there is one
                task_status.started(self)
                turn = _standing_turn(self.config)
                while not self._stopping.is_set():
                    while self.vacancy() is None:
                        await self._wait_changed()
                    await trio.sleep(random.uniform(*self.delay))
                    await turn.acquire()
                    released = False

                    def release() -> None:
                        nonlocal released
                        if not released:
                            released = True
                            turn.release()

                    try:
                        # a sibling's term may have said online while we waited our turn
                        if self.vacancy() is None:
                            continue
                        await self._look_again()
                        why = self.vacancy()
                        if why is None:
                            continue
                        end = await self._term(why, on_online=release)
                    finally:
                        release()
                    if self._stopping.is_set():
                        break
                    # A lost connection may have been a takeover (mosquitto 2.0 often
                    # just closes the earlier connection, without DISCONNECT 0x8E): give
                    # the taker time to say online before looking again.
                    self._failures = self._failures + 1 if end is TermEnd.FAILED else 0
                    backoff = min(30.0, 2.0 ** min(self._failures, 5)) if self._failures else 0
                    await trio.sleep(HANDOVER_GRACE + backoff * random.random())
                nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop standing; a term in progress ends cleanly (status offline, DISCONNECT),
        within :data:`CLOSE_TIMEOUT`. :meth:`run` returns then."""
        self._stopping.set()
        if self._work is not None:
            self._work.cancel()  # the term's work, not its connection
        elif self._scope is not None:
            self._scope.cancel()

    async def _term(self, why: str, *, on_online: Callable[[], None] | None = None) -> TermEnd:
        """Connect the dispatch session and serve until it ends (``on_online``: called once
        the term says online). With a claim store, only with a term of the store's: see
        :meth:`_store_term`."""
        if self.store is None:
            return await self._serve_term(why, self.epoch + 1, None, on_online=on_online)
        term: Leadership | None = None
        started = trio.current_time()
        with trio.CancelScope() as scope:
            self._work = scope  # stop() ends the wait for a term
            if self._stopping.is_set():
                scope.cancel()
            term = await self._store_term()
        self._work = None
        if term is None:
            if on_online is not None:
                on_online()  # our turn is over: a sibling asks the store itself
            if not scope.cancelled_caught:
                await self._wait_for_term()
            return TermEnd.NO_TERM
        try:
            return await self._serve_term(why, term.epoch, term, started, on_online=on_online)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT) as guard:  # the next one need not wait
                guard.shield = True
                try:
                    await self.store.release_leader(term)
                except StoreUnavailable:
                    pass  # it lapses

    async def _store_term(self) -> Leadership | None:
        """A term from the store (None: another candidate's is live, or no answer)."""
        assert self.store is not None
        try:
            term = await self.store.acquire_leader(
                LEADER_NAME, self.me, self.config.lease_time, known_epoch=self.epoch
            )
        except StoreUnavailable as exc:
            level = logging.DEBUG if self._refused else logging.WARNING
            log.log(level, "%s cannot stand for dispatcher: %s", self.me, exc)
            self._refused = True
            with trio.move_on_after(self.config.lease_time):
                await self.store.wait_available()
            return None
        if term is None:  # said once until we get a term (candidates ask again and again)
            level = logging.DEBUG if self._refused else logging.INFO
            log.log(level, "%s: the claim store gives the dispatcher's term to another", self.me)
            self._refused = True
        else:
            self._refused = False
            self.epoch = max(self.epoch, term.epoch)
        return term

    async def _wait_for_term(self) -> None:
        """After a refused term: until someone says online, or a while (a third of a
        lease, jittered: the live term lapses within a lease unless renewed)."""
        with trio.move_on_after(self.config.lease_time / 3 * random.uniform(0.5, 1.0)):
            while self.vacancy() is not None:
                await self._wait_changed()

    async def _keep_term(self, term: Leadership, since: float, work: trio.CancelScope) -> None:
        """Renew the store's term every heartbeat (at most a third of a lease); refused,
        or no answer for a whole lease since the last renewal began (the term may have
        lapsed in the store by then): step down (``work`` cancelled)."""
        assert self.store is not None
        lease = self.config.lease_time
        period = min(self.config.heartbeat_interval, lease / 3)
        deadline = since + lease  # the term is surely ours until then
        complained = False
        while True:
            await trio.sleep(period)
            began = trio.current_time()
            with trio.move_on_at(deadline):
                try:
                    if not await self.store.renew_leader(term, lease):
                        self._deposed = "the claim store did not renew the term (it lapsed)"
                        break
                    deadline = began + lease
                    if complained:
                        log.warning("%s: the claim store renews the term again", self.me)
                    complained = False
                    continue
                except StoreUnavailable as exc:
                    if not complained:
                        log.error("%s: claim store unavailable: the dispatcher's term is not "
                                  "renewed (%s)", self.me, exc)  # fmt: skip
                    complained = True
                    if trio.current_time() < deadline:
                        continue
            self._deposed = "the claim store did not answer for a whole lease"
            break
        log.error("%s: dispatcher term %d deposed: %s", self.me, term.epoch, self._deposed)
        work.cancel()

    async def _serve_term(
        self,
        why: str,
        epoch: int,
        term: Leadership | None,
        since: float = 0.0,
        *,
        on_online: Callable[[], None] | None = None,
    ) -> TermEnd:
        """Connect the dispatch session as the dispatcher of ``epoch`` (``term``: the
        store's, renewed meanwhile) and serve until it ends."""
        c = self.config
        self._deposed = None
        self.my_epochs.add(epoch)
        will = Will(
            self.topics.dispatch_status,
            encode(c.agent_id, c.role, self.messages.dispatch_status(epoch, "offline")),
            qos=1,
            retain=True,
            delay_interval=WILL_DELAY,
        )
        options: dict[str, Any] = {"keep_alive": c.keep_alive, **c.client_options}
        options["close_timeout"] = min(float(options.get("close_timeout", 5.0)), CLOSE_TIMEOUT)
        end, detail = TermEnd.FAILED, ""
        shell: DispatcherShell | None = None
        log.info("%s stands for dispatcher of %s: %s (epoch %d)", c.agent_id, c.swarm, why, epoch)
        try:
            async with open_client(
                c.broker,
                client_id=dispatch_client_id(c.swarm),
                clean_start=False,  # the session keeps what arrives while nobody serves
                session_expiry_interval=c.dispatch_session_expiry,
                will=will,
                manual_ack=True,  # also the messages queued before we subscribe
                # never reconnect on our own: a loss may be a takeover, and reconnecting
                # would take the session back (a fight); the election decides instead
                reconnect=False,
                **options,
            ) as dclient:
                shell = self.shell = DispatcherShell(c, dclient, self.client, epoch, self.store)
                shell.on_online = on_online
                try:
                    with trio.CancelScope() as self._work:
                        if self._stopping.is_set():
                            self._work.cancel()
                        if term is None:
                            await shell.run()
                        else:  # the store's term renewed beside it
                            async with trio.open_nursery() as keeper:
                                keeper.start_soon(self._keep_term, term, since, self._work)
                                await shell.run()
                                keeper.cancel_scope.cancel()
                        await dclient.wait_connected()  # raises once the client stopped
                        detail = "the dispatch session's subscription ended"
                    if self._deposed is not None:
                        end, detail = TermEnd.DEPOSED, self._deposed
                    elif self._work.cancelled_caught:
                        end, detail = TermEnd.STOPPED, "the agent leaves"
                except (MQTTError, trio.TooSlowError) as exc:
                    end, detail = _ended_by(exc)
                except BaseExceptionGroup as group:
                    # the error from one of the term's nurseries (the connection lost
                    # while the decider published): else open_client's exit would
                    # collapse it to the ClientClosed, seen as a failed connection
                    leaf = _one_error(group)
                    if leaf is None:
                        raise
                    end, detail = _ended_by(leaf)
                finally:
                    self._work = None
                    # our online status of this term is stale from now on
                    self.my_epochs.discard(epoch)
                if end in (TermEnd.STOPPED, TermEnd.FAILED, TermEnd.DEPOSED):  # else it is gone
                    await self._close_term(dclient, epoch)
        except MQTTError as exc:  # the dispatch connection could not be made
            if not detail:
                detail = str(exc)
        finally:
            if end is TermEnd.FAILED and not detail:  # cancelled from outside: the agent's end
                end, detail = TermEnd.STOPPED, "cancelled"
            self.shell = None
            self.terms.append((epoch, end))
            self._log_end(shell, epoch, end, detail)
        return end

    def _log_end(
        self, shell: DispatcherShell | None, epoch: int, end: TermEnd, detail: str
    ) -> None:
        if shell is None:
            log.warning("%s could not become dispatcher: %s", self.me, detail)
            return
        stats = shell.core.statistics(trio.current_time())
        log.log(
            logging.WARNING if end is TermEnd.FAILED else logging.INFO,
            "%s: dispatcher term %d ended (%s): %s; queued=%d assigned=%d claimed=%d "
            "accepted=%d completed=%d takeovers=%d",
            self.me,
            epoch,
            end.value,
            detail,
            stats.queued,
            stats.assigned,
            stats.claimed,
            stats.counters.get("accepted", 0),
            stats.counters.get("completed", 0),
            stats.counters.get("takeovers", 0),
        )

    async def _close_term(self, dclient: Client, epoch: int) -> None:
        """Status offline (flushed by the client's close, which then sends DISCONNECT),
        bounded and shielded: a cancelled agent still ends its term."""
        with trio.move_on_after(CLOSE_TIMEOUT) as guard:
            guard.shield = True
            offline = encode(
                self.me, self.config.role, self.messages.dispatch_status(epoch, "offline")
            )
            try:
                await dclient.publish(
                    self.topics.dispatch_status, offline, qos=1, retain=True, wait_ack=False
                )
            except MQTTError:
                pass  # the will says it


def _ended_by(exc: BaseException) -> tuple[TermEnd, str]:
    """Why a term ended, from the error that ended it."""
    cause = _cause(exc)
    if isinstance(cause, SessionTakenOver):
        return TermEnd.TAKEN_OVER, str(cause)
    if isinstance(exc, ClientClosed):
        return TermEnd.LOST, str(exc)
    return TermEnd.FAILED, str(exc) or "the task records were not read in time"


def _one_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first MQTT error or timeout of ``group`` if that is all it holds (besides
    cancellations), else None."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(e, (MQTTError, trio.TooSlowError)) for e in leaves):
        return leaves[0]
    return None


def _cause(exc: BaseException) -> BaseException:
    """The SessionTakenOver behind ``exc`` (ClientClosed raised from it), or ``exc``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SessionTakenOver):
            return seen
        if isinstance(seen, ClientClosed):
            seen = seen.__cause__
            continue
        break
    return exc


async def run_candidate(
    config: AgentConfig,
    client: Client,
    *,
    store: ClaimStore | None = None,
    task_status: trio.TaskStatus[Candidate] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Be a candidate for dispatcher of ``config.swarm`` (following the status on
    ``client``, the agent's own connection; with ``store``, standing only with its term)
    until the :class:`Candidate` reported to ``task_status`` is stopped. See
    :class:`Candidate`."""
    await Candidate(config, client, store=store).run(task_status=task_status)
