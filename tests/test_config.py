from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medistill.config import ClassifierConfig, dump_config, load_config, to_dict
from medistill.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_and_overrides(tmp_path):
    path = write(tmp_path, "method: classifier\ntrain: {epochs: 3}\noptim: {betas: [0.8, 0.9]}\n")
    config = load_config(path, ["train.batch_size=7", "optim.lr=3e-4", "data.modality=null", "data.labels=[a, b]"])
    assert isinstance(config, ClassifierConfig)
    assert config.train.epochs == 3 and config.train.batch_size == 7
    assert config.optim.lr == pytest.approx(3e-4) and config.optim.betas == (0.8, 0.9)
    assert config.data.modality is None and config.data.labels == ["a", "b"]


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'epochs'"):
        load_config(write(tmp_path, "method: classifier\ntrain: {epoch: 3}\n"))
    with pytest.raises(ConfigError, match=r"--set.*'optim.lrr'.*did you mean 'lr'"):
        load_config(write(tmp_path, "method: classifier\n"), ["optim.lrr=1"])


@pytest.mark.parametrize("text, message", [
    ("method: classifier\ntrain: {epochs: many}\n", "expected an integer"),
    ("method: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must hold a YAML mapping"),
    ("method: clasifier\n", "did you mean 'classifier'"),
    ("train: {epochs: 1}\n", "no 'method' key"),
    ("method: classifier\ntrain: 3\n", "expected a mapping"),
])
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override, message", [
    ("train.epochs", "expects KEY=VALUE"),
    ("train.epochs.x=1", "is a value, not a section"),
    ("train.epochs=[1", "cannot parse value"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "method: classifier\n"), [override])


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trip(tmp_path):
    config = load_config(write(tmp_path, "method: classifier\n"), ["train.early_stopping.metric=auroc"])
    dump_config(config, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(config)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["early_stopping"]["metric"] == "auroc"


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_loads(recipe):
    from medistill.config import load_config

    config = load_config(recipe, [])
    assert config.method in recipe.parent.name or recipe.parent.name == "demo"
