"""The numbers in the prose of README.md and docs/RESULTS.md, computed from the committed run folders.

A value span in a doc reads ``<!-- value:FUNC ARG ... key=val ... -->TEXT<!-- /value -->``; TEXT is
what ``FUNC(*ARGS, **KEYS)`` below returns (tools/results_tables.py rewrites and checks it, see there).

Runs are picked by what they are, never by folder: ``RUN`` is ``METHOD[,KEY=VAL...]`` where the keys
are the budget's settings a run changes (``l2b,epochs=80``, ``l2rw,val_batch_size=500``; none: a run at
the budget), ``SETTING`` is the noise and its rate in percent (``sym40``, ``asym40``), and
``seeds=1,2,3`` (default) or ``seeds=0-3`` names the seeds. Accuracies (``of=``): ``best-val`` (test
accuracy at the best clean-validation epoch, the default), ``last``, ``max`` (max over epochs), ``val``
(that best clean-validation accuracy), ``epoch`` (the best clean-validation epoch), ``minutes``
(training time). ``fmt=`` is a Python format spec (default ``.2f``; ``+.2f`` signs it).
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
from l2b.apps.report import load_runs

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
    ``abs-range`` and ``abs-mean`` (of the magnitudes), ``wins`` (how many are > 0), ``n``."""
    if show == "each":
        return join([format(v, fmt) for v in values])
    if show == "list":
        return ", ".join(format(v, fmt) for v in values)
    if show == "wins":
        return str(sum(v > 0 for v in values))
    if show == "n":
        return str(len(values))
    if show.startswith("abs-"):
        values, show = [abs(v) for v in values], show[4:]
    if show == "mean":
        return format(statistics.fmean(values), fmt)
    if show == "range":
        low, high = format(min(values), fmt), format(max(values), fmt)
        return low if low == high else f"{low}-{high}"
    raise ValueError(f"unknown show={show!r}")


def acc(spec: str, setting: str, *, of: str = "best-val", seeds: str = "1,2,3", show: str = "mean",
        fmt: str = ".2f") -> str:
    """One method's accuracy (``of``) at a setting over ``seeds``, e.g. ``acc l2b sym40 show=each``."""
    return summarise([measure(r, of) for r in pick(spec, setting, seeds).values()], show, fmt)


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


def runs(*, device: str | None = None, folder: str | None = None) -> str:
    """How many committed runs (on ``device``: cuda or cpu; under ``folder``). The first diagnosis runs
    record ``device: auto``, which resolved to the CPU of the CPU-only machine they ran on."""
    where = lambda r: "cuda" if r.config.get("device") == "cuda" else "cpu"  # noqa: E731
    return str(sum(1 for r in all_runs() if (device is None or where(r) == device)
                   and (folder is None or (RESULTS / folder) in r.path.parents)))


def config(key: str, *, file: str = "configs/fashion-mnist-sym40.yaml", fmt: str = "") -> str:
    """A setting of a committed config file (the budget's by default), or l2b's default where the file
    leaves it out, e.g. ``config subset fmt=,``."""
    settings = yaml.safe_load((ROOT / file).read_text())
    return format(settings[key] if key in settings else getattr(l2b.Config(), key), fmt)


def labels(run: str, key: str, *, fmt: str = ".3f") -> str:
    """What ``l2b labels`` reports for a committed run folder (its ``per_sample.csv.gz``) against the truly
    flipped labels: ``auroc``, ``precision``, ``recall``, ``num_samples``, or one piece of evidence's own
    AUROC, ``auroc:NAME`` (``label_issues_eval.json``'s ``auroc_by_evidence``)."""
    with tempfile.TemporaryDirectory() as tmp:  # l2b labels writes its tables next to the records, not here
        with gzip.open(RESULTS / run / "per_sample.csv.gz") as src, open(Path(tmp) / "per_sample.csv", "wb") as dst:
            shutil.copyfileobj(src, dst)
        result = label_issues_for_run(tmp)[1]
    return format(result["auroc_by_evidence"][key[6:]] if key.startswith("auroc:") else result[key], fmt)


def bench(file: str, method: str, *, field: str = "seconds", ratio_to: str | None = None, fmt: str = ".2f") -> str:
    """A figure of a committed ``l2b bench --json`` file: ``field`` (seconds or images_per_second) of one
    method, or its ratio to ``ratio_to``'s."""
    data = json.loads((RESULTS / file).read_text())[field]
    return format(data[method] / data[ratio_to] if ratio_to else data[method], fmt)


VALUES = {f.__name__: f for f in (acc, diff, runs, config, labels, bench)}


def value(expr: str) -> str:
    """Evaluate the expression of one value span, ``FUNC ARG ... key=val ...``."""
    func, *tokens = expr.split()
    if func not in VALUES:
        raise SystemExit(f"unknown value function {func!r} in {expr!r}; known: {', '.join(VALUES)}")
    args = [t for t in tokens if t.split("=")[0] not in _KEYWORDS]
    kwargs = dict(t.split("=", 1) for t in tokens if t.split("=")[0] in _KEYWORDS)
    return VALUES[func](*args, **kwargs)


# keyword arguments of the value functions (a positional RUN such as ``l2b,epochs=80`` holds "=" too)
_KEYWORDS = {"field", "per", "of", "seeds", "show", "fmt", "setting_b", "device", "folder", "file", "per", "ratio_to"}
