"""``sheri demo``: a private mosquitto, a 9-agent swarm, one task of every type.

The broker listens on free ports of 127.0.0.1 with a password generated for this run
(mosquitto 2.0.11 binds WebSocket listeners to every interface, so nothing it starts
is left open). Everything stops on exit.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .mqtt import open_client
from .swarm._agent import AgentConfig, run_agent
from .swarm._protocol import TASK_ROLES, encode
from .testing import MosquittoBroker

NINE_ROLES = (
    "general",
    "deployment",
    "testing",
    "review",
    "security",
    "monitoring",
    "documentation",
    "database",
    "general",
)

#: the seed's own examples first, then one task of every other type
DEMO_TASKS: list[tuple[str, dict[str, Any]]] = [
    ("deployment.deploy", {"service": "test-service", "version": "1.0.0"}),
    ("testing.run", {"test_suite": "integration"}),
    *[(t, {}) for t in TASK_ROLES if t not in ("deployment.deploy", "testing.run")],
    ("demo.unknown-type", {}),
]


async def run_demo(
    *, swarm: str = "sheri-demo", keep_running: bool = False, out: Any = print
) -> int:
    """Run the demo; returns the number of tasks that did not succeed."""
    workdir = Path(tempfile.mkdtemp(prefix="sheri-demo-"))
    with MosquittoBroker(workdir, tls=False) as broker:
        out(f"mosquitto {broker.url('mqtt', credentials=False)} (password per run, in {workdir})")
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            for i, role in enumerate(NINE_ROLES):
                cfg = AgentConfig(
                    role=role,
                    agent_id=f"demo-{role}-{i}",
                    swarm=swarm,
                    broker=broker.tcp_url,
                    heartbeat_interval=2.0,
                    lease_time=6.0,
                )
                await nursery.start(
                    lambda task_status, cfg=cfg: run_agent(
                        cfg, shutdown=stop, task_status=task_status
                    )
                )
            out(f"9 agents online in swarm {swarm!r}: {', '.join(NINE_ROLES)}")
            failures = await _submit_and_watch(broker.tcp_url, swarm, out)
            if keep_running:
                out(f"swarm running; submit more with: sheri submit TYPE --broker <url> --swarm {swarm}")
                await trio.sleep_forever()
            stop.set()
    return failures


async def _submit_and_watch(url: str, swarm: str, out: Any) -> int:
    t0 = time.perf_counter()
    pending: dict[str, str] = {}
    failures = 0
    async with open_client(url, client_id="demo-submitter") as client:
        async with client.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
            for n, (task_type, payload) in enumerate(DEMO_TASKS, 1):
                task_id = f"demo-{n:02d}"
                pending[task_id] = task_type
                body = {"task_id": task_id, "type": task_type, "payload": payload, "priority": "medium"}
                await client.publish(f"{swarm}/tasks/new", encode(None, None, body), qos=1)
            with trio.move_on_after(60):
                while pending:
                    m = await msgs.receive()
                    p = json.loads(m.payload)["payload"]
                    task_type = pending.pop(p["task_id"], None)
                    if task_type is None:
                        continue
                    if p["status"] == "success":
                        result = json.dumps(p["result"])[:100]
                        out(f"  ok    {task_type:24} by {p['agent_id']:22} {p['duration']:>5} ms  {result}")
                    else:
                        failures += 1
                        out(f"  FAIL  {task_type:24} by {p['agent_id']:22} {p['error']}")
    for task_id, task_type in pending.items():
        failures += 1
        out(f"  LOST  {task_type:24} {task_id}: no outcome within 60 s")
    out(f"{len(DEMO_TASKS)} tasks, {failures} not successful, {time.perf_counter() - t0:.2f} s")
    return failures


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    raise SystemExit(1 if trio.run(run_demo) else 0)


if __name__ == "__main__":
    main()
