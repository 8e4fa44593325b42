"""`l2b labels` against cleanlab: the study's JSON and its Markdown tables, from committed run folders.

    python tools/labels_tables.py collect RUN_DIR...   # copy the small files of finished runs into docs/results/labels/runs
    python tools/labels_tables.py                      # rewrite labels.json and the generated blocks
    python tools/labels_tables.py --check              # exit 1 if labels.json or a block differs

Each run folder under docs/results/labels/runs holds config.yaml, noise.json, summary.json,
metrics.jsonl and the label_issues.json that `l2b labels RUN --compare-cleanlab --cv-model logreg
model` wrote. labels.json gathers them: one entry per run and, per setting, the mean and sample std
over the reported seeds (1-3; seed 0 was the development seed the rule was chosen on). A generated
block sits between `<!-- labels:NAME -->` and `<!-- /labels -->`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from blocks import replace_blocks, write_updated

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "labels"
RUNS = RESULTS / "runs"
JSON = RESULTS / "labels.json"
DOCS = (RESULTS / "README.md", ROOT / "README.md")
SMALL_FILES = ("config.yaml", "noise.json", "summary.json", "metrics.jsonl", "label_issues.json")
OPTIONAL_FILES = ("train_time.json",)  # {"user", "sys", "wall"} of the training process (/usr/bin/time)
REPORTED_SEEDS = (1, 2, 3)
DEV_SEEDS = (0,)
METRICS = ("precision", "recall", "f1", "auroc", "seconds", "cpu_seconds")


def setting_of(config: dict) -> str:
    return f"{config['noise']} {round(100 * config['noise_rate'])}%"


def load_entries(runs: Path = RUNS) -> list[dict]:
    entries = []
    for folder in sorted(p for p in runs.iterdir() if (p / "label_issues.json").is_file()):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        noise = json.loads((folder / "noise.json").read_text())
        report = json.loads((folder / "label_issues.json").read_text())
        rows = [dict(r) for r in report["rows"]]
        if (folder / "train_time.json").is_file():  # the run's CPU seconds: its process, start to end
            used = json.loads((folder / "train_time.json").read_text())
            rows[0]["cpu_seconds"] = round(used["user"] + used["sys"], 2)
        entries.append({
            "run": folder.name, "setting": setting_of(config), "seed": config["seed"], "method": config["method"],
            "num_train": noise["num_train"], "num_clean": noise["num_clean"], "epochs": config["epochs"],
            "noise_rate_actual": noise["noise_rate_actual"], "estimated_noise_rate": report["estimated_noise_rate"],
            "clean_accuracy": report["clean_accuracy"], "rule": report["rule"], "rows": rows,
            "auroc_by_evidence": report.get("auroc_by_evidence"),
        })
    return entries


def _mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(entries: list[dict], seeds=REPORTED_SEEDS) -> list[dict]:
    """Per setting and row: mean and std of each metric over ``seeds``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        if e["seed"] not in seeds:
            continue
        for r in e["rows"]:
            groups.setdefault((e["setting"], r["name"]), []).append({**r, "seed": e["seed"]})
    out = []
    for (setting, name), rows in groups.items():
        out.append({"setting": setting, "name": name, "seeds": sorted(r["seed"] for r in rows),
                    "flagged": _mean_std([r["flagged"] for r in rows]),
                    "flipped": _mean_std([r["flipped"] for r in rows]),
                    **{m: _mean_std([r.get(m) for r in rows]) for m in METRICS}})
    order = {"sym 20%": 0, "sym 40%": 1, "asym 40%": 2}
    return sorted(out, key=lambda a: (order.get(a["setting"], 9), a["setting"], not a["name"][:1].islower()
                                      or a["name"].startswith("cleanlab"), a["name"]))


def build_json(entries: list[dict]) -> dict:
    return {"reported_seeds": list(REPORTED_SEEDS), "development_seeds": list(DEV_SEEDS),
            "runs": entries, "settings": aggregate(entries)}


def _cell(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.{digits}f}"


