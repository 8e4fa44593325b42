"""One typed config: YAML file -> dataclass -> command-line flags; every key validated before any data is read."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ._errors import L2BError, closest


@dataclass
class Config:
    # what to train
    method: str = "l2b"  # see `l2b train --help` for the list
    model: str = "small-cnn"
    pretrained: bool = False  # resnet18/resnet50: ImageNet weights from the local torch hub cache
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # where to look first for the data set's files
    image_size: int | None = None  # resize every image to SIZE x SIZE on loading; None = keep (sizes must agree)
    split_file: str | None = None  # isic2019: CSV image,split (train|val|test) instead of the seeded paper split
    noise: str = "sym"  # none | sym | uniform | asym | pairflip | instance | file:PATH
    noise_rate: float = 0.4  # fraction of training labels changed, in [0, 1)
    noise_map: str | None = None  # asym: YAML/JSON class map {source: target} (a list = a permutation)
    subset: int | None = 3000  # noisy training images used; None or 0 = all
    val_size: int = 1000  # clean (trusted) images, class-balanced, disjoint from training; 0 = none (meta_set=pseudo)
    augment: bool = False  # random crop (pad 2) + horizontal flip, on the device
    balanced_batches: int = 0  # > 0: an epoch is this many class-balanced batches (Clothing1M: 250)
    stream: bool = False  # image files (folder:, csv:, isic2019, clothing1m) decoded per batch, not held in memory; needs image_size
    workers: int = 4  # --stream: DataLoader worker processes decoding images; 0 = in the training process
    # optimisation (paper: SGD momentum 0.9, weight decay 5e-4, cosine decay)
    epochs: int = 40
    warmup_epochs: int = 1  # epochs of plain cross-entropy before a meta method starts
    batch_size: int = 128  # noisy images per step
    val_batch_size: int = 100  # clean images per meta step
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    # meta-weights (paper eq. 9 / 13 / 14)
    normalize: str = "sum"  # sum (eq. 9) | softmax (eq. 14) | sigmoid (eq. 13)
    temperature: float = 10.0  # softmax temperature T (eq. 14)
    # baselines (l2b._baselines); each key is read only by the methods named in its comment
    bootstrap_beta: float | None = None  # weight of the observed label (Reed et al. 2014); None: 0.95 soft, 0.8 hard
    distill_lambda: float = 0.5  # weight of the teacher's prediction in the target (Li et al. 2017's 1 - lambda)
    stage1_epochs: int = 10  # epochs of a preliminary stage: distill's teacher, glc's stage 1
    mixup_alpha: float = 1.0  # Beta(a, a) of the mixing coefficient (Zhang et al. 2018); 0 = no mixing
    meta_lr: float = 1e-3  # Adam lr of the meta networks of mwnet and mlc (Shu et al. 2019)
    meta_hidden: int = 100  # hidden units of the meta networks of mwnet (1-100-1) and mlc
    # scale and speed
    meta_grad: str = "exact"  # exact (forward-mode JVP) | fd (finite difference along v: faster, approximate)
    amp: str = "off"  # off | bf16 | fp16 (autocast over both meta passes and the real forward; fp16 adds loss scaling)
    channels_last: bool = False  # NHWC layout for conv nets (faster on GPU tensor cores)
    compile: bool = False  # torch.compile the real forward; the meta passes stay eager
    nproc: int = 1  # data-parallel processes on this machine (torchrun); batch sizes are global
    sync_bn: bool = False  # BatchNorm statistics over the global batch in the real forward (nproc > 1)
    # meta set: the clean set, or (no clean set) confident training samples that agree with their label
    meta_set: str = "clean"  # clean | pseudo
    pseudo_size: int = 1000  # pseudo meta set size, class-balanced where the classes allow
    meta_confidence: float = 0.0  # floor on the predicted probability; each class gives its most confident agreeing samples
    meta_refresh: int = 1  # rebuild the pseudo meta set every this many epochs after warm-up
    # run
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # epochs between checkpoints (checkpoint.pt; the last epoch always)
    keep_checkpoints: int = 1  # > 1 also keeps that many - 1 epoch checkpoints beside checkpoint.pt
    on_nan: str = "stop"  # stop: save the last good state and exit | skip: skip and count such steps
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str | None = None  # run folder; default runs/<time>-<method>; never an existing folder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RANGES = {  # key: (lower bound, inclusive?, upper bound, inclusive?)
    "noise_rate": (0.0, True, 1.0, False),
    "lr": (0.0, False, None, None),
    "momentum": (0.0, True, 1.0, False),
    "weight_decay": (0.0, True, None, None),
    "grad_clip": (0.0, True, None, None),
    "temperature": (0.0, False, None, None),
    "epochs": (1, True, None, None),
    "warmup_epochs": (0, True, None, None),
    "batch_size": (1, True, None, None),
    "val_batch_size": (1, True, None, None),
    "eval_batch_size": (1, True, None, None),
    "val_size": (0, True, None, None),
    "pseudo_size": (1, True, None, None),
    "meta_confidence": (0.0, True, 1.0, True),
    "meta_refresh": (1, True, None, None),
    "subset": (0, True, None, None),
    "checkpoint_every": (1, True, None, None),
    "keep_checkpoints": (1, True, None, None),
    "image_size": (1, True, None, None),
    "balanced_batches": (0, True, None, None),
    "bootstrap_beta": (0.0, True, 1.0, True),
    "distill_lambda": (0.0, True, 1.0, True),
    "stage1_epochs": (1, True, None, None),
    "mixup_alpha": (0.0, True, None, None),
    "meta_lr": (0.0, False, None, None),
    "meta_hidden": (1, True, None, None),
    "nproc": (1, True, None, None),
    "workers": (0, True, None, None),
}
CHOICES = {"meta_grad": ("exact", "fd"), "amp": ("off", "bf16", "fp16")}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(key: str, value, hint):
    """Check (and gently convert: int -> float) one value against its annotation."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
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


