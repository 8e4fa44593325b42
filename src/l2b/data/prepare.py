"""From a loaded data set to what the trainer reads: the clean set, the subset, the noise, the device.

Everything is drawn from ``cfg.seed``; ``l2b data check`` runs the same code and prints the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..errors import L2BError
from . import noise as noise_models
from .arrays import (
    DeviceImages,
    ImageData,
    balanced_clean_split,
    channel_stats,
    concat_images,
    device_images,
)
from .sources import is_user_data, load_dataset

__all__ = ["TrainData", "prepare_data", "data_check", "format_data_check"]


@dataclass
class TrainData:
    """Everything the loop reads, on the training device."""

    train: DeviceImages
    y_observed: Tensor  # (N,) labels the model is trained on
    flipped: Tensor | None  # (N,) bool, None when the truth is unknown
    clean: DeviceImages
    y_clean: Tensor  # (M,)
    test: DeviceImages
    y_test: Tensor
    num_classes: int
    in_channels: int
    noise_info: dict
    mean: Tensor  # (C,) channel mean and std the images are normalised with
    std: Tensor
    indices: np.ndarray  # (N,) each training sample's index in the data's training split (-1: none)
    y_true: np.ndarray | None  # (N,) true labels, None when unknown
    paths: list[str] | None  # (N,) source files, where the data has them


def prepare_data(cfg: Config, data: ImageData, device: torch.device, trains_on_clean: bool) -> TrainData:
    """Carve the clean set, pick the subset, apply noise (all from ``cfg.seed``), move to the device."""
    rng = np.random.default_rng(cfg.seed)
    k = data.num_classes
    synthetic = data.noisy_train is None and cfg.noise != "none"  # sym, asym, ... or file:PATH
    # a user's own labels (npz:, folder:, csv:) are what the user observed, not the truth, unless noise is
    # injected on top of them; then they are the truth the noise starts from
    known = data.train_labels_known and (synthetic or not is_user_data(cfg.dataset))
    if data.x_val is not None:
        x_clean, y_clean, pool = data.x_val, data.y_val, np.arange(len(data.y_train))
    elif cfg.val_size and not known:
        raise L2BError(f"val_size={cfg.val_size} would carve the trusted set out of training labels that are not "
                       "known to be clean; give a trusted set instead (--trusted KIND:PATH, or a val split in the data)")
    else:
        clean_idx = balanced_clean_split(data.y_train, cfg.val_size, k, rng)
        x_clean, y_clean = data.x_train[clean_idx], data.y_train[clean_idx]
        pool = np.setdiff1d(np.arange(len(data.y_train)), clean_idx)
    if cfg.subset:
        if cfg.subset > len(pool):
            raise L2BError(f"subset={cfg.subset} exceeds the {len(pool)} training images left after the clean set")
        pool = np.sort(rng.choice(pool, size=cfg.subset, replace=False))
    y_true = data.y_train[pool]
    noisy = noise_models.make_noise(cfg, data, pool, rng)
    noise_info = {
        "noise": cfg.noise if data.noisy_train is None else "given",
        "noise_rate": cfg.noise_rate if synthetic else None,  # no rate for labels used as given
        "noise_rate_actual": noisy.rate if known else None,
        "transition_matrix": noisy.transition.tolist() if known else None,
        "num_train": int(len(pool)),
        "num_clean": int(len(y_clean)),
        "trusted": trusted_origin(cfg, data, len(y_clean)),
    }
    x_train, y_obs, flipped = data.x_train[pool], noisy.labels, y_true != noisy.labels
    indices = pool
    paths = [data.paths[i] for i in pool] if data.paths is not None else None
    if trains_on_clean:  # ce+clean: the clean images join the training set with their true labels
        x_train = concat_images(x_train, x_clean)
        y_obs = np.concatenate([y_obs, y_clean])
        flipped = np.concatenate([flipped, np.zeros(len(y_clean), dtype=bool)])
        y_true = np.concatenate([y_true, y_clean])
        indices = np.concatenate([pool, clean_idx if data.x_val is None else np.full(len(y_clean), -1)])
        paths = None
    mean, std = channel_stats(x_train, seed=cfg.seed)

    def on_device(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)

    def images(x):  # image files (--stream) are decoded per batch by DataLoader workers
        return device_images(x, device, mean, std, workers=cfg.workers)

    return TrainData(
        train=images(x_train),
        y_observed=on_device(y_obs),
        flipped=torch.as_tensor(flipped).to(device) if known else None,
        clean=images(x_clean),
        y_clean=on_device(y_clean),
        test=images(data.x_test),
        y_test=on_device(data.y_test),
        num_classes=k,
        in_channels=data.x_train.shape[1],
        noise_info=noise_info,
        mean=mean,
        std=std,
        indices=np.asarray(indices, dtype=np.int64),
        y_true=y_true if known else None,
        paths=paths,
    )


def trusted_origin(cfg: Config, data: ImageData, size: int) -> str:
    """Where the clean (trusted) set comes from, in words (the run's plan, noise.json)."""
    if data.x_val is not None:
        return f"--trusted {cfg.trusted}" if cfg.trusted else "the data's own val (clean) split"
    if size:
        return "carved from the training set, class-balanced, with its labels before noise"
    return "none"


def data_check(cfg) -> dict:
    """What ``l2b train`` would train on with ``cfg``: split sizes and per-class counts, image shape,
    clean-set balance, and the realised noise (rate and transition matrix, or "unknown")."""
    import torch

    data = load_dataset(cfg)
    td = prepare_data(cfg, data, torch.device("cpu"), trains_on_clean=False)
    k = data.num_classes

    def counts(y) -> list[int]:
        return np.bincount(y.numpy(), minlength=k).tolist()

    clean = counts(td.y_clean)
    return {
        "dataset": data.name, "classes": data.classes, "image_shape": list(data.image_shape),
        "num_train": len(td.y_observed), "num_clean": len(td.y_clean), "num_test": len(td.y_test),
        "train_observed_counts": counts(td.y_observed), "clean_counts": clean, "test_counts": counts(td.y_test),
        "clean_balance": min(clean) / max(max(clean), 1),
        **td.noise_info,
    }


def format_data_check(r: dict) -> str:
    rate = "unknown" if r["noise_rate_actual"] is None else f"{100 * r['noise_rate_actual']:.2f}%"
    at = "" if r["noise_rate"] is None else f" at {100 * r['noise_rate']:.0f}%"
    width = max(6, *(len(c) for c in r["classes"]))
    lines = [
        f"data set {r['dataset']}: {len(r['classes'])} classes, images {tuple(r['image_shape'])} (C, H, W)",
        f"train {r['num_train']} (observed labels), clean {r['num_clean']}, test {r['num_test']}",
        f"clean (trusted) set: {r['trusted']}; balance (smallest / largest class): {r['clean_balance']:.2f}",
        f"noise {r['noise']}{at}: realised rate {rate}",
        f"{'class':<{width}} {'train':>7} {'clean':>7} {'test':>7}",
    ]
    for i, c in enumerate(r["classes"]):
        lines.append(f"{c:<{width}} {r['train_observed_counts'][i]:>7} {r['clean_counts'][i]:>7} {r['test_counts'][i]:>7}")
    if r["transition_matrix"] is None:
        lines.append("transition matrix: unknown (the true training labels are not known)")
    else:
        lines.append("transition matrix (rows: true class, columns: observed; rows sum to 1):")
        lines += ["  " + " ".join(f"{v:5.2f}" for v in row) for row in r["transition_matrix"]]
    return "\n".join(lines)