def summary_table(data: dict) -> str:
    lines = ["| setting | method | flagged (wrong) | precision | recall | F1 | AUROC | seconds | CPU seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in data["settings"]:
        lines.append(f"| {a['setting']} | {a['name']} | {a['flagged']['mean']:.0f} ({a['flipped']['mean']:.0f}) | "
                     f"{_cell(a['precision'], 3)} | {_cell(a['recall'], 3)} | {_cell(a['f1'], 3)} | "
                     f"{_cell(a['auroc'], 3)} | {_cell(a['seconds'], 0)} | {_cell(a['cpu_seconds'], 0)} |")
    n = {len(a["seeds"]) for a in data["settings"]}
    return "\n".join(lines) + f"\n\nMean ± sample std over seeds {', '.join(map(str, data['reported_seeds']))}" + (
        "" if n == {len(data["reported_seeds"])} else " (a row with fewer seeds: see the per-seed table)") + "."


def headline(data: dict) -> str:
    """One line per setting: F1 / AUROC / CPU seconds of each row, means over the reported seeds (CPU
    seconds: the wall-clock ones depend on what else the shared machine ran)."""
    names = list(dict.fromkeys(a["name"] for a in data["settings"]))
    by = {(a["setting"], a["name"]): a for a in data["settings"]}
    lines = ["| setting | " + " | ".join(f"{n}: F1 / AUROC / CPU seconds" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for s in dict.fromkeys(a["setting"] for a in data["settings"]):
        cells = []
        for n in names:
            a = by.get((s, n))
            cells.append("—" if a is None else
                         f"{a['f1']['mean']:.3f} / {a['auroc']['mean']:.3f} / {'—' if a['cpu_seconds'] is None else format(a['cpu_seconds']['mean'], '.0f')}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_table(data: dict) -> str:
    """Per setting: does the run's method reach cleanlab's F1 and AUROC with both models, in less time than CV CE?"""
    settings = list(dict.fromkeys(a["setting"] for a in data["settings"]))
    lines = ["| setting | F1 ≥ both cleanlab | AUROC ≥ both cleanlab | seconds ≤ cleanlab with CV CE | "
             "CPU seconds ≤ cleanlab with CV CE |", "|---|---|---|---|---|"]
    for s in settings:
        ours = [a for a in data["settings"] if a["setting"] == s and not a["name"].startswith("cleanlab")]
        peers = [a for a in data["settings"] if a["setting"] == s and a["name"].startswith("cleanlab")]
        if len(ours) != 1 or not peers:
            continue
        o = ours[0]
        cnn = [p for p in peers if " CE" in p["name"]]

        def verdict(metric, peers_):
            gaps = [o[metric]["mean"] - p[metric]["mean"] for p in peers_]
            return ("yes" if min(gaps) >= 0 else "no") + f" ({min(gaps):+.3f})"
        def faster(key):
            if not cnn or o[key] is None or cnn[0][key] is None:
                return "—"
            ratio = o[key]["mean"] / cnn[0][key]["mean"]
            return ("yes" if ratio <= 1 else "no") + f" ({ratio:.2f}x)"
        lines.append(f"| {s} | {verdict('f1', peers)} | {verdict('auroc', peers)} | {faster('seconds')} | "
                     f"{faster('cpu_seconds')} |")
    return "\n".join(lines) + ("\n\nIn brackets: the run's method minus the stronger cleanlab row (means over seeds), "
                               "and its (CPU) seconds as a multiple of cleanlab's with cross-validated CE.")


def seed_table(data: dict, seeds) -> str:
    lines = ["| setting | seed | method | flagged | wrong | precision | recall | F1 | AUROC | seconds | CPU seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in data["runs"]:
        if e["seed"] not in seeds:
            continue
        for r in e["rows"]:
            lines.append(f"| {e['setting']} | {e['seed']} | {r['name']} | {r['flagged']} | {r['flipped']} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['auroc']:.3f} | "
                         f"{r['seconds']:.0f} | {'—' if r.get('cpu_seconds') is None else round(r['cpu_seconds'])} |")
    return "\n".join(lines)


def estimate_table(data: dict) -> str:
    lines = ["| setting | seed | wrong labels (realised) | estimated with the trusted set | trusted-set accuracy |",
             "|---|---|---|---|---|"]
    for e in data["runs"]:
        lines.append(f"| {e['setting']} | {e['seed']} | {100 * e['noise_rate_actual']:.1f}% | "
                     f"{100 * e['estimated_noise_rate']:.1f}% | {100 * e['clean_accuracy']:.1f}% |")
    return "\n".join(lines)


def evidence_table(data: dict, seeds) -> str:
    names = ("prob_given", "agreement", "alpha_share")
    lines = ["| setting | seed | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for e in data["runs"]:
        if e["seed"] in seeds and e["auroc_by_evidence"]:
            ev = e["auroc_by_evidence"]
            lines.append(f"| {e['setting']} | {e['seed']} | " + " | ".join(
                "—" if ev.get(n) is None else f"{ev[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def setup_line(data: dict) -> str:
    e = data["runs"]
    train, clean, epochs = ({x[k] for x in e} for k in ("num_train", "num_clean", "epochs"))
    return (f"Fashion-MNIST, {'/'.join(map(str, sorted(train)))} noisy training images, "
            f"{'/'.join(map(str, sorted(clean)))} trusted, {'/'.join(map(str, sorted(epochs)))} epochs; "
            f"{len(e)} runs.")


def render(data: dict) -> dict[str, str]:
    return {
        "setup": setup_line(data),
        "headline": headline(data),
        "summary": summary_table(data),
        "target": target_table(data),
        "seeds": seed_table(data, REPORTED_SEEDS),
        "development": seed_table(data, DEV_SEEDS),
        "estimate": estimate_table(data),
        "evidence": evidence_table(data, DEV_SEEDS + REPORTED_SEEDS),
    }


def collect(run_dirs: list[str]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    for d in map(Path, run_dirs):
        if not (d / "label_issues.json").is_file():
            raise SystemExit(f"{d}: no label_issues.json; run `l2b labels {d} --compare-cleanlab ...` first")
        target = RUNS / d.name
        target.mkdir(exist_ok=True)
        for name in SMALL_FILES + tuple(f for f in OPTIONAL_FILES if (d / f).is_file()):
            shutil.copyfile(d / name, target / name)
        # the folder the run was written to names this machine: keep the path the Reproduce commands use
        config = target / "config.yaml"
        config.write_text(re.sub(r"(?m)^out: \S+", f"out: sweeps/labels-study/{d.name}", config.read_text()))
        print(f"collected {target.relative_to(ROOT)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    parser.add_argument("collect", nargs="*", help="'collect RUN_DIR...': copy run folders' small files first")
    args = parser.parse_args(argv)
    if args.collect:
        if args.collect[0] != "collect" or args.check:
            parser.error("usage: labels_tables.py collect RUN_DIR...")
        collect(args.collect[1:])
    data = build_json(load_entries())
    text = json.dumps(data, indent=1) + "\n"
    blocks = render(data)
    stale = [] if JSON.is_file() and JSON.read_text() == text else [str(JSON.relative_to(ROOT))]

    updated, changed, _ = replace_blocks(DOCS, "labels", blocks)
    stale += changed
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "labels.json and every block match the run folders")
        return 1 if stale else 0
    JSON.write_text(text)
    return write_updated(updated, stale, "item(s)")


if __name__ == "__main__":
    sys.exit(main())
