"""docs/ generated from code stay current."""

from __future__ import annotations

import re
from pathlib import Path

from sheri_trio.swarm._lifecycle import TRANSITIONS, markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_lifecycle_doc_is_generated_from_the_table() -> None:
    text = (DOCS / "lifecycle.md").read_text()
    assert text == markdown(), "run: python -m sheri_trio.swarm._lifecycle > docs/lifecycle.md"
    for t in TRANSITIONS:
        assert f"--> {t['dest']}: {t['trigger']}" in text


def test_protocol_doc_names_every_topic() -> None:
    from sheri_trio.swarm._protocol import Topics

    text = (DOCS / "protocol.md").read_text()
    topics = Topics("S")
    for name, value in vars(topics).items():
        if name in ("swarm", "all"):
            continue
        doc_form = re.escape(value.replace("S/", "{swarm}/", 1)).replace(r"\+", r"\{[a-z_]+\}")
        assert re.search(doc_form, text), name


def test_every_agent_setting_is_documented() -> None:
    from sheri_trio.config import AGENT_KEYS

    configuration = (DOCS / "configuration.md").read_text()
    cli = (DOCS / "cli.md").read_text()
    for key in AGENT_KEYS:
        assert re.search(rf"^{key} = |\[agent\] {key}\b", configuration, re.MULTILINE), key
        assert re.search(rf"\b{key}\b", cli), key
