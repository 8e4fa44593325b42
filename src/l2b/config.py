"""One typed config, one declaration per option: YAML file -> dataclass -> command-line flags.

Each field of :class:`Config` is declared once, with :func:`option`: its default, help text, choices or
range, and the methods that read it. Validation (:func:`validate`), the ``l2b train`` flags and their
help (``l2b.cli``), the comments of a run's ``config.yaml`` (:func:`save_yaml`) and the options table
of docs/OPTIONS.md (`tools/options_doc.py`) are all generated from these declarations.

A data set may bring a preset (``register_dataset(name, **preset)``): values that replace the
defaults below for that data set, while anything the user sets wins over both (:func:`make_config`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import L2BError, closest
from .meta import META_GRADS, META_LOSSES, NORMALIZATIONS, PSEUDO_SOURCES
from .aliases import ALIASES
from .registry import DATA_FORMATS, DATASETS, METHODS, MODELS, Registry

__all__ = ["Config", "option", "make_config", "validate", "load_yaml", "save_yaml",
           "NOISE_MODELS", "LOGGERS", "ALIASES"]

NOISE_MODELS = ("none", "sym", "uniform", "asym", "pairflip", "instance")  # and file:PATH (given labels)
LOGGERS = ("auto", "none", "csv", "tensorboard")  # --log takes a comma list of them
META_METHODS = ("l2b", "l2rw", "l2b-alpha0", "l2b-convex")  # the meta-reweighting family


def option(default, help: str, *, choices=None, low=None, high=None, low_open: bool = False,
           high_open: bool = False, methods: tuple[str, ...] | None = None, group: str = "", parse: str | None = None):
    """Declare a Config field.

    Parameters
    ----------
    default : the value when neither the data set's preset nor the user sets one.
    help : str
        One line: what it does, its unit, and the paper's equation or section where it has one.
    choices : tuple of str, or a :class:`l2b.registry.Registry`, optional
        The valid values (a registry's names are read when validating, so registered extensions count).
    low, high : number, optional
        The valid range; ``low_open`` / ``high_open`` exclude the bound itself.
    methods : tuple of str, optional
        The methods that read it (None: every method, or the trainer itself).
    group : str
        Heading of the option in ``--help`` and docs/OPTIONS.md.
    parse : str, optional
        A value syntax of :data:`PARSERS` (e.g. ``"interval"``): the text is checked with it, and a YAML
        number is read as its text.
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "methods": methods, "group": group, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Config:
    # ---- what to train
    method: str = option("l2b", "training method (l2b: Algorithm 1; l2rw, l2b-alpha0, l2b-convex: the beta=0, "
                         "alpha=0 and alpha+beta=1 rows of Table 7)", choices=METHODS, group="what to train")
    model: str = option("small-cnn", "network architecture", choices=MODELS, group="what to train")
    pretrained: bool = option(False, "resnet18/resnet50: ImageNet weights from the local torch hub cache",
                              group="what to train")
    # ---- data
    dataset: str = option("fashion-mnist", "a built-in data set, or your own: npz:PATH, folder:PATH or csv:PATH",
                          choices=DATASETS, group="data")
    data_dir: str | None = option(None, "folder searched first for the data set's files", group="data")
    image_size: int | None = option(None, "resize every image to SIZE x SIZE on loading (folders, CSV; "
                                    "ISIC2019/Clothing1M default 224); unset: keep (sizes must agree)", low=1,
                                    group="data")
    split_file: str | None = option(None, "isic2019: CSV image,split (train|val|test) instead of the seeded paper "
                                    "split", group="data")
    trusted: str | None = option(None, "your trusted (clean) set, KIND:PATH in any supported format (npz:PATH with "
                                 "arrays x, y; folder:PATH with one sub-folder per class; csv:PATH of path,label); "
                                 "for data that brings no val split", group="data")
    noise: str = option("none", "synthetic noise injected into the training labels: none (the labels as given), sym (uniform over the other classes), uniform (over all "
                        "classes, true one included), asym (class map), pairflip (c -> c+1), instance (Xia et al. "
                        "2020), file:PATH (your noisy label of every training image)", choices=NOISE_MODELS,
                        group="data")
    noise_rate: float | None = option(None, "fraction of training labels the synthetic noise changes, in [0, 1); "
                                      "unset without synthetic noise", low=0.0, high=1.0, high_open=True,
                                      group="data")
    noise_map: str | None = option(None, "asym: YAML/JSON class map {source: target} by index or name; a list "
                                   "must be a permutation", group="data")
    subset: int | None = option(None, "noisy training images used (0 or unset: all)", low=0, group="data")
    val_size: int = option(0, "clean (trusted) images carved from the training set before synthetic noise, "
                           "class-balanced, disjoint from training (benchmarks, whose labels are the truth); 0 = none",
                           low=0, group="data")
    augment: bool = option(False, "random crop (pad 2) + horizontal flip, on the device", group="data")
    balanced_batches: int = option(0, "if > 0, an epoch is this many class-balanced batches (Clothing1M: 250)",
                                   low=0, group="data")
    stream: bool = option(False, "decode image files (folder:, csv:, isic2019, clothing1m) per batch instead of "
                          "holding them in memory; needs --image-size", group="data")
    workers: int = option(4, "--stream: DataLoader worker processes decoding images; 0 = in the training process",
                          low=0, group="data")
    # ---- optimisation (paper: SGD momentum 0.9, weight decay 5e-4, cosine decay)
    epochs: int = option(40, "training epochs", low=1, group="optimisation")
    warmup_epochs: int = option(1, "epochs of plain cross-entropy before a meta method starts (Algorithm 1's "
                                "warm-up)", low=0, group="optimisation")
    batch_size: int = option(128, "noisy images per step (n: the sums over i in eq. 5-10); global under data "
                             "parallelism", low=1, group="optimisation")
    val_batch_size: int = option(100, "clean images per meta step (m: the clean batch of the meta objective's loss G); "
                                 "0 = the training batch size (m = n, as the published code draws it)", low=0,
                                 group="optimisation")
    lr: float = option(0.05, "initial learning rate of the look-ahead and the real step, cosine-decayed to 0; it "
                       "scales the raw weights, so it matters under softmax/sigmoid, not under sum", low=0.0,
                       low_open=True, group="optimisation")
    momentum: float = option(0.9, "SGD momentum; the look-ahead uses it too, as the published code does", low=0.0,
                             high=1.0, high_open=True, group="optimisation")
    weight_decay: float = option(5e-4, "SGD weight decay; the look-ahead uses it too, as the published code does",
                                 low=0.0, group="optimisation")
    grad_clip: float = option(5.0, "max gradient norm of the real step (eq. 10), not of the look-ahead; 0 disables",
                              low=0.0, group="optimisation")
    # ---- meta-weights (paper eq. 9 / 13 / 14)
    normalize: str = option("sum", "meta-weight normalisation (l2b: all 2n weights together): sum (clamp at 0, "
                            "eq. 8-9), softmax (eq. 14), sigmoid (eq. 13)", choices=NORMALIZATIONS,
                            methods=META_METHODS, group="meta-weights")
    temperature: float = option(10.0, "softmax temperature T of eq. 14", low=0.0, low_open=True,
                                methods=META_METHODS, group="meta-weights")
    meta_loss: str = option("mean", "clean loss G of the meta objective over the m clean images: mean (Algorithm 1, "
                            "the published code) or sum (eq. 7); sum scales the raw weights by m, which cancels "
                            "under sum normalisation and sharpens softmax/sigmoid", choices=META_LOSSES,
                            methods=META_METHODS, group="meta-weights")
    pseudo_from: str = option("train", "pseudo-labels p_i (eq. 1): argmax of the real forward's train-mode logits "
                              "(batch statistics, the published code) or of an eval-mode forward (running "
                              "statistics, no gradient); g_i uses the train-mode logits either way",
                              choices=PSEUDO_SOURCES, methods=META_METHODS, group="meta-weights")
    meta_grad: str = option("exact", "meta-gradient: exact (forward-mode JVP) or fd (finite difference along v: "
                            "faster, approximate)", choices=META_GRADS, methods=META_METHODS, group="meta-weights")
    meta_set: str = option("clean", "meta set of the meta-weights: clean (the clean set) or pseudo (confident "
                           "training samples whose prediction agrees with their label, picked after warm-up; no "
                           "clean set needed)", choices=("clean", "pseudo"), group="meta-weights")
    pseudo_size: int = option(1000, "size of the pseudo meta set (class-balanced where every class has enough "
                              "samples)", low=1, group="meta-weights")
    meta_confidence: float = option(0.0, "floor on the predicted probability of a pseudo meta sample (each class "
                                    "gives its most confident agreeing samples)", low=0.0, high=1.0,
                                    group="meta-weights")
    meta_refresh: int = option(1, "rebuild the pseudo meta set every N epochs after warm-up", low=1,
                               group="meta-weights")
    # ---- baselines: each is read only by the methods named
    bootstrap_beta: float | None = option(None, "weight of the observed label (Reed et al. 2014); unset: 0.95 "
                                          "soft, 0.8 hard", low=0.0, high=1.0,
                                          methods=("bootstrap-soft", "bootstrap-hard"), group="baselines")
    distill_lambda: float = option(0.5, "weight of the teacher's prediction in the target (Li et al. 2017's "
                                   "1 - lambda); 0 = plain CE", low=0.0, high=1.0, methods=("distill",),
                                   group="baselines")
    stage1_epochs: int = option(10, "epochs of a preliminary stage: distill's teacher on the clean set, glc's "
                                "stage 1 on the noisy set", low=1, methods=("distill", "glc"), group="baselines")
    mixup_alpha: float = option(1.0, "Beta(a, a) of the mixing coefficient (Zhang et al. 2018); 0 = no mixing",
                                low=0.0, methods=("mixup",), group="baselines")
    meta_lr: float = option(1e-3, "Adam learning rate of the meta network (Shu et al. 2019)", low=0.0,
                            low_open=True, methods=("mwnet", "mwnet-sum", "mlc"), group="baselines")
    meta_hidden: int = option(100, "hidden units of the meta network (mwnet 1-100-1, mlc)", low=1,
                              methods=("mwnet", "mwnet-sum", "mlc"), group="baselines")
    # ---- scale and speed
    amp: str = option("off", "mixed precision: off, bf16 or fp16 (autocast over the meta passes and the real "
                      "forward; fp16 adds loss scaling)", choices=("off", "bf16", "fp16"), group="scale and speed")
    channels_last: bool = option(False, "channels-last (NHWC) memory layout for conv nets (faster on GPU tensor "
                                 "cores)", group="scale and speed")
    compile: bool = option(False, "torch.compile the real forward (the meta passes stay eager)",
                           group="scale and speed")
    nproc: int = option(1, "data-parallel processes on this machine (DDP; gloo on CPU, nccl on GPUs); same as "
                        "torchrun --nproc_per_node; batch sizes are global", low=1, group="scale and speed")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch in the real forward (nproc > 1; the "
                           "meta passes use per-rank statistics)", group="scale and speed")
    # ---- run
    eval_batch_size: int = option(1000, "batch size of evaluation", low=1, group="run")
    test_every: int = option(0, "evaluate the test set every N epochs (a test curve; the benchmarks' presets: 1); "
                             "0 = only at the end, the last and the best clean-validation model", low=0, group="run")
    checkpoint_every: str = option("1", "how often checkpoint.pt (used by --resume) is written: N epochs (e.g. 2), "
                                   "N steps (500steps) or N minutes (10min); also before the first step and after "
                                   "the last epoch", parse="interval", group="run")
    keep_checkpoints: int = option(1, "keep this many epoch checkpoints (1: only the latest)", low=1, group="run")
    on_nan: str = option("stop", "on a NaN/inf loss: stop (keep the last good checkpoint, exit 2) or skip the "
                         "step and count it", choices=("stop", "skip"), group="run")
    log: str = option("auto", "per-epoch logs besides metrics.jsonl, a comma list: csv (metrics.csv), tensorboard "
                      "(event files in the run folder: pip install 'l2b[tensorboard]'), none; auto: tensorboard "
                      "where the package is installed, else csv", choices=LOGGERS, group="run")
    seed: int = option(0, "seed of the split, the noise, the initialisation and the data order", group="run")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", group="run")
    out: str | None = option(None, "run folder (must not exist); default runs/<time>-<method>", group="run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def clean_batch_size(self) -> int:
        """m, the clean images per meta step: ``val_batch_size``, or ``batch_size`` where that is 0."""
        return self.val_batch_size or self.batch_size


INTERVAL_UNITS = {"": "epochs", "epoch": "epochs", "epochs": "epochs", "step": "steps", "steps": "steps",
                  "min": "minutes", "mins": "minutes", "minute": "minutes", "minutes": "minutes"}


def parse_interval(text: str, key: str = "checkpoint_every") -> tuple[float, str]:
    """``"2"`` -> (2, "epochs"), ``"500steps"`` -> (500, "steps"), ``"10min"`` -> (10.0, "minutes").

    Epochs and steps are positive integers; minutes a positive finite number.
    """
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = INTERVAL_UNITS.get(raw[len(number):])
    try:
        value = float(number) if unit == "minutes" else int(number)
    except ValueError:
        value = None
    if unit is None or value is None or not math.isfinite(value) or value <= 0:
        raise L2BError(f"{key} must be N (epochs), Nsteps or Nmin with N > 0, e.g. 2, 500steps, 10min; got {text!r}")
    return value, unit


PARSERS = {"interval": parse_interval}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _base_type(hint) -> type:
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint) if args else hint


def _coerce(key: str, value, hint):
    """Check (and gently convert: int -> float; a number -> text for a parsed option) one value against its
    annotation."""
    optional = type(None) in typing.get_args(hint)
    base = _base_type(hint)
    if _declared(key).metadata["parse"] and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value:g}"
    if value is None:
        if optional:
            return None
        raise L2BError(f"config key {key!r} must be a {base.__name__}, got null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise L2BError(f"config key {key!r} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise L2BError(f"config key {key!r} must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise L2BError(f"config key {key!r} must be a {base.__name__}, got {value!r}")
    return value


def _declared(key: str) -> dataclasses.Field:
    return next(f for f in fields(Config) if f.name == key)


def _unknown_key(key: str, known, source: str) -> L2BError:
    hint = f" (did you mean {ALIASES[key]!r}?)" if key in ALIASES else closest(key, known)
    return L2BError(f"{source}: unknown key {key!r}{hint}")


def preset_of(dataset: str) -> dict:
    """The config values a data set brings (its registered preset); {} for an unknown name."""
    kind, sep, _ = dataset.partition(":")
    registry = DATA_FORMATS if sep and kind in DATA_FORMATS else DATASETS
    name = kind if sep and kind in DATA_FORMATS else dataset
    return registry.meta(name) if name in registry else {}


def make_config(values: dict, source: str = "config") -> Config:
    """Build a validated Config from a dict: the data set's preset under the given values.

    Unknown keys name their likely intended key; every value is checked (type, finiteness, range,
    choices) before anything is read or written.
    """
    types_ = _field_types()
    clean = {}
    for key, value in values.items():
        key_norm = str(key).replace("-", "_")
        if key_norm not in types_:
            raise _unknown_key(key_norm, types_, source)
        clean[key_norm] = _coerce(key_norm, value, types_[key_norm])
    dataset = clean.get("dataset", Config.dataset)
    if isinstance(dataset, str):
        preset = preset_of(dataset)
        if not _synthetic(clean.get("noise", preset.get("noise", Config.noise))):
            preset.pop("noise_rate", None)  # the preset's rate goes with its noise, not with the labels as given
        for key, value in preset.items():
            if key not in types_:
                raise L2BError(f"data set {dataset!r}: its preset has an unknown key {key!r}")
            clean.setdefault(key, _coerce(key, value, types_[key]))
    cfg = Config(**clean)
    validate(cfg)
    return cfg


def _synthetic(noise) -> bool:
    """Whether a noise setting injects synthetic noise (none and file:PATH do not)."""
    return isinstance(noise, str) and noise != "none" and not noise.startswith("file:")


def _check_range(key: str, v, meta: dict) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise L2BError(f"{key} must be a finite number, got {v}")
    lo, hi = meta["low"], meta["high"]
    bad = (lo is not None and (v <= lo if meta["low_open"] else v < lo)) or \
          (hi is not None and (v >= hi if meta["high_open"] else v > hi))
    if bad:
        lo_s = ("(" if meta["low_open"] else "[") + ("-inf" if lo is None else str(lo))
        hi_s = ("inf" if hi is None else str(hi)) + (")" if meta["high_open"] or hi is None else "]")
        raise L2BError(f"{key} must be in {lo_s}, {hi_s}, got {v}")


def _check_choice(key: str, v: str, choices) -> None:
    if key == "dataset":  # a registered name, or KIND:PATH for the user formats
        kind, sep, rest = v.partition(":")
        if sep and kind in DATA_FORMATS:
            if not rest:
                raise L2BError(f"dataset {v!r}: give the path after '{kind}:'")
            return
    if key == "noise" and v.startswith("file:"):
        if len(v) == 5:
            raise L2BError("noise 'file:': give the path of the label file after 'file:'")
        return
    if key == "log":  # a comma list; "auto" and "none" stand alone
        parts = [p.strip() for p in v.split(",")]
        for part in parts:
            if part not in choices:
                raise L2BError(f"log must be a comma list of {', '.join(choices[2:])}, or auto or none; "
                               f"got {part!r}{closest(part, list(choices))}")
        if len(parts) > 1 and {"auto", "none"} & set(parts):
            raise L2BError(f"log: auto and none stand alone, got {v!r}")
        return
    names = choices.names() if isinstance(choices, Registry) else list(choices)
    if isinstance(choices, Registry):
        choices.check(v)
        return
    if v not in names:
        extra = {"dataset": [k + ":PATH" for k in DATA_FORMATS.names()], "noise": ["file:PATH"]}.get(key, [])
        raise L2BError(f"{key} must be one of {', '.join(names + extra)}, got {v!r}{closest(v, names)}")


def validate(cfg: Config) -> None:
    """Every value against its declaration, then the rules that tie options together."""
    for f in fields(Config):
        v, meta = getattr(cfg, f.name), f.metadata
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            _check_range(f.name, v, meta)
        if meta["choices"] is not None:
            _check_choice(f.name, v, meta["choices"])
        if meta["parse"]:
            PARSERS[meta["parse"]](v, f.name)
    if cfg.dataset.partition(":")[0] not in DATA_FORMATS and cfg.dataset not in DATASETS:
        DATASETS.check(cfg.dataset)
    for key in ("batch_size", "val_batch_size"):
        if getattr(cfg, key) % cfg.nproc:
            raise L2BError(f"{key} ({getattr(cfg, key)}) is the global batch and must be divisible by nproc ({cfg.nproc})")
    synthetic = _synthetic(cfg.noise)
    if synthetic and cfg.noise_rate is None:
        raise L2BError(f"noise {cfg.noise!r} injects synthetic noise: give its rate, e.g. --noise-rate 0.4")
    if not synthetic and cfg.noise_rate:
        raise L2BError(f"noise_rate {cfg.noise_rate} with noise {cfg.noise!r} injects nothing: choose a noise model "
                       "(e.g. --noise sym) or leave noise_rate unset")
    if cfg.trusted is not None:
        kind, sep, rest = cfg.trusted.partition(":")
        if not sep or not rest or kind not in DATA_FORMATS:
            raise L2BError(f"trusted must be KIND:PATH with KIND one of {', '.join(DATA_FORMATS.names())}, "
                           f"got {cfg.trusted!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise L2BError(f"warmup_epochs ({cfg.warmup_epochs}) exceeds epochs ({cfg.epochs})")
    if cfg.meta_set == "pseudo" and cfg.warmup_epochs < 1:
        raise L2BError("meta_set=pseudo picks its samples with the warmed-up model; set warmup_epochs >= 1")
    if cfg.device not in ("auto", "cpu", "cuda") and not (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()):
        raise L2BError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise L2BError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise L2BError(f"{path}: not a text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise L2BError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise L2BError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    return data


def save_yaml(cfg: Config, path: Path, *, header: str = "") -> None:
    """The resolved config, one key a line, each with its help text as a comment; ``header`` (one line)
    goes first as a comment, so the file stays loadable by :func:`make_config`."""
    lines = [f"# {header}"] if header else []
    for f in fields(Config):
        value = yaml.safe_dump({f.name: getattr(cfg, f.name)}, sort_keys=False).rstrip("\n")
        lines.append(f"{value}  # {f.metadata['help']}" if "\n" not in value else value)
    Path(path).write_text("\n".join(lines) + "\n")


def describe(f: dataclasses.Field) -> str:
    """The valid values of an option, in words: its choices or its range."""
    meta = f.metadata
    if meta["parse"] == "interval":
        return "N (epochs), Nsteps or Nmin; N > 0"
    if meta["choices"] is not None:
        names = meta["choices"].names() if isinstance(meta["choices"], Registry) else list(meta["choices"])
        if f.name == "dataset":
            names = names + [k + ":PATH" for k in DATA_FORMATS.names()]
        if f.name == "noise":
            names = names + ["file:PATH"]
        if f.name == "log":
            return "auto, none, or a comma list of: " + ", ".join(names[2:])
        return "one of: " + ", ".join(names)
    if meta["low"] is not None or meta["high"] is not None:
        lo, hi = meta["low"], meta["high"]
        return (("(" if meta["low_open"] else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
                + ("inf" if hi is None else f"{hi:g}") + (")" if meta["high_open"] or hi is None else "]"))
    return ""
