"""The generated parts of the docs agree with what they are generated from."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_results_md_tables_match_the_committed_run_folders():
    # docs/RESULTS.md's tables are generated from docs/results/runs; a hand edit or a stale table fails here
    done = run_tool("results_tables.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every table matches" in done.stdout


def test_method_md_anchors_start_and_end_on_their_pinned_lines():
    done = run_tool("method_anchors.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_method_anchors_follow_moved_code_and_report_edited_code(tmp_path):
    (tmp_path / "src" / "l2b").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    code = tmp_path / "src" / "l2b" / "_x.py"
    code.write_text("import os\n\n\ndef f(a):\n    return a\n\n\ndef g():\n    pass\n")
    doc = tmp_path / "docs" / "METHOD.md"
    doc.write_text("f is `src/l2b/_x.py:L4-L5` and g `src/l2b/_x.py:L8`.\n")
    root = ["--root", str(tmp_path)]
    assert run_tool("method_anchors.py", "--pin", *root).returncode == 0

    code.write_text("import os\nimport sys\n\n\ndef f(a):\n    a += 1\n    return a\n\n\ndef g():\n    pass\n")
    check = run_tool("method_anchors.py", "--check", *root)
    assert check.returncode == 1 and "2 of 2 anchors are off their code" in check.stdout
    assert doc.read_text() == "f is `src/l2b/_x.py:L4-L5` and g `src/l2b/_x.py:L8`.\n"  # --check writes nothing
    assert run_tool("method_anchors.py", *root).returncode == 0
    assert doc.read_text() == "f is `src/l2b/_x.py:L5-L7` and g `src/l2b/_x.py:L10`.\n"
    assert run_tool("method_anchors.py", "--check", *root).returncode == 0

    code.write_text(code.read_text().replace("def g():", "def g(b):"))  # the pinned line itself changed
    lost = run_tool("method_anchors.py", *root)
    assert lost.returncode == 1 and "src/l2b/_x.py:L10: its pinned lines 'def g():'" in lost.stdout
    assert "L5-L7" in doc.read_text()  # the anchor that still holds is kept

    doc.write_text(doc.read_text() + "h is `src/l2b/_x.py:L1`.\n")  # a new anchor, not pinned yet
    assert "differ from the pinned ones" in run_tool("method_anchors.py", "--check", *root).stdout


def test_options_md_is_generated_from_the_config_declarations():
    done = run_tool("options_doc.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
