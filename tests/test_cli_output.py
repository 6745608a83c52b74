"""What the CLI prints: secrets scrubbed, the log line format, payload helpers."""

from __future__ import annotations

import logging
import re

import pytest

from sheri_trio.cli import LineFormatter, agent_label, remember_secrets, scrub
from sheri_trio.cli._output import keeping_secrets, short, state_type
from sheri_trio.config import Connection


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("sheri_trio.x", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_passwords_in_the_url_and_the_options_are_scrubbed() -> None:
    with keeping_secrets() as secrets:
        remember_secrets(Connection("mqtt://u:url-Pass@h:1883", "s", {"password": "opt-Pass"}))
        remember_secrets(Connection("mqtt://h:1883", "s", {"password": "ab"}))  # too short
        text = "url-Pass, opt-Pass and ab"
        assert scrub(text) == secrets.scrub(text) == "***, *** and ab"


def test_each_call_keeps_its_own_secrets() -> None:
    with keeping_secrets():
        remember_secrets(Connection("mqtt://u:first-Pass@h:1883", "s", {}))
        with keeping_secrets():
            assert scrub("first-Pass") == "first-Pass"
        assert scrub("first-Pass") == "***"


def test_log_lines_name_the_agent_and_are_scrubbed() -> None:
    with keeping_secrets():
        remember_secrets(Connection("mqtt://u:s3cret@h:1883", "s", {}))
        by_time = LineFormatter("sheri", label_first=False)
        by_label = LineFormatter("swarm", label_first=True)
        line = by_time.format(_record("online url=mqtt://u:s3cret@h", agent_id="a1"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \[a1\] info: online "
                            r"url=mqtt://u:\*\*\*@h", line), line  # fmt: skip
        assert re.match(r"\[swarm\] \d{4}-", by_label.format(_record("x")))
        token = agent_label.set("testing-1")
        try:
            assert by_label.format(_record("x", agent_id="a1")).startswith("[testing-1] ")
        finally:
            agent_label.reset(token)


@pytest.mark.parametrize(
    ("value", "limit", "text"),
    [("abc", 10, "abc"), ({"a": 1}, 10, '{"a": 1}'), ("x" * 20, 10, "xxxxxxx...")],
)
def test_short(value: object, limit: int, text: str) -> None:
    assert short(value, limit) == text


def test_the_type_of_a_state_is_its_own_or_its_submissions() -> None:
    assert state_type({"type": "testing.run"}) == "testing.run"
    assert state_type({"task": {"type": "code.review"}}) == "code.review"
    assert state_type({"task": "odd"}) is None
