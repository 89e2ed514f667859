"""Typed run configuration: dataclass schemas, YAML recipes (safe_load), `--set a.b=c` overrides.

A recipe is a YAML mapping with a top-level `method` key that picks its schema from `RECIPES`.
Every key is checked against the schema: an unknown key is an error naming it and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medistill.errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where the samples come from and how images are prepared."""

    format: str = "phantom"
    root: str = "runs/phantom"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the format's reader
    modality: str | None = None  # keep only records of this modality
    labels: list[str] = field(default_factory=list)  # empty: every label the records carry
    image_size: int = 64


@dataclass
class ModelConfig:
    """A model from the registry by name, with its size options."""

    name: str = "vit-tiny"
    patch_size: int = 8
    stem: str = "patch"  # patch (plain ViT) | conv (early convolutions; better on small data sets)
    stem_width: int = 0  # conv stem: channels of its first stage (0: max(16, width // 8))
    stem_convs: int = 1  # conv stem: 3x3 convolutions per stage (the first strided)
    dropout: float = 0.0


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warm-up."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    clip_grad_norm: float | None = 1.0
    accumulate: int = 1


@dataclass
class EarlyStoppingConfig:
    metric: str | None = None  # None: train all epochs and keep the last model
    mode: str = "max"
    patience: int = 5


@dataclass
class TrainConfig:
    """The shared trainer's loop settings."""

    seed: int = 0
    epochs: int = 10
    batch_size: int = 32  # the global batch: under torchrun each of N processes takes batch_size / N
    eval_batch_size: int = 128
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # steps; 0 = once per epoch
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    progress: bool = True  # shown only on a terminal
    max_bad_steps: int = 0  # batches with a non-finite loss skipped (and logged) before the run stops
    parallel: str = "ddp"  # under torchrun: ddp (a whole model per process) | fsdp (sharded: docs/scaling.md)
    workers: int = 0  # DataLoader worker processes preparing training batches beside the step (useful on a GPU)


@dataclass
class ClassifierConfig:
    """An image-only classifier on one image modality: the baseline every method compares with."""

    method: str = "classifier"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RECIPES: dict[str, type] = {"classifier": ClassifierConfig}


def register_recipe(name: str, schema: type) -> None:
    """Make `method: name` in a recipe resolve to `schema` (a dataclass with a `method` field)."""
    RECIPES[name] = schema


# ----------------------------------------------------------------------------------------------
# building dataclasses from plain data


def from_dict(schema: type[T], data: Any, where: str = "") -> T:
    """Build `schema` from a mapping, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(where, str(key)), str(key), list(fields)))
    values = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return schema(**values)


def to_dict(config: Any) -> Any:
    """A plain, YAML-safe copy of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return config


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(valid)}"
    return f"unknown config key {path!r}{hint}"


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(hint, value, where)


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# recipes and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass an existing recipe, e.g. configs/demo/classifier.yaml") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: fix the file or pass another recipe") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of config keys, not a {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], schema: type, assignment: str) -> None:
    """Apply one `a.b=c` to raw config data; the value is parsed as YAML; the key must exist in `schema`."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=3), got {assignment!r}")
    parts = key.strip().split(".")
    node_schema: Any = schema
    node = data
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_schema)]
        if part not in names:
            path = ".".join(parts[: depth + 1])
            raise ConfigError("--set: " + _unknown_key_message(path, part, names))
        hint = _unwrap_optional(typing.get_type_hints(node_schema)[part])
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"--set: {'.'.join(parts[:depth + 1])!r} is a value, not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set: {'.'.join(parts[:depth + 1])!r} in the recipe is not a mapping")
        node, node_schema = child, hint


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def schema_for(data: dict[str, Any], default_method: str | None = None) -> type:
    import medistill.methods  # noqa: F401  (importing the methods registers their recipe schemas)

    method = data.get("method", default_method)
    if method is None:
        raise ConfigError(f"the recipe has no 'method' key; set one of: {', '.join(sorted(RECIPES))}")
    try:
        return RECIPES[method]
    except KeyError:
        close = difflib.get_close_matches(str(method), list(RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {method!r}{hint} (known: {', '.join(sorted(RECIPES))})") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, method: str | None = None) -> Any:
    """Read a recipe (or start from the defaults of `method`), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    schema = schema_for(data, method)
    for assignment in overrides or []:
        apply_override(data, schema, assignment)
    return from_dict(schema, data)


def dump_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
