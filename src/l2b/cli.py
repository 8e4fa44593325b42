"""The `l2b` command line. Every user-facing failure is one line `l2b: error: ...` and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from ._config import Config, load_yaml, make_config
from ._errors import Interrupted, L2BError
from ._methods import list_methods
from ._models import list_models

# help for `l2b train` flags; the flags themselves come from Config's fields
TRAIN_HELP = {
    "method": "training method (l2b: Algorithm 1; l2rw, l2b-alpha0, l2b-convex: the beta=0, alpha=0 "
              "and alpha+beta=1 rows of Table 7): " + ", ".join(list_methods()),
    "model": "model: " + ", ".join(list_models()),
    "data_dir": "folder searched first for the data set's files",
    "dataset": "fashion-mnist, cifar10, cifar100, isic2019, clothing1m, npz:PATH, folder:PATH or csv:PATH",
    "noise": "noise model: none, sym (uniform over the other classes), uniform (over all classes, true one "
             "included), asym (class map), pairflip (c -> c+1), instance (Xia et al. 2020), file:PATH (given labels)",
    "noise_map": "asym: YAML/JSON class map {source: target} by index or name; a list must be a permutation",
    "image_size": "resize images to SIZE x SIZE on loading (folders, CSV; ISIC2019/Clothing1M default 224)",
    "split_file": "isic2019: CSV image,split (train|val|test) instead of the seeded paper split",
    "balanced_batches": "if > 0, an epoch is this many class-balanced batches (Clothing1M: 250)",
    "pretrained": "resnet18/resnet50: ImageNet weights from the local torch hub cache",
    "noise_rate": "fraction of training labels changed, in [0, 1)",
    "subset": "use N noisy training images (0 = all); the default keeps a run to minutes on 2 CPU cores",
    "val_size": "clean (trusted) images carved from the training set, class-balanced; 0 = none (needs --meta-set pseudo)",
    "augment": "random crop + horizontal flip on the device",
    "epochs": "training epochs",
    "warmup_epochs": "epochs of plain cross-entropy before a meta method starts (Algorithm 1's warm-up)",
    "batch_size": "noisy images per step (n: the sums over i in eq. 5-10)",
    "val_batch_size": "clean images per meta step (m: the clean loss G of the meta objective is their mean)",
    "lr": "initial learning rate eta of the look-ahead (eq. 5-6) and the real step (eq. 10), cosine-decayed "
          "to 0; it scales the raw weights, so it matters under softmax/sigmoid (eq. 13-14), not under sum",
    "momentum": "SGD momentum; the look-ahead (eq. 5-6) uses it too, as the published code does",
    "weight_decay": "SGD weight decay; the look-ahead (eq. 5-6) uses it too, as the published code does",
    "grad_clip": "max gradient norm of the real step (eq. 10), not of the look-ahead; 0 disables",
    "normalize": "meta-weight normalisation (l2b: all 2n weights together): sum (clamp at 0, eq. 8-9), softmax (eq. 14), "
                 "sigmoid (eq. 13)",
    "temperature": "softmax temperature T of eq. 14",
    "bootstrap_beta": "bootstrap-soft/-hard: weight of the observed label (default 0.95 soft, 0.8 hard)",
    "distill_lambda": "distill: weight of the teacher's prediction in the target; 0 = plain CE",
    "stage1_epochs": "distill: teacher epochs on the clean set; glc: stage-1 epochs on the noisy set",
    "mixup_alpha": "mixup: Beta(a, a) of the mixing coefficient; 0 = no mixing (plain CE)",
    "meta_lr": "mwnet, mlc: Adam learning rate of the meta network",
    "meta_hidden": "mwnet, mlc: hidden units of the meta network",
    "meta_set": "meta set of the meta-weights: clean (the clean set) or pseudo (confident training samples "
                "whose prediction agrees with their label, picked after warm-up; no clean set needed)",
    "pseudo_size": "size of the pseudo meta set (class-balanced where every class has enough samples)",
    "meta_confidence": "floor on the predicted probability of a pseudo meta sample (each class gives its most confident agreeing samples)",
    "meta_refresh": "rebuild the pseudo meta set every N epochs after warm-up",
    "eval_batch_size": "batch size of the per-epoch evaluation",
    "checkpoint_every": "epochs between checkpoints (checkpoint.pt, used by --resume)",
    "keep_checkpoints": "keep this many epoch checkpoints (1: only the latest)",
    "on_nan": "on a NaN/inf loss: stop (save the last good state, exit 2) or skip the step and count it",
    "seed": "seed of the split, the noise, the initialisation and the data order",
    "device": "auto, cpu, cuda or cuda:N",
    "meta_grad": "meta-gradient: exact (forward-mode JVP) or fd (finite difference: faster, approximate)",
    "amp": "mixed precision: off, bf16 or fp16 (autocast; fp16 adds a GradScaler)",
    "channels_last": "channels-last (NHWC) memory layout for conv nets",
    "compile": "torch.compile the real forward (the meta passes stay eager)",
    "nproc": "data-parallel processes (DDP; gloo on CPU, nccl on GPUs); same as torchrun --nproc_per_node",
    "sync_bn": "convert BatchNorm to SyncBatchNorm under DDP (real forward; meta passes use per-rank statistics)",
    "out": "run folder (must not exist); default runs/<time>-<method>",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own usage dump is noise here)
        raise L2BError(f"{message} (see `{self.prog} --help`)")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        default_note = f" (default {f.default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=TRAIN_HELP.get(f.name, "") + default_note)
        else:
            parser.add_argument(flag, type=base, default=None, metavar=f.name.upper(),
                                help=TRAIN_HELP.get(f.name, "") + default_note)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="l2b", description="Learning to Bootstrap: training with noisy labels and a small clean set.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (default: L2B on Fashion-MNIST, 40%% symmetric noise)")
    train.add_argument("--config", metavar="FILE", help="YAML file with the same keys; flags override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
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
    labels = sub.add_parser("labels", help="rank a run's training labels by quality: RUN_DIR/label_issues.csv")
    labels.add_argument("run_dir", metavar="RUN_DIR")
    labels.add_argument("--threshold", type=float, default=0.5,
                        help="flag a label when its label_quality is below this (default 0.5)")
    labels.add_argument("--compare-cleanlab", action="store_true",
                        help="also score cleanlab's find_label_issues on the same model (needs cleanlab)")

    for name, text in (("predict", "class probabilities of a trained run on new data: predictions.csv"),
                       ("eval", "accuracy and confusion matrix of a trained run on labelled data")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="folder of an `l2b train` run")
        p.add_argument("--data", required=True, metavar="KIND:PATH", help="e.g. npz:test.npz (arrays x [, y])")
        p.add_argument("--out", metavar="PATH",
                       help="output file (default RUN_DIR/predictions.csv, RUN_DIR/confusion_matrix.png)")
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
    data_bench = bench_sub.add_parser("data", help="cost of feeding a Fashion-MNIST epoch vs a plain CE epoch")
    data_bench.add_argument("--data-dir", default=None)
    data_bench.add_argument("--subset", type=int, default=3000, help="images per epoch")
    data_bench.add_argument("--batch-size", type=int, default=128)
    data_bench.add_argument("--model", default="small-cnn", choices=list_models())
    data_bench.add_argument("--device", default="cpu")
    data_bench.add_argument("--repeats", type=int, default=3, help="timed epochs per kind (median reported)")
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
    from ._distributed import finish, launch, launched, strip_nproc, teardown
    from ._train import train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    if args.resume:
        if flags or args.config:
            raise L2BError("--resume continues a run with its saved config; give no other training options")
        saved = Path(args.resume) / "config.yaml"
        nproc = int((load_yaml(str(saved)) if saved.is_file() else {}).get("nproc", 1) or 1)
        if nproc > 1 and not launched():  # a data-parallel run resumes with as many processes
            return launch(nproc, argv)
        try:
            summary = train(None, resume=args.resume, progress=not args.quiet)
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
    from ._sweep import plan_sweep, run_sweep

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
    run_sweep(cells, progress=not args.quiet)
    width = max(len(c.name) for c in cells)
    for c in cells:
        print(f"  {c.name:<{width}}  {c.status:<8} {c.detail}")
    bad = [c for c in cells if c.status in ("failed", "stale")]
    print(f"{len(cells) - len(bad)} of {len(cells)} runs finished; tables and plots: l2b report {out}")
    return 1 if bad else 0


def _report(args) -> int:
    from ._report import write_report

    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    result = write_report(args.runs, out, plots=not args.no_plots)
    print(f"l2b report: {result['runs']} runs, {len(result['rows'])} table rows")
    for f in result["files"]:
        print(f"  wrote {f}")
    for name, why in result["skipped_plots"].items():
        print(f"  no {name}: {why}")
    return 0


def format_summary(s: dict) -> str:
    rate = "unknown" if s["noise_rate_actual"] is None else f"{100 * s['noise_rate_actual']:.1f}%"
    return "\n".join([
        f"l2b train: {s['method']} on {s['dataset']}, noise {s['noise']} {100 * s['noise_rate']:.0f}% "
        f"(actual {rate}), {s['epochs']} epochs, seed {s['seed']}",
        f"  test accuracy, last epoch           {_pct(s['test_acc_last'])}",
        f"  test accuracy, best clean-val epoch {_pct(s['test_acc_best_val'])}  (epoch {s['best_val_epoch']})",
        f"  test accuracy, max over epochs      {_pct(s['test_acc_max'])}  (selected on the test set: paper-comparable only)",
        f"  training time                       {s['train_seconds']:.1f} s",
        f"  run folder                          {s['run_dir']}",
    ])


def _data(args) -> int:
    if args.data_command != "check":
        raise L2BError("choose a data command: l2b data check")
    from ._datasets import data_check, format_data_check

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    values = load_yaml(args.config) if args.config else {}
    values.update(flags)
    result = data_check(make_config(values, source=args.config or "command line"))
    print(json.dumps(result, indent=1) if args.json else format_data_check(result))
    return 0


def _labels(args) -> int:
    from ._labels import cleanlab_scores, label_issues_for_run

    cleanlab = cleanlab_scores(args.run_dir) if args.compare_cleanlab else None  # fails early when missing
    issues, result = label_issues_for_run(args.run_dir, threshold=args.threshold)
    n = len(issues["index"])
    print(f"l2b labels: {int(issues['is_label_issue'].sum())} of {n} labels flagged "
          f"(label_quality < {args.threshold}); written to {args.run_dir}/label_issues.csv")
    if result is not None:
        rows = [("l2b", result)] + ([("cleanlab", cleanlab)] if cleanlab else [])
        print(f"  against the truly flipped labels ({result['num_flipped']} of {n}):")
        print(f"  {'':10s} {'flagged':>8s} {'precision':>10s} {'recall':>8s} {'AUROC':>7s}")
        for name, r in rows:
            print(f"  {name:10s} {r['num_flagged']:8d} {_num(r['precision']):>10s} {_num(r['recall']):>8s} "
                  f"{_num(r['auroc']):>7s}")
    return 0


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _predict(args, evaluate: bool) -> int:
    from pathlib import Path

    import numpy as np

    from ._labels import write_table
    from ._predict import confusion_matrix, load_run_model, plot_confusion, prediction_table, read_data

    rm = load_run_model(args.checkpoint, args.device)
    data = read_data(args.data, rm.classes, rm.input_shape[-1] if len(rm.input_shape) == 3 else None)
    probs = rm.predict_proba(data.x, args.batch_size)
    if not evaluate:
        out = Path(args.out or Path(args.checkpoint) / "predictions.csv")
        write_table(prediction_table(probs, rm.classes, data.paths), out)
        print(f"l2b predict: {len(probs)} rows written to {out}")
        return 0
    if data.y is None:
        raise L2BError(f"--data {args.data} has no labels (array 'y' or 'y_test'); `l2b eval` needs them")
    if len(data.y) != len(probs) or (len(data.y) and (data.y.min() < 0 or data.y.max() >= rm.num_classes)):
        raise L2BError(f"--data {args.data}: labels must be {len(probs)} integers in [0, {rm.num_classes})")
    pred = probs.argmax(1)
    cm = confusion_matrix(data.y, pred, rm.num_classes)
    print(f"l2b eval: accuracy {100 * float(np.mean(pred == data.y)):.2f}% on {len(pred)} samples")
    out = Path(args.out or Path(args.checkpoint) / "confusion_matrix.png")
    out.with_suffix(".json").write_text(json.dumps({"classes": rm.classes, "confusion": cm.tolist(),
                                                    "rows": "true class", "columns": "predicted class"}))
    if plot_confusion(cm, rm.classes, out):
        print(f"  confusion matrix: {out} (and {out.with_suffix('.json')})")
    else:
        print(f"  confusion matrix: {out.with_suffix('.json')} (no PNG: matplotlib is not installed)")
    return 0


def _pct(v) -> str:
    return "   n/a " if v is None else f"{v:6.2f}%"


def _bench(args) -> int:
    from . import _bench as bench

    if args.bench_command == "data":
        result = bench.bench_data(data_dir=args.data_dir, subset=args.subset, batch_size=args.batch_size,
                                  model=args.model, device=args.device, repeats=args.repeats)
        print(json.dumps(result, indent=1) if args.json else bench.format_data_table(result))
        return 0
    if args.bench_command not in ("step", "epoch", "weights"):
        raise L2BError("choose a benchmark: l2b bench step | epoch | weights | data")

    try:
        shape = tuple(int(v) for v in args.image_shape.split(","))
        assert len(shape) == 3
    except (ValueError, AssertionError):
        raise L2BError(f"--image-shape must be C,H,W, got {args.image_shape!r}") from None
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
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
        from ._distributed import rank_prefix

        print(f"l2b: error: {rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        from ._distributed import is_rank_zero

        if is_rank_zero():  # every rank stopped at the same step; one says where to resume
            print(f"l2b: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("l2b: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
