"""Regenerate the generated parts of docs/RESULTS.md and README.md from the committed run folders.

    python tools/results_tables.py            # rewrite the generated blocks and values
    python tools/results_tables.py --check    # exit 1 if one differs, or a number stands outside them

Every number in README.md and docs/RESULTS.md (and every result in docs/METHOD.md) comes from a
committed file through one of these markers, and is rewritten whole by this tool:

- a table: ``<!-- table:NAME -->`` ... ``<!-- /table -->`` on lines of their own, NAME a key of
  ``render()`` below. Every cell is the mean ± sample std over seeds that `l2b report` computes
  (l2b.apps.report.aggregate); a cell with fewer than 3 seeds says how many.
- a value inside a sentence: ``<!-- value:FUNC ARG ... key=val -->TEXT<!-- /value -->``, FUNC one of
  tools/results_values.py's functions (``acc``, ``diff``, ``runs``, ``config``, ``labels``, ``bench``, ``minutes``,
  ``epoch_seconds``, ``metric``, ``group``;
  their docstrings give the arguments). To add a number to the prose, write the span with any TEXT
  (``<!-- value:diff l2b l2rw sym40 show=mean --><!-- /value -->``) and run this tool to fill it in.

``--check`` also fails on a digit outside those markers, except where ``ALLOWED`` below says why it is
not a result (a setting, a citation, a name, code), and in the sections still listed in ``PENDING``.
A new section's numbers need either a marker or, if they are settings of a new kind, a pattern in
``ALLOWED`` with its reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
from pathlib import Path

from l2b.apps.report import aggregate, load_runs, sample_groups
from l2b.methods import create_method, fits_clean_set
from results_values import config, quarters, value
from select_by_val import mean_and_half_width

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
DOCS = (RESULTS, ROOT / "README.md")  # the files whose marked tables are generated
METHOD = ROOT / "docs" / "METHOD.md"  # its results are generated values too (equation numbers are not results)
SCALING = ROOT / "docs" / "SCALING.md"  # no tables of runs; its figures are bench blocks (tools/bench_blocks.py)
RUNS = ROOT / "docs" / "results" / "runs"
ACC = {"last": "last", "best-val": "best-val", "max-test": "max-test"}

# configs/fashion-mnist-*.yaml's settings that the diagnosis changes, one at a time, and how a table names a change
BUDGET = {"warmup_epochs": 1, "normalize": "sum", "val_batch_size": 100, "lr": 0.05, "epochs": 40}
CHANGE = {"warmup_epochs": "warm-up {}", "normalize": "`{}` normalisation", "val_batch_size": "clean batch {}",
          "lr": "lr {}", "epochs": "{} epochs"}
MAIN_SEEDS = (1, 2, 3)  # every method's seeds; Table 6 alone adds L2B's seeds 4 and 5
# name: (noise, methods as rows, noise rates as column groups, accuracies per rate[, seeds: all])
TABLES = {
    "table1-best-val": ("sym", ["ce", "ce+clean", "bootstrap-soft", "distill", "glc", "l2rw", "l2b"],
                        [0.2, 0.3, 0.4, 0.5], ["best-val"]),
    "table1-last": ("sym", ["ce", "ce+clean", "bootstrap-soft", "distill", "glc", "l2rw", "l2b"],
                    [0.2, 0.3, 0.4, 0.5], ["last"]),
    "table1-max-test": ("sym", ["ce", "ce+clean", "bootstrap-soft", "distill", "glc", "l2rw", "l2b"],
                        [0.2, 0.3, 0.4, 0.5], ["max-test"]),
    "table2": ("asym", ["ce", "ce+clean", "bootstrap-soft", "distill", "mwnet", "glc", "l2rw", "l2b"], [0.4],
               ["last", "best-val", "max-test"]),
    "table6": ("sym", ["l2b"], [0.2, 0.4], ["last", "best-val", "max-test"], None),
    "table7": ("sym", ["ce", "l2b-alpha0", "l2rw", "l2b-convex", "l2b"], [0.2, 0.4], ["last", "best-val", "max-test"]),
    "table8-best-val": ("sym", ["mlc", "l2b"], [0.1, 0.2, 0.3, 0.4, 0.5], ["best-val"]),
    "table8-last": ("sym", ["mlc", "l2b"], [0.1, 0.2, 0.3, 0.4, 0.5], ["last"]),
    "table8-max-test": ("sym", ["mlc", "l2b"], [0.1, 0.2, 0.3, 0.4, 0.5], ["max-test"]),
}


def cell(row: dict | None, acc: str) -> tuple[str, float | None]:
    if row is None:
        return "—", None
    mean, std = row[f"{acc}_mean"], row[f"{acc}_std"]
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    if row["runs"] < 3:
        text += f" ({row['runs']} seed{'s' if row['runs'] > 1 else ''})"
    return text, mean


def table(rows: list[dict], noise: str, methods: list[str], rates: list[float], accs: list[str]) -> str:
    by_key = {(r["noise"], r["method"], r["noise_rate"]): r for r in rows}
    columns = [(rate, acc) for rate in rates for acc in accs]
    cells = {(m, c): cell(by_key.get((noise, m, c[0])), c[1]) for m in methods for c in columns}
    best = {}  # the highest mean of each column is bold (only among cells that exist)
    for c in columns:
        means = [(cells[m, c][1], m) for m in methods if cells[m, c][1] is not None]
        best[c] = max(means)[1] if len(means) > 1 else None
    header = "| method | " + " | ".join(f"{100 * rate:g}% {acc}" for rate, acc in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for m in methods:
        texts = [f"**{cells[m, c][0]}**" if best[c] == m else cells[m, c][0] for c in columns]
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    seeds = sorted({int(x) for r in rows if r["noise"] == noise and r["method"] in methods
                    and r["noise_rate"] in rates for x in r["seeds"].split()})
    lines += ["", f"Mean ± sample std over seeds {', '.join(map(str, seeds)) or '(none)'}; bold: the highest mean "
              "of a column; a cell with fewer than 3 seeds says how many."]
    return "\n".join(lines)


def provenance(runs: list, noise: str, methods: list[str], rates: list[float], seeds) -> str:
    """Which runs a table is made of: the commands, per machine the number of runs and their training time."""
    used = [r for r in runs if r.summary["noise"] == noise and r.summary["method"] in methods
            and r.summary["noise_rate"] in rates and (seeds is None or r.summary["seed"] in seeds)]
    by_config = {}
    for r in used:  # runs/<config>/<run>: made with configs/fashion-mnist-<config>.yaml
        got = by_config.setdefault(r.path.parent.name, (set(), set(), set()))
        got[0].add(r.summary["method"]), got[1].add(r.summary["noise_rate"]), got[2].add(r.summary["seed"])
    commands = [f"`l2b sweep --config configs/fashion-mnist-{name}.yaml --methods "
                f"{','.join(m for m in methods if m in ms)} --noise-rates {','.join(f'{x:g}' for x in sorted(rs))} "
                f"--seeds {','.join(map(str, sorted(ss)))}`" for name, (ms, rs, ss) in sorted(by_config.items())]
    machines = []
    for device, name in (("cuda", "GPU"), ("cpu", "CPU")):
        minutes = sorted(r.summary["train_seconds"] / 60 for r in used if r.config.get("device") == device)
        if minutes:
            machines.append(f"{name} {len(minutes)} (training {sum(minutes):.0f} min in all, "
                            f"{statistics.median(minutes):.1f} min the median run)")
    cells = {}
    for r in used:
        key = (r.summary["method"], r.summary["noise_rate"])
        cells.setdefault(key, {}).setdefault("GPU" if r.config.get("device") == "cuda" else "CPU", []).append(r.summary["seed"])
    mixed = [f"{m} {100 * rate:g}% (seeds " + ", ".join(f"{','.join(map(str, sorted(seeds)))} {name}"
                                                        for name, seeds in sorted(on.items(), reverse=True)) + ")"
             for (m, rate), on in sorted(cells.items()) if len(on) > 1]
    return (f"Runs: {len(used)}, on " + " and ".join(machines) + ". Made by " + "; ".join(commands)
            + " (`--device cuda` or `cpu`, as each run's config.yaml records)."
            + (" Cells whose seeds ran on both machines: " + "; ".join(mixed) + "." if mixed else "")
            ) if used else "Runs: none yet."


@functools.cache
def _folder_runs(folder: Path) -> tuple:
    """The runs under one results folder, read once however many tables use it (none if it is missing)."""
    return tuple(load_runs([folder])) if folder.is_dir() else ()


def _changes(run) -> dict:
    """The budget's settings that a run changes, with the run's values (empty for a run at the budget)."""
    return {k: run.config.get(k, v) for k, v in BUDGET.items() if run.config.get(k, v) != v}


def setting(run) -> str:
    """How a run differs from the budget, e.g. "clean batch 500" ("budget" if it does not)."""
    return ", ".join(CHANGE[k].format(v) for k, v in _changes(run).items()) or "budget"


def _best_val_line(run) -> dict:
    """The metrics line of the epoch that model selection picked (the run's summary records which)."""
    return next(m for m in run.metrics if m["epoch"] == run.summary["best_val_epoch"])


def seed_table(folders: list[Path], rows: list[tuple[str, str, dict]], seeds: tuple[int, ...], note: str,
               rate: float = 0.4) -> str:
    """One row per (method, config values) and one column per seed: the best-val test accuracy with, in
    brackets, the clean-validation accuracy that chose the epoch; then the mean ± std over the seeds run."""
    runs = [r for f in folders for r in _folder_runs(f)]
    wanted = [{key: v for key, v in changed.items() if v != BUDGET[key]} for _, _, changed in rows]
    cells = {}
    for r in runs:
        for k, (method, _, _) in enumerate(rows):
            if (r.summary["method"] == method and r.summary["noise_rate"] == rate and r.summary["seed"] in seeds
                    and _changes(r) == wanted[k]):
                cells[k, r.summary["seed"]] = (r.summary["test_acc_best_val"], _best_val_line(r)["val_acc"])
    lines = ["| method | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std (test) |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for k, (method, label, _) in enumerate(rows):
        got = [cells.get((k, s)) for s in seeds]
        tests = [g[0] for g in got if g]
        mean = sum(tests) / len(tests) if tests else None
        std = (sum((t - mean) ** 2 for t in tests) / (len(tests) - 1)) ** 0.5 if len(tests) > 1 else None
        texts = [f"{g[0]:.2f} ({g[1]:.1f})" if g else "—" for g in got]
        summary = "—" if mean is None else cell({"last_mean": mean, "last_std": std, "runs": len(tests)}, "last")[0]
        lines.append(f"| {method} | {label} | " + " | ".join(texts) + f" | {summary} |")
    lines += ["", "Test accuracy at the epoch of best clean-validation accuracy (that validation accuracy in "
              f"brackets), {100 * rate:g}% symmetric noise. " + note]
    return "\n".join(lines)


def one_change_table(key: str, values: tuple, setting: str, folder: str, rate: float = 0.4) -> str:
    """L2B and L2RW at the budget's value of ``key`` and one other, seed by seed at symmetric noise ``rate``
    (seed 0 at 40%: docs/results/diagnosis)."""
    results = ROOT / "docs" / "results"
    rows = [(m, setting.format(v), {key: v}) for m in ("l2b", "l2rw") for v in values]
    budget = f"sym{100 * rate:g}"
    seeds, note = MAIN_SEEDS, "Run folders: "
    if rate == 0.4:  # the diagnosis began with seed 0 at 40%
        seeds, note = (0, *MAIN_SEEDS), note + "docs/results/diagnosis (the first seed-0 runs), "
    note += (f"docs/results/runs/{budget} ({setting.format(values[0])}, seeds 1-3) and docs/results/{folder} "
             f"({setting.format(values[1])}).")
    return seed_table([RUNS / budget, results / "diagnosis", results / folder], rows, seeds, note, rate)


# folders under docs/results of the one-change runs at 40%: diagnosis holds the first seed-0 runs (CE, L2B and
# L2RW at the budget, L2B's warm-up 5 and both clean batch 500), the others one change each over seeds
DIAGNOSIS = ("diagnosis", "cleanbatch500", "warmup5", "lr0.15", "epochs80")


def diagnosis_table() -> str:
    """Seed 0 at 40%: CE, L2B and L2RW at the budget and each one-change variant run at that seed, with the
    epoch model selection picked and the mean alpha of clean and flipped samples a quarter into training
    and at the last epoch."""
    results = ROOT / "docs" / "results"
    runs = [r for f in DIAGNOSIS for r in _folder_runs(results / f)
            if r.summary["seed"] == 0 and (r.summary["noise"], r.summary["noise_rate"]) == ("sym", 0.4)]
    order = {m: k for k, m in enumerate(("ce", "l2b", "l2rw"))}
    runs.sort(key=lambda r: (setting(r) != "budget", setting(r), order.get(r.summary["method"], 3)))
    lines = ["| method | setting | best clean-val acc (epoch) | test at best val | test, last epoch | alpha clean / "
             "flipped, a quarter in | at the last epoch |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        best = _best_val_line(r)
        weights = [f"{m['alpha_clean']:.2f} / {m['alpha_flipped']:.2f} (epoch {m['epoch']})" if m.get("alpha_clean") is not None
                   else "—" for m in (r.metrics[len(r.metrics) // 4 - 1], r.metrics[-1])]
        lines.append(f"| {r.summary['method']} | {setting(r)} | {best['val_acc']:.1f} ({best['epoch']}) | "
                     f"{r.summary['test_acc_best_val']:.2f} | {r.summary['test_acc_last']:.2f} | "
                     + " | ".join(weights) + " |")
    lines += ["", "40% symmetric noise, seed 0, 2 CPU cores; weights times the batch size (1 = an average sample's "
              "share). Run folders: " + ", ".join(f"docs/results/{f}" for f in DIAGNOSIS) + "."]
    return "\n".join(lines)


def normalize_table() -> str:
    """The Fig. 3 analogue in numbers: L2B with sum, softmax (T = 10) and sigmoid normalisation, seed by seed."""
    results = ROOT / "docs" / "results"
    rows = [("l2b", f"`{n}`", {"normalize": n}) for n in ("sum", "softmax", "sigmoid")]
    return seed_table([RUNS / "sym40", results / "normalize-softmax", results / "normalize-sigmoid"], rows, MAIN_SEEDS,
                      "Run folders: `sum` in docs/results/runs/sym40, the others in docs/results/normalize-softmax "
                      "and normalize-sigmoid.")


# the paper's orderings, each as "a > b" (Table 1: L2B > L2RW > CE; Table 7: alpha = 0 < CE < beta = 0 < convex < L2B)
ORDERINGS = [("l2b", "l2rw"), ("l2rw", "ce"), ("l2b", "ce"), ("ce", "l2b-alpha0"), ("l2b-convex", "l2rw"),
             ("l2b", "l2b-convex"), ("l2b", "glc")]
SETTINGS = [("sym", 0.2), ("sym", 0.3), ("sym", 0.4), ("sym", 0.5), ("asym", 0.4)]


def orderings_table(runs: list) -> str:
    """Each ordering of the paper, seed by seed: the mean difference a - b of best-val test accuracy over
    the seeds both methods ran (same noise, clean split, initialisation and data order), and on how
    many of them a > b."""
    acc = {(r.summary["noise"], r.summary["noise_rate"], r.summary["method"], r.summary["seed"]):
           r.summary["test_acc_best_val"] for r in runs if r.summary["seed"] in MAIN_SEEDS}
    lines = ["| ordering | " + " | ".join(f"{100 * rate:g}% {noise}" for noise, rate in SETTINGS) + " |",
             "|---|" + "---|" * len(SETTINGS)]
    for a, b in ORDERINGS:
        texts = []
        for noise, rate in SETTINGS:
            diffs = [acc[noise, rate, a, s] - acc[noise, rate, b, s] for s in MAIN_SEEDS
                     if (noise, rate, a, s) in acc and (noise, rate, b, s) in acc]
            texts.append(f"{sum(diffs) / len(diffs):+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "—")
        lines.append(f"| {a} > {b} | " + " | ".join(texts) + " |")
    lines += ["", "Mean over seeds of the paired difference a - b in test accuracy at the best clean-validation "
              "epoch (points); in brackets, on how many seeds a > b of those both methods ran."]
    return "\n".join(lines)


def _paired_metrics(runs, seeds: tuple[int, ...] = MAIN_SEEDS) -> dict[tuple, list[tuple[int, list, list]]]:
    """Per (setting (see ``setting``), noise, noise rate), the (seed, L2B's, L2RW's metrics lines) of each
    seed that both ran, for as many epochs."""
    by_key = {}
    for r in runs:
        s = r.summary
        if s["method"] in ("l2b", "l2rw") and s["seed"] in seeds:
            by_key[setting(r), s["noise"], s["noise_rate"], s["seed"], s["method"]] = r.metrics
    pairs = {}
    for k in sorted(by_key):
        other = (*k[:4], "l2rw")
        if k[4] == "l2b" and other in by_key and len(by_key[k]) == len(by_key[other]):
            pairs.setdefault(k[:3], []).append((k[3], by_key[k], by_key[other]))
    return pairs


def phases_table(runs: list) -> str:
    """L2B against L2RW along training: per quarter of the epochs, the paired gap in clean-validation and
    test accuracy (each run's mean over the quarter's epochs) and the mean weights of flipped and clean
    samples; for the default budget (every noise setting) and for each one-change variant at each noise
    setting it ran (the budget's own row there is seed 0 at 40%, the seeds 1-3 being in the first)."""
    results = ROOT / "docs" / "results"
    default = [p for (change, _, _), pairs in _paired_metrics(runs).items() if change == "budget" for p in pairs]
    groups = [("default (clean batch 100, warm-up 1): 20-50% sym, 40% asym", default)]
    # each change at each noise setting, pooled over every seed it ran
    variants = _paired_metrics([r for f in DIAGNOSIS for r in _folder_runs(results / f)], seeds=(0, *MAIN_SEEDS))
    for change, noise, rate in sorted(variants, key=lambda k: (k[0] != "budget", k[0], k[1:] != ("sym", 0.4))):
        seeds = sorted({seed for seed, _, _ in variants[change, noise, rate]})
        groups.append((f"{change}: {100 * rate:g}% {noise}, seed{'s' * (len(seeds) > 1)} "
                       f"{','.join(map(str, seeds))}", variants[change, noise, rate]))

    def mean_over(metrics, first, last, key):  # weights exist only for the meta epochs (not the warm-up)
        values = [m[key] for m in metrics[first - 1 : last] if key in m]
        return statistics.mean(values) if values else None

    lines = ["| setting | epochs | L2B - L2RW, clean-val acc | L2B - L2RW, test acc | L2RW: alpha flipped / "
             "clean | L2B: alpha flipped / clean | L2B: beta flipped / clean |", "|---|---|---|---|---|---|---|"]
    for name, pairs in groups:
        for first, last in quarters(len(pairs[0][1])) if pairs else ():
            texts = []
            for key in ("val_acc", "test_acc"):
                gaps = [mean_over(a, first, last, key) - mean_over(b, first, last, key) for _, a, b in pairs]
                texts.append(f"{statistics.mean(gaps):+.2f} ({sum(g > 0 for g in gaps)}/{len(gaps)})")
            for side, weight in ((2, "alpha"), (1, "alpha"), (1, "beta")):  # (seed, l2b, l2rw)
                means = [[mean_over(p[side], first, last, f"{weight}_{g}") for p in pairs] for g in ("flipped", "clean")]
                texts.append("—" if any(None in m for m in means) else " / ".join(f"{statistics.mean(m):.3f}" for m in means))
            count = f"{len(pairs)} pair{'s' if len(pairs) > 1 else ''}"
            lines.append(f"| {name}, {count} | {first}-{last} | " + " | ".join(texts) + " |")
    lines += ["", "Pairs of runs with the same noise setting and seed (1-3 unless a row names them): each run's mean "
              "over the epochs of a quarter of training, then the mean over pairs; in brackets, in how many pairs "
              "L2B is ahead. Weights are per-epoch means over the meta steps (times the batch size; the warm-up "
              "epochs have none)."]
    return "\n".join(lines)


def weights_table() -> str:
    """Where the weight of L2B, L2RW and the convex mix goes, from the runs that kept their per-sample
    records (CPU runs): per group of training samples (clean or flipped, by the final model's prediction)
    its share and mean alpha / beta."""
    results = ROOT / "docs" / "results"
    runs = [r for r in load_runs([RUNS, results / "cleanbatch500"])  # one load: labels name what varies
            if r.summary["method"] in ("l2b", "l2rw", "l2b-convex") and r.summary["seed"] in MAIN_SEEDS]
    groups = {}
    for row in sample_groups(runs):
        groups.setdefault((row["noise"], row["noise_rate"], row["method"]), {})[row["group"]] = row
    pair = lambda g: f"{g['alpha']:.2f} / {g['beta']:.2f}"  # noqa: E731
    lines = ["| setting | method | runs | clean, predicted wrong: % of samples | its alpha / beta | clean, "
             "predicted right: alpha / beta | flipped, predicted the true class: alpha / beta | flipped, predicted "
             "the given label: % |", "|---|---|---|---|---|---|---|---|"]
    for (noise, rate, label), g in sorted(groups.items()):
        cw, cr, ft, fg = (g[k] for k in ("clean, predicted wrong", "clean, predicted right",
                                         "flipped, predicted the true class", "flipped, predicted the given label"))
        method, _, batch = label.partition(" [val_batch_size=")  # the label names the clean batch where it varies
        setting = f"{100 * rate:g}% {noise}" + (f", clean batch {batch.rstrip(']')}" if batch else "")
        lines.append(f"| {setting} | {method} | {cw['runs']} | {cw['share_pct']:.1f} | {pair(cw)} | "
                     f"{pair(cr)} | {pair(ft)} | {fg['share_pct']:.1f} |")
    lines += ["", "Seeds 1-3 that ran on the CPU (their folders keep `per_sample.csv.gz`); alpha and beta are each "
              "sample's mean over its meta steps times the batch size (1 = an average sample's share), averaged over "
              "the group; groups by the final model's prediction on the training image. All groups: `l2b report` "
              "(`sample_groups.csv`)."]
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    """README's table: the main methods at each noise setting, last epoch / best clean-validation epoch."""
    by_key = {(r["noise"], r["method"], r["noise_rate"]): r for r in rows}
    settings = [("sym", 0.2), ("sym", 0.4), ("sym", 0.5), ("asym", 0.4)]
    lines = ["| method | " + " | ".join(f"{100 * rate:g}% {noise}" for noise, rate in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in ("ce", "l2rw", "l2b", "glc"):
        texts = []
        for noise, rate in settings:
            row = by_key.get((noise, m, rate))
            texts.append("—" if row is None else f"{cell(row, 'last')[0]} / {cell(row, 'best-val')[0]}")
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def default_run_table() -> str:
    """README's first table: `l2b train` with no arguments (seed 0) and plain CE at the same seed and budget.

    The L2B run is the one whose settings are today's defaults (the recipe study may have changed them
    since the reproduction's budget); CE reads no clean batch, so its run at the budget stands for it."""
    from l2b import make_config

    now = make_config({})  # what `l2b train` with no arguments runs
    runs = {}
    for r in _folder_runs(ROOT / "docs" / "results" / "diagnosis"):
        method = r.summary["method"]
        if r.summary["seed"] != 0 or method not in ("ce", "l2b"):
            continue
        at_default = all(r.config.get(k, v) == getattr(now, k) for k, v in BUDGET.items())
        if (method == "ce" and not _changes(r)) or (method == "l2b" and at_default):
            runs[method] = r
    keys = ("test_acc_last", "test_acc_best_val", "test_acc_max")
    best = {k: max(runs, key=lambda m: runs[m].summary[k]) for k in keys}
    lines = ["| method | test acc, last epoch | test acc, best clean-val epoch | max over epochs (test-selected) | "
             "training time |", "|---|---|---|---|---|"]
    for method, name in (("ce", "`ce`"), ("l2b", "`l2b` (the default)")):
        s = runs[method].summary
        cells = [f"**{s[k]:.2f}**" if best[k] == method and k != "test_acc_max" else f"{s[k]:.2f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['train_seconds'] / 60:.1f} min |")
    lines += ["", "Run folders: docs/results/diagnosis (" + ", ".join(f"`{runs[m].path.name}`" for m in ("ce", "l2b"))
              + ")."]
    return "\n".join(lines)


def table9(file: str = "table9_cpu.json") -> str:
    """Seconds per training epoch of each method (``l2b bench epoch --json``) and its ratio to CE's."""
    bench = json.loads((ROOT / "docs" / "results" / file).read_text())
    seconds = bench["seconds"]
    names = {"glc": f"glc (stage 2; stage 1 is a CE run of {config('stage1_epochs')} epochs)", "l2b_fd": "l2b, `--meta-grad fd`", "mlc": "mlc (simplified)"}
    lines = ["| method | s / epoch | x CE |", "|---|---|---|"]
    for method in sorted((m for m in seconds if m != "data"), key=seconds.get):
        lines.append(f"| {names.get(method, method)} | {seconds[method]:.2f} | {seconds[method] / seconds['ce']:.2f} |")
    lines += ["", f"{bench['device'].upper()}, {bench['threads']} threads, {bench['num_images']} images (whole batches "
              f"of {bench['batch_size']}), clean batch {bench['val_batch_size']}, input "
              f"{'x'.join(map(str, bench['image_shape']))}, `{bench['model']}`, median of {bench['repeats']} epochs: "
              f"docs/results/{file}."]
    return "\n".join(lines)


# the study's protocol (docs/RESULTS.md, "Protocol"): recipes are chosen on the development setting only
DEV_SETTING = ("sym", 0.4)
HELD_OUT = (("sym", 0.2), ("sym", 0.5), ("asym", 0.4))


def paired_interval(diffs: list[float]) -> str:
    """Mean of paired differences with its 95% t-interval, e.g. "-0.71 [-2.05, +0.63] (3)"."""
    n = len(diffs)
    if n == 0:
        return "—"
    mean, half = mean_and_half_width(diffs)
    if n == 1:
        return f"{mean:+.2f} (1 seed)"
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] ({n})"


def which_method_table(runs: list) -> str:
    """L2B minus each baseline, paired by seed, at the development setting and each held-out setting
    (best-val test accuracy), at the default budget and, where run, at 80 epochs."""
    baselines = ("l2rw", "glc", "ce", "l2b-convex")
    acc = {(r.summary["noise"], r.summary["noise_rate"], r.summary["method"], r.summary["seed"]):
           r.summary["test_acc_best_val"] for r in runs if r.summary["seed"] in MAIN_SEEDS}
    long = {(r.summary["noise"], r.summary["noise_rate"], r.summary["method"], r.summary["seed"]):
            r.summary["test_acc_best_val"] for r in _folder_runs(ROOT / "docs" / "results" / "epochs80")}
    lines = ["| setting | role | budget | " + " | ".join(f"L2B − {b}" for b in baselines) + " |",
             "|---|---|---|" + "---|" * len(baselines)]
    for noise, rate in (DEV_SETTING, *HELD_OUT):
        role = "development" if (noise, rate) == DEV_SETTING else "held out"
        for budget, table_ in (("40 epochs", acc), ("80 epochs", long)):
            cells = []
            for b in baselines:
                seeds = sorted(s for (n_, r_, m, s) in table_ if (n_, r_, m) == (noise, rate, "l2b")
                               and (noise, rate, b, s) in table_)
                cells.append(paired_interval([table_[noise, rate, "l2b", s] - table_[noise, rate, b, s] for s in seeds]))
            if budget == "80 epochs" and all(c == "—" for c in cells):
                continue
            lines.append(f"| {100 * rate:g}% {noise} | {role} | {budget} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference L2B − baseline in test accuracy at the best clean-validation epoch (points): "
              "mean over seeds [95% t-interval] (seeds). Positive: L2B ahead. 40 epochs: seeds 1-3 of "
              "docs/results/runs; 80 epochs: every seed of docs/results/epochs80 that both methods ran."]
    return "\n".join(lines)


STUDY_DEV = ROOT / "docs" / "results" / "study" / "dev"  # the recipe study's development runs, seeds 1-5
RECIPE_CANDIDATES = {  # block name -> (the candidates' folders under STUDY_DEV, config key, the default's value)
    "recipe-m128": (("default", "m128"), "val_batch_size", 100),
    "recipe-epochs80": (("m128", "epochs80"), "epochs", 40),
    "recipe-pseudo-eval": (("m128", "pseudo-eval"), "pseudo_from", "train"),
    "recipe-lr": (("m128", "lr0.15"), "lr", 0.05),
    "tune-bootstrap": (("bootstrap/beta0.95", "bootstrap/beta0.8", "bootstrap/beta0.6"), "bootstrap_beta", 0.95),
    "tune-mwnet": (("mwnet/mwnet", "mwnet/mwnet-sum"), "method", "mwnet"),
}


def recipe_table(folders: tuple[str, ...], key: str, default) -> str:
    """Candidates against the default at the development setting, by the protocol's rule:
    tools/select_by_val.py on the runs of the seeds every candidate finished (best clean-validation
    accuracy; no test accuracy is read)."""
    import select_by_val as sbv

    paths = [STUDY_DEV / f for f in folders]
    if not all(p.is_dir() for p in paths):
        return "Not run yet: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths if not p.is_dir()) + " missing."
    seeds = [{yaml_safe(r / "config.yaml")["seed"]: r for r in sbv.find_runs([p]) if (r / "summary.json").is_file()}
             for p in paths]
    common = sorted(set.intersection(*(set(s) for s in seeds)))
    if len(common) < 2:
        return f"Fewer than two seeds finished by every candidate ({key}): nothing to compare yet."
    runs = [s[seed] for s in seeds for seed in common]
    table = sbv.candidates(runs, [key])
    text = sbv.format_result(sbv.select(table, (default,)), [key]).splitlines()
    rows = [line for line in text if line.startswith("|")]
    devices = sorted({str(yaml_safe(r / "config.yaml").get("device")) for r in runs})
    short = "" if len(common) >= 5 else f" Seeds {', '.join(map(str, common))} only: the protocol asks for 1 to 5."
    return ("\n".join(rows) + "\n\n" + "; ".join(line for line in text if not line.startswith("|")) + "."
            + short + "\n\n" + f"`python tools/select_by_val.py --key {key} --reference {default} "
            + " ".join(f"{p.relative_to(ROOT)}" for p in paths) + f"` (runs on: {', '.join(devices)}).")


STUDY_HELDOUT = ROOT / "docs" / "results" / "study" / "heldout"  # held-out settings under the frozen recipe
FULL_SET = ", full training set"
# the protocol's settings under the frozen recipe: name (setting_name of its runs) -> (role, where its runs are)
FROZEN_SETTINGS = {
    "40% sym": ("development", (STUDY_DEV / "m128", STUDY_DEV / "baselines")),
    "20% sym": ("held out", (STUDY_HELDOUT / "sym20",)),
    "50% sym": ("held out", (STUDY_HELDOUT / "sym50",)),
    "40% asym": ("held out", (STUDY_HELDOUT / "asym40",)),
    "40% pairflip": ("held out", (STUDY_HELDOUT / "pairflip40",)),
    "40% instance": ("held out", (STUDY_HELDOUT / "instance40",)),
    "40% sym" + FULL_SET: ("held out", (STUDY_HELDOUT / "full40",)),
}
FROZEN_BASELINES = ("l2rw", "glc", "ce", "l2b-convex")
# ce never draws a clean batch, so the clean batch of the recipe does not reach it (tests/test_baselines.py,
# test_the_clean_batch_size_changes_only_the_methods_that_draw_a_clean_batch): where a setting has no ce run
# of its own under the frozen recipe, the reproduction's ce runs of that setting stand in
UNTOUCHED_BY_RECIPE = ("ce",)


def setting_name(run) -> str:
    """A run's setting as the study's tables name it: "40% sym", or "40% sym, full training set"."""
    s = run.summary
    return f"{100 * s['noise_rate']:g}% {s['noise']}" + (FULL_SET if not run.config.get("subset") else "")


def frozen_recipe_runs() -> dict[tuple, object]:
    """(setting name, method, seed) -> run, for the frozen recipe's comparison (its own runs first)."""
    found = {}
    for setting, (_, folders) in FROZEN_SETTINGS.items():
        for folder in folders:
            for r in _folder_runs(folder):
                if setting_name(r) == setting and r.config.get("val_batch_size") in (0, r.config.get("batch_size")):
                    found.setdefault((setting, r.summary["method"], r.summary["seed"]), r)
    for r in _folder_runs(RUNS / "asym40") + tuple(r for f in sorted(RUNS.glob("sym*")) for r in _folder_runs(f)):
        s, setting = r.summary, setting_name(r)
        if s["method"] in UNTOUCHED_BY_RECIPE and setting in FROZEN_SETTINGS and not _changes(r):
            found.setdefault((setting, s["method"], s["seed"]), r)
    return found


def _setting_runs(found: dict, setting: str, method: str) -> list:
    """``method``'s runs at ``setting`` in ``frozen_recipe_runs()``'s result, by seed."""
    return [r for (n_, m, _), r in sorted(found.items()) if (n_, m) == (setting, method)]


def _frozen_cells(found: dict, setting: str, acc: str) -> list[tuple[str, list[float]]]:
    """Per baseline: its interval text and the paired differences L2B - baseline (seeds both finished)."""
    cells = []
    for b in FROZEN_BASELINES:
        seeds = sorted(s for (n_, m, s) in found if (n_, m) == (setting, "l2b") and (setting, b, s) in found)
        diffs = [found[setting, "l2b", s].summary[acc] - found[setting, b, s].summary[acc] for s in seeds]
        cells.append((paired_interval(diffs), diffs))
    return cells


def _verdict(diffs: list[float]) -> str | None:
    """"ahead" / "behind" where the 95% interval excludes zero, "level" where it contains it; None under 2 seeds."""
    if len(diffs) < 2:
        return None
    mean, half = mean_and_half_width(diffs)
    return "ahead" if mean - half > 0 else "behind" if mean + half < 0 else "level"


STUDY_VERIFY = ROOT / "docs" / "results" / "study" / "verify"  # reruns of reproduction runs with the study's code


def stand_in_check() -> str:
    """Whether the study's code reruns a CPU run of the reproduction exactly: every per-epoch value both logged."""
    sentences = []
    for rerun in _folder_runs(STUDY_VERIFY):
        s = rerun.summary
        original = RUNS / f"{s['noise']}{100 * s['noise_rate']:g}" / rerun.path.name
        old = load_runs([original])[0]
        shared = (set(rerun.metrics[0]) & set(old.metrics[0])) - {"seconds"}
        same = len(rerun.metrics) == len(old.metrics) and all(
            a[k] == b[k] for a, b in zip(rerun.metrics, old.metrics) for k in shared)
        sentences.append(f"a rerun of `{s['method']}` at {100 * s['noise_rate']:g}% {s['noise']}, seed {s['seed']}, with the "
                         f"study's code on a CPU ({rerun.path.relative_to(ROOT)}) "
                         + ("reproduces" if same else "does **not** reproduce")
                         + f" the reproduction's CPU run in every per-epoch value both logged ({', '.join(sorted(shared))}; "
                         f"{len(old.metrics)} epochs)")
    return "; ".join(sentences)


def which_method_new_recipe_table() -> str:
    """L2B minus each baseline, paired by seed, at the development setting and every held-out setting
    under the frozen recipe, at the best clean-validation epoch and at the last epoch."""
    found = frozen_recipe_runs()
    if not found:
        return "No run under the frozen recipe is committed yet."
    lines = ["| setting | role | epoch | L2B | " + " | ".join(f"L2B − {b}" for b in FROZEN_BASELINES) + " |",
             "|---|---|---|---|" + "---|" * len(FROZEN_BASELINES)]
    stand_ins, stand_in_devices = set(), set()
    for setting, (role, _) in FROZEN_SETTINGS.items():
        l2b = [r.summary for r in _setting_runs(found, setting, "l2b")]
        for acc, epoch in (("test_acc_best_val", "best clean-val"), ("test_acc_last", "last")):
            mean = f"{statistics.fmean(s[acc] for s in l2b):.2f} ({len(l2b)})" if l2b else "—"
            cells = [text for text, _ in _frozen_cells(found, setting, acc)]
            lines.append(f"| {setting} | {role} | {epoch} | {mean} | " + " | ".join(cells) + " |")
        for r in _setting_runs(found, setting, "ce"):
            if RUNS in r.path.parents:
                stand_ins.add(setting)
                stand_in_devices.add(str(r.config.get("device")).upper())
    folders = sorted({str(f.relative_to(ROOT)) for _, fs in FROZEN_SETTINGS.values() for f in fs if f.is_dir()})
    lines += ["", "L2B: its mean test accuracy (seeds). Paired difference L2B − baseline in test accuracy (points): "
              "mean over seeds [95% t-interval] (seeds), every seed both methods finished; positive: L2B ahead. "
              "Runs: " + ", ".join(folders) + ", on a CPU, the configs of the frozen recipe"
              + (f"; `ce` at {', '.join(sorted(stand_ins))}: the reproduction's runs (docs/results/runs, on "
                 f"{' and '.join(sorted(stand_in_devices))}; ce never draws a clean batch, so the recipe's change "
                 "does not reach it, as a test checks" + (f"; {rerun}" if (rerun := stand_in_check()) else "") + ")"
                 if stand_ins else "")
              + "."]
    return "\n".join(lines)


def clean_set_fit_table() -> str:
    """Whether a method's clean-validation accuracy can select its epoch: per setting under the frozen
    recipe and method, the runs whose clean-val accuracy reaches 100% (GLC trains on clean batches, so
    it fits the very images it is selected on), the epochs spent at its maximum, the selected epoch, and
    the test accuracy there and at the last epoch."""
    found = frozen_recipe_runs()
    lines = ["| setting | method | runs | clean-val maximum | runs at 100% | epochs at the maximum | selected epoch | "
             "test at selected epoch | test at last epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in FROZEN_SETTINGS:
        for method in ("glc", "l2b", "l2rw"):
            runs = _setting_runs(found, setting, method)
            if not runs:
                continue
            top = [max(e["val_acc"] for e in r.metrics) for r in runs]
            at_top = [sum(e["val_acc"] == t for e in r.metrics) for r, t in zip(runs, top)]
            chosen = [r.summary["best_val_epoch"] for r in runs]
            lines.append(f"| {setting} | {method} | {len(runs)} | {statistics.fmean(top):.2f} | {sum(t == 100 for t in top)} | "
                         f"{min(at_top)}-{max(at_top)} of {runs[0].summary['epochs']} | {min(chosen)}-{max(chosen)} | "
                         f"{statistics.fmean(r.summary['test_acc_best_val'] for r in runs):.2f} | "
                         f"{statistics.fmean(r.summary['test_acc_last'] for r in runs):.2f} |")
    lines += ["", "Per run from metrics.jsonl and summary.json: the clean-validation accuracy's maximum over the "
              "epochs (mean over the runs) and how many epochs reach it (ties: the trainer keeps the first, `best.pt`); test accuracy "
              "in points, mean over the runs. Runs: those of the first table."]
    return "\n".join(lines)


def full_set_table() -> str:
    """The held-out setting at scale beside the development setting: per method, test accuracy at the
    best clean-val and at the last epoch, how much of the noise the model has memorised by its last
    epoch, and the minutes a run took."""
    found = frozen_recipe_runs()
    lines = ["| setting | method | seeds | epochs | test at best clean-val | test at last epoch | "
             "flipped samples memorised, last epoch (%) | minutes a run (median) |", "|---|---|---|---|---|---|---|---|"]
    mean = lambda values: f"{statistics.fmean(values):.2f}"  # noqa: E731
    for setting in ("40% sym", "40% sym" + FULL_SET):
        for method in ("l2b", *FROZEN_BASELINES):
            runs = _setting_runs(found, setting, method)
            if not runs:
                continue
            memorised = [r.metrics[-1].get("train_memorized") for r in runs]
            lines.append(f"| {setting} | {method} | {len(runs)} | {runs[0].summary['epochs']} | "
                         f"{mean(r.summary['test_acc_best_val'] for r in runs)} | "
                         f"{mean(r.summary['test_acc_last'] for r in runs)} | "
                         + (mean(memorised) if None not in memorised else "—") + " | "
                         + (f"{statistics.median(r.summary['train_seconds'] for r in runs) / 60:.1f}"
                            if not any(RUNS in r.path.parents for r in runs) else "—") + " |")
    lines += ["", "Means over the seeds. Memorised: the share of the flipped training samples whose prediction in "
              "the last epoch's training steps is their wrong observed label (`train_memorized` in "
              "metrics.jsonl; —: not logged by the code of that time). Minutes: training time on one CPU thread, "
              "two runs at a time (—: the reproduction's runs stand in, on other machines). Runs: those of the "
              "first table."]
    return "\n".join(lines)


WEIGHT_SCORES = (("auroc_alpha", "alpha"), ("auroc_beta", "beta"), ("auroc_alpha_plus_beta", "alpha + beta"),
                 ("auroc_beta_minus_alpha", "beta − alpha"))


def _quarters(logged: list[list[dict]], key: str) -> str:
    """``key``'s mean per quarter of each run's logged epochs, over the runs: "q1, q2, q3, q4"."""
    quarters = []
    for q in range(4):
        values = [e[key] for epochs in logged for e in epochs[q * len(epochs) // 4:(q + 1) * len(epochs) // 4]
                  if e.get(key) is not None]
        quarters.append(f"{statistics.fmean(values):.2f}" if values else "—")
    return ", ".join(quarters)


def mwnet_weights_table() -> str:
    """What MW-Net's weighting network learned: the mean weight V(l)/n of clean and of flipped samples,
    and its AUROC as a score for "flipped", per quarter of training; the development runs of both forms,
    `mwnet` at 40% asymmetric noise under the same recipe, and the reproduction's runs (clean batch 100)."""
    groups = [(f"`{form}`", "40% sym (development), m = n", _folder_runs(STUDY_DEV / "mwnet" / form))
              for form in ("mwnet", "mwnet-sum")]
    groups.append(("`mwnet`", "40% asym, m = n", tuple(r for r in _folder_runs(STUDY_HELDOUT / "asym40")
                                                      if r.summary["method"] == "mwnet")))
    groups.append(("`mwnet`", "40% asym, clean batch 100 (reproduction)",  # the reproduction ran mwnet there only
                   tuple(r for r in _folder_runs(RUNS / "asym40") if r.summary["method"] == "mwnet"
                         and r.summary["seed"] in MAIN_SEEDS)))
    lines = ["| form | setting | seeds | mean weight, clean: quarters 1-4 | mean weight, flipped: quarters 1-4 | "
             "AUROC of the weight: quarters 1-4 |", "|---|---|---|---|---|---|"]
    for form, where, runs in groups:
        logged = [[e for e in r.metrics if "alpha_clean" in e] for r in runs]
        logged = [epochs for epochs in logged if epochs]
        if logged:
            lines.append(f"| {form} | {where} | {len(logged)} | " + " | ".join(
                _quarters(logged, key) for key in ("alpha_clean", "alpha_flipped", "auroc_alpha")) + " |")
    lines += ["", "A sample's weight in the training loss is V(l_i; phi) / n for `mwnet` and V / sum V for "
              "`mwnet-sum`; the mean weights are shown times n, as metrics.jsonl logs them (V itself for `mwnet`; "
              "mean 1 over a batch for `mwnet-sum`, whatever V learns). Per epoch from metrics.jsonl, averaged "
              "over the quarter's epochs after the warm-up and over the seeds; AUROC below one half: flipped "
              "samples weighted less (—: not logged by the code of that time)."]
    return "\n".join(lines)


def _frozen_quarters_rows(columns: tuple[tuple[str, str], ...]) -> list[str]:
    """A table of metrics.jsonl keys per quarter of the meta epochs (after the warm-up), L2B and L2RW under
    the frozen recipe, one row per setting and method, averaged over the seeds: its header and rows."""
    found = frozen_recipe_runs()
    lines = ["| setting | method | seeds | " + " | ".join(f"{name}: quarters 1-4" for _, name in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for setting in FROZEN_SETTINGS:
        for method in ("l2b", "l2rw"):
            runs = _setting_runs(found, setting, method)
            logged = [[e for e in r.metrics if "auroc_alpha" in e] for r in runs]
            logged = [epochs for epochs in logged if epochs]
            if not logged:
                continue
            cells = [_quarters(logged, key) if key != "auroc_beta" or method != "l2rw" else "— (beta = 0)"
                     for key, _ in columns]
            lines.append(f"| {setting} | {method} | {len(logged)} | " + " | ".join(cells) + " |")
    return lines


def weights_auroc_table() -> str:
    """How well each weight separates flipped from clean samples, per quarter of training, for L2B and
    L2RW under the frozen recipe: the AUROC of the epoch's mean weight as a score for "flipped"
    (metrics.jsonl), averaged over the seeds and the quarter's epochs."""
    return "\n".join(_frozen_quarters_rows(WEIGHT_SCORES) + [
        "", "AUROC of each sample's mean weight over an epoch as a score for \"flipped\" (one half: no signal; a "
        "weight that does its job, lower for flipped samples, is below one half; beta − alpha is above one half "
        "when the pair points at flipped samples), per epoch from metrics.jsonl, averaged over the quarter's "
        "epochs after the warm-up and over the seeds. Runs: those of the table above."])


PREDICTION_SCORES = (("train_acc_flipped", "flipped samples"), ("train_acc_clean", "clean samples"))


def predictions_table() -> str:
    """How often the model's training-time prediction (L2B's pseudo-label) is the true class, on the flipped
    and on the clean training samples, per quarter of training, L2B and L2RW under the frozen recipe."""
    return "\n".join(_frozen_quarters_rows(PREDICTION_SCORES) + [
        "", "Percentage of training samples whose prediction in the training step's forward (train mode; for "
        "L2B, the pseudo-label of g_i) is the true class, per epoch from metrics.jsonl (`train_acc_flipped`, "
        "`train_acc_clean`), averaged over the quarter's epochs after the warm-up and over the seeds. Runs: "
        "those of the first table."])


def _verdicts(found: dict, i: int, acc: str) -> tuple[dict[str, list[str]], list[str]]:
    """Baseline ``i``'s settings by verdict ("ahead", "level", "behind") at ``acc``, and those not run."""
    by, pending = {"ahead": [], "level": [], "behind": []}, []
    for setting, (role, _) in FROZEN_SETTINGS.items():
        verdict = _verdict(_frozen_cells(found, setting, acc)[i][1])
        name = setting + (" (development)" if role == "development" else "")
        (pending if verdict is None else by[verdict]).append(name)
    return by, pending


def _count(b: str, by: dict[str, list[str]]) -> str:
    run = sum(map(len, by.values()))
    return (f"ahead of `{b}` at {len(by['ahead'])} of the {run} setting{'s' * (run != 1)} run"
            + (f" and behind it at {len(by['behind'])}" if by["behind"] else ""))


def which_method_summary() -> str:
    """The verdicts in words: per baseline, at how many settings L2B is ahead and behind at the best
    clean-val epoch (a baseline that trains on the clean set, GLC, at the last epoch: its clean-val
    accuracy selects nothing) and at the last epoch, then where, then what is not run."""
    found = frozen_recipe_runs()
    parts, pending, counts, last = [], [], [], []
    for i, b in enumerate(FROZEN_BASELINES):
        selects = not fits_clean_set(create_method(b))
        by, missing = _verdicts(found, i, "test_acc_best_val" if selects else "test_acc_last")
        if b != "l2b-convex":  # the convex mix is reported where run, not listed as missing
            pending += [f"{b} at {name}" for name in missing]
        said = [f"{v} at {', '.join(by[v])}" for v in ("ahead", "level", "behind") if by[v]]
        if said:
            where = "" if selects else " (both at the last epoch: it trains on the clean set, which then selects nothing)"
            parts.append(f"against `{b}`{where}, L2B is " + "; ".join(said))
            counts.append(_count(b, by) + where)
            last.append(_count(b, _verdicts(found, i, "test_acc_last")[0]))
    text = ("In short, at the best clean-validation epoch, L2B is " + "; ".join(counts) + ". Without model "
            "selection, at the last epoch, it is " + "; ".join(last) + ". In detail, at the best clean-validation "
            "epoch, under the frozen recipe (\"ahead\" and \"behind\": the 95% interval excludes zero; \"level\": "
            "it contains it, not distinguishable at this number of seeds): " + "; ".join(parts) + ".")
    if pending:
        text += " Not run yet (fewer than two seeds): " + "; ".join(pending) + "."
    return text


def yaml_safe(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def render(runs: list) -> dict[str, str]:
    main_rows = aggregate([r for r in runs if r.summary.get("seed") in MAIN_SEEDS])
    all_rows = aggregate(runs)
    blocks, previous = {}, None
    for name, spec in TABLES.items():
        source = provenance(runs, *spec[:3], MAIN_SEEDS if len(spec) == 4 else None)
        blocks[name] = table(main_rows if len(spec) == 4 else all_rows, *spec[:4]) + "\n\n" + (
            "Runs: those of the table above." if source == previous else source)
        previous = source
    blocks["clean-batch"] = one_change_table("val_batch_size", (100, 500), "clean batch {}", "cleanbatch500")
    blocks["normalize"] = normalize_table()
    blocks["warmup"] = one_change_table("warmup_epochs", (1, 5), "warm-up {}", "warmup5")
    blocks["lr"] = one_change_table("lr", (0.05, 0.15), "lr {}", "lr0.15")
    blocks["epochs"] = one_change_table("epochs", (40, 80), "{} epochs", "epochs80")
    blocks["epochs-20"] = one_change_table("epochs", (40, 80), "{} epochs", "epochs80", rate=0.2)
    blocks["diagnosis"] = diagnosis_table()
    blocks["orderings"] = orderings_table(runs)
    blocks["weights"] = weights_table()
    blocks["phases"] = phases_table(runs)
    blocks["headline"] = headline(main_rows)
    blocks["which-method"] = which_method_table(runs)
    for name, spec in RECIPE_CANDIDATES.items():
        blocks[name] = recipe_table(*spec)
    blocks["which-method-mn"] = which_method_new_recipe_table()
    blocks["which-method-summary"] = which_method_summary()
    blocks["clean-set-fit"] = clean_set_fit_table()
    blocks["full-set"] = full_set_table()
    blocks["weights-auroc-mn"] = weights_auroc_table()
    blocks["predictions-mn"] = predictions_table()
    blocks["mwnet-weights"] = mwnet_weights_table()
    blocks["table9"] = table9()
    blocks["default-run"] = default_run_table()
    return blocks


# Digits outside the markers that are not results, each with why; matched on the text with the blocks,
# code and link targets taken out (code: commands, flags, file names and version pins)
ALLOWED = {
    r"\b(?:Tables?|Fig\.|Figs\.|eqs?\.|Algorithm|Appendix|§) ?[A-Z]?\d+(?:\.\d+)*(?:[-–]\d+)?": "paper's tables, figures, equations",
    r"\bTable \d+ analogue\b": "section names",
    r"(?:et al\.,?|CVPR|ICCV|ECCV|NeurIPS|ICML|ICLR)\s+(?:19|20)\d\d[a-z]?": "citations",
    r"\b[1-5]0(?:(?:-|–| to )[1-5]0)?%(?:(?:,| and| or) [1-5]0(?:-[1-5]0)?%)*": "the noise rates of the study (10-50%)",
    r"\bclean batch(?:es)?(?: of)? \d+(?: (?:instead of|and) \d+)?|\bbatch \d+": "batch sizes (settings)",
    r">= ?\d+(?:\.\d+)*|\bv\d\b": "versions",
    r"\bexit (?:code|status) \d+(?: / \d+)?|\bMD5\b|\brank 0\b|\b\d ranks\b": "interface and names",
    r"\b95%\s(?:t-)?interval|\bt\(0\.975, k - 1\)": "the confidence level the project uses, its t quantile",
    r"\bunder \d+ minutes\b": "a time limit the protocol sets (a requirement, not a result)",
    r"\b\d+ runs at a time\b": "how many runs a machine ran at once (a setting)",
    r"\bwarm-up \d+\b|\blr \d+(?:\.\d+)?\b": "a one-change run's setting, named as the tables' rows name it",
    r"\[[\w./-]+\.(?:png|json|md|csv)\b": "file names as link text (the link target is taken out first)",
    r"\b[\d,]+/[\d,]+/[\d,]+ split\b": "the paper's ISIC split (a setting)",
    r"\b[Ss]eeds? \d(?:(?:, |-|–| and | to |,)\d)*": "which seeds a run used (settings)",
    r"\b\d+-\d+ seeds\b|\b\d seeds\b": "how many seeds (settings)",
    r"\b\d+(?:-| )epochs?\b(?! \d)": "a budget in epochs (settings)",
    r"\b\d+ CPU cores?\b|\b\d+ threads?\b|\bH[12]00\b": "the machines",
    r"\bCIFAR-\d+(?:/\d+)?|ISIC ?\d{4}|Clothing1M|(?:Pre[Aa]ct)?Res[Nn]et-?\d+|WRN-\d+-\d+": "data set and model names",
    r"\b(?:bf|fp|float|u?int)\d+\b|\b[Ll]2(?:[Bb]|RW|rw)\b|\b[xX]_?\d\b": "names with a digit",
    r"\b1/\d+\b|\b1e-\d+\b|(?<![\d.])[01](?!\.?\d|,\d|%)": "0 and 1 in formulas, fractions, tolerances tests assert",
}
# sections whose numbers are not generated yet (file: headings); the check fails once one is clean, so
# the list only shrinks
PENDING: dict[str, list[str]] = {}  # sections whose typed numbers are still to be generated: none
MARKED = re.compile(r"<!-- (table|value):([^>]*?) -->(.*?)<!-- /\1 -->", re.S)
BENCH_BLOCK = r"<!-- bench:[\w-]+ -->.*?<!-- /bench -->"  # generated from benchmarks/*.json (tools/bench_blocks.py)
LABELS_BLOCK = r"<!-- labels:[\w-]+ -->.*?<!-- /labels -->"  # generated from docs/results/labels (tools/labels_tables.py)


# in docs/METHOD.md only results count (its equations, settings and the published code's values do not):
# a number with a unit of a result, or after a word that reports one
RESULT = re.compile(r"\d(?:[\d.,]*\d)? ?(?:%|points?\b|ms\b|min\b|minutes\b|s\b|x\b)"
                    r"|\b(?:AUROC|accuracy|precision|recall|Pearson|measured|relative)\b[^.;]*\d")


def stray_numbers(text: str, results_only: bool = False) -> list[tuple[int, str, str]]:
    """(line number, line, heading of its section) of every line with a digit outside the markers, code,
    link targets and ``ALLOWED`` (with ``results_only``, of every line with a number that is a result)."""
    def blank(match):  # keep line numbers
        return re.sub(r"[^\n]", " ", match.group(0))

    headings = text.splitlines()
    for pattern in (MARKED.pattern, BENCH_BLOCK, LABELS_BLOCK, r"```.*?```", r"`[^`\n]*`", r"\]\([^)]*\)", r"<!--.*?-->", *ALLOWED):
        text = re.sub(pattern, blank, text, flags=re.S)
    found, section = [], ""
    for number, (line, original) in enumerate(zip(text.splitlines(), headings), 1):
        if original.startswith("#"):
            section = original.lstrip("# ")
        elif RESULT.search(line) if results_only else re.search(r"\d", line):
            found.append((number, line.strip(), section))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    args = parser.parse_args(argv)
    blocks = render(load_runs([RUNS]))
    stale = []

    def replace(match):
        kind, name, old = match.groups()
        if kind == "table":
            if name not in blocks:
                raise SystemExit(f"unknown table {name!r}; known: {', '.join(blocks)}")
            new = f"\n{blocks[name]}\n"
        else:
            new = value(name.strip())
        if old != new:
            stale.append(f"{kind} {name.strip()}")
        return f"<!-- {kind}:{name} -->{new}<!-- /{kind} -->"

    updated, strays = {}, []
    for path in (*DOCS, METHOD, SCALING):
        updated[path] = MARKED.sub(replace, path.read_text())
        pending = PENDING.get(path.name, ())
        found = stray_numbers(updated[path], results_only=path == METHOD)
        strays += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line, section in found
                   if not any(section.startswith(h) for h in pending)]
        strays += [f"{path.relative_to(ROOT)}: section {h!r} is listed in PENDING but has no stray number: drop it"
                   for h in pending if not any(section.startswith(h) for _, _, section in found)]
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "every table and value matches the run folders")
        print("\n".join(["numbers outside the generated blocks:", *strays]) if strays else "no number outside them")
        return 1 if stale or strays else 0
    for path, text in updated.items():
        path.write_text(text)
    print(f"{len(stale)} block(s) rewritten" + (f": {', '.join(stale)}" if stale else ""))
    print("\n".join(["numbers outside the generated blocks:", *strays]) if strays else "no number outside them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
