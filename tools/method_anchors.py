"""Keep docs/METHOD.md's line anchors (`src/l2b/_meta.py:L218-L225`) on the code they name.

    python tools/method_anchors.py            # move every anchor whose code moved; rewrites METHOD.md
    python tools/method_anchors.py --check    # exit 1 if an anchor no longer starts and ends on its lines
    python tools/method_anchors.py --pin      # after writing or correcting anchors by hand: record them

Each anchor is pinned in docs/METHOD.anchors.json by the text of its first and last line (stripped).
An edit above an anchor shifts the code, not the number; this tool finds the pinned pair of lines
again (the occurrence nearest the old place, with the span length closest to the old one) and
rewrites the number. A pinned line that occurs more than once (the same statement in two functions)
is told apart by the definition it sits in (the nearest `def` or `class` line above it, pinned too).
Code moved to another file (its old file gone, or the pair no longer in it) is
looked for in every file under src/l2b, and the anchor follows it when exactly one file has it. An anchor whose first or last line was itself edited cannot be found: it is
reported, and the author corrects it by hand and pins again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR = re.compile(r"`(src/l2b/[\w/]+\.py):L(\d+)(?:-L(\d+))?`")


def anchors(text: str) -> list[tuple[re.Match, str, int, int]]:
    """Every anchor of ``text`` in order: (match, path, first line, last line), lines 1-based."""
    return [(m, m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))) for m in ANCHOR.finditer(text)]


def code_lines(root: Path, path: str) -> list[str]:
    return [line.strip() for line in (root / path).read_text().splitlines()]


def label(path: str, first: int, last: int) -> str:
    return f"{path}:L{first}" + (f"-L{last}" if last != first else "")


def enclosing(lines: list[str], first: int) -> str | None:
    """The nearest ``def`` or ``class`` line at or above line ``first`` (1-based), or None."""
    for line in reversed(lines[:first]):
        if line.startswith(("def ", "async def ", "class ")):
            return line
    return None


def relocate(lines: list[str], pin: dict, old_first: int, old_last: int) -> tuple[int, int] | None:
    """Where the pinned first/last lines are now: in the pinned enclosing definition if possible, then
    with the span length kept, then nearest the old place."""
    span = old_last - old_first
    best = None
    for i, line in enumerate(lines):
        if line != pin["first"]:
            continue
        elsewhere = "within" in pin and enclosing(lines, i + 1) != pin["within"]
        for j in range(i, len(lines)):
            if lines[j] == pin["last"]:
                key = (elsewhere, abs((j - i) - span), abs(i + 1 - old_first))
                if best is None or key < best[0]:
                    best = (key, (i + 1, j + 1))
    return None if best is None else best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report anchors off their code; change nothing")
    mode.add_argument("--pin", action="store_true", help="record the current anchors as correct")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    root = args.root
    method, pins_file = root / "docs" / "METHOD.md", root / "docs" / "METHOD.anchors.json"

    text = method.read_text()
    found = anchors(text)
    files: dict[str, list[str]] = {}
    for _, path, _, _ in found:
        if path not in files:
            if not (root / path).is_file():
                if args.pin or args.check:
                    print(f"METHOD.md anchors a file that does not exist: {path}")
                    return 1
                files[path] = []  # moved away: the pinned lines are looked for in the other files
                continue
            files[path] = code_lines(root, path)
    every = {str(f.relative_to(root)): None for f in sorted((root / "src" / "l2b").rglob("*.py"))}

    if args.pin:
        pins = []
        for _, path, first, last in found:
            lines = files[path]
            if last > len(lines) or first < 1 or last < first:
                print(f"{label(path, first, last)} is outside {path} ({len(lines)} lines)")
                return 1
            pins.append({"anchor": label(path, first, last), "first": lines[first - 1], "last": lines[last - 1],
                         "within": enclosing(lines, first)})
        pins_file.write_text(json.dumps(pins, indent=1) + "\n")
        print(f"pinned {len(pins)} anchors")
        return 0

    pins = json.loads(pins_file.read_text()) if pins_file.is_file() else []
    if [p["anchor"] for p in pins] != [label(path, a, b) for _, path, a, b in found]:
        print("METHOD.md's anchors differ from the pinned ones (an anchor was added, removed or edited by "
              "hand): check them against the code, then run `python tools/method_anchors.py --pin`")
        return 1

    moved, lost, pieces, pos = [], [], [], 0
    for (m, path, first, last), pin in zip(found, pins):
        lines = files[path]
        if first <= last <= len(lines) and (lines[first - 1], lines[last - 1]) == (pin["first"], pin["last"]) \
                and enclosing(lines, first) == pin.get("within", enclosing(lines, first)):
            continue
        where, new_path = relocate(lines, pin, first, last), path
        if where is None:  # moved to another file?
            hits = []
            for other in every:
                if other != path:
                    found_at = relocate(files.setdefault(other, code_lines(root, other)), pin, first, last)
                    if found_at is not None:
                        hits.append((other, found_at))
            if len(hits) == 1:
                new_path, where = hits[0]
        if where is None:
            lost.append(f"{label(path, first, last)}: its pinned lines {pin['first']!r} ... {pin['last']!r} "
                        "are gone (edited, or found in several files): correct the anchor by hand, then --pin")
            continue
        moved.append(f"{label(path, first, last)} -> {label(new_path, *where)}")
        pieces += [text[pos:m.start()], f"`{label(new_path, *where)}`"]
        pos = m.end()
    for line in moved + lost:
        print(line)
    if args.check:
        if moved or lost:
            print(f"{len(moved) + len(lost)} of {len(found)} anchors are off their code; "
                  "run `python tools/method_anchors.py` to move them")
            return 1
        print(f"all {len(found)} anchors are on their code")
        return 0
    if moved:
        method.write_text("".join(pieces) + text[pos:])
        pins = [{**p, "anchor": label(path, a, b), "within": enclosing(code_lines(root, path), a)}
                for p, (_, path, a, b) in zip(pins, anchors(method.read_text()))]
        pins_file.write_text(json.dumps(pins, indent=1) + "\n")
    print(f"moved {len(moved)} anchors, {len(lost)} need a hand")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
