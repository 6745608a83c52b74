"""The bench's measurement subprocesses: ``python -m bench.clients KIND [options]``.

Each measurement runs in a process of its own, so event loops, threads and the GIL of
one client never mix with another's (nor with the harness's progress bar). The process
prints exactly one JSON object on its last line of stdout.

The broker URL comes from the environment variable ``BENCH_URL`` (or ``--url``), so that
per-run passwords never appear on a command line (``ps`` shows those to every user).
A process contacts only that URL's host and port.

Throughput kinds (one publisher and one subscriber connection in this process, ``-n``
messages of ``--size`` bytes at ``--qos``; the transport is the URL's scheme):

* ``native``: sheri-trio's own client (``open_client``), ``mqtt://`` or ``ws://``
* ``native-gmqtt``: sheri-trio's interface on gmqtt (``open_client(backend="gmqtt")``)
* ``paho``: paho-mqtt 2.x, its network thread (``loop_start``); ``ws://`` uses its
  websockets transport
* ``gmqtt``: gmqtt on plain asyncio
* ``aiomqtt``: aiomqtt on asyncio
* ``mosquitto-c``: ``mosquitto_pub -l`` fed from a file and ``mosquitto_sub -C``

Other kinds: ``fanout-c`` (one ``mosquitto_pub -l``, ``--subscribers`` ``mosquitto_sub``:
the broker's deliveries/s), ``latency`` (request/response round trips), ``tasks`` (the
end-to-end task rate of :mod:`bench.tasks`), ``peer`` (Celery, Dramatiq or arq on a
private Redis, :mod:`bench.peers`), ``memory`` (RSS with 1..n in-process
agents), ``startup`` (spawn of an agent process to its retained ``online`` status),
``agent`` (one agent until SIGINT/SIGTERM: the fallback process for ``startup``) and
``broker-version`` (``$SYS/broker/version``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

THROUGHPUT_KINDS = ("native", "native-gmqtt", "paho", "gmqtt", "aiomqtt", "mosquitto-c")
OTHER_KINDS = (
    "fanout-c",
    "latency",
    "tasks",
    "peer",
    "memory",
    "startup",
    "agent",
    "broker-version",
    "presence",
    "retained",
    "share",
)
DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "ws": 80}
PAHO_MAX_UNACKED = 60_000
POLL = 0.05  # seconds between checks for "all arrived / idle" (end times are exact)

pc = time.perf_counter


@dataclass(frozen=True)
class URL:
    scheme: str
    host: str
    port: int
    path: str
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> URL:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise SystemExit(f"bench.clients: unsupported scheme {scheme!r} (mqtt:// or ws://)")
        return cls(
            scheme="mqtt" if scheme == "tcp" else scheme,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or DEFAULT_PORTS[scheme],
            path=parts.path or "/mqtt",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def websocket(self) -> bool:
        return self.scheme == "ws"


def payload_of(size: int) -> bytes:
    """A printable payload without newlines (``mosquitto_pub -l`` sends one per line)."""
    unit = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return (unit * (size // len(unit) + 1))[:size]


def new_tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


class Counter:
    """Messages seen by the subscriber, and when the last one arrived."""

    __slots__ = ("count", "cpu0", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.cpu0 = time.process_time()  # reset when the clock starts: see start()

    def start(self) -> float:
        """Start the clock: returns t0, and notes this process's CPU time."""
        self.cpu0 = time.process_time()
        return pc()


def idle_expired(counter: Counter, published_at: float | None, idle: float) -> bool:
    """True once nothing arrived for ``idle`` seconds after the publisher finished."""
    if published_at is None:
        return False
    return pc() - max(counter.last, published_at) > idle


