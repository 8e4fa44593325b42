"""The generated parts of the docs agree with what they are generated from."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    sys.path.insert(0, str(ROOT / "tools"))  # results_tables imports its sibling results_values
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "tools"))


def run_tool(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_results_md_tables_match_the_committed_run_folders():
    # docs/RESULTS.md's tables are generated from docs/results/runs; a hand edit or a stale table fails here
    done = run_tool("results_tables.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every table and value matches" in done.stdout
    assert "no number outside them" in done.stdout  # README.md, docs/RESULTS.md and docs/METHOD.md's results


def test_a_number_typed_outside_the_generated_blocks_is_found():
    tables = load_tool("results_tables")
    text = ("# Intro\nL2B on seeds 1-3 at 40% noise, `--epochs 80`, Table 7, eq. 9, CVPR 2024.\n"
            "## Results\nL2B gains <!-- value:diff l2b l2rw sym40 -->+1.40<!-- /value --> points.\n"
            "<!-- table:headline -->\n| l2b | 79.52 |\n<!-- /table -->\n"
            "It reaches 82.91 at 80 epochs.\n## Speed\nCE takes 2.61 s.\n")
    found = tables.stray_numbers(text)
    assert [(n, section) for n, _, section in found] == [(8, "Results"), (10, "Speed")]
    assert "82.91" in found[0][1] and "80 epochs" not in found[0][1]  # the budget is a setting
    # docs/METHOD.md: only results count, not equation numbers or the published code's settings
    method = "## B\nEq. 8 with momentum 0.9 and T = 10.\nThe exact step measured 2.98x CE.\n"
    assert [n for n, _, _ in tables.stray_numbers(method, results_only=True)] == [3]


def test_a_value_span_is_computed_from_the_run_folders():
    values = load_tool("results_values")
    # L2B minus L2RW at 80 epochs, 40% symmetric, seeds 0-2: each pair from the committed summaries
    runs = {(r.summary["method"], r.summary["seed"]): r.summary["test_acc_best_val"]
            for r in values.all_runs() if r.config.get("epochs") == 80 and r.summary["noise_rate"] == 0.4}
    expected = [runs["l2b", s] - runs["l2rw", s] for s in (0, 1, 2)]
    assert values.value("diff l2b,epochs=80 l2rw,epochs=80 sym40 seeds=0-2") == values.join(
        [f"{d:+.2f}" for d in expected])
    assert values.value("diff l2b,epochs=80 l2rw,epochs=80 sym40 seeds=0-2 show=wins") == str(
        sum(d > 0 for d in expected))
    with pytest.raises(ValueError, match="no run of seed"):
        values.value("acc l2b,epochs=80 sym40 seeds=7")


def test_the_verdict_is_ahead_or_behind_only_where_the_95_percent_interval_excludes_zero():
    tables = load_tool("results_tables")
    # three seeds: half-width t(0.975, 2) * s / sqrt(3) = 4.303 * 0.2 / 1.732 = 0.497 around a mean of 1
    assert tables._verdict([1.0, 1.2, 0.8]) == "ahead"
    assert tables._verdict([-1.0, -1.2, -0.8]) == "behind"
    assert tables._verdict([0.6, 1.4, 1.0]) == "ahead"  # s = 0.4: half-width 0.994, just short of the mean
    assert tables._verdict([0.58, 1.42, 1.0]) == "level"  # s = 0.42: half-width 1.04, past it
    assert tables._verdict([2.5]) is None  # one seed has no interval


def test_a_run_on_the_full_training_set_is_its_own_setting():
    # the held-out setting at scale shares noise and rate with the development setting: pairing its runs
    # with the development ones would compare runs of different budgets
    from types import SimpleNamespace

    tables = load_tool("results_tables")
    summary = {"noise": "sym", "noise_rate": 0.4}
    subset_run, full_run = (SimpleNamespace(summary=summary, config={"subset": n}) for n in (3000, 0))
    assert tables.setting_name(subset_run) == "40% sym" and tables.setting_name(full_run) == "40% sym, full training set"
    assert {tables.setting_name(subset_run), tables.setting_name(full_run)} <= set(tables.FROZEN_SETTINGS)


def test_method_md_anchors_start_and_end_on_their_pinned_lines():
    done = run_tool("method_anchors.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def pinned_repo(tmp_path, code_text, doc_text):
    """A repository with one module and a METHOD.md anchoring it, pinned: (code file, doc file, --root args)."""
    (tmp_path / "src" / "l2b").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    code, doc = tmp_path / "src" / "l2b" / "_x.py", tmp_path / "docs" / "METHOD.md"
    code.write_text(code_text)
    doc.write_text(doc_text)
    root = ["--root", str(tmp_path)]
    assert run_tool("method_anchors.py", "--pin", *root).returncode == 0
    return code, doc, root


def moved_anchors(code, doc, root, new_code, n_off):
    """Rewrite the module, see --check report ``n_off`` anchors off and write nothing, then move them:
    METHOD.md's text after the move."""
    before = doc.read_text()
    code.write_text(new_code)
    check = run_tool("method_anchors.py", "--check", *root)
    assert check.returncode == 1 and f"{n_off} of {n_off} anchors are off their code" in check.stdout
    assert doc.read_text() == before  # --check writes nothing
    assert run_tool("method_anchors.py", *root).returncode == 0
    assert run_tool("method_anchors.py", "--check", *root).returncode == 0
    return doc.read_text()