def make_config(values: dict, source: str = "config") -> Config:
    """Build a validated Config from a dict; unknown keys name their nearest known key."""
    types_ = _field_types()
    clean = {}
    for key, value in values.items():
        key_norm = str(key).replace("-", "_")
        if key_norm not in types_:
            raise L2BError(f"{source}: unknown key {key!r}{closest(key_norm, types_)}")
        clean[key_norm] = _coerce(key_norm, value, types_[key_norm])
    cfg = Config(**clean)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for key, (lo, lo_inc, hi, hi_inc) in _RANGES.items():
        v = getattr(cfg, key)
        if v is None:
            continue
        bad = (lo is not None and (v < lo if lo_inc else v <= lo)) or (hi is not None and (v > hi if hi_inc else v >= hi))
        if bad:
            lo_s = ("[" if lo_inc else "(") + str(lo)
            hi_s = (str(hi) + ("]" if hi_inc else ")")) if hi is not None else "inf)"
            raise L2BError(f"{key} must be in {lo_s}, {hi_s}, got {v}")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise L2BError(f"{key} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    for key in ("batch_size", "val_batch_size"):
        if getattr(cfg, key) % cfg.nproc:
            raise L2BError(f"{key} ({getattr(cfg, key)}) is the global batch and must be divisible by nproc ({cfg.nproc})")
    if cfg.warmup_epochs > cfg.epochs:
        raise L2BError(f"warmup_epochs ({cfg.warmup_epochs}) exceeds epochs ({cfg.epochs})")
    if cfg.on_nan not in ("stop", "skip"):
        raise L2BError(f"on_nan must be stop or skip, got {cfg.on_nan!r}")
    if cfg.meta_set not in ("clean", "pseudo"):
        raise L2BError(f"meta_set must be clean or pseudo, got {cfg.meta_set!r}")
    if cfg.meta_set == "pseudo" and cfg.warmup_epochs < 1:
        raise L2BError("meta_set=pseudo picks its samples with the warmed-up model; set warmup_epochs >= 1")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise L2BError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise L2BError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise L2BError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise L2BError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    return data


def save_yaml(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["Config", "make_config", "validate", "load_yaml", "save_yaml"]
