"""The machine's limits, measured in this run: matrix-multiply throughput per precision (the ceiling every
compute figure is divided by) and the bandwidth of a large copy (the ceiling of memory-bound work).

Issue 8 quoted about 145 GFLOP/s fp32 and 377 GFLOP/s bf16 for the project's 2-core CPU; measured here,
PyTorch reaches about 390 to 430 fp32 (AVX-512) and 1,900 to 2,800 bf16 (oneDNN on the AMX tiles): the figures
below, not the quoted ones, are the ceilings.
"""

from __future__ import annotations

from typing import Any

from bench.common import copy_bandwidth, figure, matmul_peak


def run(full: bool, device: str = "cpu") -> list[dict[str, Any]]:
    size = 8192 if device == "cuda" else 4096 if full else 2048
    fp32 = matmul_peak("float32", device, size)
    bf16 = matmul_peak("bfloat16", device, size)
    bandwidth = copy_bandwidth(device)
    scale, unit = (1e12, "TFLOP/s") if device == "cuda" else (1e9, "GFLOP/s")
    return [
        figure(f"peak: matmul fp32 ({device})", fp32 / scale, unit, f"none: {size}x{size} matrices", 0.0),
        figure(f"peak: matmul bf16 ({device})", bf16 / scale, unit, "matmul fp32, same size", fp32 / scale),
        figure(f"peak: copy bandwidth ({device})", bandwidth / 1e9, "GB/s", "none: 256 MB read + written", 0.0),
    ]