def test_method_anchors_follow_moved_code_and_report_edited_code(tmp_path):
    code, doc, root = pinned_repo(tmp_path, "import os\n\n\ndef f(a):\n    return a\n\n\ndef g():\n    pass\n",
                                  "f is `src/l2b/_x.py:L4-L5` and g `src/l2b/_x.py:L8`.\n")

    new_code = "import os\nimport sys\n\n\ndef f(a):\n    a += 1\n    return a\n\n\ndef g():\n    pass\n"
    assert moved_anchors(code, doc, root, new_code, 2) == "f is `src/l2b/_x.py:L5-L7` and g `src/l2b/_x.py:L10`.\n"

    code.write_text(code.read_text().replace("def g():", "def g(b):"))  # the pinned line itself changed
    lost = run_tool("method_anchors.py", *root)
    assert lost.returncode == 1 and "src/l2b/_x.py:L10: its pinned lines 'def g():'" in lost.stdout
    assert "L5-L7" in doc.read_text()  # the anchor that still holds is kept

    doc.write_text(doc.read_text() + "h is `src/l2b/_x.py:L1`.\n")  # a new anchor, not pinned yet
    assert "differ from the pinned ones" in run_tool("method_anchors.py", "--check", *root).stdout


def test_method_anchors_tell_a_repeated_line_apart_by_the_function_it_is_in(tmp_path):
    code, doc, root = pinned_repo(tmp_path, "def f():\n    p = 1\n\n\ndef g():\n    p = 1\n",
                                  "`p` in g `src/l2b/_x.py:L6` and in f `src/l2b/_x.py:L2`.\n")

    # g's copy moves to line 2 and f's to line 6: nearest-place alone would leave both anchors where they are
    new_code = "def g():\n    p = 1\n\n\ndef f():\n    p = 1\n"
    assert moved_anchors(code, doc, root, new_code, 2) == "`p` in g `src/l2b/_x.py:L2` and in f `src/l2b/_x.py:L6`.\n"


def test_options_md_is_generated_from_the_config_declarations():
    done = run_tool("options_doc.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_errors_md_lists_every_error_the_code_raises():
    # docs/ERRORS.md's list is generated from every `raise L2BError(...)`: a new or changed message fails here
    done = run_tool("errors_doc.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_labels_study_json_and_tables_match_the_committed_run_folders():
    # docs/results/labels/labels.json and the labels blocks of the docs are generated from docs/results/labels/runs
    done = run_tool("labels_tables.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "match the run folders" in done.stdout


def test_benchmark_blocks_match_the_committed_benchmark_json():
    # README.md's and docs/SCALING.md's benchmark figures are generated from benchmarks/*.json
    done = run_tool("bench_blocks.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every benchmark block matches" in done.stdout
