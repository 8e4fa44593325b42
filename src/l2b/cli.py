"""The `l2b` command line. Every user-facing failure is one line `l2b: error: ...` and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

import numpy as np

from .config import Config, describe, load_yaml, make_config
from .errors import Interrupted, L2BError
from .models import list_models
from .parallel import is_rank_zero, launched, rank_prefix
from .runfiles import claim_output

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own usage dump is noise here)
        raise L2BError(f"{message} (see `{self.prog} --help`)")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per Config field, its help and valid values from the field's declaration (l2b.config.option)."""
    hints = typing.get_type_hints(Config)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        valid = describe(f)
        readers = f"; read by {', '.join(meta['methods'])}" if meta["methods"] else ""
        text = f"{meta['help']} ({valid + '; ' if valid else ''}default {'unset' if f.default is None else f.default}{readers})"
        text = text.replace("%", "%%")
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=_typed(base, flag), default=None, metavar=f.name.upper(), help=text)


def _typed(base: type, flag: str):
    """argparse type: a clear one-line error for a value that is not a number, and no NaN sneaking in as 'nan'."""
    def convert(text: str):
        try:
            return base(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(base, base.__name__)
            raise argparse.ArgumentTypeError(f"{flag} must be {kind}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="l2b", description="Learning to Bootstrap: training with noisy labels and a small clean set.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--plugin", action="append", metavar="MODULE", default=[],
                        help="import MODULE first (repeatable): its register_method/register_dataset/register_model "
                             "calls add methods, data sets and models (docs/EXTENDING.md)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (default: L2B on Fashion-MNIST with its benchmark preset, "
                                         "40%% symmetric noise)")
    train.add_argument("--config", metavar="FILE", help="YAML file with the same keys; flags override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--resume-anyway", action="store_true",
                       help="with --resume: use a checkpoint whose checksum or data fingerprint does not match "
                            "(altered file, changed data or noisy labels), knowingly")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_config_flags(train)

    sweep = sub.add_parser("sweep", help="a grid of runs (method x noise rate x seed), one run folder each, resumable")
    sweep.add_argument("--config", metavar="FILE", help="YAML file of the shared settings; flags override it")
    sweep.add_argument("--methods", help="comma-separated methods (default: the config's method)")
    sweep.add_argument("--noise-rates", help="comma-separated noise rates, e.g. 0.2,0.4 (default: the config's)")
    sweep.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3 (default: the config's seed)")
    sweep.add_argument("--out", metavar="DIR", help="folder of the run folders (default sweeps/<config name>)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    _add_config_flags(sweep, skip=_SWEPT)

    report = sub.add_parser("report", help="tables (Markdown, CSV) and plots from run folders")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders containing them")
    report.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/report for one RUN_DIR, else report)")
    report.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    labels = sub.add_parser("labels", help="rank a run's training labels by quality: RUN_DIR/label_issues.csv")
    labels.add_argument("run_dir", metavar="RUN_DIR")
    labels.add_argument("--threshold", type=float, default=None,
                        help="flag label_quality below this instead of the number of wrong labels the trusted "
                             "set estimates (without a trusted set the default is 0.5)")
    labels.add_argument("--compare-cleanlab", action="store_true",
                        help="also run cleanlab's find_label_issues on the same images and labels, with "
                             "out-of-sample probabilities by cross-validation (needs l2b[cleanlab])")
    labels.add_argument("--cv-model", nargs="+", default=["logreg"], metavar="MODEL",
                        help="models of the cross-validation: logreg (logistic regression on the pixels) and/or "
                             "model (the run's own architecture, plain CE) (default logreg)")
    labels.add_argument("--cv-folds", type=int, default=5, help="folds of the cross-validation (default 5)")
    labels.add_argument("--cv-epochs", type=int, default=None, help="epochs per fold of --cv-model model "
                                                                   "(default: the run's epochs)")
    labels.add_argument("--device", default=None, help="device of --cv-model model (default: the run's)")

    for name, text in (("predict", "class probabilities of a trained run on new data: predictions.csv"),
                       ("eval", "accuracy, per-class precision/recall/F1 and confusion matrix of a trained run on "
                                "a test split: eval.json")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="an `l2b train` run folder (its checkpoint.pt: the last epoch's model), or its "
                            "checkpoint.pt or best.pt (the best clean-validation model)")
        if name == "predict":
            p.add_argument("--data", required=True, metavar="KIND:PATH",
                           help="npz:FILE (array x), folder:DIR (image files) or csv:FILE (rows path[,label])")
            p.add_argument("--out", metavar="FILE.csv", help="a new .csv file (default RUN_DIR/predictions.csv, "
                                                             "numbered if it exists; nothing is overwritten)")
        else:
            p.add_argument("--data", metavar="KIND:PATH",
                           help="labelled data, its test split only: npz:FILE (x_test, y_test of a training file, "
                                "else x, y), folder:DIR (its test/ in the training layout, else one sub-folder per "
                                "class), csv:FILE (the rows of split test, else rows path,label); default: the "
                                "run's own data set's test split")
            p.add_argument("--out", metavar="FILE.json", help="a new .json file (default RUN_DIR/eval.json, "
                                                              "numbered if it exists; nothing is overwritten)")
            p.add_argument("--plot", metavar="FILE.png", help="also draw the confusion matrix to this new .png file")
        p.add_argument("--device", default="cpu")
        p.add_argument("--batch-size", type=int, default=1000)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", parser_class=_Parser)
    for name, text in (("step", "step-time ratios: plain CE, L2B exact (fused, generic rules, unfused), L2B fd, "
                                "double-backward reference, the floor"),
                       ("epoch", "images/second of a whole epoch per method on random data, and the data cost"),
                       ("weights", "agreement of bf16/fp16 and fd meta-weights with exact float32 ones")):
        b = bench_sub.add_parser(name, help=text)
        b.add_argument("--model", default="small-cnn", choices=list_models())
        b.add_argument("--batch-size", type=int, default=128)
        b.add_argument("--val-batch-size", type=int, default=100)
        b.add_argument("--image-shape", default="3,32,32", help="C,H,W of the random inputs")
        b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        b.add_argument("--amp", default="off" if name != "weights" else "bf16", choices=["off", "bf16", "fp16"])
        b.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name != "weights":
            b.add_argument("--channels-last", action="store_true", help="NHWC layout for model and inputs")
    bench_sub.choices["step"].add_argument("--steps", type=int, default=20, help="timed steps per kind (median)")
    bench_sub.choices["step"].add_argument("--no-reference", action="store_true", help="skip the slow double backward")
    bench_sub.choices["step"].add_argument("--peer", choices=["higher"], default=None,
                                           help="add the published recipe's step (needs the package)")
    bench_sub.choices["step"].add_argument("--memory", action="store_true",
                                           help="peak memory of one step per kind, each in a fresh process")
    bench_sub.choices["epoch"].add_argument("--num-images", type=int, default=10000, help="images per epoch")
    bench_sub.choices["epoch"].add_argument(
        "--methods", default="ce,l2b_exact,l2b_fd",
        help="comma-separated: ce, l2b_exact, l2b_fd, reference_double_backward, or any method (l2rw, mlc, ...)")
    bench_sub.choices["epoch"].add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                                            help="random crop + flip on the device, as --augment in training")
    bench_sub.choices["epoch"].add_argument("--repeats", type=int, default=1,
                                            help="epochs per method, run round-robin; the median is reported")
    ddp = bench_sub.add_parser("ddp", help="fused vs unfused L2B step under DDP: gloo ranks on this CPU, paired ratio")
    ddp.add_argument("--model", default="small-cnn", choices=list_models())
    ddp.add_argument("--nproc", type=int, default=2, help="ranks (one thread each; at most the cores)")
    ddp.add_argument("--batch-size", type=int, default=128, help="global training batch")
    ddp.add_argument("--val-batch-size", type=int, default=100, help="global clean batch")
    ddp.add_argument("--image-shape", default="1,28,28", help="C,H,W of the random inputs")
    ddp.add_argument("--steps", type=int, default=20, help="timed step pairs (median)")
    ddp.add_argument("--compile", action="store_true",
                     help="also try the fused forward through torch.compile (reports 'ok' or the error)")
    ddp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data_bench = bench_sub.add_parser("data", help="cost of feeding a Fashion-MNIST epoch vs a plain CE epoch; "
                                                   "--stream: decoding image files per worker")
    data_bench.add_argument("--data-dir", default=None)
    data_bench.add_argument("--subset", type=int, default=3000, help="images per epoch")
    data_bench.add_argument("--batch-size", type=int, default=None, help="default 128; 64 with --stream")
    data_bench.add_argument("--stream", action="store_true",
                            help="image files as --stream reads them: generated JPEGs, decode rate per worker and "
                                 "the share of an L2B step spent waiting for data")
    data_bench.add_argument("--image-sizes", default="64,224", help="--stream: comma-separated JPEG sizes")
    data_bench.add_argument("--workers", default="0,1,2", help="--stream: comma-separated worker counts")
    data_bench.add_argument("--num-images", type=int, default=512, help="--stream: generated JPEGs per size")
    data_bench.add_argument("--val-batch-size", type=int, default=32, help="--stream: clean batch per step")
    data_bench.add_argument("--model", default="small-cnn", choices=list_models())
    data_bench.add_argument("--device", default="cpu")
    data_bench.add_argument("--repeats", type=int, default=3,
                            help="timed epochs per kind (median reported); with --stream, passes over the files")
    data_bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    data = sub.add_parser("data", help="inspect a data set")
    data_sub = data.add_subparsers(dest="data_command", parser_class=_Parser)
    check = data_sub.add_parser("check", help="counts per split and class, image shape, clean-set balance, "
                                              "realised noise rate and matrix (same flags as train)")
    check.add_argument("--config", metavar="FILE", help="YAML file with the same keys; flags override it")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_config_flags(check)
    return parser


def _train(args, argv: list[str]) -> int:
    from .train import train
    from .train.distributed import finish, launch, strip_nproc, teardown

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


_SWEPT = ("method", "noise_rate", "seed", "out")


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


def _sweep(args) -> int:
    from .apps.sweep import plan_sweep, run_sweep

    values = load_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if f.name not in _SWEPT and getattr(args, f.name, None) is not None})
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


