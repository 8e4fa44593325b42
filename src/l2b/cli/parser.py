"""The parser of the `l2b` command line: one flag per config option (from its declaration), and the
subcommands' own flags. A parse error is one line, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import typing


from ..config import Config, describe
from ..errors import L2BError
from ..models import list_models


SWEPT = ("method", "noise_rate", "seed", "out")  # the options `l2b sweep` takes as lists, not as config flags


def version_line() -> str:
    import torch

    from ..version import __version__

    return f"l2b {__version__} (torch {torch.__version__})"


class Parser(argparse.ArgumentParser):
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
    parser = Parser(prog="l2b", description="Learning to Bootstrap: training with noisy labels and a small clean set.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--plugin", action="append", metavar="MODULE", default=[],
                        help="import MODULE first (repeatable): its register_method/register_dataset/register_model "
                             "calls add methods, data sets and models (docs/EXTENDING.md)")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

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
    _add_config_flags(sweep, skip=SWEPT)

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
    bench_sub = bench.add_subparsers(dest="bench_command", parser_class=Parser)
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
    data_sub = data.add_subparsers(dest="data_command", parser_class=Parser)
    check = data_sub.add_parser("check", help="counts per split and class, image shape, clean-set balance, "
                                              "realised noise rate and matrix (same flags as train)")
    check.add_argument("--config", metavar="FILE", help="YAML file with the same keys; flags override it")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_config_flags(check)
    return parser
