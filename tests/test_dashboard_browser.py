"""The dashboard in a real browser: Debian's headless chromium (through chromium-driver
and selenium) opens the page while real agents on a real mosquitto process tasks.

Asserted: the agents appear; completed and failed tasks show up live (no reload: a
marker set in the page survives); a cancel from the page stops a long-running task; a
bad task in the form is refused, a good one runs; a failed task is retried from the page;
the page logs no error; a broker that goes away is shown, and so is its
return; the history survives a dashboard restart (the progress events of a finished
task are in no retained message, and the final states expire from the broker after 1 s).
A screenshot is saved (``SHERI_DASHBOARD_SCREENSHOT=docs/dashboard.png`` refreshes the
one in docs/).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from sheri_trio.config import Connection
from sheri_trio.dashboard import DashboardOptions, Running, run_dashboard
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, encode, run_agent

if TYPE_CHECKING:
    from collections.abc import Callable

    from sheri_trio.testing import MosquittoBroker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
        reason="needs Debian's chromium and chromium-driver (.ci/setup test installs them)",
    ),
]

SWARM = "t-dash-browser"
AGENTS = (
    ("testing", "b-tester"),
    ("general", "b-general"),
    ("database", "b-database"),
    ("security", "b-security"),
)
#: a burst of mixed tasks, some slow, some failing (what the screenshot shows)
BURST = [
    {
        "task_id": f"burst-{i:02d}",
        "type": ("database.backup", "security.scan", "code.generate", "documentation.generate")[
            i % 4
        ],
        "payload": {"simulate_seconds": (i % 5) / 10, "simulate_failure": i % 7 == 3},
        "max_retries": 1,
    }
    for i in range(24)
]
TOKEN = "browser-test-token"


class Browser:
    """A headless chromium, driven from worker threads (selenium blocks)."""

    def __init__(self, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1500,1100",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args))

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, script, *args)

    async def until(self, script: str, *args: Any, what: str, within: float = 20.0) -> Any:
        """Wait (polling the page) until ``script`` returns something truthy."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def wait() -> Any:
            return WebDriverWait(self.driver, within, poll_frequency=0.1).until(
                lambda d: d.execute_script(script, *args)
            )

        try:
            return await self.run(wait)
        except TimeoutException:
            text = await self.js("return document.body.innerText")
            raise AssertionError(f"the page never showed {what}; it shows:\n{text}") from None

    async def state_of(self, task_id: str, state: str) -> None:
        await self.until(
            "const td = document.querySelector(`tr[data-task='${arguments[0]}'] td.state`);"
            "return td && td.textContent === arguments[1];",
            task_id,
            state,
            what=f"task {task_id} {state}",
        )

    async def click(self, selector: str) -> None:
        await self.js("document.querySelector(arguments[0]).click()", selector)

    async def errors(self) -> list[str]:
        """The script errors the page logged (not the refused requests: those we made
        on purpose, e.g. the bad form's 400)."""
        entries = await self.run(self.driver.get_log, "browser")
        return [
            e["message"]
            for e in entries
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
        ]

    def close(self) -> None:
        self.driver.quit()


def agent_config(broker: MosquittoBroker, role: str, agent_id: str) -> AgentConfig:
    return AgentConfig(
        role=role,
        agent_id=agent_id,
        swarm=SWARM,
        broker=broker.tcp_url,
        heartbeat_interval=0.5,
        lease_time=2.0,
        grace_period=1.0,
        final_retention=1,  # the broker forgets final states: only the history keeps them
        executor_config={"executors": {"simulate": True}},
    )


async def publish(broker: MosquittoBroker, body: dict[str, Any]) -> None:
    async with open_client(broker.tcp_url) as client:
        await client.publish(f"{SWARM}/tasks/new", encode(None, None, body), qos=1)


async def test_the_dashboard_in_a_browser(fresh_broker: MosquittoBroker, tmp_path: Path) -> None:
    broker = fresh_broker
    options = DashboardOptions(
        conn=Connection(broker.tcp_url, SWARM, {}),
        db=tmp_path / "history.sqlite3",
        retention=3600,
        port=0,
        token=TOKEN,
    )
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    browser = await trio.to_thread.run_sync(Browser, profile)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                agents_leave = trio.Event()
                for role, agent_id in AGENTS:
                    await nursery.start(
                        partial(
                            run_agent,
                            agent_config(broker, role, agent_id),
                            shutdown=agents_leave,
                        )
                    )
                first = trio.Event()
                async with trio.open_nursery() as dashboard:
                    running: Running = await dashboard.start(
                        partial(run_dashboard, options, shutdown=first)
                    )
                    await check_live_page(browser, broker, running, tmp_path)
                    first.set()  # the dashboard stops; the history stays
                second = trio.Event()
                again: Running = await nursery.start(
                    partial(run_dashboard, options, shutdown=second)
                )
                await check_history(browser, again)
                second.set()
                agents_leave.set()
    finally:
        await trio.to_thread.run_sync(browser.close)


