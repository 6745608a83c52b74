"""deployment.deploy / rollback with real commands that write files, and the history."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError
from sheri_trio.executors._deployment import deploy, history, rollback

if TYPE_CHECKING:
    from pathlib import Path

# writes the deployed version (and how it got there) to live.json in its cwd
DEPLOY = (
    "import json, os, sys; "
    "json.dump({k: os.environ.get(k) for k in ('SHERI_SERVICE', 'SHERI_VERSION', "
    "'SHERI_TASK_ID', 'SHERI_ROLLBACK', 'SHERI_PREVIOUS_VERSION', 'HOME', 'SECRET_X')} "
    "| {'argv': sys.argv[1:], 'env': sorted(os.environ)}, open('live.json', 'w')); "
    "print('deployed', os.environ['SHERI_VERSION'])"
)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[dict, Path, Path]:
    site = tmp_path / "site"
    site.mkdir()
    config = {
        "deploy": {
            "web": {
                "command": [sys.executable, "-c", DEPLOY, "--tag={version}"],
                "cwd": str(site),
                "url": "https://web.example/{version}/",
            }
        }
    }
    return config, site, tmp_path / "state"


def _live(site: Path) -> dict:
    return json.loads((site / "live.json").read_text())


async def test_deploy_runs_the_configured_command(
    setup: tuple[dict, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, site, state = setup
    monkeypatch.setenv("SECRET_X", "do-not-pass")
    ctx, rec = make_ctx(
        "deployment.deploy", {"service": "web", "version": "1.0.0"}, config=config, state=state,
        task_id="dep-1",
    )  # fmt: skip
    result = await deploy(ctx)
    assert result["status"] == "deployed"
    assert result["version"] == "1.0.0"
    assert result["url"] == "https://web.example/1.0.0/"
    assert result["previous_version"] is None
    live = _live(site)
    assert (live["SHERI_SERVICE"], live["SHERI_VERSION"], live["SHERI_TASK_ID"]) == (
        "web", "1.0.0", "dep-1",
    )  # fmt: skip
    assert live["argv"] == ["--tag=1.0.0"]
    assert live["SECRET_X"] is None  # a clean environment
    assert set(live["env"]) <= {"PATH", "HOME", "LANG", "SHERI_SERVICE", "SHERI_VERSION",
                                "SHERI_TASK_ID", "SHERI_PREVIOUS_VERSION", "LC_CTYPE"}  # fmt: skip
    assert "deployed 1.0.0" in rec.messages(kind="output")


async def test_rollback_without_version_returns_to_the_previous(
    setup: tuple[dict, Path, Path],
) -> None:
    config, site, state = setup
    for n, version in enumerate(["1.0.0", "1.1.0", "1.2.0"]):
        ctx, _ = make_ctx(
            "deployment.deploy", {"service": "web", "version": version}, config=config,
            state=state, task_id=f"d-{n}",
        )  # fmt: skip
        assert (await deploy(ctx))["version"] == version
    assert _live(site)["SHERI_VERSION"] == "1.2.0"

    ctx, _ = make_ctx("deployment.rollback", {"service": "web"}, config=config, state=state)
    back = await rollback(ctx)
    assert (back["status"], back["version"], back["from_version"]) == (
        "rolled_back",
        "1.1.0",
        "1.2.0",
    )
    live = _live(site)
    assert (live["SHERI_VERSION"], live["SHERI_ROLLBACK"], live["SHERI_PREVIOUS_VERSION"]) == (
        "1.1.0", "1", "1.2.0",
    )  # fmt: skip

    ctx, _ = make_ctx("deployment.rollback", {"service": "web"}, config=config, state=state,
                      task_id="r-2")  # fmt: skip
    assert (await rollback(ctx))["version"] == "1.0.0"
    ctx, _ = make_ctx("deployment.rollback", {"service": "web"}, config=config, state=state,
                      task_id="r-3")  # fmt: skip
    with pytest.raises(TaskConfigError, match=r"live version 1\.0\.0 and no earlier one"):
        await rollback(ctx)

    # the prototype's spelling names the version to return to
    ctx, _ = make_ctx(
        "deployment.rollback", {"service": "web", "previous_version": "1.2.0"}, config=config,
        state=state, task_id="r-4",
    )  # fmt: skip
    assert (await rollback(ctx))["version"] == "1.2.0"
    assert _live(site)["SHERI_VERSION"] == "1.2.0"

    rows = history(state, "web")
    assert [(r["action"], r["version"], r["status"]) for r in rows][:3] == [
        ("rollback", "1.2.0", "rolled_back"),
        ("rollback", "1.0.0", "rolled_back"),
        ("rollback", "1.1.0", "rolled_back"),
    ]
    # a new deploy after all that: its previous version is the live 1.2.0
    ctx, _ = make_ctx("deployment.deploy", {"service": "web", "version": "2.0"}, config=config,
                      state=state, task_id="d-9")  # fmt: skip
    assert (await deploy(ctx))["previous_version"] == "1.2.0"


async def test_configured_rollback_command(setup: tuple[dict, Path, Path]) -> None:
    config, site, state = setup
    script = "import os; open('rolled.txt', 'w').write(os.environ['SHERI_VERSION'])"
    config["deploy"]["web"]["rollback"] = [sys.executable, "-c", script]
    for n, version in enumerate(["a1", "a2"]):
        ctx, _ = make_ctx("deployment.deploy", {"service": "web", "version": version},
                          config=config, state=state, task_id=f"d{n}")  # fmt: skip
        await deploy(ctx)
    ctx, _ = make_ctx("deployment.rollback", {"service": "web"}, config=config, state=state)
    assert (await rollback(ctx))["version"] == "a1"
    assert (site / "rolled.txt").read_text() == "a1"


async def test_failed_command_is_recorded_and_raised(tmp_path: Path) -> None:
    config = {"deploy": {"api": {"command": [sys.executable, "-c", "print('boom'); exit(3)"]}}}
    ctx, _ = make_ctx("deployment.deploy", {"service": "api", "version": "9"}, config=config,
                      state=tmp_path, workspace=tmp_path)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"deploy.api.command exited with 3: .*boom"):
        await deploy(ctx)
    assert [(r["status"], r["exit_code"]) for r in history(tmp_path, "api")] == [("failed", 3)]


async def test_seed_deploy_without_config_names_the_missing_key(tmp_path: Path) -> None:
    ctx, _ = make_ctx(
        "deployment.deploy", {"service": "test-service", "version": "1.0.0"}, state=tmp_path
    )
    with pytest.raises(TaskConfigError, match=r"no \[deploy\.test-service\] table.*"
                       r"deploy\.test-service\.command is required"):  # fmt: skip
        await deploy(ctx)


@pytest.mark.parametrize(
    ("payload", "error", "message"),
    [
        ({}, TaskPayloadError, "payload needs 'service'"),
        ({"service": "web"}, TaskPayloadError, "payload needs 'version'"),
        ({"service": "web", "version": "--force"}, TaskPayloadError, "must be a version"),
        ({"service": "web", "version": "1; rm -rf /"}, TaskPayloadError, "must be a version"),
        ({"service": "../web", "version": "1"}, TaskPayloadError, "payload 'service' must be"),
        ({"service": "web", "version": "1", "command": ["sh"]}, TaskPayloadError, "commands"),
        ({"service": "web", "version": "1", "cwd": "/"}, TaskPayloadError, "unknown payload"),
    ],
)
async def test_bad_deploy_payloads(
    setup: tuple[dict, Path, Path], payload: dict, error: type, message: str
) -> None:
    config, _, state = setup
    ctx, _ = make_ctx("deployment.deploy", payload, config=config, state=state)
    with pytest.raises(error, match=message):
        await deploy(ctx)


async def test_repeated_attempt_does_not_deploy_twice(setup: tuple[dict, Path, Path]) -> None:
    config, site, state = setup
    ctx, _ = make_ctx("deployment.deploy", {"service": "web", "version": "3"}, config=config,
                      state=state, task_id="same")  # fmt: skip
    await deploy(ctx)
    (site / "live.json").unlink()
    again = await deploy(ctx)
    assert again["repeated"] is True
    assert again["version"] == "3"
    assert not (site / "live.json").exists()