def throughput_result(
    kind: str,
    url: URL,
    args: argparse.Namespace,
    counter: Counter,
    t0: float,
    published_at: float | None,
    **extra: Any,
) -> dict[str, Any]:
    received = counter.count
    seconds = (counter.last - t0) if received else None
    cpu = extra.pop("cpu_s", None)
    if cpu is None:
        cpu = time.process_time() - counter.cpu0  # every thread of this process
    return {
        "kind": kind,
        "transport": "ws" if url.websocket else "tcp",
        "qos": args.qos,
        "size": args.size,
        "sent": args.count,
        "received": received,
        "lost": args.count - received,
        "seconds": round(seconds, 4) if seconds else None,
        "publish_seconds": round(published_at - t0, 4) if published_at else None,
        "msgs_per_s": round(received / seconds, 1) if seconds else 0.0,
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


# ----------------------------------------------------------------- sheri-trio (ours)
def run_native(args: argparse.Namespace, url_text: str, *, backend: str) -> dict[str, Any]:
    import trio

    from sheri_trio.mqtt import open_client

    url = URL.parse(url_text)
    topic = f"bench/{new_tag()}/t"
    payload = payload_of(args.size)
    n, qos = args.count, args.qos
    counter = Counter()

    async def main() -> dict[str, Any]:
        tag = new_tag()
        async with (
            open_client(url_text, backend=backend, client_id=f"bench-sub-{tag}") as sub,
            open_client(url_text, backend=backend, client_id=f"bench-pub-{tag}") as pub,
            sub.subscribe(topic, qos=qos) as messages,
        ):
            published_at: float | None = None

            async def consume() -> None:
                count = 0
                if args.drain:  # as Agent._intake: take what is already delivered at once
                    while count < n:
                        await messages.receive()
                        count += 1
                        try:
                            while count < n:
                                messages.receive_nowait()
                                count += 1
                        except trio.WouldBlock:
                            pass
                        counter.count = count
                        counter.last = pc()
                    return
                async for _ in messages:
                    count += 1
                    counter.count = count
                    counter.last = pc()
                    if count >= n:
                        return

            async def produce() -> None:
                nonlocal published_at
                publish = pub.publish
                for _ in range(n):
                    await publish(topic, payload, qos=qos, wait_ack=False)
                published_at = pc()

            with trio.move_on_after(args.timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume)
                    t0 = counter.start()
                    nursery.start_soon(produce)
                    # polls: it also watches for idleness (lost messages)
                    while counter.count < n and not idle_expired(  # noqa: ASYNC110
                        counter, published_at, args.idle
                    ):
                        await trio.sleep(POLL)
                    nursery.cancel_scope.cancel()
        return throughput_result(
            "native" if backend == "trio" else "native-gmqtt", url, args, counter, t0, published_at
        )

    return trio.run(main)


# ----------------------------------------------------------------------- paho-mqtt
def run_paho(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    url = URL.parse(url_text)
    topic = f"bench/{new_tag()}/t"
    payload = payload_of(args.size)
    n, qos = args.count, args.qos
    counter = Counter()
    done = threading.Event()

    def make(client_id: str) -> tuple[Any, threading.Event]:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            transport="websockets" if url.websocket else "tcp",
        )
        if url.username is not None:
            client.username_pw_set(url.username, url.password)
        if url.websocket:
            client.ws_set_options(path=url.path)
        connected = threading.Event()
        client.on_connect = lambda c, u, flags, rc, props: connected.set()
        return client, connected

    tag = new_tag()
    sub, sub_connected = make(f"bench-sub-{tag}")
    pub, pub_connected = make(f"bench-pub-{tag}")
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        counter.count += 1
        counter.last = pc()
        if counter.count >= n:
            done.set()

    acked = [0]

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        acked[0] += 1

    sub.on_message = on_message
    sub.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    if qos:  # (paho calls it for QoS 0 messages too: don't charge it that)
        pub.on_publish = on_publish
    for client, connected in ((sub, sub_connected), (pub, pub_connected)):
        client.connect(url.host, url.port, keepalive=60)
        client.loop_start()
        if not connected.wait(10):
            raise SystemExit("paho: no CONNACK within 10 s")
    sub.subscribe(topic, qos=qos)
    if not subscribed.wait(10):
        raise SystemExit("paho: no SUBACK within 10 s")
    t0 = counter.start()
    deadline = t0 + args.timeout
    publish = pub.publish
    for i in range(n):
        # paho keys unacknowledged QoS 1 messages by their 16-bit packet id: with more than
        # 65,535 queued, new ones overwrite old ones and those are silently never sent.
        # Stay below that (it only matters for runs of more than 60,000 messages).
        while qos and i - acked[0] >= PAHO_MAX_UNACKED:
            time.sleep(0.001)
        publish(topic, payload, qos=qos)
    published_at = pc()
    while not done.wait(POLL):
        if idle_expired(counter, published_at, args.idle) or pc() > deadline:
            break
    result = throughput_result("paho", url, args, counter, t0, published_at)
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return result


# --------------------------------------------------------------- gmqtt on asyncio
def run_gmqtt(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    import asyncio

    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50

    url = URL.parse(url_text)
    if url.websocket:
        raise SystemExit("gmqtt has no WebSocket transport")
    topic = f"bench/{new_tag()}/t"
    payload = payload_of(args.size)
    n, qos = args.count, args.qos
    counter = Counter()

    async def main() -> dict[str, Any]:
        done = asyncio.Event()
        subscribed = asyncio.Event()
        tag = new_tag()

        def on_message(client: Any, topic: str, data: bytes, qos: int, props: Any) -> int:
            counter.count += 1
            counter.last = pc()
            if counter.count >= n:
                done.set()
            return 0

        sub = gmqtt.Client(f"bench-sub-{tag}")
        pub = gmqtt.Client(f"bench-pub-{tag}")
        for client in (sub, pub):
            if url.username is not None:
                client.set_auth_credentials(url.username, url.password)
        sub.on_message = on_message
        sub.on_subscribe = lambda client, mid, granted, props: subscribed.set()
        await sub.connect(url.host, url.port, version=MQTTv50, keepalive=60)
        await pub.connect(url.host, url.port, version=MQTTv50, keepalive=60)
        sub.subscribe(topic, qos=qos)
        await asyncio.wait_for(subscribed.wait(), 10)
        t0 = counter.start()
        publish = pub.publish
        every = args.yield_every
        for i in range(n):
            while True:
                try:
                    publish(topic, payload, qos=qos)
                    break
                except OverflowError:
                    # gmqtt refuses a QoS 1 publish beyond the broker's Receive Maximum:
                    # let the reader take PUBACKs (the public way to wait for a free id).
                    await asyncio.sleep(0)
            if every and i % every == every - 1:
                await asyncio.sleep(0)  # let the subscriber's reader run
        published_at = pc()
        deadline = t0 + args.timeout
        while not done.is_set():
            if idle_expired(counter, published_at, args.idle) or pc() > deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), POLL)
        result = throughput_result("gmqtt", url, args, counter, t0, published_at)
        await pub.disconnect()
        await sub.disconnect()
        return result

    return asyncio.run(main())


