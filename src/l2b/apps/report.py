"""`l2b report`: tables and plots from run folders only (summary.json, metrics.jsonl, config.yaml).

This module never imports the trainer: a report can be made anywhere the run folders are.

Outputs (in ``out``): ``report.md`` (Markdown tables), ``results.csv`` (one row per method x noise
setting), ``sample_groups.csv`` (where the meta-weights go: clean/flipped samples by the final prediction,
from the runs that kept ``per_sample.csv``) and, with matplotlib, ``fig2_test_acc.png`` (test accuracy per epoch, paper
Fig. 2), ``fig3_normalize.png`` (normalisations compared, Fig. 3), ``fig4_weights.png`` (mean alpha and
beta of clean vs flipped samples over training, Fig. 4), ``fig4_auroc.png`` (per epoch, the AUROC of
alpha, beta, alpha + beta and beta - alpha as scores for "flipped") and ``table9_time.png`` (seconds per
epoch, Table 9).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..config import Config
from ..errors import L2BError
from ..runfiles import read_table

log = logging.getLogger(__name__)

__all__ = ["Run", "load_runs", "aggregate", "write_report", "rate_of"]

ACCURACIES = (  # summary key, column name, meaning
    ("test_acc_last", "last", "test accuracy at the last epoch"),
    ("test_acc_best_val", "best-val", "test accuracy at the epoch of best clean-validation accuracy (honest selection)"),
    ("test_acc_max", "max-test", "max test accuracy over epochs (selected on the TEST set: paper-comparable only)"),
)
# keys that never distinguish methods in a table (a table is per data set and noise model)
_NOT_A_VARIANT = {"seed", "out", "device", "noise_rate", "data_dir", "eval_batch_size", "method", "dataset", "noise",
                  "nproc", "test_every"}
_DEFAULTS = Config().to_dict()  # a key an older run folder lacks had its default value


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    label: str = ""

    @property
    def group(self) -> tuple[str, str]:
        return (self.summary.get("dataset", "?"), self.summary.get("noise", "?"))


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``: a path with a config.yaml, or folders below it that have one."""
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise L2BError(f"{p}: not a folder; give run folders or folders that contain them")
        found += [p] if (p / "config.yaml").is_file() else sorted(c.parent for c in p.rglob("config.yaml"))
    if not found:
        raise L2BError(f"no run folders (with a config.yaml) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Finished runs under ``paths``; unfinished ones (no summary.json) are skipped with a warning."""
    runs = []
    for d in find_run_dirs(paths):
        if not (d / "summary.json").is_file():
            log.warning("%s: no summary.json (unfinished or failed run); left out", d)
            continue
        try:
            config = yaml.safe_load((d / "config.yaml").read_text()) or {}
            summary = json.loads((d / "summary.json").read_text())
            metrics_file = d / "metrics.jsonl"
            metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
                if metrics_file.is_file() else []
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise L2BError(f"{d}: cannot read the run folder ({exc})") from None
        runs.append(Run(d, config, summary, metrics))
    if not runs:
        raise L2BError("none of the run folders has a summary.json (no finished run)")
    _label(runs)
    return runs


def _label(runs: list[Run]) -> None:
    """Label = method, plus the config keys in which that method's runs differ (e.g. normalize=softmax)."""
    by_method = defaultdict(list)
    for r in runs:
        by_method[(r.group, r.summary["method"])].append(r)
    for (_, method), rs in by_method.items():
        keys = sorted({k for r in rs for k in r.config} - _NOT_A_VARIANT)
        value = lambda r, k: r.config.get(k, _DEFAULTS.get(k))  # noqa: E731
        varying = [k for k in keys if len({json.dumps(value(r, k)) for r in rs}) > 1]
        for r in rs:
            extra = ", ".join(f"{k}={value(r, k)}" for k in varying)
            r.label = f"{method} [{extra}]" if extra else method


def rate_of(summary: dict) -> float:
    """The run's synthetic noise rate; 0 for labels used as given (its summary records no rate)."""
    return float(summary["noise_rate"] or 0.0)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:  # e.g. max-test of runs that tested only at the end
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per (data set, noise, noise rate, label): mean and sample std over seeds of each accuracy,
    and mean seconds per epoch."""
    cells = defaultdict(list)
    for r in runs:
        cells[(*r.group, rate_of(r.summary), r.label)].append(r)
    rows = []
    for (dataset, noise, rate, label), rs in sorted(cells.items()):
        row = {"dataset": dataset, "noise": noise, "noise_rate": rate, "method": label, "runs": len(rs),
               "seeds": " ".join(str(r.summary.get("seed")) for r in sorted(rs, key=lambda r: r.summary.get("seed", 0))),
               "epochs": " ".join(sorted({str(r.summary.get("epochs")) for r in rs}))}
        for key, name, _ in ACCURACIES:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([float(r.summary[key]) for r in rs if r.summary[key] is not None])
        secs = [m["seconds"] for r in rs for m in r.metrics if "seconds" in m]
        row["seconds_per_epoch"] = sum(secs) / len(secs) if secs else None
        rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: list[dict]) -> str:
    """Paper-style tables: per data set and noise model, one table per accuracy, method x noise rate."""
    lines = ["# Results", "",
             "Mean ± sample std over seeds (runs per cell in the seeds table); test accuracy in %.", ""]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["noise"])].append(row)
    for (dataset, noise), grp in groups.items():
        rates = sorted({r["noise_rate"] for r in grp})
        methods = list(dict.fromkeys(r["method"] for r in grp))
        cell = {(r["method"], r["noise_rate"]): r for r in grp}
        header = "| method | " + " | ".join(f"{100 * x:g}%" for x in rates) + " |"
        rule = "|---|" + "---|" * len(rates)
        for _, name, meaning in ACCURACIES:
            lines += [f"## {dataset}, {noise} noise: {name}", "", f"_{meaning}_", "", header, rule]
            for m in methods:
                vals = [_fmt(cell[m, x][f"{name}_mean"], cell[m, x][f"{name}_std"]) if (m, x) in cell else "—"
                        for x in rates]
                lines.append(f"| {m} | " + " | ".join(vals) + " |")
            lines.append("")
        lines += [f"## {dataset}, {noise} noise: seeds and time", "",
                  "| method | noise rate | runs | seeds | epochs | s / epoch |", "|---|---|---|---|---|---|"]
        for r in grp:
            spe = "—" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.2f}"
            lines.append(f"| {r['method']} | {100 * r['noise_rate']:g}% | {r['runs']} | {r['seeds']} | {r['epochs']} | {spe} |")
        lines.append("")
    return "\n".join(lines)


# training samples split by whether their label was flipped and what the final model predicts for them
SAMPLE_GROUPS = (
    ("clean, predicted right", lambda given, true, pred: (given == true) & (pred == true)),
    ("clean, predicted wrong", lambda given, true, pred: (given == true) & (pred != true)),
    ("flipped, predicted the true class", lambda given, true, pred: (given != true) & (pred == true)),
    ("flipped, predicted the given label", lambda given, true, pred: (given != true) & (pred == given)),
    ("flipped, predicted a third class", lambda given, true, pred: (given != true) & (pred != given) & (pred != true)),
)


def _nanmean(values) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def sample_groups(runs: list[Run]) -> list[dict]:
    """Per-sample weights by group, from the runs that kept ``per_sample.csv`` (or ``per_sample.csv.gz``):
    for each cell (data set, noise, rate, label) and each of ``SAMPLE_GROUPS``, the share of training
    samples in the group and their mean alpha and beta (each sample's mean over its meta steps, times the
    batch size: 1 = an average sample's share), averaged over the cell's runs (the weights over the runs
    where the group has samples). Shows where the weight goes, e.g. how much
    of it lands on clean samples the model still gets wrong."""
    cells = defaultdict(list)
    for r in runs:
        found = [p for p in (r.path / "per_sample.csv", r.path / "per_sample.csv.gz") if p.is_file()]
        if not found:
            continue
        table = read_table(found[0])
        missing = {"given_label", "true_label", "pred_label", "alpha_mean", "beta_mean"} - set(table)
        if missing:
            raise L2BError(f"{found[0]}: no column {', '.join(sorted(missing))}")
        stats = []
        for _, member in SAMPLE_GROUPS:
            mask = member(table["given_label"], table["true_label"], table["pred_label"])
            stats.append((100 * mask.mean(), _nanmean(table["alpha_mean"][mask]), _nanmean(table["beta_mean"][mask])))
        cells[(*r.group, rate_of(r.summary), r.label)].append(stats)
    rows = []
    for (dataset, noise, rate, label), per_run in sorted(cells.items()):
        for k, (group, _) in enumerate(SAMPLE_GROUPS):
            values = np.array([run[k] for run in per_run])  # (runs, 3); a group empty in a run has no mean weight
            share, alpha, beta = (_nanmean(values[:, j]) for j in range(3))
            rows.append({"dataset": dataset, "noise": noise, "noise_rate": rate, "method": label, "group": group,
                         "runs": len(per_run), "share_pct": share, "alpha": alpha, "beta": beta})
    return rows


def sample_groups_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["## Where the weights go: per-sample weights by group", "",
             "_from the runs' per_sample.csv; mean alpha and beta times the batch size (1 = an average sample's "
             "share), by the final model's prediction; mean over runs_", "",
             "| data set | noise | method | runs | group | % of samples | alpha | beta |",
             "|---|---|---|---|---|---|---|---|"]
    num = lambda v: "—" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['noise']} {100 * r['noise_rate']:g}% | {r['method']} | {r['runs']} | "
                     f"{r['group']} | {r['share_pct']:.1f} | {num(r['alpha'])} | {num(r['beta'])} |")
    return "\n".join(lines + [""])


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(paths: list[str | Path], out: str | Path, *, plots: bool = True) -> dict:
    """Read the run folders under ``paths`` and write tables (and plots) into ``out``.

    Returns a dict: ``rows`` (the aggregated table rows), ``files`` (paths written), ``skipped_plots``
    (plot name -> why it was not drawn).
    """
    plt = _pyplot() if plots else None
    runs = load_runs(paths)
    rows = aggregate(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = sample_groups(runs)
    (out / "report.md").write_text(markdown(rows) + "\n" + sample_groups_markdown(groups))
    write_csv(rows, out / "results.csv")
    files, skipped = [out / "report.md", out / "results.csv"], {}
    if groups:
        write_csv(groups, out / "sample_groups.csv")
        files.append(out / "sample_groups.csv")
    if plt is not None:
        from . import plots

        for name, draw in plots.PLOTS.items():
            why = draw(plt, runs, out / f"{name}.png")
            if why:
                skipped[name] = why
                log.warning("%s not drawn: %s", name, why)
            else:
                files.append(out / f"{name}.png")
    return {"rows": rows, "files": files, "skipped_plots": skipped, "runs": len(runs)}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise L2BError("plots need matplotlib: pip install 'l2b[plots]', or pass --no-plots for tables only") from None
    return plt
