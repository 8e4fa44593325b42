"""What each `l2b` subcommand does with its parsed arguments; ``l2b.cli.main`` dispatches to them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..config import Config, load_yaml, make_config
from ..errors import L2BError
from ..parallel import launched
from ..runfiles import claim_output
from .parser import SWEPT


def train_command(args, argv: list[str]) -> int:
    from ..train import train
    from ..train.distributed import finish, launch, strip_nproc, teardown

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    if args.resume_anyway and not args.resume:
        raise L2BError("--resume-anyway goes with --resume RUN_DIR")
    if args.resume:
        if flags or args.config:
            raise L2BError("--resume continues a run with its saved config; give no other training options")
        saved = Path(args.resume) / "config.yaml"
        nproc = int((load_yaml(str(saved)) if saved.is_file() else {}).get("nproc", 1) or 1)
        if nproc > 1 and not launched():  # a data-parallel run resumes with as many processes
            return launch(nproc, argv)
        try:
            summary = train(None, resume=args.resume, progress=not args.quiet, resume_anyway=args.resume_anyway)
            finish()
        finally:
            teardown()
    else:
        values = load_yaml(args.config) if args.config else {}
        values.update(flags)
        cfg = make_config(values, source=args.config or "command line")
        if cfg.nproc > 1 and not launched():
            return launch(cfg.nproc, strip_nproc(argv))  # K copies of this command, under torchrun
        try:
            summary = train(cfg, progress=not args.quiet)
            finish()
        finally:
            teardown()
    if summary is not None:  # None on ranks other than 0
        print(format_summary(summary))
    return 0


def _split(text: str | None, kind, flag: str) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise L2BError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if not values:
        raise L2BError(f"{flag} is empty")
    return values


def sweep_command(args) -> int:
    from ..apps.sweep import plan_sweep, run_sweep

    values = load_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if f.name not in SWEPT and getattr(args, f.name, None) is not None})
    base = make_config({k: v for k, v in values.items() if k != "out"}, source=args.config or "command line")
    out = Path(args.out or Path("sweeps") / (Path(args.config).stem if args.config else "default"))
    cells = plan_sweep({k: v for k, v in values.items() if k != "out"},
                       methods=_split(args.methods, str, "--methods") or [base.method],
                       noise_rates=_split(args.noise_rates, float, "--noise-rates") or [base.noise_rate],
                       seeds=_split(args.seeds, int, "--seeds") or [base.seed], out=out)
    print(f"l2b sweep: {len(cells)} runs in {out}")
    run_sweep(cells, progress=not args.quiet, echo=print)
    width = max(len(c.name) for c in cells)
    for c in cells:
        print(f"  {c.name:<{width}}  {c.status:<8} {c.detail}")
    bad = [c for c in cells if c.status in ("failed", "stale")]
    print(f"{len(cells) - len(bad)} of {len(cells)} runs finished; tables and plots: l2b report {out}")
    return 1 if bad else 0


def report_command(args) -> int:
    from ..apps.report import write_report

    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    if Path(out).is_dir():
        claim_output(Path(out) / "report.md", overwrite=args.overwrite)
    result = write_report(args.runs, out, plots=not args.no_plots)
    print(f"l2b report: {result['runs']} runs, {len(result['rows'])} table rows")
    for f in result["files"]:
        print(f"  wrote {f}")
    for name, why in result["skipped_plots"].items():
        print(f"  no {name}: {why}")
    return 0


def format_summary(s: dict) -> str:
    if s["noise_rate"] is None:  # the labels as given (or given noisy labels): no rate was asked for
        noise = s["noise"] if s["noise_rate_actual"] is None else f"{s['noise']} (actual {100 * s['noise_rate_actual']:.1f}%)"
    else:
        rate = "unknown" if s["noise_rate_actual"] is None else f"{100 * s['noise_rate_actual']:.1f}%"
        noise = f"{s['noise']} {100 * s['noise_rate']:.0f}% (actual {rate})"
    return "\n".join([
        f"l2b train: {s['method']} on {s['dataset']}, noise {noise}, {s['epochs']} epochs, seed {s['seed']}",
        f"  test accuracy, last epoch           {_pct(s['test_acc_last'])}",
        f"  test accuracy, best clean-val epoch {_pct(s['test_acc_best_val'])}  (epoch {s['best_val_epoch']})"
        + (f"; {s['method']} trains on the clean set, so this selects nothing: use the last epoch"
           if s.get("val_is_train") else ""),
        f"  test accuracy, max over epochs      {_pct(s['test_acc_max'])}  (selected on the test set: paper-comparable only)",
        f"  training time                       {s['train_seconds']:.1f} s",
        f"  run folder                          {s['run_dir']}",
    ])


def data_command(args) -> int:
    if args.data_command != "check":
        raise L2BError("choose a data command: l2b data check")
    from ..data.prepare import data_check, format_data_check

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    values = load_yaml(args.config) if args.config else {}
    values.update(flags)
    result = data_check(make_config(values, source=args.config or "command line"))
    print(json.dumps(result, indent=1) if args.json else format_data_check(result))
    return 0


def labels_command(args) -> int:
    if args.cv_epochs is not None and args.cv_epochs < 1:
        raise L2BError(f"--cv-epochs must be at least 1, got {args.cv_epochs}")
    if args.compare_cleanlab:
        from ..apps.label_compare import label_issues_with_cleanlab

        report = label_issues_with_cleanlab(args.run_dir, compare=tuple(args.cv_model), threshold=args.threshold,
                                            folds=args.cv_folds, cv_epochs=args.cv_epochs, device=args.device)
    else:
        from ..apps.labels import label_issues_for_run

        report = label_issues_for_run(args.run_dir, threshold=args.threshold)
    n = len(report.issues["index"])
    print(f"l2b labels: {report.rows[0]['flagged']} of {n} labels flagged in this {report.method} run ({report.rule}); "
          f"written to {report.files[0]} and {report.files[1].name}")
    if report.warning:
        print(f"l2b: warning: {report.warning}", file=sys.stderr)
    width = max(len(r["name"]) for r in report.rows)
    if not report.truth_known:  # nothing to score against: counts only
        if len(report.rows) > 1:
            print(f"  {'':{width}s} {'flagged':>8s} {'seconds':>8s}")
            for r in report.rows:
                print(f"  {r['name']:{width}s} {r['flagged']:8d} {_num(r['seconds'], 1):>8s}")
        return 0
    print(f"  against the truly wrong labels ({report.rows[0]['flipped']} of {n}):")
    print(f"  {'':{width}s} {'flagged':>8s} {'precision':>10s} {'recall':>7s} {'F1':>6s} {'AUROC':>6s} {'seconds':>8s}")
    for r in report.rows:
        print(f"  {r['name']:{width}s} {r['flagged']:8d} {_num(r['precision']):>10s} {_num(r['recall']):>7s} "
              f"{_num(r['f1']):>6s} {_num(r['auroc']):>6s} {_num(r['seconds'], 1):>8s}")
    return 0


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def predict_command(args, evaluate: bool) -> int:
    from ..apps.predict import load_run_model, new_output_path, prediction_table, resolve_checkpoint
    from ..data.user import read_inputs
    from ..runfiles import write_table

    if args.batch_size < 1:
        raise L2BError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_dir, _ = resolve_checkpoint(args.checkpoint)
    if evaluate:
        return _evaluate(args, run_dir)
    out = new_output_path(args.out, run_dir / "predictions.csv", (".csv",), "--out")
    rm = load_run_model(args.checkpoint, args.device)
    data = read_inputs(args.data, rm.classes, rm.input_shape[-1] if len(rm.input_shape) == 3 else None)
    probs = rm.predict_proba(data.x, args.batch_size)
    write_table(prediction_table(probs, rm.classes, data.paths), out)
    print(f"l2b predict: {len(probs)} rows written to {out}\n  model: {rm.checkpoint}")
    return 0


def _evaluate(args, run_dir: Path) -> int:
    """`l2b eval`: the test split of --data (or of the run's own data set) -> eval.json (and a plot)."""
    from ..apps.predict import classification_report, load_run_model, new_output_path, plot_confusion
    from ..data.sources import load_dataset
    from ..data.user import read_inputs

    out = new_output_path(args.out, run_dir / "eval.json", (".json",), "--out")
    plot = new_output_path(args.plot, run_dir / "confusion_matrix.png", (".png",), "--plot") if args.plot else None
    rm = load_run_model(args.checkpoint, args.device)
    cfg = make_config(load_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    if args.data is None or args.data == cfg.dataset:  # the run's own split, exactly as training made it
        data = load_dataset(cfg)
        x, y, spec = data.x_test, data.y_test, f"{cfg.dataset} (test split)"
    else:
        arrays = read_inputs(args.data, rm.classes, rm.input_shape[-1] if len(rm.input_shape) == 3 else None,
                             split="test")
        x, y, spec = arrays.x, arrays.y, args.data
        if y is None:
            raise L2BError(f"--data {args.data} has no labels (npz: y or y_test; folder: one sub-folder per class "
                           "named as the run's classes; csv: rows path,label); `l2b eval` needs them")
    if len(y) == 0:
        raise L2BError(f"--data {spec}: the test split is empty")
    if len(y) != len(x) or y.min() < 0 or y.max() >= rm.num_classes:
        raise L2BError(f"--data {spec}: labels must be {len(x)} integers in [0, {rm.num_classes})")
    pred = rm.predict_proba(x, args.batch_size).argmax(1)
    report = classification_report(np.asarray(y), pred, rm.classes)
    report.update({"checkpoint": rm.checkpoint, "data": spec, "split": "test"})
    out.write_text(json.dumps(report, indent=1))
    print(f"l2b eval: accuracy {100 * report['accuracy']:.2f}% on {len(pred)} samples of {spec}, macro F1 "
          f"{report['macro_f1']:.3f}\n  model: {rm.checkpoint}\n  written to {out}")
    if plot is not None:
        if plot_confusion(np.asarray(report["confusion_matrix"]), rm.classes, plot):
            print(f"  confusion matrix plot: {plot}")
        else:
            print("  no plot: matplotlib is not installed")
    return 0


def _pct(v) -> str:
    return "   n/a " if v is None else f"{v:6.2f}%"


def bench_command(args) -> int:
    from ..apps import bench

    if args.bench_command == "data" and args.stream:
        result = bench.bench_stream(image_sizes=_split(args.image_sizes, int, "--image-sizes"),
                                    num_images=args.num_images, workers=_split(args.workers, int, "--workers"),
                                    batch_size=args.batch_size or 64, val_batch_size=args.val_batch_size,
                                    model=args.model, repeats=args.repeats)
        print(json.dumps(result, indent=1) if args.json else bench.format_stream_table(result))
        return 0
    if args.bench_command == "data":
        result = bench.bench_data(data_dir=args.data_dir, subset=args.subset, batch_size=args.batch_size or 128,
                                  model=args.model, device=args.device, repeats=args.repeats)
        print(json.dumps(result, indent=1) if args.json else bench.format_data_table(result))
        return 0
    if args.bench_command not in ("step", "epoch", "weights", "ddp"):
        raise L2BError("choose a benchmark: l2b bench step | epoch | weights | data | ddp")

    try:
        shape = tuple(int(v) for v in args.image_shape.split(","))
        assert len(shape) == 3
    except (ValueError, AssertionError):
        raise L2BError(f"--image-shape must be C,H,W, got {args.image_shape!r}") from None
    if args.bench_command == "ddp":
        result = bench.bench_ddp(model=args.model, nproc=args.nproc, batch_size=args.batch_size,
                                 val_batch_size=args.val_batch_size, image_shape=shape, steps=args.steps,
                                 check_compile=args.compile)
        print(json.dumps(result, indent=1) if args.json else bench.format_ddp_table(result))
        return 0
    common = dict(model=args.model, batch_size=args.batch_size, val_batch_size=args.val_batch_size,
                  image_shape=shape, device=args.device, amp=args.amp)
    if args.bench_command == "step":
        result = bench.bench_step(**common, steps=args.steps, channels_last=args.channels_last,
                                  reference=not args.no_reference, peer=args.peer, memory=args.memory)
        table = bench.format_step_table
    elif args.bench_command == "epoch":
        result = bench.bench_epoch(**common, num_images=args.num_images, channels_last=args.channels_last,
                                   methods=tuple(m for m in args.methods.split(",") if m), augment=args.augment,
                                   repeats=args.repeats)
        table = bench.format_epoch_table
    else:
        result = bench.bench_weights(**common)
        table = bench.format_weights_table
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0
