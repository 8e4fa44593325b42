"""The numbers in the prose of README.md and docs/RESULTS.md, computed from the committed run folders.

A value span in a doc reads ``<!-- value:FUNC ARG ... key=val ... -->TEXT<!-- /value -->``; TEXT is
what ``FUNC(*ARGS, **KEYS)`` below returns (tools/results_tables.py rewrites and checks it, see there).

Runs are picked by what they are, never by folder: ``RUN`` is ``METHOD[,KEY=VAL...]`` where the keys
are the budget's settings a run changes (``l2b,epochs=80``, ``l2rw,val_batch_size=500``; none: a run at
the budget), ``SETTING`` is the noise and its rate in percent (``sym40``, ``asym40``), and
``seeds=1,2,3`` (default) or ``seeds=0-3`` names the seeds. Accuracies (``of=``): ``best-val`` (test
accuracy at the best clean-validation epoch, the default), ``last``, ``max`` (max over epochs), ``val``
(that best clean-validation accuracy), ``epoch`` (the best clean-validation epoch), ``minutes``
(training time). ``fmt=`` is a Python format spec (default ``.2f``; ``+.2f`` signs it). Where a
function takes several settings (``sym20,asym40``) their runs are pooled, or with ``per=setting`` each
setting's mean is one value.
"""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml

import l2b

from l2b.apps.labels import label_issues_for_run
from l2b.apps.report import load_runs, sample_groups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
# every folder of committed runs (report folders such as results/all hold no runs)
FOLDERS = ("runs", "diagnosis", "cleanbatch500", "warmup5", "lr0.15", "epochs80", "normalize-softmax",
           "normalize-sigmoid")
BUDGET = {"warmup_epochs": 1, "normalize": "sum", "val_batch_size": 100, "lr": 0.05, "epochs": 40}
FIELD = {"best-val": "test_acc_best_val", "last": "test_acc_last", "max": "test_acc_max", "epoch": "best_val_epoch"}
_RUNS: list = []


def all_runs() -> list:
    """Every committed run, loaded once."""
    if not _RUNS:
        _RUNS.extend(load_runs([RESULTS / f for f in FOLDERS]))
    return _RUNS


def changes(run) -> dict:
    """The budget's settings that a run changes, with the run's values."""
    return {k: run.config.get(k, v) for k, v in BUDGET.items() if run.config.get(k, v) != v}


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def parse_run(spec: str) -> tuple[str, dict]:
    """``"l2b,epochs=80"`` -> ``("l2b", {"epochs": 80})``, each value typed like the budget's."""
    method, *pairs = spec.split(",")
    wanted = {}
    for pair in pairs:
        key, value = pair.split("=")
        wanted[key] = type(BUDGET[key])(value)
    return method, wanted


def parse_setting(setting: str) -> tuple[str, float]:
    noise = setting.rstrip("0123456789")
    return noise, int(setting[len(noise):]) / 100


def pick(spec: str, setting: str, seeds: str = "1,2,3") -> dict[int, object]:
    """The runs of ``spec`` at ``setting``, by seed; every seed named must have exactly one run."""
    method, wanted = parse_run(spec)
    noise, rate = parse_setting(setting)
    found = {}
    for r in all_runs():
        s = r.summary
        if (s["method"], s["noise"], s["noise_rate"]) == (method, noise, rate) and changes(r) == wanted:
            if s["seed"] in found:
                raise ValueError(f"{spec} {setting} seed {s['seed']}: two runs ({found[s['seed']].path}, {r.path})")
            found[s["seed"]] = r
    missing = [s for s in parse_seeds(seeds) if s not in found]
    if missing:
        raise ValueError(f"{spec} {setting}: no run of seed(s) {missing}")
    return {s: found[s] for s in parse_seeds(seeds)}


def measure(run, of: str) -> float:
    if of == "val":
        return next(m for m in run.metrics if m["epoch"] == run.summary["best_val_epoch"])["val_acc"]
    if of == "minutes":
        return run.summary["train_seconds"] / 60
    return run.summary[FIELD[of]]


