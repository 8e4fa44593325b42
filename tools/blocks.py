"""Generated blocks in the docs: ``<!-- KIND:NAME -->`` ... ``<!-- /KIND -->``, each replaced whole by the
text its generator renders (tools/bench_blocks.py, tools/labels_tables.py)."""

from __future__ import annotations

import re
from pathlib import Path


def replace_blocks(paths, kind: str, blocks: dict[str, str]) -> tuple[dict[Path, str], list[str], set[str]]:
    """The files' texts with every ``kind`` block rewritten from ``blocks``; the names whose block changed,
    and the names seen. An unknown name stops the generator (a typo in a doc must not pass silently)."""
    stale, seen = [], set()

    def replace(match):
        name = match.group(1)
        if name not in blocks:
            raise SystemExit(f"unknown {kind} block {name!r}; known: {', '.join(blocks)}")
        seen.add(name)
        new = f"<!-- {kind}:{name} -->\n{blocks[name]}\n<!-- /{kind} -->"
        if match.group(0) != new:
            stale.append(name)
        return new

    pattern = re.compile(rf"<!-- {kind}:([\w-]+) -->.*?<!-- /{kind} -->", re.S)
    updated = {Path(p): pattern.sub(replace, Path(p).read_text()) for p in paths if Path(p).is_file()}
    return updated, stale, seen


def write_updated(updated: dict[Path, str], stale: list[str], noun: str) -> int:
    """Write the rewritten files and say what changed; exit status 0."""
    for path, text in updated.items():
        path.write_text(text)
    print(f"{len(stale)} {noun} rewritten" + (f": {', '.join(stale)}" if stale else ""))
    return 0
