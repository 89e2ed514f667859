"""Tiny helpers every benchmark shares: best-of-N wall time and the result record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The best wall time of `repeats` calls of `fn`, in seconds (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution", "aten::convolution_backward")


@dataclass(frozen=True)
class MatmulProfile:
    share: float  # of the step's operator time spent in matrix multiplies (and convolutions)
    flops: float  # their floating-point operations, as the profiler counts them
    rate: float  # FLOP/s those kernels reach on their own


def profile_matmuls(step: Callable[[], Any]) -> MatmulProfile:
    """One profiled call of `step`. Where a step falls short of the peak, this says whether the multiplies are
    slow or the time goes elsewhere (elementwise work, casts, copies); its FLOP count also gives the step's
    achieved FLOP/s where no formula does."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_flops=True) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]  # operators, not their kernels
    device_time = any(e.self_device_time_total for e in events)

    def seconds(event: Any) -> float:
        return (event.self_device_time_total if device_time else event.self_cpu_time_total) / 1e6

    matmul = [e for e in events if e.key in MATMUL_OPS]
    matmul_time = sum(seconds(e) for e in matmul)
    flops = float(sum(e.flops for e in matmul))
    return MatmulProfile(matmul_time / sum(seconds(e) for e in events), flops, flops / matmul_time)


def best_times(functions: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, float]:
    """The best wall time of each function, measured in turns (a warm-up call of each, then one call of each
    per round): a slow spell of a noisy machine then hits every contender alike, and their ratio holds."""
    for fn in functions.values():
        fn()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def figure(name: str, value: float, unit: str, baseline: str, reference: float, goal: float | None = None) -> dict[str, Any]:
    """One result: `value` compared with `reference` (described by `baseline`); met when ratio >= goal."""
    ratio = value / reference if reference else None
    met = None if goal is None or ratio is None else bool(ratio >= goal)
    return {"name": name, "value": round(value, 4), "unit": unit, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "met": met}


def matmul_peak(dtype_name: str, device: str = "cpu", size: int | None = None, repeats: int = 10) -> float:
    """Measured matrix-multiply throughput in FLOP/s for square `size` matrices of `dtype_name`
    ("float32" or "bfloat16") on `device`: the ceiling compute figures are divided by. The default size
    is one the device reaches its peak at (8192 on a GPU, 2048 on a CPU)."""
    import torch

    size = size or (8192 if device == "cuda" else 2048)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def multiply() -> None:
        (a @ b).sum().item()  # .item() waits for a GPU

    multiply()
    return 2 * size**3 / best_time(multiply, repeats)


def copy_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes per second read plus written by a large tensor copy (the memory-bound parts' ceiling)."""
    import torch

    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)

    def copy() -> None:
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()

    copy()
    return 2 * source.numel() * 4 / best_time(copy, repeats)


def run_module(name: str, full: bool, device: str) -> tuple[list[dict[str, Any]], float]:
    """`bench.<name>.run(full, device)` and this process's peak resident memory in MB (run in a child)."""
    import importlib
    import resource

    results = importlib.import_module(f"bench.{name}").run(full, device)
    return results, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
