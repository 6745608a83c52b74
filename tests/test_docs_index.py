"""docs/index.md maps every page of docs/, its links resolve, and README.md links it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
INDEX = (DOCS / "index.md").read_text()


def _links(text: str) -> list[str]:
    """The targets of the markdown links that are not URLs."""
    return [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]


def test_the_index_lists_every_page() -> None:
    rows = re.findall(r"^\| \[([^]]+)\]\(([^)]+)\) \|", INDEX, re.MULTILINE)
    listed = {target for name, target in rows if name == target}
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - listed == set(), "pages missing from docs/index.md's map"
    assert listed - pages == set(), "docs/index.md maps pages that do not exist"


def test_the_index_links_resolve() -> None:
    for target in _links(INDEX):
        assert (DOCS / target).is_file(), target


def test_the_readme_links_the_index_and_shares_its_first_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/index.md" in readme
    for command in ("./demo", "./.ci/run"):
        assert f"\n{command}\n" in readme, command
        assert re.search(rf"^{re.escape(command)}\s", INDEX, re.MULTILINE), command
