"""Writing a bench script's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(section: str, doc: Path = DOC) -> None:
    """Put `section` (text starting with its ``## Title`` line) in place of the section with that
    title, up to the next ``## `` heading, or append it when the document has none yet."""
    title = section.split("\n", 1)[0]
    assert title.startswith("## "), title
    section = section.rstrip("\n") + "\n"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
