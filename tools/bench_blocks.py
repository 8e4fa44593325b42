"""Regenerate the benchmark blocks of README.md and docs/SCALING.md from the committed benchmark JSON.

    python tools/bench_blocks.py            # rewrite the generated blocks
    python tools/bench_blocks.py --check    # exit 1 if a block differs from benchmarks/*.json

Each block sits between `<!-- bench:NAME -->` and `<!-- /bench -->` and is replaced whole; the JSON
files are the `--json` output of the `l2b bench` command named in each block.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from blocks import replace_blocks, write_updated

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "SCALING.md")
BENCH = ROOT / "benchmarks"
GPU_STEP_SECONDS = (0.05, 0.2)  # step times to size the workers for (a GPU's; none was measured here)


def stream_block(r: dict) -> str:
    """`l2b bench data --stream`: decode rates, wait shares, and the workers that keep up with the step."""
    per_step = r["batch_size"] + r["val_batch_size"]
    lines = [f"`l2b bench data --stream` ({r['num_images']} generated JPEGs per size, {r['format']}; CPU, "
             f"{r['cores']} cores shared with other jobs; {r['threads']} thread for the step; "
             f"{r['method']} step of `{r['model']}`, n={r['batch_size']} + m={r['val_batch_size']} images per step):",
             "",
             "| image size | workers | images/s decoded | per worker | share of the step waiting for data |",
             "|---|---|---|---|---|"]
    for size, s in r["sizes"].items():
        for w in map(str, r["workers"]):
            lines.append(f"| {size}x{size} | {w} | {s['images_per_second'][w]:.0f} | "
                         f"{s['images_per_second_per_worker'][w]:.0f} | {100 * s['wait_share'][w]:.0f}% |")
    lines.append("")
    for size, s in r["sizes"].items():
        per_worker = s["images_per_second_per_worker"]
        one = per_worker.get("1") or per_worker[str(max(r["workers"]))]
        need = {t: math.ceil(per_step / (one * t)) for t in GPU_STEP_SECONDS}
        lines.append(f"- {size}x{size}: this CPU step computes in {s['step_compute_seconds']:.1f} s, so "
                     f"{s['workers_to_keep_up']} worker keeps up with it. At one worker's {one:.0f} images/s, a "
                     f"step of the same {per_step} images that computes in "
                     + " or ".join(f"{1000 * t:.0f} ms needs {n} worker{'s' if n > 1 else ''}" for t, n in need.items())
                     + " to decode them in no more time than it computes (fewer where a worker has a core of its "
                     "own: these rates are from a shared machine).")
    return "\n".join(lines)


def ddp_block(r: dict) -> str:
    """`l2b bench ddp --compile`: the fused/unfused ratio and whether torch.compile takes the fused forward."""
    lines = [f"`l2b bench ddp --compile` ({r['nproc']} {r['backend']} ranks on the CPU, {r['threads_per_rank']} "
             f"thread each; `{r['model']}`, global n={r['batch_size']}, m={r['val_batch_size']}, input "
             f"{'x'.join(map(str, r['image_shape']))}; torch {r['torch']}): the fused step takes "
             f"**{r['fused_over_unfused']:.2f}x** the time of the unfused one (median of {r['steps']} paired "
             f"ratios; medians {1000 * r['seconds']['fused']:.0f} ms fused, {1000 * r['seconds']['unfused']:.0f} ms "
             "unfused)."]
    if "compile" in r["fused_checks"]:
        lines.append(f"The fused forward through `torch.compile`: {r['fused_checks']['compile']}")
    return "\n".join(lines)


STEP_COLUMNS = (("ce", "CE"), ("peer_higher", "published recipe (`higher`)"),
                ("reference_double_backward", "double-backward reference"), ("l2b_exact", "**L2B exact, fused (trainer)**"),
                ("l2b_exact_generic", "fused, generic tangent rules"), ("l2b_unfused", "unfused"),
                ("l2b_fd", "L2B fd (approximate)"))
# issue targets of the exact step on the CPU: (model, times CE, times the published recipe or None)
STEP_TARGETS = {"small-cnn": (2.5, 0.5), "preact-resnet18": (2.4, None)}


def step_block(results: list[dict]) -> str:
    """`l2b bench step --peer higher --memory`: each kind's paired ratio to CE, the floor, the memory peaks."""
    r0 = results[0]
    lines = [f"`l2b bench step --peer higher --memory` (CPU, {r0['threads']} threads, random inputs, "
             f"{r0['steps']} interleaved rounds; each entry is the median of the per-round ratios to the CE step "
             "of the same round):", "",
             "| model, batch | " + " | ".join(label for _, label in STEP_COLUMNS) + " | floor of an exact step |",
             "|---|" + "---|" * (len(STEP_COLUMNS) + 1)]
    for r in results:
        cells = [f"{r['ratio_to_ce'][k]:.2f}" if k in r["ratio_to_ce"] else "—" for k, _ in STEP_COLUMNS]
        lines.append(f"| {r['model']}, n={r['batch_size']}, m={r['val_batch_size']} | " + " | ".join(cells)
                     + f" | {r['floor_ratio_to_ce']:.2f} |")
    lines += ["", "Peak memory of one step (MiB, each kind in a fresh process; resident set on the CPU):", "",
              "| model, batch | " + " | ".join(label for _, label in STEP_COLUMNS) + " |",
              "|---|" + "---|" * len(STEP_COLUMNS)]
    for r in results:
        mem = r.get("peak_memory_mib") or {}
        cells = [f"{mem[k]:.0f}" if mem.get(k) is not None else "—" for k, _ in STEP_COLUMNS]
        lines.append(f"| {r['model']}, n={r['batch_size']}, m={r['val_batch_size']} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        ratio, target = r["ratio_to_ce"]["l2b_exact"], STEP_TARGETS.get(r["model"])
        text = (f"- {r['model']}: the exact step is {ratio:.2f}x CE and {r['exact_over_floor']:.2f}x its floor; "
                f"{r['l2b_over_peer']:.2f}x the published recipe's step" if "l2b_over_peer" in r else
                f"- {r['model']}: the exact step is {ratio:.2f}x CE and {r['exact_over_floor']:.2f}x its floor")
        if target:
            met = ratio <= target[0] and (target[1] is None or r.get("l2b_over_peer", math.inf) <= target[1])
            goal = f"<= {target[0]}x CE" + (f" and <= {target[1]}x the published recipe" if target[1] else "")
            text += f". Target {goal}: {'met' if met else 'not met'}."
        else:
            text += "."
        lines.append(text)
    return "\n".join(lines)


def render() -> dict[str, str]:
    blocks = {}
    for name, fn, file in (("stream", stream_block, "stream_cpu.json"), ("ddp", ddp_block, "ddp_cpu.json")):
        path = BENCH / file
        if path.is_file():
            blocks[name] = fn(json.loads(path.read_text()))
    steps = [json.loads(p.read_text()) for p in sorted(BENCH.glob("step_cpu_*.json"))]
    if steps:
        blocks["step"] = step_block(sorted(steps, key=lambda r: r["model"] != "small-cnn"))
    return blocks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    args = parser.parse_args(argv)
    blocks = render()
    updated, stale, seen = replace_blocks(DOCS, "bench", blocks)
    unused = sorted(set(blocks) - seen)
    if args.check:
        if stale or unused:
            print("stale blocks: " + ", ".join(stale) + ("; no block shows: " + ", ".join(unused) if unused else ""))
            return 1
        print("every benchmark block matches benchmarks/*.json")
        return 0
    return write_updated(updated, stale, "block(s)")


if __name__ == "__main__":
    sys.exit(main())
