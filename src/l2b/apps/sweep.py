"""`l2b sweep`: a grid of runs (method x noise rate x seed), one run folder each, resumable.

Cells run one after another in this process through the one trainer. A cell whose folder holds a
``summary.json`` is finished and skipped; one with a checkpoint is resumed; a failing cell is
reported (its folder gets an ``error.txt``) and the others continue.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, make_config
from ..errors import L2BError
from ..methods import list_methods
from ..train import train

log = logging.getLogger(__name__)

__all__ = ["Cell", "plan_sweep", "run_sweep", "cell_name"]


@dataclass
class Cell:
    name: str
    cfg: Config
    status: str = "pending"  # done | skipped | resumed | failed | stale
    detail: str = ""


def cell_name(method: str, noise: str, noise_rate: float | None, seed: int) -> str:
    """Deterministic folder name, e.g. ``l2b-sym-r0.4-s1`` or ``ce-none-s0`` (``+`` becomes ``-``)."""
    rate = "" if noise_rate is None else f"-r{noise_rate:g}"
    return f"{method.replace('+', '-')}-{noise.replace(':', '-').replace('/', '-')}{rate}-s{seed}"


def plan_sweep(base: dict, *, methods: list[str], noise_rates: list[float], seeds: list[int], out: Path) -> list[Cell]:
    """Validate every cell's config up front (a typo fails before any training)."""
    for m in methods:
        if m not in list_methods():
            raise L2BError(f"--methods: unknown method {m!r}; choose from: {', '.join(list_methods())}")
    cells = []
    for method in methods:
        for rate in noise_rates:
            for seed in seeds:
                values = dict(base, method=method, noise_rate=rate, seed=seed)
                noise = make_config(values, source=f"sweep cell {method}, rate {rate}, seed {seed}").noise  # preset
                name = cell_name(method, noise, rate, seed)
                values["out"] = str(out / name)
                cells.append(Cell(name, make_config(values, source=f"sweep cell {name}")))
    return cells


def run_sweep(cells: list[Cell], *, progress: bool = False) -> list[Cell]:
    """Run the cells in order; never raises for one cell's failure (see each cell's status)."""
    for i, cell in enumerate(cells, 1):
        run_dir = Path(cell.cfg.out)
        log.info("[%d/%d] %s", i, len(cells), cell.name)
        try:
            if (run_dir / "summary.json").is_file():
                _check_same_config(run_dir, cell.cfg)
                cell.status = "skipped"
                continue
            if (run_dir / "checkpoint.pt").is_file():
                _check_same_config(run_dir, cell.cfg)
                train(None, resume=run_dir, progress=progress)
                cell.status = "resumed"
            elif run_dir.exists():
                cell.status, cell.detail = "stale", (f"{run_dir} exists without summary.json or checkpoint.pt "
                                                     "(see its error.txt); delete it to rerun this cell")
            else:
                train(cell.cfg, progress=progress)
                cell.status = "done"
        except Exception as exc:  # one broken cell must not stop the sweep  # noqa: BLE001
            cell.status, cell.detail = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("%s failed: %s", cell.name, cell.detail)
            if run_dir.is_dir():
                (run_dir / "error.txt").write_text(traceback.format_exc())
    return cells


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    differ = sorted(k for k, v in cfg.to_dict().items() if k in saved and saved[k] != v)
    if differ:
        raise L2BError(f"{run_dir} was run with other settings ({', '.join(differ)}); "
                       "use another --out or delete the folder")
