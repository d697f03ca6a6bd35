"""Write one benchmark's section of benchmarks/RESULTS.md, between <!-- NAME:begin/end --> markers."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `name`; other sections are left as they are. Notes written by
    hand at the section's end, after a `<!-- NAME:notes -->` line, are kept."""
    begin, end, notes = f"<!-- {name}:begin -->", f"<!-- {name}:end -->", f"<!-- {name}:notes -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    kept = ""
    if begin in text and end in text:
        old = text.split(begin, 1)[1].split(end, 1)[0]
        if notes in old:
            kept = "\n" + notes + old.split(notes, 1)[1].rstrip() + "\n"
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{kept}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