def join(texts: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def summarise(values: list[float], show: str, fmt: str) -> str:
    """Several numbers as one phrase: ``each`` (a, b and c), ``mean``, ``range`` (lowest-highest),
    ``abs-range`` and ``abs-mean`` (of the magnitudes), ``std`` (sample std), ``median``, ``sum``, ``wins``
    (how many are > 0), ``above:X`` (how many are > X), ``n``."""
    if show == "each":
        return join([format(v, fmt) for v in values])
    if show == "list":
        return ", ".join(format(v, fmt) for v in values)
    if show == "wins":
        return str(sum(v > 0 for v in values))
    if show.startswith("above:"):  # how many exceed a threshold, e.g. best-val epochs in the last quarter
        return str(sum(v > float(show[6:]) for v in values))
    if show == "n":
        return str(len(values))
    if show.startswith("abs-"):
        values, show = [abs(v) for v in values], show[4:]
    if show == "mean":
        return format(statistics.fmean(values), fmt)
    if show == "std":
        return format(statistics.stdev(values), fmt)
    if show == "median":
        return format(statistics.median(values), fmt)
    if show == "sum":
        return format(sum(values), fmt)
    if show == "range":
        low, high = format(min(values), fmt), format(max(values), fmt)
        return low if low == high else f"{low}-{high}"
    raise ValueError(f"unknown show={show!r}")


def acc(spec: str, setting: str, *, of: str = "best-val", seeds: str = "1,2,3", show: str = "mean",
        fmt: str = ".2f", per: str = "seed") -> str:
    """One method's accuracy (``of``) at a setting over ``seeds``, e.g. ``acc l2b sym40 show=each``, or
    ``acc glc sym20,sym30 of=last per=setting show=each`` (each setting's mean)."""
    values = []
    for one in setting.split(","):
        got = [measure(r, of) for r in pick(spec, one, seeds).values()]
        values += [statistics.fmean(got)] if per == "setting" else got
    return summarise(values, show, fmt)


def diff(a: str, b: str, setting: str, *, of: str = "best-val", seeds: str = "1,2,3", show: str = "each",
         fmt: str = "+.2f", setting_b: str | None = None, per: str = "seed") -> str:
    """Paired by seed, ``a`` minus ``b`` (e.g. ``diff l2b l2rw sym40``, or a change's gain:
    ``diff l2b,epochs=80 l2b sym40 seeds=0-2``); ``setting`` may list several (``sym20,asym40``), whose
    pairs are then pooled (``per=setting``: each setting's mean difference is one value)."""
    diffs = []
    for one in setting.split(","):
        runs_a, runs_b = pick(a, one, seeds), pick(b, setting_b or one, seeds)
        pairs = [measure(runs_a[s], of) - measure(runs_b[s], of) for s in runs_a]
        diffs += [statistics.fmean(pairs)] if per == "setting" else pairs
    return summarise(diffs, show, fmt)


def where(run) -> str:
    """The machine a run trained on: cuda or cpu (the first diagnosis runs record ``device: auto``, which
    resolved to the CPU of the CPU-only machine they ran on)."""
    return "cuda" if run.config.get("device") == "cuda" else "cpu"


def select(spec: str = "*", setting: str | None = None, *, device: str | None = None,
           folder: str | None = None) -> list:
    """Every committed run of ``spec`` (``*``: any method; its changes must match, none for the budget)
    at ``setting`` (any if None), on ``device`` and under ``folder``; unlike ``pick``, any seeds."""
    method, wanted = parse_run(spec)
    keys = [parse_setting(one) for one in setting.split(",")] if setting else None
    return [r for r in all_runs() if method in ("*", r.summary["method"]) and changes(r) == wanted
            and (keys is None or (r.summary["noise"], r.summary["noise_rate"]) in keys)
            and (device is None or where(r) == device) and (folder is None or (RESULTS / folder) in r.path.parents)]


def minutes(spec: str = "*", setting: str | None = None, *, device: str | None = None, folder: str | None = None,
            show: str = "median", fmt: str = ".0f") -> str:
    """Training minutes of the runs ``select`` finds, e.g. ``minutes l2b device=cpu`` (the median) or
    ``minutes *,val_batch_size=500 show=range``. Every run of a kind, whatever else shared its machine."""
    found = select(spec, setting, device=device, folder=folder)
    if not found:
        raise ValueError(f"minutes: no run of {spec} at {setting} on {device} under {folder}")
    return summarise([r.summary["train_seconds"] / 60 for r in found], show, fmt)


def epoch_seconds(method: str, *, device: str = "cuda", fmt: str = ".2f") -> str:
    """Seconds per epoch (training and its evaluations) from the runs' metrics: the mean over every epoch
    of every budget run of ``method`` on ``device``, as report's ``table9_time.png`` plots it."""
    seconds = [m["seconds"] for r in select(method, device=device) for m in r.metrics if "seconds" in m]
    if not seconds:
        raise ValueError(f"epoch_seconds: no budget run of {method} on {device} has per-epoch seconds")
    return format(statistics.fmean(seconds), fmt)


def quarters(epochs: int) -> list[tuple[int, int]]:
    """The quarters of a run's epochs (1-based, inclusive), the first without epoch 1, the CE warm-up."""
    q = epochs // 4
    return [(2, q), (q + 1, 2 * q), (2 * q + 1, 3 * q), (3 * q + 1, epochs)]


def epoch_span(text: str, epochs: int) -> tuple[int, int]:
    """``"q2"`` (a quarter, see ``quarters``), ``"last"``, ``"12"`` or ``"2-10"`` -> first and last epoch."""
    if text.startswith("q"):
        return quarters(epochs)[int(text[1:]) - 1]
    if text == "last":
        return epochs, epochs
    first, _, last = text.partition("-")
    return int(first), int(last or first)


def epoch_mean(run, key: str, span: str) -> float:
    """A run's mean of metrics ``key`` over the epochs of ``span`` that have it (weights: the meta epochs)."""
    first, last = epoch_span(span, len(run.metrics))
    values = [m[key] for m in run.metrics[first - 1 : last] if key in m]
    if not values:
        raise ValueError(f"{run.path}: no {key} in epochs {first}-{last}")
    return statistics.fmean(values)


def metric(spec: str, setting: str, key: str, *, epochs: str = "last", minus: str | None = None,
           ratio_to: str | None = None, seeds: str = "1,2,3", per: str = "run", show: str = "each",
           fmt: str = ".2f") -> str:
    """A per-epoch figure of ``metrics.jsonl`` (``val_acc``, ``test_acc``, ``alpha_flipped``, ``beta_clean``...,
    or several, comma-separated and pooled):
    each run's mean over ``epochs`` (comma list of spans, see ``epoch_span``, or ``every`` meta epoch), paired by seed with ``minus``
    (that run's mean subtracted) or divided by the same run's mean of ``ratio_to``. ``per=run``: one value
    per run and span; ``per=span``: per span, the mean over runs (pooled over the settings), a ratio being
    the ratio of those means, as the phases table has them; ``per=wins``: per span, how many runs (pairs) are
    above zero."""
    if epochs == "every":  # each meta epoch on its own (2 to the last; epoch 1 is the CE warm-up)
        epochs = ",".join(map(str, range(2, len(next(iter(pick(spec, setting.split(",")[0], seeds).values())).metrics) + 1)))
    values = []
    for span in epochs.split(","):
        nums, dens = [], []
        for one in setting.split(","):
            runs = pick(spec, one, seeds)
            others = pick(minus, one, seeds) if minus else {}
            for seed, run in runs.items():
                for k in key.split(","):  # several keys pool like several settings
                    nums.append(epoch_mean(run, k, span) - (epoch_mean(others[seed], k, span) if minus else 0))
                    dens.append(epoch_mean(run, ratio_to, span) if ratio_to else 1.0)
        if per == "span":
            values.append(statistics.fmean(nums) / statistics.fmean(dens))
        elif per == "wins":
            values.append(sum(n / d > 0 for n, d in zip(nums, dens)))
        else:
            values += [n / d for n, d in zip(nums, dens)]
    return summarise(values, show, fmt)


def group(spec: str, setting: str, name: str, *, field: str = "share_pct", seeds: str = "1,2,3", show: str = "range",
          fmt: str = ".1f") -> str:
    """Where the weight goes (RESULTS' weights table): of the training samples in group ``name`` (``clean-wrong``,
    ``clean-right``, ``flipped-true``, ``flipped-given``: clean or flipped, by the final model's prediction), the
    ``field`` (``share_pct``, ``alpha``, ``beta``) of ``l2b report``'s ``sample_groups`` over the runs of ``seeds``
    that kept per-sample records. ``setting`` lists one or more cells, each ``sym40`` or with a change of its own,
    ``sym40:val_batch_size=500``; one value per cell."""
    label = GROUPS[name]
    values = []
    for cell in setting.split(","):
        one, _, change = cell.partition(":")
        wanted = set(parse_seeds(seeds))
        found = [r for r in select(spec + ("," + change if change else ""), one) if r.summary["seed"] in wanted]
        rows = [row for row in sample_groups(found) if row["group"] == label]
        if len(rows) != 1:
            raise ValueError(f"group: {spec} {cell}: {len(rows)} cells with per-sample records, not one")
        values.append(rows[0][field])
    return summarise(values, show, fmt)


# short names of report's sample groups
GROUPS = {"clean-wrong": "clean, predicted wrong", "clean-right": "clean, predicted right",
          "flipped-true": "flipped, predicted the true class", "flipped-given": "flipped, predicted the given label"}


def runs(*, device: str | None = None, folder: str | None = None) -> str:
    """How many committed runs (on ``device``: cuda or cpu; under ``folder``). The first diagnosis runs
    record ``device: auto``, which resolved to the CPU of the CPU-only machine they ran on."""
    return str(sum(1 for r in all_runs() if (device is None or where(r) == device)
                   and (folder is None or (RESULTS / folder) in r.path.parents)))


def config(key: str, *, file: str = "configs/fashion-mnist-sym40.yaml", fmt: str = "") -> str:
    """A setting of a committed config file (the budget's by default), or l2b's default where the file
    leaves it out, e.g. ``config subset fmt=,``."""
    settings = yaml.safe_load((ROOT / file).read_text())
    return format(settings[key] if key in settings else getattr(l2b.Config(), key), fmt)


def labels(run: str, key: str, *, fmt: str = ".3f") -> str:
    """What ``l2b labels`` reports for a committed run folder (its ``per_sample.csv.gz``) against the truly
    flipped labels: ``auroc``, ``precision``, ``recall``, ``f1``, ``flagged``, ``num_samples``, or one piece of
    evidence's own AUROC, ``auroc:NAME`` (``label_issues.json``'s ``auroc_by_evidence``)."""
    with tempfile.TemporaryDirectory() as tmp:  # l2b labels writes its tables next to the records, not here
        with gzip.open(RESULTS / run / "per_sample.csv.gz") as src, open(Path(tmp) / "per_sample.csv", "wb") as dst:
            shutil.copyfileobj(src, dst)
        report = label_issues_for_run(tmp)
    if key.startswith("auroc:"):
        return format(report.evidence_auroc[key[6:]], fmt)
    return format(len(report.issues["index"]) if key == "num_samples" else report.rows[0][key], fmt)


def bench(file: str, method: str | None = None, *, field: str = "seconds", ratio_to: str | None = None,
          fmt: str = ".2f") -> str:
    """A figure of a committed ``l2b bench --json`` file: ``field`` (seconds or images_per_second) of one
    method, or its ratio to ``ratio_to``'s; without a method, a setting the file records (``field=repeats``;
    a shape such as ``image_shape`` reads 1x28x28)."""
    data = json.loads((RESULTS / file).read_text())[field]
    if method is None:
        return "x".join(map(str, data)) if isinstance(data, list) else format(data, fmt)
    return format(data[method] / data[ratio_to] if ratio_to else data[method], fmt)


VALUES = {f.__name__: f for f in (acc, diff, runs, config, labels, bench, minutes, epoch_seconds, metric, group)}


def value(expr: str) -> str:
    """Evaluate the expression of one value span, ``FUNC ARG ... key=val ...``."""
    func, *tokens = expr.split()
    if func not in VALUES:
        raise SystemExit(f"unknown value function {func!r} in {expr!r}; known: {', '.join(VALUES)}")
    def keyword(token: str) -> bool:  # ``config epochs``: a key's name alone is positional
        return "=" in token and token.split("=")[0] in _KEYWORDS

    args = [t for t in tokens if not keyword(t)]
    kwargs = dict(t.split("=", 1) for t in tokens if keyword(t))
    return VALUES[func](*args, **kwargs)


# keyword arguments of the value functions (a positional RUN such as ``l2b,epochs=80`` holds "=" too)
_KEYWORDS = {"field", "per", "of", "seeds", "show", "fmt", "setting_b", "device", "folder", "file", "ratio_to", "epochs",
             "minus"}
