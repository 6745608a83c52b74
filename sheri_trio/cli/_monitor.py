"""``sheri monitor``: a live table of a swarm's agents and recent tasks, and its model
(:class:`SwarmView`, fed messages, no I/O). Its rows are the dashboard's
(:class:`~sheri_trio.dashboard.AgentRow`, :class:`~sheri_trio.dashboard.TaskRow`)."""

from __future__ import annotations

import math
import signal
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Annotated

import trio
from cyclopts import Parameter

from ..dashboard import SETTLED, AgentRow, TaskRow
from ..swarm import FINAL_STATES, Topics
from ._broker import BROKER_DEFAULTS, STORE_DEFAULTS, BrokerArgs, StoreArgs, decode
from ._errors import NoAnswer
from ._output import EXIT_OK, state_type, styled_state

if TYPE_CHECKING:
    from rich.console import RenderableType

    from ..mqtt import Message

__all__ = ["AgentRow", "SwarmView", "TaskRow"]


class SwarmView:
    """What ``sheri monitor`` knows about a swarm, from the messages it has seen."""

    def __init__(self, topics: Topics, *, max_tasks: int = 20, claim_store: str = "broker") -> None:
        self.topics = topics
        #: the claim store's location (without its password), shown in the summary
        self.claim_store = claim_store
        self.agents: dict[str, AgentRow] = {}
        self.tasks: OrderedDict[str, TaskRow] = OrderedDict()
        self.max_tasks = max_tasks
        self.messages = 0
        #: the latest reports on ``{swarm}/errors``: (reporter, error), divergence first
        self.errors: deque[tuple[str, str]] = deque(maxlen=5)
        #: reports that the broker keeps no single order (a second holder, outcome, leader)
        self.divergences = 0

    def _agent(self, agent_id: str) -> AgentRow:
        row = self.agents.get(agent_id)
        if row is None:
            row = self.agents[agent_id] = AgentRow(agent_id)
        return row

    def _task(self, task_id: str) -> TaskRow:
        row = self.tasks.get(task_id)
        if row is None:
            row = self.tasks[task_id] = TaskRow(task_id)
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)
        return row

    def feed(self, message: Message, now: float) -> None:
        env = decode(message)
        if env is None:
            return
        self.messages += 1
        t, p, topic = self.topics, env.payload, message.topic
        agent_id = p.get("agent_id", env.agent_id)
        agent_id = agent_id if isinstance(agent_id, str) else None
        role = p.get("role", env.role)
        role = role if isinstance(role, str) else None
        if topic == t.errors:
            error = p.get("error")
            if isinstance(error, str):
                reporter = p.get("reported_by", env.agent_id)
                self.errors.append((reporter if isinstance(reporter, str) else "?", error[:500]))
                if p.get("kind") == "divergence":
                    self.divergences += 1
            return
        status_of = t.status_agent_id(topic)
        if status_of is not None:
            row = self._agent(status_of)
            row.status = str(p.get("status", "?"))
            row.role = role or row.role
            return
        if topic in (t.agents_register, t.agents_heartbeat, t.agents_shutdown):
            if agent_id is None:
                return
            row = self._agent(agent_id)
            row.role = role or row.role
            if topic == t.agents_shutdown:
                row.status, row.running = "offline", 0
            else:
                row.status, row.last_seen = "online", now
                running = p.get("running_tasks")
                if isinstance(running, int):
                    row.running = running
            return
        task_id = p.get("task_id")
        if not isinstance(task_id, str):
            return
        attempt = p.get("attempt", 1)
        attempt = attempt if isinstance(attempt, int) else 1
        if topic == t.tasks_new:
            task = self._task(task_id)
            task.type = str(p.get("type")) if p.get("type") else task.type
        elif topic == t.tasks_assigned:
            task = self._task(task_id)
            if attempt > task.attempt and task.state not in SETTLED:
                task.attempt, task.agent, task.state, task.started = (
                    attempt,
                    agent_id,
                    "claimed",
                    now,
                )
        elif topic in (t.tasks_progress, t.task_state(task_id)):
            known = task_id in self.tasks
            if not known and not message.retain:
                return  # progress of a task we never saw start: ignore
            task = self._task(task_id)
            task.type = state_type(p) or task.type
            if attempt >= task.attempt and task.state not in SETTLED:
                task.attempt = attempt
                task.state = str(p.get("state", task.state))
                task.agent = agent_id or task.agent
                if isinstance(p.get("duration"), int | float):
                    task.duration_ms = p["duration"]
                if p.get("error"):
                    task.error = str(p["error"])
        elif topic in (t.tasks_complete, t.tasks_failed):
            task = self._task(task_id)
            if attempt < task.attempt:
                return  # fenced off
            task.attempt = attempt
            task.state = "done" if topic == t.tasks_complete else "failed"
            task.agent = agent_id or task.agent
            task.type = str(p.get("type")) if p.get("type") else task.type
            if isinstance(p.get("duration"), int | float):
                task.duration_ms = p["duration"]
            elif task.started is not None:
                task.duration_ms = round((now - task.started) * 1000)
            if p.get("error"):
                task.error = str(p["error"])
        elif topic == t.tasks_released:
            task = self._task(task_id)
            if attempt == task.attempt:
                task.state = "released"

    def render(self, now: float) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        agents = Table(title=f"agents in {self.topics.swarm}", expand=False)
        for column in ("agent", "role", "status", "heartbeat", "running"):
            agents.add_column(column, no_wrap=True)
        for row in sorted(self.agents.values(), key=lambda r: (r.status != "online", r.agent_id)):
            age = "-" if row.last_seen is None else f"{now - row.last_seen:.1f} s ago"
            style = "green" if row.status == "online" else "dim"
            agents.add_row(
                row.agent_id,
                row.role or "?",
                Text(row.status, style=style),
                age,
                "-" if row.running is None else str(row.running),
            )
        tasks = Table(title="recent tasks", expand=False)
        for column in ("task", "type", "state", "agent", "duration"):
            tasks.add_column(column, no_wrap=True)
        for task in reversed(self.tasks.values()):
            if task.duration_ms is not None:
                duration = f"{task.duration_ms / 1000:.2f} s"
            elif task.started is not None and task.state not in FINAL_STATES:
                duration = f"{now - task.started:.1f} s…"
            else:
                duration = "-"
            tasks.add_row(
                task.task_id,
                task.type or "?",
                styled_state(task.state),
                task.agent or "-",
                duration,
            )
        online = sum(1 for r in self.agents.values() if r.status == "online")
        summary = Text(
            f"{online} online, {len(self.agents)} known; {self.messages} messages; "
            f"claim store {self.claim_store}"
        )
        if not self.errors:
            return Group(agents, tasks, summary)
        lines = [Text(f"errors reported on {self.topics.errors}:", style="bold red")]
        if self.divergences:
            lines.append(
                Text(
                    f"{self.divergences} report(s) that tasks ran twice or two dispatchers "
                    "served: see below",
                    style="bold red",
                )
            )
        lines += [Text(f"{who}: {error}", style="red") for who, error in self.errors]
        return Group(agents, tasks, summary, *lines)


