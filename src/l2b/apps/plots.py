"""The report's figures (matplotlib, optional). Each ``draw(plt, runs, path)`` writes one PNG and returns
None, or returns why it could not be drawn from these runs."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np

WEIGHT_KEYS = ("alpha_clean", "alpha_flipped", "beta_clean", "beta_flipped")
# the trainer's per-epoch AUROC of each score for "flipped" (l2b.train.outputs.weight_aurocs), and its legend
AUROC_KEYS = {"auroc_alpha": "alpha", "auroc_beta": "beta", "auroc_alpha_plus_beta": "alpha + beta",
              "auroc_beta_minus_alpha": "beta - alpha"}


def _curve(runs, key):
    """Mean and std over runs of metrics[key] per epoch, on the epochs every run has; (epochs, mean, std)."""
    length = min(len(r.metrics) for r in runs)
    vals = np.array([[np.nan if m.get(key) is None else m[key] for m in r.metrics[:length]] for r in runs], float)
    epochs = np.array([m["epoch"] for m in runs[0].metrics[:length]])
    with warnings.catch_warnings():  # epochs without a value (warm-up has no weights) stay NaN: not drawn
        warnings.simplefilter("ignore", RuntimeWarning)
        return epochs, np.nanmean(vals, 0), np.nanstd(vals, 0)


def _grid(plt, n):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def fig2_test_acc(plt, runs, path):
    """Test accuracy per epoch per method (paper Fig. 2), one panel per data set / noise / rate."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.metrics:
            panels[(*r.group, (r.summary["noise_rate"] or 0.0))][r.label].append(r)
    if not panels:
        return "no metrics.jsonl in the runs"
    fig, axes = _grid(plt, len(panels))
    for ax, ((dataset, noise, rate), by_label) in zip(axes, sorted(panels.items())):
        for label, rs in sorted(by_label.items()):
            ep, mean, std = _curve(rs, "test_acc")
            ax.plot(ep, mean, label=f"{label} (n={len(rs)})")
            ax.fill_between(ep, mean - std, mean + std, alpha=0.2)
        ax.set(title=f"{dataset}, {noise} {100 * rate:g}%", xlabel="epoch", ylabel="test accuracy (%)")
        ax.legend(fontsize=7)
    _save(fig, path)


def fig3_normalize(plt, runs, path):
    """Normalisations compared (paper Fig. 3): test accuracy (best clean-val epoch) vs noise rate, one
    line per method and normalisation, for methods whose runs differ in ``normalize``."""
    per_method = defaultdict(set)
    for r in runs:
        per_method[(r.group, r.summary["method"])].add(r.config.get("normalize"))
    chosen = {k for k, v in per_method.items() if len(v) > 1}
    if not chosen:
        return "no method has runs that differ in `normalize` (run e.g. l2b with --normalize softmax too)"
    groups = sorted({g for g, _ in chosen})
    fig, axes = _grid(plt, len(groups))
    for ax, group in zip(axes, groups):
        lines = defaultdict(lambda: defaultdict(list))
        for r in runs:
            if (r.group, r.summary["method"]) in chosen:
                lines[(r.summary["method"], r.config.get("normalize"))][(r.summary["noise_rate"] or 0.0)].append(
                    r.summary["test_acc_best_val"])
        for (method, norm), by_rate in sorted(lines.items()):
            rates = sorted(by_rate)
            ax.errorbar([100 * x for x in rates], [np.mean(by_rate[x]) for x in rates],
                        yerr=[np.std(by_rate[x]) for x in rates], marker="o", capsize=3, label=f"{method}, {norm}")
        ax.set(title=f"{group[0]}, {group[1]} noise", xlabel="noise rate (%)",
               ylabel="test acc. at best clean-val epoch (%)")
        ax.legend(fontsize=7)
    _save(fig, path)


def _panels_of(runs, key: str, most: int = 12) -> dict[tuple, list]:
    """The runs that logged ``key`` per epoch, by (label, data set, noise, rate): the first ``most`` panels."""
    panels = defaultdict(list)
    for r in runs:
        if any(m.get(key) is not None for m in r.metrics):
            panels[(r.label, *r.group, (r.summary["noise_rate"] or 0.0))].append(r)
    return {k: panels[k] for k in sorted(panels)[:most]}


def fig4_weights(plt, runs, path):
    """Mean alpha and beta of clean vs flipped samples per epoch (paper Fig. 4), per meta method and setting.

    Weights are in units of an average sample's share (1 = 1/n of the batch)."""
    panels = _panels_of(runs, "alpha_clean")
    if not panels:
        return "no run logged alpha/beta of clean vs flipped samples (meta methods on data with known noise)"
    fig, axes = _grid(plt, len(panels))
    for ax, (key, rs) in zip(axes, panels.items()):
        for name, style in zip(WEIGHT_KEYS, ("-", "--", "-", "--")):
            ep, mean, _ = _curve(rs, name)
            if not np.all(np.isnan(mean)):
                ax.plot(ep, mean, style, label=name)
        label, dataset, noise, rate = key
        ax.set(title=f"{label}: {dataset}, {noise} {100 * rate:g}%", xlabel="epoch", ylabel="mean weight x n")
        ax.legend(fontsize=7)
    _save(fig, path)


def fig4_auroc(plt, runs, path):
    """AUROC per epoch of alpha, beta, alpha + beta and beta - alpha as scores for "flipped", per meta
    method and setting (mean over runs): how well the weights single out the flipped samples.

    0.5 = no signal; alpha works as intended below 0.5 (flipped samples get less), beta - alpha above."""
    panels = _panels_of(runs, "auroc_alpha")
    if not panels:
        return "no run logged the weights' AUROC (meta methods on data with known noise, logged since it was added)"
    fig, axes = _grid(plt, len(panels))
    for ax, (key, rs) in zip(axes, panels.items()):
        for name, legend in AUROC_KEYS.items():
            ep, mean, _ = _curve(rs, name)
            if not np.all(np.isnan(mean)):
                ax.plot(ep, mean, marker=".", label=legend)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        label, dataset, noise, rate = key
        ax.set(title=f"{label}: {dataset}, {noise} {100 * rate:g}% (n={len(rs)})", xlabel="epoch",
               ylabel="AUROC for flipped", ylim=(0, 1))
        ax.legend(fontsize=7)
    _save(fig, path)


def table9_time(plt, runs, path):
    """Wall-clock seconds per training epoch per method (paper Table 9), mean over all its epochs and runs."""
    secs = defaultdict(list)
    for r in runs:
        secs[r.label] += [m["seconds"] for m in r.metrics if "seconds" in m]
    secs = {k: v for k, v in secs.items() if v}
    if not secs:
        return "no per-epoch 'seconds' in the runs' metrics"
    labels = sorted(secs, key=lambda k: np.mean(secs[k]))
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(labels) + 1.2))
    ax.barh(labels, [np.mean(secs[k]) for k in labels], xerr=[np.std(secs[k]) for k in labels], capsize=3)
    ax.set(xlabel="seconds per epoch (training + evaluation)", title="time per epoch")
    _save(fig, path)


PLOTS = {"fig2_test_acc": fig2_test_acc, "fig3_normalize": fig3_normalize, "fig4_weights": fig4_weights,
         "fig4_auroc": fig4_auroc, "table9_time": table9_time}
