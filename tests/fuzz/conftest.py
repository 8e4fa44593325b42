"""The fuzzing harness's contract check and its ledger.

Every case runs the command line in-process (``l2b.cli.main``) and must end in one of two ways:
exit 0 with a correct result (checked by the case's own oracle), or exit 2 with exactly one
``l2b: error:`` line on stderr. Never a traceback, never a changed input file (hashed before and
after), never a half-written output (a failed ``train`` leaves no run folder; no ``*.tmp`` is left).

The ledger counts the cases: tried, clean errors, correct runs, tracebacks, silent wrong results
(exit 0 where the input is defective, or a wrong result), wrong refusals (exit 2 on a valid input),
inputs changed, and leftovers (a half-written output). With ``L2B_FUZZ_COUNT_ONLY=1`` a broken case is
counted but does not fail the test (to measure another version). The counts are written to
``.pytest_cache/l2b-fuzz-counts.json`` at the end of the session and printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from l2b.cli import main

KINDS = ("tried", "clean_errors", "correct_runs", "tracebacks", "silent_wrong_results", "wrong_refusals",
         "inputs_changed", "leftovers")


def tree_hash(paths) -> str:
    """sha256 over the files under ``paths`` (names and bytes), in sorted order."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            if p.exists():
                h.update(str(p).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


class Ledger:
    def __init__(self):
        self.counts = Counter({k: 0 for k in KINDS})
        self.examples: dict[str, list[str]] = {}

    def check(self, argv: list[str], *, inputs=(), expect: str, outputs=(), oracle=None, label: str = "") -> int:
        """Run ``l2b argv`` and assert the contract; ``expect`` is "ok" or "error".

        ``outputs``: paths that must not exist after a refusal (a failed start leaves nothing behind).
        ``oracle(stdout) -> str | None``: on exit 0, None if the result is correct, else what is wrong.
        """
        before = tree_hash(inputs)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse --help/--version only
                code = exc.code
            except BaseException as exc:  # noqa: BLE001 - the contract says: never
                code, err_text = None, f"Traceback (uncaught {type(exc).__name__}: {exc})"
                err.write(err_text)
        stderr = err.getvalue()
        self.counts["tried"] += 1
        problems = []
        error_lines = [ln for ln in stderr.splitlines() if ln.startswith("l2b: error:")]
        if code is None or "Traceback" in stderr:
            kind = "tracebacks"
        elif code == 0:
            wrong = "the input is defective" if expect == "error" else (oracle(out.getvalue()) if oracle else None)
            kind = "silent_wrong_results" if wrong else "correct_runs"
            if wrong:
                problems.append(wrong)
        elif code == 2 and len(error_lines) == 1:
            kind = "clean_errors" if expect == "error" else "wrong_refusals"
        else:
            kind = "tracebacks"  # any other exit, or not exactly one error line
        self.counts[kind] += 1
        if tree_hash(inputs) != before:
            self.counts["inputs_changed"] += 1
            problems.append("an input file changed")
        if code != 0:
            left = [str(p) for p in outputs if Path(p).exists()]
            left += [str(t) for p in inputs if Path(p).is_dir() for t in Path(p).rglob("*.tmp")]
            if left:
                self.counts["leftovers"] += 1
                problems.append(f"left behind: {left}")
        if kind not in ("clean_errors", "correct_runs"):
            problems.append(kind)
        if problems:
            self.examples.setdefault(label or " ".join(argv[:2]), []).append(f"{problems}: {stderr[-400:]}")
        if os.environ.get("L2B_FUZZ_COUNT_ONLY"):  # to measure another version of l2b: count, don't stop
            return code
        assert not problems, f"{label}: exit {code}, {problems}\nstderr: {stderr[-2000:]}"
        return code


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger(request):
    yield _LEDGER
    # each xdist worker writes its own counts; every worker then sums those of this test run
    run_id = getattr(request.config, "workerinput", {}).get("testrunuid", "single")
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    folder = Path(str(request.config.rootpath)) / ".pytest_cache" / "l2b-fuzz"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        if not old.name.startswith(run_id):
            old.unlink(missing_ok=True)
    (folder / f"{run_id}-{worker}.json").write_text(json.dumps({"counts": dict(_LEDGER.counts),
                                                                "problems": _LEDGER.examples}))
    total, problems = Counter(), {}
    for part in folder.glob(f"{run_id}-*.json"):
        data = json.loads(part.read_text())
        total.update(data["counts"])
        problems.update(data["problems"])
    path = folder.parent / "l2b-fuzz-counts.json"
    path.write_text(json.dumps({"counts": {k: total[k] for k in KINDS}, "problems": problems}, indent=1))
    print(f"\nl2b fuzz ledger ({path}): " + ", ".join(f"{k} {total[k]}" for k in KINDS))