# --------------------------------------------------------------------------- aiomqtt
def run_aiomqtt(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    import asyncio

    import aiomqtt

    url = URL.parse(url_text)
    topic = f"bench/{new_tag()}/t"
    payload = payload_of(args.size)
    n, qos = args.count, args.qos
    counter = Counter()
    window = args.window

    quiet = logging.getLogger("bench.aiomqtt")  # it warns for every publish beyond 10 pending
    quiet.setLevel(logging.ERROR)

    def make(client_id: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            url.host,
            url.port,
            logger=quiet,
            username=url.username,
            password=url.password,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            transport="websockets" if url.websocket else "tcp",
            websocket_path=url.path if url.websocket else None,
        )

    async def main() -> dict[str, Any]:
        tag = new_tag()
        done = asyncio.Event()
        async with make(f"bench-sub-{tag}") as sub, make(f"bench-pub-{tag}") as pub:
            await sub.subscribe(topic, qos=qos)

            async def consume() -> None:
                async for _ in sub.messages:
                    counter.count += 1
                    counter.last = pc()
                    if counter.count >= n:
                        done.set()
                        return

            consumer = asyncio.create_task(consume())
            t0 = counter.start()
            if window <= 1:
                for _ in range(n):
                    await pub.publish(topic, payload, qos=qos)
            else:  # up to `window` publishes awaiting completion at once
                pending: set[asyncio.Task[None]] = set()
                for _ in range(n):
                    pending.add(asyncio.create_task(pub.publish(topic, payload, qos=qos)))
                    if len(pending) >= window:
                        _, pending = await asyncio.wait(
                            pending, return_when=asyncio.FIRST_COMPLETED
                        )
                if pending:
                    await asyncio.wait(pending)
            published_at = pc()
            deadline = t0 + args.timeout
            while not done.is_set():
                if idle_expired(counter, published_at, args.idle) or pc() > deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), POLL)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        return throughput_result("aiomqtt", url, args, counter, t0, published_at, window=window)

    return asyncio.run(main())


