"""Models chosen by name in configs: one class, many named variants as small factory functions (timm's habit)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch

from medistill.errors import ConfigError

MODELS: dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    def decorate(factory: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        MODELS[name] = factory
        return factory

    return decorate


def create_model(name: str, **kwargs: Any) -> torch.nn.Module:
    import medistill.models  # noqa: F401  (registers every variant)

    try:
        factory = MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (known: {', '.join(sorted(MODELS))})") from None
    return factory(**kwargs)
