"""Choose among candidate settings by clean-validation accuracy only; the test set is never read.

    python tools/select_by_val.py --key bootstrap_beta --reference 0.95 sweeps/tune-bootstrap
    python tools/select_by_val.py --key warmup_epochs --key lr sweeps/recipe-a sweeps/recipe-b

A candidate is one value (or one tuple of values) of the ``--key`` config keys. Each run folder
(``config.yaml``, ``metrics.jsonl`` and ``summary.json``, as ``l2b train`` and ``l2b sweep`` write
them) is scored by its best clean-validation accuracy over the epochs, the accuracy at the epoch
the trainer's model selection picks. ``summary.json`` is only checked to exist (the run finished);
no test accuracy is read, so nothing printed here can leak the test set into a choice.

The comparison is paired and like with like, or it is refused: every candidate must have run the
same seeds, and the runs may differ in nothing but the candidate keys, the seed and the settings in
``IGNORED`` (where the run went and how it was evaluated or saved). Each candidate gets the mean and
sample std over seeds and its paired difference to the reference (``--reference``, the current
setting) or, without one, to the leader, with the 95% t-interval of that difference
(mean +- t(0.975, k - 1) s / sqrt(k) over k seeds). The leader is the highest mean (a tie that
includes the reference goes to the reference). With ``--reference`` the leader is chosen only if
its interval lies above zero; otherwise the reference is kept.
"""

from __future__ import annotations

import argparse
import json
import functools
import math
import statistics
import sys
from pathlib import Path

import yaml

# config keys that may differ between runs of one comparison: not part of the recipe
IGNORED = {"seed", "out", "device", "data_dir", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
           "workers", "on_nan"}


