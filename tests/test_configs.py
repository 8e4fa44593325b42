"""Every YAML in configs/ is a valid Config (keys, types, ranges)."""

from pathlib import Path

import pytest

from l2b.config import load_yaml, make_config
from l2b import list_methods

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_paper_settings_are_all_there():
    names = {p.stem for p in CONFIGS}
    for stem in ("cifar10-sym{}", "cifar100-sym{}", "isic2019-sym{}", "fashion-mnist-sym{}"):
        assert {stem.format(r) for r in (20, 30, 40, 50)} <= names
    assert {"cifar10-asym40", "fashion-mnist-asym40", "clothing1m"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_file_is_valid(path):
    cfg = make_config(load_yaml(path), source=str(path))  # raises on an unknown key or a value out of range
    assert cfg.method in list_methods()
    if "-sym" in path.stem or "-asym" in path.stem:  # the noise in the name is the noise in the file
        noise, rate = path.stem.rsplit("-", 1)[1].rstrip("0123456789"), int(path.stem[-2:]) / 100
        assert (cfg.noise, cfg.noise_rate) == (noise, rate)
    if path.stem.startswith("isic2019"):
        assert (cfg.model, cfg.normalize, cfg.temperature) == ("resnet50", "softmax", 10.0)


def test_alias_table_points_at_real_keys_and_beats_edit_distance():
    import dataclasses

    from l2b import L2BError
    from l2b.config import ALIASES, Config

    keys = {f.name for f in dataclasses.fields(Config)}
    assert set(ALIASES.values()) <= keys and not set(ALIASES) & keys
    for wrong, right in (("learning_rate", "lr"), ("num_epochs", "epochs"), ("noise_ratio", "noise_rate"),
                         ("save_every", "checkpoint_every"), ("arch", "model")):
        with pytest.raises(L2BError, match=f"unknown key '{wrong}' \\(did you mean '{right}'\\?\\)"):
            make_config({wrong: 1})


@pytest.mark.parametrize("text, value", [("2", (2, "epochs")), ("500steps", (500, "steps")),
                                         ("10min", (10.0, "minutes")), ("1 epoch", (1, "epochs")), (3, (3, "epochs"))])
def test_checkpoint_every_in_epochs_steps_or_minutes(text, value):
    from l2b.config import parse_interval

    cfg = make_config({"checkpoint_every": text})
    assert parse_interval(cfg.checkpoint_every) == value
