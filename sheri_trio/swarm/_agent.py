"""One agent: the trio shell around the sans-IO :class:`~._scheduler.Scheduler`.

The scheduler decides (messages and the time in, commands out); the agent runs the
loops and carries the commands out: intake (messages to the scheduler), the claimer
(claims for free slots), heartbeat, leases, and a nursery with one
:class:`~._runner.TaskRunner` per won task. It talks to the broker only through a
:class:`~sheri_trio.mqtt.Client`, so the same code runs on the real client and, in unit
tests, on the in-memory bus of :mod:`sheri_trio.testing`.
"""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..executors import ExecutorRegistry, agent_state_dir, default_registry
from ..mqtt import (
    Client,
    ClientClosed,
    MQTTError,
    Subscription,
)
from ..stores import StoreError, StoreUnavailable, open_store
from ._config import AgentConfig, new_agent_id
from ._dispatching import Candidate
from ._divergence import ReportDivergence
from ._messages import Messages, encode
from ._presence import Peer, PresenceKind, rendezvous_score
from ._protocol import BadMessage, Topics, decode_envelope
from ._runner import TaskRunner
from ._scheduler import (
    AnnounceClaim,
    ClearPending,
    Command,
    Reannounce,
    ReportError,
    RepublishOutcome,
    Scheduler,
    SendCancelReply,
    SendClaim,
    SendFailed,
    SendPending,
    SendRelease,
    StartTask,
    StopTask,
    StoreClaim,
    log_event,
)
from ._startup import (
    Startup,
    StartupError,
    StartupStep,
    agent_connection,
    check_duplicate,
    publish_json,
    read_retained,
    startup_timeout,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ..stores import ClaimStore
    from ._claims import ClaimBook
    from ._lifecycle import StateChange, TaskRecord
    from ._presence import PeerTable
    from ._scheduler import Entry, FailReason

__all__ = [
    "Agent",
    "AgentConfig",
    "Peer",
    "new_agent_id",
    "rendezvous_score",
    "run_agent",
]

log = logging.getLogger("sheri_trio.agent")


class Agent:
    """An agent of one role in one swarm, over an already connected client."""

    def __init__(
        self,
        config: AgentConfig,
        client: Client,
        *,
        executors: ExecutorRegistry | None = None,
        store: ClaimStore | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.client = client
        #: the claim store opened at start-up (None: the broker's order decides): it
        #: decides our claims (broadcast), and takes our renewals and outcomes (both modes)
        self.store = store
        self.agent_id = config.agent_id
        self.role = config.role
        self.topics = Topics(config.swarm)
        self.executors = executors or default_registry()
        self.scheduler = Scheduler(config)
        self.messages = Messages(config.agent_id, config.role)
        self.started_at = 0.0
        self._scopes: dict[str, trio.CancelScope] = {}  # the cancel scope of each run
        self._claim_wakeup = trio.Event()
        self._shutdown = trio.Event()
        self._tasks_nursery: trio.Nursery | None = None
        self._early_starts: list[StartTask] = []
        self._dispatcher_known = trio.Event()
        #: the client's connection count when we last said online (None: not counted)
        self._connections: object = None
        #: our register is out: from then on a heartbeat may give the dispatcher our slots
        self._announced = False
        self._idle = trio.Event()
        #: the claim store did not answer: no new claims until it does (no fallback)
        self._store_down = False
        #: with a store: final state changes held until the store accepts the outcome
        self._final_changes: dict[str, tuple[Entry, TaskRecord, StateChange]] = {}
        #: dispatch mode: the last dispatch/view read (trio time, view), reused for a tenth
        #: of the interval the dispatcher republishes it in, and the read under way, which
        #: every monitoring.alerts that comes meanwhile shares: (its event, its answer)
        self._view: tuple[float, dict[str, Any]] | None = None
        self._view_read: trio.Event | None = None
        self._view_answer: tuple[trio.Event, dict[str, Any] | None] | None = None

    # ------------------------------------------------------------ public API
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (what SIGINT/SIGTERM do)."""
        self._shutdown.set()

    @property
    def book(self) -> ClaimBook:
        return self.scheduler.book

    @property
    def peers(self) -> PeerTable:
        return self.scheduler.peers

    @property
    def counters(self) -> dict[str, int]:
        return self.scheduler.counters

    async def run(
        self,
        *,
        startup: Startup | None = None,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe, load task states, announce (start-up steps, bounded by ``startup``'s
        scope if it has one), work until shutdown is requested, then leave cleanly."""
        startup = startup if startup is not None else Startup(self.agent_id)
        t = self.topics
        self.started_at = trio.current_time()
        dispatched = self.scheduler.dispatched
        if dispatched:
            # The dispatcher hands us our tasks (docs/dispatch.md): our inbox, acknowledged
            # once what it asks is carried out, and whom to follow.
            filters: tuple[str, ...] = (
                t.agent_inbox(self.agent_id),
                t.dispatch_status,
                t.broadcast,
            )
        else:
            filters = (
                t.tasks_new,
                t.tasks_assigned,
                t.tasks_complete,
                t.tasks_failed,
                t.tasks_released,
                t.tasks_cancel,
                t.tasks_pending_all,
                t.agents_status_all,
                t.agents_register,
                t.agents_heartbeat,
                t.agents_shutdown,
                t.broadcast,
            )
        async with trio.open_nursery() as root, AsyncExitStack() as stack:
            with startup.step(StartupStep.SUBSCRIBE):
                # One subscription for every topic: the broker's order is kept across them.
                messages = await stack.enter_async_context(
                    self.client.subscribe(*filters, qos=1, manual_ack=dispatched)
                )
            with startup.step(StartupStep.LOAD_TASK_STATES):
                if dispatched:
                    await self._drain_inbox(root, messages)
                else:
                    await self._load_task_states(progress=startup.renew)
            if dispatched:
                # Announce once tasks can reach the swarm: submissions published while no
                # dispatch session exists have no subscriber, and the broker drops them.
                # A submitter that waits for our register (the prototype's scripts) must
                # not publish into that void; and the dispatcher hears our register.
                with startup.step(StartupStep.DISPATCHER):
                    await self._dispatcher_known.wait()
            with startup.step(StartupStep.ANNOUNCE):
                await self._announce()
            if not dispatched:
                root.start_soon(self._intake, messages)
            root.start_soon(self._heartbeat_loop)
            root.start_soon(self._lease_loop)
            root.start_soon(self._claimer)
            self._log(logging.INFO, "online", max_tasks=self.config.max_tasks)
            task_status.started(self)
            async with trio.open_nursery() as tasks:
                self._tasks_nursery = tasks
                for command in self._early_starts:  # assigned while we started
                    await self._carry_out(command)
                self._early_starts.clear()
                await self._shutdown.wait()
                await self._drain()
            self._tasks_nursery = None
            await self._leave()
            root.cancel_scope.cancel()

    async def _drain_inbox(self, nursery: trio.Nursery, messages: Subscription) -> None:
        """Dispatch mode: read our inbox's backlog up to a sync marker of ours before
        anything starts, so an assignment revoked while we were away never runs."""
        nonce = secrets.token_hex(4)
        self.scheduler.begin_drain(nonce)
        drained = trio.Event()
        nursery.start_soon(self._intake, messages, drained)
        # not _publish(): a refused marker would only be logged, and the step would wait
        # for it until its bound; raised, it fails the step naming the refusal
        await self.client.publish(
            self.topics.agent_inbox(self.agent_id),
            encode(self.agent_id, self.role, self.messages.sync(nonce)),
            qos=1,
            content_type="application/json",
        )
        await drained.wait()

    async def _load_task_states(self, progress: Callable[[], object] | None = None) -> None:
        """Read the retained task states once (see :meth:`Scheduler.on_state`). ``progress``
        is called on every message that arrives (see :func:`read_retained`)."""
        sync = self.topics.sync_marker(self.agent_id, secrets.token_hex(4))
        now = trio.current_time()
        loaded = 0
        retained = await read_retained(
            self.client, sync, self.topics.tasks_state_all, progress=progress
        )
        for message in retained:
            try:
                self.scheduler.on_state(decode_envelope(message.payload).payload, now)
                loaded += 1
            except BadMessage as exc:
                self._log(logging.DEBUG, "ignored task state", reason=exc.reason)
        if loaded:
            held = len(self.scheduler.entries)
            self._log(logging.INFO, "task states loaded", count=loaded, held=held)
        self._wake_claimer()

    # ------------------------------------------------------------ presence
    async def _announce(self) -> None:
        m = self.messages
        self._connections = self.client.statistics().get("connections")
        await self._publish(
            self.topics.agent_status(self.agent_id), m.status("online"), retain=True
        )
        await self._publish(self.topics.agents_register, m.register(self.config.max_tasks))
        self._announced = True
        self.scheduler.peers.observe(
            self.agent_id, PresenceKind.ALIVE, trio.current_time(), role=self.role
        )

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        next_beat = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_beat)
            next_beat += interval
            await self._online_again()
            await self._beat(self.config.max_tasks if self.scheduler.accepting else 0)
            if self.store is not None:
                await self._renew_holds()

    async def _renew_holds(self) -> None:
        """With a store: renew the lease of every attempt we run; one the store lost (it
        restarted empty) is re-asserted; one another agent holds now stops (fenced)."""
        assert self.store is not None
        lease = self.config.lease_time
        for task_id, attempt in self.scheduler.holds():
            try:
                if await self.store.renew(task_id, attempt, self.agent_id, lease):
                    continue
                if await self.store.assert_hold(task_id, attempt, self.agent_id, lease):
                    self._log(logging.WARNING, "hold re-asserted in the claim store",
                              task_id=task_id, attempt=attempt)  # fmt: skip
                    continue
            except StoreUnavailable as exc:
                self._log(logging.WARNING, "claim store unavailable: lease not renewed",
                          error=exc)  # fmt: skip
                return
            for command in self.scheduler.on_hold_lost(task_id, attempt):
                await self._carry_out(command)

    async def _online_again(self) -> None:
        """After a reconnect, our retained status online again: our will may have gone
        out meanwhile (mosquitto publishes every client's will as it stops, so after a
        broker's restart every agent's retained status said offline)."""
        connections = self.client.statistics().get("connections")
        if connections == self._connections:
            return
        self._connections = connections
        self._log(logging.INFO, "reconnected: online again")
        await self._publish(
            self.topics.agent_status(self.agent_id),
            self.messages.status("online"),
            retain=True,
            wait_ack=False,
        )

    async def _beat(self, capacity: int) -> None:
        s = self.scheduler
        beat = self.messages.heartbeat(
            uptime=trio.current_time() - self.started_at,
            rss=_rss_bytes(),
            running=list(s.running),
            capacity=capacity,
            queued=len(s.queue),
        )
        await self._publish(self.topics.agents_heartbeat, beat, wait_ack=False)

    async def _lease_loop(self) -> None:
        period = max(self.config.lease_time / 4, 0.01)
        connections = self.client.statistics().get("connections")
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            # while we are cut off nobody's silence counts; a reconnect since the last
            # look (even one too short to be seen down) restarts every lease from now
            before, connections = connections, self.client.statistics().get("connections")
            if not self.client.connected or connections != before:
                self.scheduler.connection(False, now)
            self.scheduler.connection(self.client.connected, now)
            self.scheduler.check_leases(now)
            self._wake_claimer()

    # -------------------------------------------------------------- intake
    async def _intake(self, messages: Subscription, drained: trio.Event | None = None) -> None:
        # Take every message already delivered in one go: one scheduling round per
        # batch instead of one per message.
        scheduler = self.scheduler
        manual = scheduler.dispatched
        while True:
            try:
                batch = [await messages.receive()]
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return  # the subscription ended: we are leaving
            try:
                while len(batch) < 512:
                    batch.append(messages.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                pass
            for message in batch:
                commands = scheduler.receive(message.topic, message.payload, trio.current_time())
                for command in commands:
                    await self._carry_out(command)
                if manual:
                    message.ack()  # carried out (a start: handed to the task nursery)
            if drained is not None and scheduler.draining is None:
                drained.set()
            if scheduler.dispatcher is not None:
                self._dispatcher_known.set()
            self._wake_claimer()

    async def _claimer(self) -> None:
        while True:
            await self._claim_wakeup.wait()
            self._claim_wakeup = trio.Event()
            if self._store_down and self.store is not None:
                await self.store.wait_available()  # no new work meanwhile: no fallback
                self._store_down = False
                self._log(logging.WARNING, "claim store available again", url=self._store_url)
            for claim in self.scheduler.claims():
                await self._carry_out(claim)
            if self._store_down:
                self._claim_wakeup.set()  # wait for the store, then claim again

    def _wake_claimer(self) -> None:
        if self.scheduler.can_claim():
            self._claim_wakeup.set()

    async def _carry_out(self, command: Command) -> None:
        """Do what the scheduler decided."""
        t, m = self.topics, self.messages
        if type(command) is SendClaim:
            claim = m.claim(command.task_id, command.attempt)
            await self._publish(t.tasks_assigned, claim, wait_ack=False)
        elif type(command) is StoreClaim:
            await self._store_claim(command)
        elif type(command) is RepublishOutcome:
            await self._republish(command.task_id)
        elif type(command) is AnnounceClaim:
            claim = m.claim(command.task_id, command.attempt)
            await self._publish(t.tasks_assigned, claim, wait_ack=False)
        elif type(command) is StartTask:
            if self._tasks_nursery is None:  # assigned while we start: when the nursery is
                self._early_starts.append(command)
                return
            scope = trio.CancelScope()
            self._scopes[command.entry.task_id] = scope
            self._tasks_nursery.start_soon(self._run_task, command.entry, command.attempt, scope)
        elif type(command) is StopTask:
            running = self._scopes.get(command.entry.task_id)
            if running is not None:
                running.cancel()
        elif type(command) is SendRelease:
            await self._store_release(command.task_id, command.attempt)
            released = m.released(command.task_id, command.attempt)
            await self._publish(t.tasks_released, released, wait_ack=False)
        elif type(command) is SendFailed:
            failed = m.failed(command.spec, command.attempt, command.error, command.reason)
            if not await self._store_finish(command.spec.task_id, command.attempt, failed):
                return  # with a store: another outcome was accepted first
            if command.task is not None:  # never ran: its final state keeps the submission
                state = m.never_started(command.spec, command.attempt, command.error, command.task)
                await self._publish_state(command.spec.task_id, state, final=True)
            await self._publish(t.tasks_failed, failed)
            if command.clear_marker:
                await self._carry_out(ClearPending(command.spec.task_id))
        elif type(command) is SendPending:
            await self._publish(
                t.task_pending(command.task_id),
                command.submission,
                retain=True,
                expiry=self.config.state_retention,
            )
        elif type(command) is ClearPending:
            await self.client.publish(t.task_pending(command.task_id), b"", qos=1, retain=True)
        elif type(command) is Reannounce:
            if self._announced:  # before our register, a heartbeat would give the dispatcher
                # our slots, and what it gave us then our register would take over
                await self._beat(self.config.max_tasks if self.scheduler.accepting else 0)
        elif type(command) is ReportError:
            report = m.error_report(command.topic, command.reason, command.size, command.task_id)
            await self._publish(t.errors, report, wait_ack=False)
        elif type(command) is ReportDivergence:  # logged by the scheduler already
            await self._publish(t.errors, m.divergence_report(command), wait_ack=False)
        elif type(command) is SendCancelReply:
            reply = m.cancel_reply(
                command.request_id,
                command.task_id,
                command.result.value,
                command.scope,
                state=command.state,
                holder=command.holder,
                attempt=command.attempt,
            )
            await self._publish(t.tasks_cancel_reply, reply, wait_ack=False)

    # --------------------------------------------------------- the claim store
    @property
    def _store_url(self) -> str:
        return self.config.store.url

    async def _store_claim(self, command: StoreClaim) -> None:
        """Ask the store for the attempt; its verdict goes to the scheduler."""
        assert self.store is not None
        task_id, attempt, lease = command.task_id, command.attempt, self.config.lease_time
        try:
            if command.takeover:
                verdict = await self.store.takeover(
                    task_id, attempt, self.agent_id, lease, holder_dead=True
                )
            else:
                verdict = await self.store.claim(task_id, attempt, self.agent_id, lease)
        except StoreUnavailable as exc:
            self.scheduler.on_store_unavailable(command)
            if not self._store_down:
                self._store_down = True
                self._log(logging.ERROR, "claim store unavailable: no new tasks", error=exc)
            return
        for follow in self.scheduler.on_store_verdict(
            task_id, attempt, verdict, trio.current_time()
        ):
            await self._carry_out(follow)

    async def _republish(self, task_id: str) -> None:
        """Publish the outcome the store accepted (its holder's payload, as it stored it)."""
        assert self.store is not None
        try:
            stored = await self.store.outcome(task_id)
        except StoreUnavailable as exc:
            self._log(logging.WARNING, "claim store unavailable: outcome not republished",
                      task_id=task_id, error=exc)  # fmt: skip
            return
        if stored is None:
            return
        payload = dict(stored.outcome)
        topic = self.topics.tasks_complete if payload.get("status") == "success" else None
        self._log(logging.WARNING, "republishing the stored outcome", task_id=task_id,
                  holder=stored.holder, attempt=stored.attempt)  # fmt: skip
        await self._publish(topic or self.topics.tasks_failed, payload)

    async def _store_finish(self, task_id: str, attempt: int, outcome: dict[str, Any]) -> bool:
        """With a store: the outcome is stored before it is published; False: the store
        refused it (a newer attempt, or another outcome): publish nothing. Waits for a
        store that does not answer (there is no fallback)."""
        if self.store is None:
            return True
        while True:
            try:
                accepted = await self.store.finish(task_id, attempt, self.agent_id, outcome)
                break
            except StoreUnavailable as exc:
                self._log(logging.ERROR, "claim store unavailable: outcome waits", task_id=task_id,
                          error=exc)  # fmt: skip
                await self.store.wait_available()
        if not accepted:
            self._log(logging.WARNING, "outcome refused by the claim store (fenced)",
                      task_id=task_id, attempt=attempt)  # fmt: skip
        return accepted

    async def _store_release(self, task_id: str, attempt: int) -> None:
        if self.store is None:
            return
        try:
            await self.store.release(task_id, attempt, self.agent_id)
        except StoreUnavailable as exc:  # its lease runs out: taken over once we are gone
            self._log(logging.WARNING, "claim store unavailable: release not stored",
                      task_id=task_id, error=exc)  # fmt: skip

    # ------------------------------------------------------------- running
    async def _run_task(self, entry: Entry, attempt: int, scope: trio.CancelScope) -> None:
        try:
            if not self.scheduler.accepting:
                # shutdown began before it started: given back without running
                self._log(logging.INFO, "won while shutting down: released", task_id=entry.task_id)
                await self.released(entry, attempt)
                return
            runner = TaskRunner(
                entry, attempt, config=self.config, executors=self.executors, outbox=self
            )
            await runner.run(scope)
        finally:
            self._scopes.pop(entry.task_id, None)
            self.scheduler.on_ended(entry)
            if not self.scheduler.running:
                self._idle.set()
            self._wake_claimer()

    # The Outbox of the runners: publish what a task did, and book it first.
    async def changed(self, entry: Entry, record: TaskRecord, change: StateChange) -> None:
        if self.store is not None and record.final and change.dest != "released":
            # with a store, the final state goes out once the store accepted the outcome
            self._final_changes[record.task_id] = (entry, record, change)
            return
        await self._publish_change(entry, record, change)

    async def _publish_final_change(self, task_id: str, accepted: bool) -> None:
        held = self._final_changes.pop(task_id, None)
        if held is not None and accepted:
            await self._publish_change(*held)

    async def _publish_change(self, entry: Entry, record: TaskRecord, change: StateChange) -> None:
        payload = self.messages.state_change(record, change, entry.spec.type)
        await self._publish(self.topics.tasks_progress, payload, wait_ack=False)
        if change.detail.get("reason") == "fenced":
            return  # a newer attempt's holder owns the retained record now
        if change.dest == "claimed" or record.final:
            # newcomers (and a new dispatcher) read this retained state to take over;
            # a final one keeps the submission for ``sheri retry``
            final = record.final and change.dest != "released"
            payload["task"] = entry.submission() if final else entry.spec.to_wire()
            await self._publish_state(record.task_id, payload, final=final)
            if change.dest == "claimed" and self.scheduler.dispatched:
                # after the record: the claim tells the dispatcher and observers we have it
                claim = self.messages.claim(record.task_id, record.attempt)
                await self._publish(self.topics.tasks_assigned, claim, wait_ack=False)

    async def progress(self, record: TaskRecord, message: str, fields: dict[str, Any]) -> None:
        payload = self.messages.progress(record, message, fields)
        await self._publish(self.topics.tasks_progress, payload, wait_ack=False)

    async def completed(self, entry: Entry, attempt: int, result: Any, duration_ms: int) -> None:
        result = await self._bounded_result(entry.task_id, attempt, result)
        payload = self.messages.complete(entry.spec, attempt, result, duration_ms)
        accepted = await self._store_finish(entry.task_id, attempt, payload)
        await self._publish_final_change(entry.task_id, accepted)
        if not accepted:
            return
        after = self.scheduler.finish(entry, success=True)
        # wait_ack=False: the session delivers it (resent after a reconnect, flushed by
        # the client's close); nothing here waits on the broker's answer, and the wait
        # (an event and a timeout scope per task) was ~4 % of the agents' CPU
        await self._publish(self.topics.tasks_complete, payload, wait_ack=False)
        for command in after:
            await self._carry_out(command)
        self._log(logging.INFO, "completed", task_id=entry.task_id, duration_ms=duration_ms)

    async def failed(self, entry: Entry, attempt: int, error: str, reason: FailReason) -> None:
        payload = self.messages.failed(entry.spec, attempt, error, reason)
        accepted = await self._store_finish(entry.task_id, attempt, payload)
        await self._publish_final_change(entry.task_id, accepted)
        if not accepted:
            return
        after = self.scheduler.finish(entry, success=False)
        await self._publish(self.topics.tasks_failed, payload, wait_ack=False)  # as completed
        for command in after:
            await self._carry_out(command)
        self._log(
            logging.WARNING, "failed", task_id=entry.task_id, reason=reason, error=error[:200]
        )

    async def released(self, entry: Entry, attempt: int) -> None:
        """Give an attempt back: other eligible agents claim ``attempt + 1``."""
        self.scheduler.released(entry)
        await self._store_release(entry.task_id, attempt)
        payload = self.messages.released(entry.task_id, attempt)
        # wait_ack=False: the client's close flushes it; a cancelled reader acks nothing
        await self._publish(self.topics.tasks_released, payload, wait_ack=False)

    async def swarm_view(self) -> dict[str, Any] | None:
        """What monitoring.alerts sees of the swarm: our peer table (broadcast), or the
        dispatcher's retained ``dispatch/view`` (dispatch mode; None when there is none).

        Dispatch mode: a view read within the last tenth of ``heartbeat_interval`` (the
        dispatcher republishes it once per interval) is reused, and a read under way is
        shared: a burst of monitoring.alerts reads it once, not a subscription each."""
        if not self.scheduler.dispatched:
            return self.scheduler.swarm_view(trio.current_time())
        while True:
            if self._view is not None and (
                trio.current_time() - self._view[0] < self.config.heartbeat_interval / 10
            ):
                return self._view[1]
            reading = self._view_read
            if reading is None:
                break
            await reading.wait()
            if self._view_answer is not None and self._view_answer[0] is reading:
                return self._view_answer[1]
            # that read was cancelled: read ourselves
        reading = self._view_read = trio.Event()
        try:
            view = await self._read_view()
            self._view_answer = (reading, view)
            if view is not None:
                self._view = (trio.current_time(), view)
            return view
        finally:
            self._view_read = None
            reading.set()

    async def _read_view(self) -> dict[str, Any] | None:
        sync = self.topics.sync_marker(self.agent_id, secrets.token_hex(4))
        with trio.move_on_after(self.config.heartbeat_interval):
            for message in await read_retained(self.client, sync, self.topics.dispatch_view):
                try:
                    return decode_envelope(message.payload).payload
                except BadMessage as exc:
                    self._log(logging.WARNING, "bad dispatch view", reason=exc.reason)
        return None

    async def _bounded_result(self, task_id: str, attempt: int, result: Any) -> Any:
        """The result as published: whole up to ``max_result_bytes`` of JSON; beyond, a
        marker with its head, and the whole of it in ``<state_dir>/results/``."""
        try:
            data = orjson.dumps(result, default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            return {"error": "result is not JSON-serialisable", "repr": repr(result)[:1000]}
        limit = self.config.max_result_bytes
        if len(data) <= limit:
            return result
        marker: dict[str, Any] = {
            "truncated": True,
            "size": len(data),
            "head": data[: max(limit - 400, 0)].decode("utf-8", errors="ignore"),
        }
        path = (
            agent_state_dir(self.config.executor_config, self.agent_id)
            / "results"
            / f"{task_id}.{attempt}.json"
        )
        try:
            await trio.to_thread.run_sync(_write_private, path, data)
            marker["stored"] = str(path)
        except OSError as exc:
            self._log(logging.ERROR, "cannot store the full result", task_id=task_id, error=exc)
        self._log(logging.WARNING, "result truncated", task_id=task_id, size=len(data), stored=path)
        return marker

    # ------------------------------------------------------------- shutdown
    async def _drain(self) -> None:
        """Stop taking tasks; let running ones finish within the grace period; release the rest."""
        self.scheduler.stop_accepting()
        self._log(logging.INFO, "shutting down", running=len(self.scheduler.running))
        if self.scheduler.dispatched:
            await self._beat(capacity=0)  # the dispatcher assigns us nothing more
        if self.scheduler.running:
            self._idle = trio.Event()
            with trio.move_on_after(self.config.grace_period):
                await self._idle.wait()
        for command in self.scheduler.release_running():
            await self._carry_out(command)

    async def _leave(self) -> None:
        with trio.move_on_after(5) as guard:
            guard.shield = True
            uptime = trio.current_time() - self.started_at
            await self._publish(
                self.topics.agents_shutdown, self.messages.shutdown(uptime), wait_ack=False
            )
            await self._publish(
                self.topics.agent_status(self.agent_id),
                self.messages.status("offline", "shutdown"),
                retain=True,
                wait_ack=False,  # flushed by the client's close before DISCONNECT
            )
        self._log(logging.INFO, "offline")

    # --------------------------------------------------------------- helpers
    async def _publish_state(self, task_id: str, payload: dict[str, Any], *, final: bool) -> None:
        """The retained ``tasks/state/{task_id}``. Its submission (``task``) came within
        ``max_message_bytes``; should the record with it exceed that, the record goes
        without it (``task_omitted``), so readers never refuse it."""
        data = encode(self.agent_id, self.role, payload)
        if len(data) > self.config.max_message_bytes and "task" in payload:
            payload = {k: v for k, v in payload.items() if k != "task"}
            payload["task_omitted"] = "too large"
            data = encode(self.agent_id, self.role, payload)
        await self._publish_data(
            self.topics.task_state(task_id),
            data,
            retain=True,
            expiry=self.config.final_retention if final else self.config.state_retention,
            wait_ack=False,
        )

    async def _publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        retain: bool = False,
        expiry: int | None = None,
        wait_ack: bool = True,
    ) -> None:
        data = encode(self.agent_id, self.role, payload)
        await self._publish_data(topic, data, retain=retain, expiry=expiry, wait_ack=wait_ack)

    async def _publish_data(
        self,
        topic: str,
        data: bytes,
        *,
        retain: bool = False,
        expiry: int | None = None,
        wait_ack: bool = True,
    ) -> None:
        try:
            await publish_json(
                self.client, topic, data, retain=retain, expiry=expiry, wait_ack=wait_ack
            )
        except ClientClosed:
            raise
        except MQTTError as exc:
            self._log(logging.ERROR, "publish failed", topic=topic, error=str(exc))

    def _log(self, level: int, event: str, **fields: Any) -> None:
        log_event(level, event, self.agent_id, **fields)


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (results may hold anything)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ running one
async def run_agent(
    config: AgentConfig,
    *,
    executors: ExecutorRegistry | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe, connect, run one agent until ``shutdown`` is set (or it is cancelled), leave.

    Each start-up step is bounded by :func:`startup_timeout` (a :class:`StartupError`
    names the step). A ``shutdown`` set during start-up stops it there: this returns
    without calling ``task_status.started()``. Once online the agent leaves gracefully.
    """
    config.validate()
    startup = Startup(config.agent_id, startup_timeout(config))
    agent: Agent | None = None

    def leave() -> None:
        if agent is not None:
            agent.request_shutdown()

    async with startup.guard(shutdown, leave), AsyncExitStack() as stack:
        store: ClaimStore | None = None
        if config.store.kind != "broker":
            with startup.step(StartupStep.CLAIM_STORE):
                try:
                    store = await stack.enter_async_context(open_store(config.store, config.swarm))
                except StoreError as exc:  # unreachable, credentials refused, wrong version
                    raise StartupError(
                        config.agent_id, StartupStep.CLAIM_STORE, startup.timeout, cause=exc
                    ) from None
            log_event(logging.INFO, "claim store", config.agent_id, url=config.store.url)
        if config.check_duplicate:
            with startup.step(StartupStep.PROBE):
                await check_duplicate(config)
        async with AsyncExitStack() as connection:
            with startup.step(StartupStep.CONNECT):
                client = await connection.enter_async_context(agent_connection(config, startup))
            agent = Agent(config, client, executors=executors, store=store)
            candidate = (
                Candidate(config, client, store=store) if config.dispatch == "dispatcher" else None
            )
            async with trio.open_nursery() as beside:
                if candidate is not None:  # a candidate for dispatcher, beside the agent
                    beside.start_soon(candidate.run)
                await agent.run(startup=startup, task_status=task_status)  # after a graceful exit
                if candidate is not None:
                    candidate.stop()  # its term ends cleanly, within CLOSE_TIMEOUT
