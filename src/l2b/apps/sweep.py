"""`l2b sweep`: a grid of runs (method x noise rate x seed), one run folder each, resumable.

Cells run one after another in this process through the one trainer. A cell whose folder holds a
``summary.json`` is finished and skipped; one with a checkpoint (or, stopped before its first one,
its config.yaml) is resumed; a failing cell is reported (its folder gets an ``error.txt``) and the
others continue. SIGINT/SIGTERM stop the sweep: the running cell writes a checkpoint, and
:class:`l2b.errors.Interrupted` (exit 130/143) ends the sweep; a rerun resumes that cell. Each cell
says when it starts and ends (k of N, its result, the time left at the mean pace of the cells trained
so far).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..config import Config, make_config
from ..errors import Interrupted, L2BError
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


class _StopBetweenCells:
    """SIGINT/SIGTERM outside a cell's training loop (set-up, data loading) stop the sweep too.

    Inside the loop the trainer's own handlers take over and checkpoint first."""

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @staticmethod
    def _handle(signum, frame):
        raise Interrupted("sweep stopped by signal between checkpoints; rerun the same command to continue",
                          130 if signum == signal.SIGINT else 143)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_sweep(cells: list[Cell], *, progress: bool = False, echo: Callable[[str], None] | None = None) -> list[Cell]:
    """Run the cells in order; never raises for one cell's failure (see each cell's status).

    A signal (SIGINT/SIGTERM) is not a failure: the cell is marked ``stopped`` and
    :class:`l2b.errors.Interrupted` propagates, ending the sweep (a rerun resumes the cell).
    ``echo`` (e.g. ``print``; default: the log) gets a line ``[k/N] name: ...`` as a cell starts, with
    the runs to go and their estimated time, and one as it ends, with its status, time and result.
    """
    say = echo or log.info
    durations: list[float] = []  # seconds of the cells trained (or resumed) so far
    with _StopBetweenCells():
        for i, cell in enumerate(cells, 1):
            tag, run_dir = f"[{i}/{len(cells)}] {cell.name}", Path(cell.cfg.out)
            if (run_dir / "summary.json").is_file():
                _run_cell(cell, progress)
                say(f"{tag}: already finished, {_result(run_dir)}" if cell.status == "skipped"
                    else f"{tag}: {cell.status}, {cell.detail}")
                continue
            say(f"{tag}: started{_eta(cells[i - 1:], durations)}")
            t0 = time.perf_counter()
            _run_cell(cell, progress)
            seconds = time.perf_counter() - t0
            if cell.status in ("done", "resumed"):
                durations.append(seconds)
            result = _result(run_dir) if cell.status in ("done", "resumed") else cell.detail
            say(f"{tag}: {cell.status} in {_duration(seconds)}, {result}{_eta(cells[i:], durations)}")
    return cells


def _result(run_dir: Path) -> str:
    """A finished cell's result in words, from its summary.json."""
    s = json.loads((run_dir / "summary.json").read_text())
    pct = lambda v: "n/a" if v is None else f"{v:.2f}%"  # noqa: E731
    return (f"test accuracy {pct(s['test_acc_last'])} at the last epoch, {pct(s['test_acc_best_val'])} at the best "
            f"clean-val epoch ({s['best_val_epoch']})")


def _eta(rest: list[Cell], durations: list[float]) -> str:
    """'; N runs to go, about T': the cells of ``rest`` without a summary, at the mean pace so far."""
    left = sum(not (Path(c.cfg.out) / "summary.json").is_file() for c in rest)
    if not left:
        return ""
    pace = f", about {_duration(left * sum(durations) / len(durations))}" if durations else ""
    return f"; {left} run{'s' if left > 1 else ''} to go{pace}"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _run_cell(cell: Cell, progress: bool) -> None:
    run_dir = Path(cell.cfg.out)
    try:
        if (run_dir / "summary.json").is_file():
            _check_same_config(run_dir, cell.cfg)
            cell.status = "skipped"
        elif (run_dir / "checkpoint.pt").is_file() or (run_dir / "config.yaml").is_file():
            _check_same_config(run_dir, cell.cfg)  # interrupted, or killed before its first checkpoint
            train(None, resume=run_dir, progress=progress)
            cell.status = "resumed"
        elif run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
            why = "see its error.txt" if (run_dir / "error.txt").is_file() else "not a run folder of this sweep"
            cell.status, cell.detail = "stale", (f"{run_dir} exists without summary.json, checkpoint.pt or "
                                                 f"config.yaml ({why}); delete it to rerun this cell")
        else:
            train(cell.cfg, progress=progress)
            cell.status = "done"
    except Interrupted:
        cell.status = "stopped"
        raise
    except Exception as exc:  # one broken cell must not stop the sweep  # noqa: BLE001
        cell.status, cell.detail = "failed", f"{type(exc).__name__}: {exc}"
        log.warning("%s failed: %s", cell.name, cell.detail)
        if run_dir.is_dir():
            try:
                (run_dir / "error.txt").write_text(traceback.format_exc())
                cell.detail += f" (traceback in {run_dir / 'error.txt'})"
            except OSError:
                pass


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    def same(old, new) -> bool:  # a number saved by an older version for an option now written as text
        if isinstance(new, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
            return f"{old:g}" == new
        return old == new

    # --log changes what is written beside the results, not the results
    differ = sorted(k for k, v in cfg.to_dict().items() if k in saved and k != "log" and not same(saved[k], v))
    if differ:
        raise L2BError(f"{run_dir} was run with other settings ({', '.join(differ)}); "
                       "use another --out or delete the folder")
