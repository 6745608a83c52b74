"""The public names exist where users import them (as trio's test_exports does): every
name a private module lists in ``__all__`` is re-exported by its package; and the MQTT
layer's layout rules hold."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import sheri_trio.mqtt
import sheri_trio.testing

MQTT = Path(sheri_trio.mqtt.__file__).parent


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
