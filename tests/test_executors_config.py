"""validate_executor_config, and the examples of docs/configuration.md."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from executor_helpers import make_ctx

from sheri_trio.config import parse_config
from sheri_trio.executors import default_registry, validate_executor_config

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"


def _examples() -> list[str]:
    """The executors' examples (the agent/broker section has tests of its own)."""
    text = DOC.read_text().split("## Executors", 1)[1]
    return re.findall(r"```toml\n(.*?)```", text, re.S)


def test_every_executor_has_an_example() -> None:
    text = "".join(_examples())
    for table in ("[testing", "[security", "[monitoring", "[deploy.", "[database.", "[llm]",
                  "[workspace]", "[process]"):  # fmt: skip
        assert table in text, table


@pytest.mark.parametrize("example", _examples(), ids=lambda e: e.split("\n", 1)[0])
def test_doc_examples_are_valid(example: str, tmp_path: Path) -> None:
    example = example.replace("/srv/checkout/myapp", str(tmp_path))
    data = tomllib.loads(example)
    assert validate_executor_config(data, source="sheri.toml") is None
    # the agent's loader accepts the file as well, and hands every table to the executors
    assert parse_config(data).extra == data


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"deploy": {"web": {"command": "make deploy"}}},
         "sheri.toml: deploy.web.command: must be a list of strings, got 'make deploy'"),
        ({"deploy": {"web": {"url": "x"}}}, "sheri.toml: deploy.web.command: missing"),
        ({"deploy": {"../web": {"command": ["x"]}}}, "sheri.toml: deploy.../web: names are"),
        ({"deploy": {"web": {"command": ["x"], "comand": ["y"]}}},
         "sheri.toml: deploy.web.comand: unknown key (known: timeout"),
        ({"testing": {"suites": {"unit": "tests/unit"}}},
         "sheri.toml: testing.suites.unit: must be a list of strings"),
        ({"testing": {"command": []}}, "testing.command: must be a non-empty list"),
        ({"workspace": {"root": "/no/such/dir"}}, "workspace.root: no such directory: /no/such"),
        ({"monitoring": {"targets": ["tcp://db"]}},
         "monitoring.targets: 'tcp://db': tcp targets need a port"),
        ({"monitoring": {"alerts": {"failure_rate": 2}}},
         "monitoring.alerts.failure_rate: must be a number within 0..1, got 2"),
        ({"llm": {"api_key": "sk-ant-..."}}, "llm.api_key: keep the API key out of the file"),
        ({"llm": {"max_tokens": 0}}, "llm.max_tokens: must be an integer within 1..1000000"),
        ({"llm": {"base_url": "ftp://x"}}, "llm.base_url: must be an http:// or https:// URL"),
        ({"database": {"app": {"migrate": ["x"]}}},
         "database.app: needs exactly one of path or url"),
        ({"database": {"app": {"url": "mysql://x/y"}}}, "database.app.url: must be sqlite"),
        ({"process": {"env": {"A B": "x"}}}, "process.env: 'A B' is not an environment variable"),
        ({"process": {"pass_env": "HOME"}}, "process.pass_env: must be a list of environment"),
        ({"executors": {"simulate": "yes"}}, "executors.simulate: must be true or false"),
        ({"security": {"audit": {"tool": "safety"}}},
         "security.audit.tool: must be one of pip-audit, npm"),
        ({"state_dir": 3}, "state_dir: must be a path"),
    ],
)  # fmt: skip
def test_invalid_settings_name_file_key_and_reason(config: dict[str, Any], message: str) -> None:
    if not message.startswith("sheri.toml: "):
        message = "sheri.toml: " + message
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        validate_executor_config(config, source="sheri.toml")


def test_other_tables_are_left_alone() -> None:
    others = {"agent": {"role": 1}, "dashboard": {"x": 1}}
    assert validate_executor_config(others, source="f") is None
    # the same entry in one of the executors' tables is refused
    with pytest.raises(ValueError, match=r"^f: testing\.x: unknown key"):
        validate_executor_config({**others, "testing": {"x": 1}}, source="f")


async def test_the_complete_example_deploys_the_seed_service(tmp_path: Path) -> None:
    complete = _examples()[-1]
    assert complete.startswith("state_dir")
    text = complete.replace("/srv/checkout/myapp", str(tmp_path)).replace(
        "/var/lib/sheri/deploy-agent-01", str(tmp_path / "state")
    )
    config = tomllib.loads(text)
    validate_executor_config(config, source="sheri.toml")
    deploy = default_registry().get("deployment.deploy")
    assert deploy is not None
    ctx, rec = make_ctx(
        "deployment.deploy", {"service": "test-service", "version": "1.0.0"}, config=config
    )
    result = await deploy(ctx)
    assert result["status"] == "deployed"
    assert rec.messages(kind="output") == ["deploying 1.0.0"]