async def check_live_page(
    browser: Browser, broker: MosquittoBroker, running: Running, tmp_path: Path
) -> None:
    await browser.get(running.login_url)  # sets the cookie, redirects to /
    await browser.until(
        "return document.querySelectorAll('#agents tr[data-agent]').length === 4",
        what="the agents",
    )
    assert await browser.js("return location.search") == ""
    await browser.until(
        "return document.getElementById('mode').textContent.startsWith('token accepted')",
        what="the token accepted",
    )
    await browser.js("window.__noReload = 'still here'")
    for body in BURST:
        await publish(broker, body)
    await publish(broker, {"task_id": "ok-1", "type": "testing.run", "payload": {}})
    await publish(
        broker,
        {
            "task_id": "bad-1",
            "type": "testing.run",
            "payload": {"simulate_failure": True},
            "max_retries": 0,
        },
    )
    await browser.state_of("ok-1", "done")
    await browser.state_of("bad-1", "failed")
    # a long task, cancelled from the page
    slow = {"task_id": "long-1", "type": "testing.run", "payload": {"simulate_seconds": 600}}
    await publish(broker, slow)
    await browser.state_of("long-1", "running")
    await browser.click("tr[data-task='long-1']")
    await browser.until(
        "return !document.getElementById('cancel').disabled", what="the cancel button"
    )
    await browser.click("#cancel")
    await browser.state_of("long-1", "cancelled")
    assert await browser.js("return window.__noReload") == "still here"
    # a bad task in the form: a clear error, nothing submitted
    await browser.js(
        "document.getElementById('s-type').value = 'testing.run';"
        "document.getElementById('s-payload').value = '{not json';"
        "document.getElementById('s-id').value = 'never-1';"
    )
    await browser.click("#s-go")
    await browser.until(
        "return document.getElementById('submit-msg').textContent.includes('not valid JSON')",
        what="the form's error",
    )
    # a good one from the form
    await browser.js(
        "document.getElementById('s-payload').value = '{\"simulate_seconds\": 0.1}';"
        "document.getElementById('s-id').value = 'form-1';"
    )
    await browser.click("#s-go")
    await browser.state_of("form-1", "done")
    # the failed task's detail, then a retry from the page
    await browser.click("tr[data-task='bad-1']")
    await browser.until(
        "return document.getElementById('detail-id').textContent === 'bad-1'"
        " && !document.getElementById('retry').disabled",
        what="bad-1's detail",
    )
    await browser.click("#retry")
    await browser.state_of("bad-1.retry-1", "failed")
    assert await browser.js("return !!document.querySelector(\"tr[data-task='never-1']\")") is False
    await browser.click("tr[data-task='ok-1']")
    await browser.until(
        "return document.getElementById('detail').textContent.includes('simulated')",
        what="ok-1's result",
    )
    await browser.until(
        "return [...document.querySelectorAll('#tasks td.state')].filter("
        "  (td) => ['done', 'failed'].includes(td.textContent)).length >= 27",
        what="the burst finished",
    )
    await save_screenshot(browser, tmp_path)
    # the broker goes away while the page is open, and comes back
    await trio.to_thread.run_sync(broker.stop)
    await browser.until(
        "return document.getElementById('broker').textContent.includes('unreachable')",
        what="the broker unreachable",
    )
    await trio.to_thread.run_sync(broker.start)
    await browser.until(
        "return document.getElementById('broker').textContent === 'broker connected'",
        what="the broker back",
        within=40,
    )
    await trio.sleep(1.2)  # the final states' retention (1 s) runs out at the broker
    assert await browser.js("return window.__noReload") == "still here"
    assert await browser.errors() == []


async def check_history(browser: Browser, running: Running) -> None:
    await browser.run(browser.driver.delete_all_cookies)
    await browser.get(running.url)  # no token: read-only
    await browser.state_of("long-1", "cancelled")
    await browser.state_of("ok-1", "done")
    await browser.state_of("bad-1", "failed")
    mode = await browser.js("return document.getElementById('mode').textContent")
    assert mode.startswith("read-only")
    await browser.click("tr[data-task='ok-1']")
    # progress events are never retained: only the history has them
    await browser.until(
        "return document.querySelectorAll('#detail .events li time').length >= 1",
        what="ok-1's progress events from the history",
    )
    assert await browser.js("return document.getElementById('cancel').disabled") is True
    assert await browser.js("return document.getElementById('s-go').disabled") is True
    assert await browser.errors() == []


async def save_screenshot(browser: Browser, tmp_path: Path) -> None:
    png = await browser.run(browser.driver.get_screenshot_as_png)
    assert png.startswith(b"\x89PNG")
    await trio.Path(tmp_path / "dashboard.png").write_bytes(png)
    target = os.environ.get("SHERI_DASHBOARD_SCREENSHOT")
    if target:
        await trio.Path(target).write_bytes(png)
    print(json.dumps({"screenshot": str(tmp_path / "dashboard.png")}))