async def monitor_cmd(
    *,
    once: Annotated[bool, Parameter(help="Print one snapshot (retained state) and exit.")] = False,
    recent: Annotated[int, Parameter(help="How many recent tasks to show.")] = 20,
    where: BrokerArgs = BROKER_DEFAULTS,
    store: StoreArgs = STORE_DEFAULTS,
) -> int:
    """A live table of the swarm's agents and recent tasks, until Ctrl+C.

    With a claim store, it is opened and checked first (a wrong one exits 1).
    """
    from rich.console import Console
    from rich.live import Live

    link = where.link(store)
    topics = link.topics
    shown = link.store.url if link.store is not None else "broker"
    view = SwarmView(topics, max_tasks=max(recent, 1), claim_store=shown)
    console = Console()
    async with link.claim_store(), link.client("monitor") as client:
        if once:
            retained = await link.read_retained(
                client,
                topics.all,
                what=f"the swarm's retained messages ({topics.all})",
            )
            for message in retained:
                view.feed(message, trio.current_time())
            console.print(view.render(trio.current_time()))
            return EXIT_OK
        with (
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
            Live(view.render(0), console=console, auto_refresh=False) as live,
        ):
            with trio.move_on_after(link.bound) as answer:  # lifted once subscribed
                async with (
                    client.subscribe(topics.all, qos=1) as messages,
                    trio.open_nursery() as nursery,
                ):
                    answer.deadline = math.inf

                    async def stop_on_signal() -> None:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()

                    async def refresh() -> None:
                        while True:
                            live.update(view.render(trio.current_time()), refresh=True)
                            await trio.sleep(0.25)

                    nursery.start_soon(stop_on_signal)
                    nursery.start_soon(refresh)
                    async for message in messages:
                        view.feed(message, trio.current_time())
            live.update(view.render(trio.current_time()), refresh=True)
        if answer.cancelled_caught:
            raise NoAnswer(link.bound, f"subscribing to {topics.all} (waiting for the SUBACK)")
    return EXIT_OK
