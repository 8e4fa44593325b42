"""Write (or with --check, verify) docs/OPTIONS.md's table from the Config declarations (l2b.config.option)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataclasses import fields

from l2b.config import Config, describe

DOC = Path(__file__).resolve().parents[1] / "docs" / "OPTIONS.md"
BEGIN, END = "<!-- options -->", "<!-- /options -->"
INTRO = """# Options

Every option of `l2b train` (and `sweep`, `data check`), as a flag `--name` or a key `name:` of a YAML
config file. Generated from the declarations in `src/l2b/config.py` by `python tools/options_doc.py`;
a test fails when the two differ. A data set's preset (built-in benchmarks) replaces some defaults
for that data set; what you set yourself always wins. "read by" names the methods that use an option
(all: the trainer or every method).

"""


def options_markdown() -> str:
    """docs/OPTIONS.md's table: every option with its default, valid values, readers and help."""
    rows = ["| option | default | valid values | read by | what it does |", "|---|---|---|---|---|"]
    group = None
    for f in fields(Config):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            rows.append(f"| **{group}** | | | | |")
        readers = ", ".join(f.metadata["methods"]) if f.metadata["methods"] else "all"
        default = "unset" if f.default is None else f"`{f.default}`"
        rows.append(f"| `--{f.name.replace('_', '-')}` | {default} | {describe(f)} | {readers} | "
                    f"{f.metadata['help']} |")
    return "\n".join(rows)


def render() -> str:
    return f"{INTRO}{BEGIN}\n{options_markdown()}\n{END}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        if not DOC.is_file() or DOC.read_text() != render():
            print("docs/OPTIONS.md differs from the Config declarations: run python tools/options_doc.py")
            return 1
        print("docs/OPTIONS.md matches the Config declarations")
        return 0
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
