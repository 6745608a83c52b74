"""The public names exist where users import them (as trio's test_exports does): every
name a private module lists in ``__all__`` is re-exported by its package; and the MQTT
layer's layout rules hold."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sheri_trio.mqtt
import sheri_trio.testing

MQTT = Path(sheri_trio.mqtt.__file__).parent
SWARM = MQTT.parent / "swarm"


PACKAGES = [
    "sheri_trio.swarm",
    "sheri_trio.cli",
    "sheri_trio.mqtt",
    "sheri_trio.testing",
    "sheri_trio.stores",
    "sheri_trio.dashboard",
]


def _private_modules(package_name: str) -> list[str]:
    package = importlib.import_module(package_name)
    return [
        f"{package_name}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("_") and not info.name.startswith("__")
    ]


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_name_in_a_private_module_s_all_is_exported_by_its_package(
    package_name: str,
) -> None:
    package = importlib.import_module(package_name)
    missing = []
    for module_name in _private_modules(package_name):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if getattr(package, name, None) is not getattr(module, name):
                missing.append(f"{module_name}.{name}")
    assert missing == []


def test_the_swarm_names_the_cli_and_the_bench_use_are_public() -> None:
    import sheri_trio.swarm as swarm

    for attr in ("Agent", "AgentConfig", "run_agent", "read_retained", "Scheduler", "Topics"):
        assert hasattr(swarm, attr), attr


@pytest.mark.parametrize(
    "name",
    [
        "AckTimeout",
        "Client",
        "ClientOptions",
        "MQTTClient",
        "Message",
        "Subscription",
        "Will",
        "open_client",
        "PublishError",
        "SubscribeError",
    ],
)
def test_mqtt_exports(name: str) -> None:
    assert hasattr(sheri_trio.mqtt, name)


def test_testing_exports_every_name_of_its_all() -> None:
    for name in sheri_trio.testing.__all__:
        assert hasattr(sheri_trio.testing, name), name
    from sheri_trio._mosquitto import MosquittoBroker

    assert sheri_trio.testing.MosquittoBroker is MosquittoBroker


def _imported_names(module: Path) -> list[tuple[str, str]]:
    tree = ast.parse(module.read_text())
    return [
        (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    ]


def test_gmqtt_uses_no_private_names_of_the_native_modules() -> None:
    private = [
        (module, name)
        for module, name in _imported_names(MQTT / "_gmqtt.py")
        if name.startswith("_") or module == "_client"
    ]
    assert private == []


def test_only_open_knows_both_backends() -> None:
    for path in MQTT.glob("*.py"):
        modules = {module for module, _ in _imported_names(path)}
        if path.name != "_open.py":
            assert not {"_client", "_gmqtt"} <= modules, path.name
        assert "_gmqtt" not in modules or path.name == "_open.py", path.name


def test_the_cli_entry_points_and_the_names_the_demo_uses_are_public() -> None:
    import sheri_trio.cli as cli

    for attr in ("app", "main", "rewrite_prototype_argv", "explain", "SwarmView",
                 "LineFormatter", "agent_label", "exit_now", "remember_secrets", "scrub",
                 "setup_logging", "UsageError", "DEFAULT_SWARM_ROLES"):  # fmt: skip
        assert hasattr(cli, attr), attr


def _type_checking_imports(module: Path) -> set[tuple[str, str]]:
    """(module, name) of the ``from .x import name`` lines under ``if TYPE_CHECKING:``."""
    tree = ast.parse(module.read_text())
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    ]
    return {
        (node.module or "", alias.name)
        for block in blocks
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_the_swarm_s_trio_shell_is_listed_for_type_checkers() -> None:
    """Every public name of the shell is in the TYPE_CHECKING block (or imported eagerly,
    when the shell re-exports a sans-IO name), and the block imports only from the shell."""
    import sheri_trio.swarm as swarm

    listed = _type_checking_imports(SWARM / "__init__.py")
    assert listed
    assert {module for module, _ in listed} == set(swarm._SHELL)
    eager = {  # the sans-IO names, imported at the package's top
        alias.asname or alias.name
        for node in ast.parse((SWARM / "__init__.py").read_text()).body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    for sub in swarm._SHELL:
        module = importlib.import_module(f"sheri_trio.swarm.{sub}")
        for name in module.__all__:
            assert (sub, name) in listed or name in eager, f"{sub}.{name}"
        assert {name for m, name in listed if m == sub} <= set(module.__all__), sub


def test_importing_the_config_does_not_load_the_agent_runtime() -> None:
    """``sheri_trio.config`` needs AgentConfig and the protocol's checks, not the agent."""
    probe = (
        "import sys, sheri_trio.config, sheri_trio.swarm as swarm\n"
        "swarm.AgentConfig, swarm.Topics, swarm.Scheduler\n"
        "print(sorted(m for m in sys.modules if m.startswith('sheri_trio.swarm.')))\n"
        "swarm.Agent\n"
        "print(sorted(m for m in sys.modules if m.startswith('sheri_trio.swarm.')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(MQTT.parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    before, after = (set(ast.literal_eval(line)) for line in done.stdout.splitlines())
    shell = {f"sheri_trio.swarm.{sub}" for sub in ("_agent", "_control", "_dispatching",
             "_runner", "_startup")}  # fmt: skip
    assert "sheri_trio.swarm._config" in before
    assert before.isdisjoint(shell)
    assert shell <= after  # the first use of a shell name loads it