def _report(args) -> int:
    from .apps.report import write_report

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
        f"  test accuracy, best clean-val epoch {_pct(s['test_acc_best_val'])}  (epoch {s['best_val_epoch']})",
        f"  test accuracy, max over epochs      {_pct(s['test_acc_max'])}  (selected on the test set: paper-comparable only)",
        f"  training time                       {s['train_seconds']:.1f} s",
        f"  run folder                          {s['run_dir']}",
    ])


def _data(args) -> int:
    if args.data_command != "check":
        raise L2BError("choose a data command: l2b data check")
    from .data.prepare import data_check, format_data_check

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    values = load_yaml(args.config) if args.config else {}
    values.update(flags)
    result = data_check(make_config(values, source=args.config or "command line"))
    print(json.dumps(result, indent=1) if args.json else format_data_check(result))
    return 0


def _labels(args) -> int:
    if args.cv_epochs is not None and args.cv_epochs < 1:
        raise L2BError(f"--cv-epochs must be at least 1, got {args.cv_epochs}")
    if args.compare_cleanlab:
        from .apps.label_compare import label_issues_with_cleanlab

        report = label_issues_with_cleanlab(args.run_dir, compare=tuple(args.cv_model), threshold=args.threshold,
                                            folds=args.cv_folds, cv_epochs=args.cv_epochs, device=args.device)
    else:
        from .apps.labels import label_issues_for_run

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


