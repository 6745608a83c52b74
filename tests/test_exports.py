"""The public names of each package (as trio's test_exports does): every name a private
module lists in ``__all__`` is re-exported by its package, and resolves there."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["sheri_trio.swarm", "sheri_trio.cli"]  # sheri_trio.mqtt joins once its layout
# (issue 12) lands; in cli/, the command modules' own helpers are in no ``__all__``


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


def test_the_cli_entry_points_and_the_names_the_demo_uses_are_public() -> None:
    import sheri_trio.cli as cli

    for attr in ("app", "main", "rewrite_prototype_argv", "explain", "SwarmView",
                 "LineFormatter", "agent_label", "exit_now", "remember_secrets", "scrub",
                 "setup_logging", "UsageError", "DEFAULT_SWARM_ROLES"):  # fmt: skip
        assert hasattr(cli, attr), attr
