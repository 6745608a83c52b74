"""The production mosquitto config of docs/operations.md loads and carries a swarm.

The config block is read from the page (the ```conf block after its marker comment), its
paths and ports are replaced by the test's own, and a real mosquitto runs it. An agent
configured through ``sheri.toml`` (``[broker]`` URL and ``ca_file``, the password from
``SHERI_PASSWORD``) works over the TLS listener and a task is submitted over the WSS one;
a client without the password is refused; what was retained survives a restart.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest
import trio
import trustme

from sheri_trio.config import build_agent_config, load_config
from sheri_trio.mqtt import ConnectError, TLSOptions, open_client
from sheri_trio.swarm import AgentConfig, run_agent

if TYPE_CHECKING:
    from collections.abc import Iterator

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
MARKER = "<!-- production-mosquitto-conf: read by tests/test_docs_mosquitto.py -->"
USER = "sheri"
PASSWORD = "pw-from-mosquitto_passwd"  # only this test's broker, on 127.0.0.1


def documented_config() -> str:
    """The config block that follows the marker on docs/operations.md."""
    text = DOC.read_text()
    assert MARKER in text, f"{DOC.name}: the marker {MARKER!r} is gone"
    after = text.split(MARKER, 1)[1]
    found = re.match(r"\s*```conf\n(.*?)```", after, re.DOTALL)
    assert found, f"{DOC.name}: no ```conf block right after the marker"
    return found.group(1)


def settings(conf: str) -> dict[str, list[str]]:
    """Every option of a mosquitto config and its values, in order."""
    values: dict[str, list[str]] = {}
    for line in conf.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            values.setdefault(key, []).append(value.strip())
    return values


def _duration(value: str) -> int:
    """mosquitto's ``persistent_client_expiration`` form (``14d``) in seconds."""
    units = {"h": 3600, "d": 86_400, "w": 7 * 86_400, "m": 30 * 86_400, "y": 365 * 86_400}
    found = re.fullmatch(r"(\d+)([hdwmy])", value)
    assert found, f"not a mosquitto duration: {value!r}"
    return int(found.group(1)) * units[found.group(2)]


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (all held open until each is picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("0.0.0.0", 0))  # mosquitto binds WebSocket listeners on every interface
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _executable(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()), None
    )
    if found is None:
        pytest.fail(f"{name} not found (install the Debian 'mosquitto' package)")
    return found