def _predict(args, evaluate: bool) -> int:
    from .apps.predict import load_run_model, new_output_path, prediction_table, resolve_checkpoint
    from .data.user import read_inputs
    from .runfiles import write_table

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
    from .apps.predict import classification_report, load_run_model, new_output_path, plot_confusion
    from .data.sources import load_dataset
    from .data.user import read_inputs

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


def _bench(args) -> int:
    from .apps import bench

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


def version_line() -> str:
    import torch

    from .version import __version__

    return f"l2b {__version__} (torch {torch.__version__})"


def load_plugins(argv: list[str]) -> list[str]:
    """Import the modules named by ``--plugin`` before the subcommand, and those of the ``l2b.plugins``
    entry-point group of installed packages, so their registrations count in flags, help and validation."""
    from importlib import import_module
    from importlib.metadata import entry_points

    names, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--plugin" and i + 1 < len(argv):
            names.append(argv[i + 1])
            i += 1
        elif argv[i].startswith("--plugin="):
            names.append(argv[i].split("=", 1)[1])
        i += 1
    for name in names:
        try:
            import_module(name)
        except ImportError as exc:
            raise L2BError(f"--plugin {name}: cannot import it ({exc}); is its folder on PYTHONPATH?") from None
    for ep in entry_points(group="l2b.plugins"):
        try:
            ep.load()
        except ImportError as exc:
            raise L2BError(f"plugin {ep.name!r} of an installed package cannot be imported ({exc})") from None
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_plugins(argv)
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "data":
            return _data(args)
        if args.command == "labels":
            return _labels(args)
        if args.command in ("predict", "eval"):
            return _predict(args, evaluate=args.command == "eval")
        build_parser().print_help()
        return 2
    except L2BError as exc:
        if debug:
            raise
        print(f"l2b: error: {rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if is_rank_zero():  # every rank stopped at the same step; one says where to resume
            print(f"l2b: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("l2b: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: the reader left, nothing to say
        _silence_stdout()
        return 0
    except OSError as exc:  # a full disk, a missing permission...: one line naming the file
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"l2b: error: {rank_prefix()}{where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    import os

    if sys.stdout is not sys.__stdout__:  # in-process (tests): the caller owns that stream
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
