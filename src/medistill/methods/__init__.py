"""The stages of each method. `RUNNERS` maps a recipe's `method` to the function that trains it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medistill.engine.rundir import RunDir

Runner = Callable[[Any, RunDir, bool], dict[str, Any]]
RUNNERS: dict[str, Runner] = {}


def register_runner(method: str) -> Callable[[Runner], Runner]:
    def decorate(runner: Runner) -> Runner:
        RUNNERS[method] = runner
        return runner

    return decorate


from medistill.methods import amif, classifier, clinkd, mmpkd  # noqa: E402,F401  (register their runners)
