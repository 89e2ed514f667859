"""The ViT student's training step and attention-map evaluation against transformers' ViTForImageClassification
of the same configuration (ViT-S/16 at 224 px, grey input, 14 labels, BCE), side by side in one run.

Goals (issue 8): training samples/s at least 1.1x transformers at the same precision and 2x transformers at
fp32, with achieved FLOP/s at least 0.7 of the measured matmul peak of the precision used. The same at
evaluation with attention maps on (ours computes the weights explicitly only where asked; transformers needs
its eager attention for `output_attentions`). bf16 autocast where the CPU has it (GPUs always).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from bench.common import best_time, figure, matmul_peak

WIDTH, DEPTH, HEADS, PATCH, SIZE, LABELS = 384, 12, 6, 16, 224, 14


def step_flops(batch: int) -> float:
    """Forward + backward multiply-adds x 2 of a ViT-S/16 step (backward = 2x forward)."""
    tokens = (SIZE // PATCH) ** 2 + 1
    per_token = 2 * (12 * WIDTH**2) * DEPTH  # qkv, projection, 4x MLP: 12 d^2 weights per layer
    attention = 2 * 2 * tokens * WIDTH * DEPTH  # scores and weighted sum, per token
    embed = 2 * PATCH * PATCH * WIDTH
    return 3 * batch * tokens * (per_token + attention + embed)


def models(device: str) -> dict[str, Any]:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from medistill.models import create_model

    torch.manual_seed(0)
    ours = create_model("vit-small", image_size=SIZE, patch_size=PATCH, num_classes=LABELS).to(device)
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       intermediate_size=4 * WIDTH, image_size=SIZE, patch_size=PATCH, num_channels=1,
                       num_labels=LABELS)
    theirs = {kind: ViTForImageClassification._from_config(config, attn_implementation=kind).to(device)
              for kind in ("sdpa", "eager")}
    return {"ours": ours, **theirs}


def run(full: bool, device: str = "cpu") -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from medistill.engine.trainer import cpu_has_native_bf16

    batch = 32 if full else 8
    repeats = 3 if full else 2
    bf16 = device == "cuda" or cpu_has_native_bf16()
    nets = models(device)
    images = torch.randn(batch, 1, SIZE, SIZE, device=device)
    targets = torch.randint(0, 2, (batch, LABELS), device=device).float()

    def logits(name: str, attentions: bool = False) -> Any:
        if name == "ours":
            out = nets["ours"](images, return_attentions=attentions)
            return out["logits"]
        return nets[name](pixel_values=images, output_attentions=attentions).logits

    def train_step(name: str, low: bool) -> None:
        model = nets[name]
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16) if low else nullcontext():
            loss = F.binary_cross_entropy_with_logits(logits(name).float(), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def eval_step(name: str, low: bool) -> None:
        nets[name].eval()
        with torch.autocast(device, dtype=torch.bfloat16) if low else nullcontext():
            logits(name, attentions=True).float().sum().item()

    def rate(function: Any, *args: Any) -> float:
        function(*args)  # warm-up
        return batch / best_time(lambda: function(*args), repeats)

    low = bf16
    precision = "bf16" if low else "fp32"
    ours_train = rate(train_step, "ours", low)
    theirs_train = rate(train_step, "sdpa", low)
    theirs_fp32 = rate(train_step, "sdpa", False) if low else theirs_train
    ours_eval = rate(eval_step, "ours", low)
    theirs_eval = rate(eval_step, "eager", low)
    peak = matmul_peak("bfloat16" if low else "float32", device)
    achieved = ours_train / batch * step_flops(batch)
    shape = f"ViT-S/16, {SIZE} px, batch {batch}, {device}"
    return [
        figure(f"vit: train samples/s, {precision}", ours_train, "samples/s",
               f"transformers ViTForImageClassification (sdpa), {precision}, {shape}", theirs_train, goal=1.1),
        figure(f"vit: train samples/s, {precision} vs transformers fp32", ours_train, "samples/s",
               f"transformers ViTForImageClassification (sdpa), fp32, {shape}", theirs_fp32, goal=2.0),
        figure(f"vit: train FLOP/s of the {precision} peak", achieved / 1e9, "GFLOP/s",
               f"measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s", peak / 1e9, goal=0.7),
        figure(f"vit: eval samples/s with attention maps, {precision}", ours_eval, "samples/s",
               f"transformers (eager, output_attentions=True), {precision}, {shape}", theirs_eval, goal=1.1),
    ]