@dataclass
class DocBroker:
    """A real mosquitto running the documented config with the test's files and ports."""

    workdir: Path
    tls_port: int
    wss_port: int
    ca: trustme.CA
    proc: subprocess.Popen[bytes] | None = None
    stderr: IO[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def prepare(self) -> Path:
        """Password file, certificates, and the documented config with our paths in it."""
        w = self.workdir
        (w / "data").mkdir()
        subprocess.run(
            [_executable("mosquitto_passwd"), "-b", "-c", str(w / "passwd"), USER, PASSWORD],
            check=True,
            capture_output=True,
        )
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        server.private_key_pem.write_to_path(str(w / "server.key"))
        for blob in server.cert_chain_pems:
            blob.write_to_path(str(w / "server.pem"), append=True)
        replacements = {
            "/run/mosquitto/mosquitto.pid": f"{w}/mosquitto.pid",
            "/var/log/mosquitto/mosquitto.log": str(self.log),
            "/var/lib/mosquitto/": f"{w}/data/",
            "/etc/mosquitto/passwd": f"{w}/passwd",
            "/etc/mosquitto/certs/server.pem": f"{w}/server.pem",
            "/etc/mosquitto/certs/server.key": f"{w}/server.key",
            "listener 8883\n": f"listener {self.tls_port} 127.0.0.1\n",
            "listener 8884\n": f"listener {self.wss_port}\n",
        }
        conf = documented_config()
        for doc_form, ours in replacements.items():
            assert doc_form in conf, f"the documented config no longer has {doc_form!r}"
            conf = conf.replace(doc_form, ours)
        # run as ourselves: as root mosquitto would switch to the user "mosquitto"
        user = pwd.getpwuid(os.geteuid()).pw_name
        path = w / "mosquitto.conf"
        path.write_text(f"user {user}\n{conf}")
        return path

    def start(self, config: Path) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.stderr = (self.workdir / "stderr.log").open("ab")
        self.proc = subprocess.Popen(
            [_executable("mosquitto"), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        deadline = time.monotonic() + 10
        while not self._ready(offset):
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                stderr = (self.workdir / "stderr.log").read_text(errors="replace")
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                pytest.fail(f"mosquitto did not start (exit {code}):\n{stderr}\n{log}")
            time.sleep(0.02)  # polling the process and its ports, bounded by the deadline

    def _ready(self, offset: int) -> bool:
        if not self.log.exists():
            return False
        with self.log.open("rb") as f:
            f.seek(offset)
            if b" running" not in f.read():
                return False
        for port in (self.tls_port, self.wss_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its database and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def url(self, scheme: str, *, password: bool = True) -> str:
        auth = f"{USER}:{PASSWORD}@" if password else ""
        if scheme == "mqtts":
            return f"mqtts://{auth}localhost:{self.tls_port}"
        return f"wss://{auth}localhost:{self.wss_port}/mqtt"


@contextmanager
def documented_broker(workdir: Path) -> Iterator[tuple[DocBroker, Path]]:
    tls_port, wss_port = _free_ports(2)
    broker = DocBroker(workdir, tls_port, wss_port, trustme.CA())
    config = broker.prepare()
    try:
        broker.start(config)
        yield broker, config
    finally:
        broker.stop()


def test_the_documented_settings_match_what_the_swarm_needs() -> None:
    conf = settings(documented_config())
    for key, value in {
        "allow_anonymous": "false",
        "persistence": "true",
        "set_tcp_nodelay": "true",
        "per_listener_settings": "false",
    }.items():
        assert conf.get(key) == [value], key
    assert int(conf["max_queued_messages"][0]) > 1000  # mosquitto's default
    assert int(conf["max_inflight_messages"][0]) > 20  # mosquitto's default
    assert int(conf["autosave_interval"][0]) < 1800  # mosquitto's default
    # mosquitto keeps a session for the shorter of this and the client's expiry
    expiry = _duration(conf["persistent_client_expiration"][0])
    assert expiry > AgentConfig().dispatch_session_expiry > AgentConfig().session_expiry
    assert conf["protocol"] == ["mqtt", "websockets"]
    assert len(conf["certfile"]) == len(conf["keyfile"]) == 2  # TLS on both listeners


async def test_the_documented_mosquitto_carries_a_swarm_over_tls(tmp_path: Path) -> None:
    swarm = "docs-prod"
    (tmp_path / "broker").mkdir()
    with documented_broker(tmp_path / "broker") as (broker, config):
        tls = TLSOptions(ca_file=str(broker.ca_file))

        # no password, a wrong one: refused (allow_anonymous false, password_file)
        for url in (
            broker.url("mqtts", password=False),
            f"mqtts://{USER}:wrong@localhost:{broker.tls_port}",
        ):
            with trio.fail_after(10), pytest.raises(ConnectError) as refused:
                async with open_client(url, tls=tls):
                    pass
            assert refused.value.reason_code in (0x86, 0x87), url

        # an agent as an operator configures it: sheri.toml, the password in the env
        toml = tmp_path / "sheri.toml"
        toml.write_text(
            f'state_dir = "{tmp_path / "state"}"\n'
            "[agent]\n"
            f'swarm = "{swarm}"\n'
            "[broker]\n"
            # the user in the URL, the password from SHERI_PASSWORD (docs/operations.md;
            # [broker] username would combine with it too: each field on its own)
            f'url = "mqtts://{USER}@localhost:{broker.tls_port}"\n'
            'ca_file = "broker/ca.pem"\n'
            "[executors]\n"
            "simulate = true\n"
            "[workspace]\n"
            f'root = "{tmp_path}"\n'
        )
        agent_config = build_agent_config(
            load_config(toml),
            env={"SHERI_PASSWORD": PASSWORD},
            role="testing",
            agent_id="prod-testing-1",
        )
        task = {"payload": {"task_id": "t-prod-1", "type": "testing.run", "payload": {}}}
        outcome: dict[str, Any] = {}
        with trio.fail_after(30):
            async with (
                open_client(broker.url("wss"), tls=tls) as submitter,
                submitter.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as done,
                trio.open_nursery() as nursery,
            ):
                shutdown = trio.Event()
                await nursery.start(
                    lambda task_status: run_agent(
                        agent_config, shutdown=shutdown, task_status=task_status
                    )
                )
                await submitter.publish(f"{swarm}/tasks/new", json.dumps(task), qos=1)
                message = await done.receive()
                outcome = json.loads(message.payload)["payload"]
                shutdown.set()
        assert message.topic == f"{swarm}/tasks/complete"
        assert outcome["task_id"] == "t-prod-1"
        assert outcome["agent_id"] == "prod-testing-1"

        # persistence: the retained final state and the offline status survive a restart
        broker.stop()
        broker.start(config)
        retained: dict[str, dict[str, Any]] = {}
        with trio.fail_after(10):
            async with (
                open_client(broker.url("mqtts"), tls=tls) as reader,
                reader.subscribe(
                    f"{swarm}/tasks/state/t-prod-1", f"{swarm}/agents/prod-testing-1/status"
                ) as messages,
            ):
                async for m in messages:
                    retained[m.topic] = json.loads(m.payload)["payload"]
                    if len(retained) == 2:
                        break
    assert retained[f"{swarm}/tasks/state/t-prod-1"]["state"] == "done"
    assert retained[f"{swarm}/agents/prod-testing-1/status"]["status"] == "offline"