class SelectError(Exception):
    """A comparison that cannot be made as asked; reported as one line, exit status 2."""


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding config.yaml and metrics.jsonl) at or under ``paths``, sorted, no duplicates."""
    runs = set()
    for path in paths:
        if not path.is_dir():
            raise SelectError(f"{path} is not a folder")
        found = [p.parent for p in path.rglob("metrics.jsonl") if (p.parent / "config.yaml").is_file()]
        if not found:
            raise SelectError(f"no run folder (config.yaml + metrics.jsonl) under {path}")
        runs.update(found)
    return sorted(runs)


def best_val(run: Path) -> float:
    """The best clean-validation accuracy (percent) over the epochs of a finished run."""
    if not (run / "summary.json").is_file():
        raise SelectError(f"{run} has no summary.json: the run has not finished")
    accs = [rec.get("val_acc") for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    accs = [a for a in accs if a is not None]
    if not accs:
        raise SelectError(f"{run} has no clean-validation accuracy (val_size 0?): nothing to select on")
    return max(accs)


def _resolved(cfg: dict) -> dict:
    """A run's settings as they reach its model: ``val_batch_size: 0`` is the batch size (the recipe study's
    configs write 0, its first runs the number), and a method that never draws a clean batch (``ce``,
    bootstrapping: ``uses_meta_set``) has no clean batch size, whatever its config says."""
    if cfg.get("val_batch_size") == 0 and "batch_size" in cfg:
        cfg = {**cfg, "val_batch_size": cfg["batch_size"]}
    if "val_batch_size" in cfg and not _draws_clean_batches(cfg.get("method")):
        cfg = {k: v for k, v in cfg.items() if k != "val_batch_size"}
    return cfg


@functools.cache
def _draws_clean_batches(method: str | None) -> bool:
    from l2b import L2BError
    from l2b.methods import create_method

    if method is None:
        return True
    try:
        return create_method(method).uses_meta_set
    except L2BError:  # a method this install does not know (a plugin not loaded): compare every setting
        return True


def candidates(runs: list[Path], keys: list[str]) -> dict[tuple, dict[int, float]]:
    """{candidate values: {seed: best clean-val accuracy}}, after checking the runs are comparable."""
    configs = {run: _resolved(yaml.safe_load((run / "config.yaml").read_text())) for run in runs}
    for run, cfg in configs.items():
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise SelectError(f"{run}/config.yaml has no key {missing[0]!r}")
    shared = set().union(*configs.values()) - IGNORED - set(keys)
    first = runs[0]
    for run in runs[1:]:
        differ = sorted(k for k in shared if configs[run].get(k) != configs[first].get(k))
        if differ:
            k = differ[0]
            raise SelectError(f"{first} and {run} differ in {k!r} ({configs[first].get(k)!r} vs "
                              f"{configs[run].get(k)!r}), which is not a --key: not a like-with-like comparison")
    table: dict[tuple, dict[int, float]] = {}
    for run, cfg in configs.items():
        cand = tuple(cfg[k] for k in keys)
        seeds = table.setdefault(cand, {})
        if cfg["seed"] in seeds:
            raise SelectError(f"two runs of {_label(keys, cand)} with seed {cfg['seed']} (one is {run})")
        seeds[cfg["seed"]] = best_val(run)
    seed_sets = {cand: sorted(s) for cand, s in table.items()}
    ref = next(iter(seed_sets.values()))
    for cand, seeds in seed_sets.items():
        if seeds != ref:
            raise SelectError(f"{_label(keys, cand)} ran seeds {seeds}, another candidate {ref}: "
                              "the comparison must be paired (same seeds for every candidate)")
    return table


def _label(keys: list[str], cand: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, cand))


def _text(cand: tuple) -> str:
    return ",".join(str(v) for v in cand)


@functools.cache  # a pure function, asked for the same few degrees of freedom many times
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection on its CDF."""
    const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, steps: int = 4000) -> float:  # 0.5 + Simpson's rule of the density over [0, x]
        h = x / steps
        f = [math.exp(const - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_and_half_width(diffs: list[float]) -> tuple[float, float | None]:
    """Mean of paired differences and the half-width of its 95% t-interval (None under two)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def paired(scores: dict[int, float], ref: dict[int, float]) -> tuple[float, float | None]:
    """Mean paired difference (scores - ref, same seeds) and the half-width of its 95% t-interval."""
    return mean_and_half_width([scores[s] - ref[s] for s in scores])


def select(table: dict[tuple, dict[int, float]], reference: tuple | None = None) -> dict:
    """Rows (candidate, seeds, mean, sample std, paired difference to the reference or the leader, with
    the half-width of its 95% t-interval), the leader (highest mean) and the chosen candidate.

    Without a reference the leader is chosen. With one, the leader replaces the reference only if
    its paired difference to the reference has a 95% t-interval above zero.
    """
    cands = sorted(table, key=lambda c: (c != reference, _text(c)))  # the reference first
    means = {c: statistics.fmean(table[c].values()) for c in cands}
    top = max(means.values())
    tied = [c for c in cands if math.isclose(means[c], top, rel_tol=0, abs_tol=1e-9)]
    leader = tied[0]  # the reference wins a tie it is part of
    base = leader if reference is None else reference
    rows = []
    for c in cands:
        diff, half = paired(table[c], table[base])
        rows.append({"candidate": c, "seeds": sorted(table[c]), "mean": means[c],
                     "std": statistics.stdev(table[c].values()) if len(table[c]) > 1 else None,
                     "diff": diff, "half": half})
    chosen = leader
    if reference is not None and leader != reference:
        diff, half = paired(table[leader], table[reference])
        chosen = leader if half is not None and diff - half > 0 else reference
    return {"rows": rows, "leader": leader, "tied": tied, "chosen": chosen, "base": base}


def format_result(result: dict, keys: list[str]) -> str:
    base = _label(keys, result["base"])
    lines = [f"| {' | '.join(keys)} | seeds | best clean-val accuracy, mean | sample std | "
             f"paired difference to {base} (95% t-interval) |", "|" + "---|" * (len(keys) + 4)]
    for r in result["rows"]:
        std = "—" if r["std"] is None else f"{r['std']:.2f}"
        diff = f"{r['diff']:+.2f}" + ("" if r["half"] is None else f" ± {r['half']:.2f}")
        values = " | ".join(str(v) for v in r["candidate"])
        lines.append(f"| {values} | {','.join(map(str, r['seeds']))} | {r['mean']:.2f} | {std} | {diff} |")
    if len(result["tied"]) > 1:
        lines.append(f"tie on the mean between {'; '.join(_label(keys, c) for c in result['tied'])}")
    if result["chosen"] != result["leader"]:
        lines.append(f"the leader {_label(keys, result['leader'])} is not ahead of {base} beyond its 95% "
                     "t-interval: the reference is kept")
    lines.append(f"chosen by clean-validation accuracy: {_label(keys, result['chosen'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders containing them")
    parser.add_argument("--key", action="append", required=True,
                        help="config key whose values are the candidates (repeat for a combination)")
    parser.add_argument("--reference", help="the current setting (comma-separated values, one per --key, as "
                                            "config.yaml writes them): another candidate replaces it only if "
                                            "ahead beyond the 95%% t-interval of the paired difference")
    args = parser.parse_args(argv)
    try:
        table = candidates(find_runs(args.runs), args.key)
        if len(table) < 2:
            raise SelectError(f"only one candidate ({_label(args.key, next(iter(table)))}): nothing to choose")
        reference = None
        if args.reference is not None:
            reference = next((c for c in table if _text(c) == args.reference), None)
            if reference is None:
                raise SelectError(f"--reference {args.reference}: no such candidate; the candidates are "
                                  + "; ".join(_text(c) for c in sorted(table, key=_text)))
        print(format_result(select(table, reference), args.key))
    except (SelectError, yaml.YAMLError, json.JSONDecodeError) as exc:
        print(f"select_by_val: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