# ---------------------------------------------------------------- mosquitto C tools
class _CTools:
    """``mosquitto_pub`` / ``mosquitto_sub`` with the credentials in an options file.

    The clients read ``$XDG_CONFIG_HOME/mosquitto_pub`` (and ``..._sub``): the password
    stays off the command line.
    """

    def __init__(self, url: URL, workdir: Path) -> None:
        if url.websocket:
            raise SystemExit("mosquitto's C clients have no WebSocket transport")
        self.workdir = workdir
        lines = [f"-h {url.host}", f"-p {url.port}", "-V mqttv5"]
        if url.username is not None:
            lines.append(f"-u {url.username}")
        if url.password is not None:
            lines.append(f"-P {url.password}")
        config = workdir / "xdg"
        config.mkdir()
        for tool in ("mosquitto_pub", "mosquitto_sub"):
            fd = os.open(config / tool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(config)}

    def run_pub(
        self, *args: str, stdin: Any = subprocess.DEVNULL
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["mosquitto_pub", *args], env=self.env, stdin=stdin, capture_output=True, timeout=600
        )

    def spawn_pub(self, *args: str, stdin: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["mosquitto_pub", *args],
            env=self.env,
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def spawn_sub(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["mosquitto_sub", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


class _LineCounter(threading.Thread):
    """Counts the lines a ``mosquitto_sub`` prints, with the time of the last one."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.counter = Counter()
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            chunk = stream.read1(1 << 16)
            if not chunk:
                return
            lines = chunk.count(b"\n")
            if lines:
                self.counter.count += lines
                self.counter.last = pc()
                self.first.set()


def _c_run(
    args: argparse.Namespace, url: URL, subscribers: int
) -> tuple[list[Counter], float, float, subprocess.CompletedProcess[bytes] | Any, float]:
    """Publish ``args.count`` lines with ``mosquitto_pub -l`` to ``subscribers`` subs."""
    n, qos = args.count, args.qos
    with tempfile.TemporaryDirectory(prefix="bench-c-") as tmp:
        work = Path(tmp)
        tools = _CTools(url, work)
        data = work / "payload"
        data.write_bytes((payload_of(args.size) + b"\n") * n)
        topic = f"bench/{new_tag()}/c"
        # A retained marker tells when each subscription is live (it is counted: -C n+1).
        marker = tools.run_pub("-t", topic, "-r", "-q", "1", "-m", "ready")
        if marker.returncode:
            err = marker.stderr.decode(errors="replace")
            raise SystemExit(f"mosquitto_pub failed: {err}")
        subs = [
            tools.spawn_sub("-t", topic, "-q", str(qos), "-C", str(n + 1))
            for _ in range(subscribers)
        ]
        try:
            counters = [_LineCounter(p) for p in subs]
            for c in counters:
                if not c.first.wait(10):
                    raise SystemExit("mosquitto_sub did not subscribe within 10 s")
            for c in counters:
                c.counter.count = 0  # the marker
            with data.open("rb") as stdin:
                children0 = _children_cpu()
                t0 = pc()
                pub = tools.spawn_pub("-t", topic, "-q", str(qos), "-l", stdin=stdin)
                _, pub_err = pub.communicate(timeout=args.timeout)
            published_at = pc()
            deadline = t0 + args.timeout
            total = Counter()
            while True:
                total.count = sum(c.counter.count for c in counters)
                total.last = max(c.counter.last for c in counters)
                if total.count >= n * subscribers or pc() > deadline:
                    break
                if idle_expired(total, published_at, min(args.idle, 2.0)):
                    break
                time.sleep(POLL)
        finally:
            for p in subs:
                if p.poll() is None:
                    p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        cpu = _children_cpu() - children0  # mosquitto_pub and the mosquitto_subs
        tools.run_pub("-t", topic, "-r", "-n")  # clear the marker
        pub_result = subprocess.CompletedProcess(pub.args, pub.returncode, b"", pub_err)
        return [c.counter for c in counters], t0, published_at, pub_result, cpu


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_mosquitto_c(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    url = URL.parse(url_text)
    (counter,), t0, published_at, pub, cpu = _c_run(args, url, 1)
    extra: dict[str, Any] = {"pub_exit": pub.returncode, "cpu_s": cpu}
    if counter.count < args.count:
        extra["partial"] = True
        extra["note"] = (
            f"only {counter.count:,} of {args.count:,} messages arrived: mosquitto_pub -l queues "
            "every line at once, and beyond 65,535 unacknowledged QoS 1 messages its packet "
            "ids repeat; the broker then disconnects it ('out of memory' in its log) while "
            f"mosquitto_pub exits {pub.returncode}. The rate counts what arrived"
        )
    err = pub.stderr.decode(errors="replace").strip()
    if err:
        extra["pub_stderr"] = err[-300:]
    return throughput_result("mosquitto-c", url, args, counter, t0, published_at, **extra)


def run_fanout_c(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    url = URL.parse(url_text)
    counters, t0, published_at, pub, cpu = _c_run(args, url, args.subscribers)
    delivered = sum(c.count for c in counters)
    last = max(c.last for c in counters)
    seconds = last - t0 if delivered else None
    return {
        "kind": "fanout-c",
        "qos": args.qos,
        "size": args.size,
        "messages": args.count,
        "subscribers": args.subscribers,
        "deliveries": delivered,
        "expected": args.count * args.subscribers,
        "seconds": round(seconds, 4) if seconds else None,
        "publish_seconds": round(published_at - t0, 4),
        "deliveries_per_s": round(delivered / seconds, 1) if seconds else 0.0,
        "pub_exit": pub.returncode,
        "client_cpu_s": round(cpu, 3),
    }


# ------------------------------------------------------------------------- latency
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def run_latency(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """Round trips: request -> broker -> responder -> broker -> requester, serially."""
    import trio

    from sheri_trio.mqtt import open_client

    url = URL.parse(url_text)
    tag = new_tag()
    req_topic, resp_topic = f"bench/{tag}/req", f"bench/{tag}/resp"
    payload = payload_of(args.size)
    qos = args.qos

    async def main() -> list[float]:
        samples: list[float] = []
        async with (
            open_client(url_text, client_id=f"bench-req-{tag}") as requester,
            open_client(url_text, client_id=f"bench-resp-{tag}") as responder,
            requester.subscribe(resp_topic, qos=qos) as responses,
            responder.subscribe(req_topic, qos=qos) as requests,
            trio.open_nursery() as nursery,
        ):

            async def respond() -> None:
                async for m in requests:
                    await responder.publish(resp_topic, m.payload, qos=qos)

            nursery.start_soon(respond)
            with trio.fail_after(args.timeout):
                for i in range(args.warmup + args.count):
                    t0 = pc()
                    await requester.publish(req_topic, payload, qos=qos)  # QoS 1: waits for PUBACK
                    await responses.receive()
                    if i >= args.warmup:
                        samples.append(pc() - t0)
            nursery.cancel_scope.cancel()
        return samples

    samples = sorted(trio.run(main))
    ms = [s * 1000 for s in samples]
    return {
        "kind": "latency",
        "transport": "ws" if url.websocket else "tcp",
        "qos": qos,
        "size": args.size,
        "round_trips": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


# ----------------------------------------------------------------------- task rate
def run_tasks(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    import trio

    from bench.tasks import task_rate

    pid = os.environ.get("BENCH_BROKER_PID")  # our own broker: its CPU over the burst
    result = trio.run(
        lambda: task_rate(
            url_text,
            agents=args.agents,
            tasks=args.tasks,
            max_tasks=args.max_tasks,
            max_wait=args.timeout,
            lone=args.lone,
            workload=args.workload,
            task_seconds=args.task_seconds,
            dispatch=args.dispatch,
            broker_pid=int(pid) if pid else None,
            processes=args.processes,
            swarm=args.swarm_name,
        )
    )
    return {"kind": "tasks", **result}


def run_share(args: argparse.Namespace, url_text: str) -> dict[str, Any] | None:
    """One share of a ``tasks --processes N`` swarm (bench/tasks.py ``run_share``)."""
    import trio

    from bench.tasks import run_share as share

    trio.run(
        lambda: share(
            url_text,
            args.swarm,
            [int(i) for i in args.indices.split(",") if i],
            agents=args.agents,
            max_tasks=args.max_tasks,
            task_seconds=args.task_seconds,
            dispatch=args.dispatch,
        )
    )
    return None


def run_presence(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """One swarm of ``--agents`` started at once: start-up and idle presence traffic."""
    import trio

    from bench.presence import swarm_presence

    result = trio.run(
        lambda: swarm_presence(
            url_text,
            agents=args.agents,
            dispatch=args.dispatch,
            heartbeat_interval=args.heartbeat,
            intervals=args.intervals,
            start_timeout=args.timeout,
        )
    )
    return {"kind": "presence", **result}


def run_retained(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """An agent started next to ``--records`` retained final task states."""
    import trio

    from bench.presence import retained_start

    result = trio.run(
        lambda: retained_start(
            url_text, records=args.records, dispatch=args.dispatch, reps=args.reps
        )
    )
    return {"kind": "retained", **result}


# ---------------------------------------------------------------------- peers
def run_peer(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """A task queue of another project on a private Redis (``$BENCH_REDIS_URL``)."""
    from bench.peers import run_peer as run

    return {
        "kind": "peer",
        **run(
            args.peer, tasks=args.tasks, lone=args.lone, workers=args.workers, timeout=args.timeout
        ),
    }


# -------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """RSS of this process with 1, 100, 1,000... agents started in it.

    Agents are grouped in swarms of ``--swarm-size`` (0: all in one swarm). Every agent
    follows the presence of every other agent of its swarm, so one swarm of n agents
    costs O(n^2) messages and memory.
    """
    import gc

    import trio

    from bench.machine import raise_fd_limit
    from sheri_trio.executors import default_registry
    from sheri_trio.mqtt import open_client
    from sheri_trio.swarm import AgentConfig, run_agent

    counts = sorted({int(c) for c in args.counts.split(",")})
    fd_limit = raise_fd_limit(max(counts) + 64)
    swarm = f"bench-mem-{new_tag()}"
    registry = default_registry()
    points: list[dict[str, Any]] = []
    notes: list[str] = []

    def measure() -> int:
        gc.collect()
        return rss_bytes()

    async def main() -> int:
        # Import and warm up what every agent uses, with one throw-away connection, so
        # the baseline holds the code and the first agent is charged only for itself.
        async with open_client(url_text, client_id=f"bench-warm-{new_tag()}") as c:
            async with c.subscribe(f"{swarm}/warm", qos=1):
                await c.publish(f"{swarm}/warm", b"x", qos=1)
        await trio.sleep(0.2)
        base = measure()
        stop = trio.Event()
        started = 0
        t_start = pc()
        async with trio.open_nursery() as nursery:
            try:
                for target in counts:
                    while started < target:
                        group = started // args.swarm_size if args.swarm_size else 0
                        cfg = AgentConfig(
                            role="general",
                            agent_id=f"{swarm}-{started}",
                            swarm=f"{swarm}-{group}",
                            broker=url_text,
                            check_duplicate=False,
                            heartbeat_interval=3600.0,
                            lease_time=7200.0,
                            default_timeout=None,
                        )
                        with trio.fail_after(30):
                            await nursery.start(
                                lambda task_status, cfg=cfg: run_agent(
                                    cfg, executors=registry, shutdown=stop, task_status=task_status
                                )
                            )
                        started += 1
                    await trio.sleep(args.settle)
                    rss = measure()
                    points.append(
                        {
                            "agents": target,
                            "rss_mb": round(rss / 2**20, 1),
                            "per_agent_kb": round((rss - base) / target / 1024, 1),
                            "seconds_to_start": round(pc() - t_start, 2),
                        }
                    )
            except Exception as exc:  # a limit reached: say where, keep the points
                notes.append(f"stopped after {started} agents: {type(exc).__name__}: {exc}"[:400])
            stop.set()
            with trio.move_on_after(60):
                while True:  # let the agents leave (graceful DISCONNECT)
                    await trio.sleep(0.1)
                    if not nursery.child_tasks:
                        break
            nursery.cancel_scope.cancel()
        # Leave no retained agent status behind.
        async with open_client(url_text, client_id=f"bench-clean-{new_tag()}") as c:
            for i in range(started):
                group = i // args.swarm_size if args.swarm_size else 0
                topic = f"{swarm}-{group}/agents/{swarm}-{i}/status"
                await c.publish(topic, b"", qos=1, wait_ack=i == started - 1, retain=True)
        return base

    base = trio.run(main)
    for prev, cur in itertools.pairwise(points):
        cur["marginal_kb"] = round(
            (cur["rss_mb"] - prev["rss_mb"]) * 1024 / (cur["agents"] - prev["agents"]), 1
        )
    return {
        "kind": "memory",
        "baseline_rss_mb": round(base / 2**20, 1),
        "points": points,
        "fd_limit": fd_limit,
        "swarm_size": args.swarm_size or max(counts),
        "notes": notes,
    }


# ------------------------------------------------------------------------- startup
def run_startup(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """Spawn an agent process; time until a watcher sees its retained ``online`` status."""
    import trio

    from sheri_trio.mqtt import open_client

    repo = Path(__file__).resolve().parent.parent
    swarm = f"bench-start-{new_tag()}"

    def commands(agent_id: str) -> dict[str, list[str]]:
        return {
            "cli": [
                sys.executable,
                "-m",
                "sheri_trio",
                "agent",
                "--role",
                "general",
                "--agent-id",
                agent_id,
                "--swarm",
                swarm,
            ],
            "run_agent": [
                sys.executable,
                "-m",
                "bench.clients",
                "agent",
                "--agent-id",
                agent_id,
                "--swarm",
                swarm,
            ],
        }

    env = {
        **os.environ,
        "SHERI_BROKER": url_text,
        "BENCH_URL": url_text,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }

    async def one(watcher: Any, variant: str, index: int) -> float | str:
        agent_id = f"{swarm}-{variant.replace('_', '-')}-{index}"
        status_topic = f"{swarm}/agents/{agent_id}/status"
        async with watcher.subscribe(status_topic, qos=1) as statuses:
            t0 = pc()
            proc = await trio.lowlevel.open_process(
                commands(agent_id)[variant],
                env=env,
                cwd=str(repo),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            elapsed: float | str = "no online status within the timeout"
            try:
                with trio.move_on_after(args.timeout):
                    async for m in statuses:
                        if m.payload and b'"online"' in m.payload:
                            elapsed = pc() - t0
                            break
                        if proc.poll() is not None:
                            break
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)  # graceful: publishes offline, leaves
                with trio.move_on_after(15) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    proc.kill()
                    await proc.wait()
            if isinstance(elapsed, str) and proc.returncode not in (0, None):
                err = b""
                if proc.stderr is not None:
                    with contextlib.suppress(Exception):
                        err = await proc.stderr.receive_some(4000)
                elapsed = f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
        await watcher.publish(status_topic, b"", qos=1, retain=True)  # clear it
        return elapsed

    async def interpreter(code: str) -> float:
        t0 = pc()
        await trio.run_process([sys.executable, "-c", code], env=env, cwd=str(repo))
        return pc() - t0

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "startup", "variants": {}}
        async with open_client(url_text, client_id=f"bench-watch-{new_tag()}") as watcher:
            for variant in ("cli", "run_agent"):
                samples: list[float] = []
                errors: list[str] = []
                for i in range(args.reps):
                    r = await one(watcher, variant, i)
                    (samples if isinstance(r, float) else errors).append(r)  # type: ignore[arg-type]
                entry: dict[str, Any] = {"runs": len(samples), "errors": errors[:3]}
                if samples:
                    entry.update(
                        median_s=round(statistics.median(samples), 3),
                        min_s=round(min(samples), 3),
                        max_s=round(max(samples), 3),
                    )
                out["variants"][variant] = entry
        # What an interpreter alone costs, and the imports an agent process needs.
        out["python_bare_s"] = round(
            statistics.median([await interpreter("pass") for _ in range(3)]), 3
        )
        out["import_cli_s"] = round(
            statistics.median([await interpreter("import sheri_trio.cli") for _ in range(3)]), 3
        )
        out["import_agent_s"] = round(
            statistics.median([await interpreter("import sheri_trio.swarm") for _ in range(3)]),
            3,
        )
        return out

    return trio.run(main)


def run_agent_process(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    """One agent in this process (no CLI) until SIGINT/SIGTERM."""
    import trio

    from sheri_trio.swarm import AgentConfig, run_agent

    cfg = AgentConfig(role="general", agent_id=args.agent_id, swarm=args.swarm, broker=url_text)

    async def main() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: run_agent(cfg, shutdown=stop, task_status=task_status)
                )
                async for _ in signals:
                    stop.set()
                    break

    trio.run(main)
    return {"kind": "agent", "agent_id": args.agent_id}


def run_broker_version(args: argparse.Namespace, url_text: str) -> dict[str, Any]:
    import trio

    from sheri_trio.mqtt import open_client

    async def main() -> str | None:
        with trio.move_on_after(5):
            async with open_client(url_text, client_id=f"bench-ver-{new_tag()}") as c:
                async with c.subscribe("$SYS/broker/version", qos=0) as msgs:
                    async for m in msgs:
                        return m.payload.decode(errors="replace")
        return None

    return {"kind": "broker-version", "version": trio.run(main)}


# ---------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=THROUGHPUT_KINDS + OTHER_KINDS)
    p.add_argument("--url", default=None, help="broker URL (default: $BENCH_URL)")
    p.add_argument("-n", "--count", type=int, default=1000, help="messages (or round trips)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--size", type=int, default=256, help="payload bytes")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="stop this long after the last message once the publisher is done",
    )
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="aiomqtt: publishes awaited at once (1: one after the other)",
    )
    p.add_argument(
        "--yield-every",
        type=int,
        default=64,
        help="gmqtt: yield to the event loop after this many publishes (0: never)",
    )
    p.add_argument(
        "--drain",
        action="store_true",
        help="native: the subscriber takes every message already delivered with "
        "receive_nowait() after each receive() (as the agents do) instead of async for",
    )
    p.add_argument("--subscribers", type=int, default=9, help="fanout-c: subscribers")
    p.add_argument("--warmup", type=int, default=100, help="latency: untimed round trips first")
    p.add_argument("--agents", type=int, default=9, help="tasks: agents")
    p.add_argument("--tasks", type=int, default=1000, help="tasks: tasks")
    p.add_argument(
        "--lone", type=int, default=0, help="tasks, peer: then this many, one at a time (latency)"
    )
    p.add_argument("--max-tasks", type=int, default=16, help="tasks: max_tasks of each agent")
    p.add_argument(
        "--processes", type=int, default=1, help="tasks: the agents, in turn, over N processes"
    )
    p.add_argument("--indices", default="", help="share: which agents of the swarm (0-based)")
    p.add_argument("--swarm-name", default=None, help="tasks: the swarm (default: a new name)")
    p.add_argument(
        "--workload",
        choices=("unknown", "all-types"),
        default="unknown",
        help="tasks: one unknown type (general agents only) or every type (every role)",
    )
    p.add_argument("--task-seconds", type=float, default=0.0, help="tasks: each task sleeps")
    p.add_argument("--dispatch", default="broadcast", help="tasks: the swarm's dispatch rule")
    p.add_argument("--peer", default="celery-prefork", help="peer: which (bench.peers.PEERS)")
    p.add_argument("--workers", type=int, default=9, help="peer: workers")
    p.add_argument("--counts", default="1,100,1000", help="memory: agent counts")
    p.add_argument(
        "--swarm-size", type=int, default=9, help="memory: agents per swarm (0: all in one)"
    )
    p.add_argument("--settle", type=float, default=1.0, help="memory: seconds before measuring")
    p.add_argument("--reps", type=int, default=3, help="startup: repetitions")
    p.add_argument(
        "--heartbeat", type=float, default=2.0, help="presence: the agents' heartbeat_interval"
    )
    p.add_argument("--intervals", type=int, default=3, help="presence: heartbeat intervals counted")
    p.add_argument("--records", type=int, default=100_000, help="retained: final task states")
    p.add_argument("--agent-id", default="bench-agent", help="agent: its id")
    p.add_argument("--swarm", default="bench", help="agent: its swarm")
    return p


RUNNERS = {
    "native": lambda a, u: run_native(a, u, backend="trio"),
    "native-gmqtt": lambda a, u: run_native(a, u, backend="gmqtt"),
    "paho": run_paho,
    "gmqtt": run_gmqtt,
    "aiomqtt": run_aiomqtt,
    "mosquitto-c": run_mosquitto_c,
    "fanout-c": run_fanout_c,
    "latency": run_latency,
    "tasks": run_tasks,
    "peer": run_peer,
    "memory": run_memory,
    "startup": run_startup,
    "agent": run_agent_process,
    "broker-version": run_broker_version,
    "presence": lambda a, u: run_presence(a, u),
    "retained": lambda a, u: run_retained(a, u),
    "share": run_share,
}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    url = args.url or os.environ.get("BENCH_URL")
    if not url and args.kind != "peer":
        raise SystemExit("bench.clients: set BENCH_URL (or --url) to the broker URL")
    result = RUNNERS[args.kind](args, url or "")
    if result is not None:  # share: it printed its own lines
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
