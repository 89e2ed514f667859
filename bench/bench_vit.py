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

from bench.common import best_times, figure, matmul_peak, profile_matmuls

WIDTH, DEPTH, HEADS, PATCH, SIZE, LABELS = 384, 12, 6, 16, 224, 14
GPU_BATCH = 256


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


def attention_figure(device: str, low: bool, batch: int, repeats: int) -> dict[str, Any]:
    """What the attention path of a training step costs, explicit (product, softmax, product) against the
    fused kernel, at ViT-S/16's shapes: the numbers behind the model's choice of path (explicit for CPU
    training up to CPU_EXPLICIT_ATTENTION_MAX_TOKENS, fused elsewhere)."""
    import torch
    import torch.nn.functional as F

    from medistill.models.vit import attention_weights

    dtype = torch.bfloat16 if low else torch.float32
    tokens, head = (SIZE // PATCH) ** 2 + 1, WIDTH // HEADS
    q, k, v = (torch.randn(batch, HEADS, tokens, head, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def step(explicit: bool) -> None:
        if explicit:
            out = attention_weights(q, k) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    times = best_times({"explicit": lambda: step(True), "fused": lambda: step(False)}, repeats * 3)
    return figure(f"vit: attention forward + backward, explicit vs fused ({device})", 1 / times["explicit"],
                  "blocks/s", f"scaled_dot_product_attention ({1e3 * times['fused']:.2f} ms against "
                  f"{1e3 * times['explicit']:.2f} ms; batch {batch}, {HEADS} heads, {tokens} tokens)",
                  1 / times["fused"])


def compile_figure(step: Any, eager: Any, batch: int, repeats: int) -> dict[str, Any]:
    """What torch.compile (which fuses the elementwise work between the multiplies) would buy the step."""
    import time

    started = time.perf_counter()
    step()
    compile_seconds = time.perf_counter() - started
    times = best_times({"compiled": step, "eager": eager}, repeats)
    return figure("vit: train samples/s, torch.compile (not used by medistill)", batch / times["compiled"], "samples/s",
                  f"ours without compiling; compiling took {compile_seconds:.0f} s", batch / times["eager"])


def run(full: bool, device: str = "cpu") -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from medistill.engine.trainer import cpu_has_native_bf16

    batch = 32  # the configuration at every size; --full only measures more rounds
    repeats = 5 if full else 2
    bf16 = device == "cuda" or cpu_has_native_bf16()
    nets = models(device)
    sizes = {batch, GPU_BATCH} if device == "cuda" else {batch}
    inputs = {size: (torch.randn(size, 1, SIZE, SIZE, device=device),
                     torch.randint(0, 2, (size, LABELS), device=device).float()) for size in sizes}

    def logits(name: str, size: int = batch, attentions: bool = False) -> Any:
        images = inputs[size][0]
        if name.startswith("ours"):
            out = nets[name](images, return_attentions=attentions)
            return out["logits"]
        return nets[name](pixel_values=images, output_attentions=attentions).logits

    def train_step(name: str, low: bool, size: int = batch) -> None:
        model = nets[name]
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16) if low else nullcontext():
            loss = F.binary_cross_entropy_with_logits(logits(name, size).float(), inputs[size][1])
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def eval_step(name: str, low: bool) -> None:
        nets[name].eval()
        with torch.autocast(device, dtype=torch.bfloat16) if low else nullcontext():
            logits(name, attentions=True).float().sum().item()

    low = bf16
    precision = "bf16" if low else "fp32"
    train = best_times({"ours": lambda: train_step("ours", low), "theirs": lambda: train_step("sdpa", low),
                        "theirs fp32": lambda: train_step("sdpa", False)}, repeats)
    ours_train, theirs_train, theirs_fp32 = (batch / train[k] for k in ("ours", "theirs", "theirs fp32"))
    evaluation = best_times({"ours": lambda: eval_step("ours", low), "theirs": lambda: eval_step("eager", low)},
                            repeats)
    ours_eval, theirs_eval = batch / evaluation["ours"], batch / evaluation["theirs"]
    peak = matmul_peak("bfloat16" if low else "float32", device)
    achieved = ours_train / batch * step_flops(batch)
    matmuls = profile_matmuls(lambda: train_step("ours", low))
    shape = f"ViT-S/16, {SIZE} px, batch {batch}, {device}"
    extra = [attention_figure(device, low, batch, repeats)]
    if full:
        nets["ours compiled"] = torch.compile(nets["ours"])
        extra.append(compile_figure(lambda: train_step("ours compiled", low), lambda: train_step("ours", low),
                                    batch, repeats))
    if device == "cuda":  # batch 32 leaves a GPU waiting on kernel launches; a batch that fills it
        big = GPU_BATCH / best_times({"ours": lambda: train_step("ours", low, GPU_BATCH)}, repeats)["ours"]
        extra.append(figure(f"vit: train FLOP/s of the {precision} peak, batch {GPU_BATCH}",
                            big / GPU_BATCH * step_flops(GPU_BATCH) / 1e9, "GFLOP/s",
                            f"measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s", peak / 1e9, goal=0.7))
    return extra + [
        figure(f"vit: train samples/s, {precision}", ours_train, "samples/s",
               f"transformers ViTForImageClassification (sdpa), {precision}, {shape}", theirs_train, goal=1.1),
        figure(f"vit: train samples/s, {precision} vs transformers fp32", ours_train, "samples/s",
               f"transformers ViTForImageClassification (sdpa), fp32, {shape}", theirs_fp32, goal=2.0),
        figure(f"vit: train FLOP/s of the {precision} peak", achieved / 1e9, "GFLOP/s",
               f"measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s", peak / 1e9, goal=0.7),
        figure("vit: train time in matrix multiplies", 100 * matmuls.share, "%",
               "torch.profiler, one step: mm, addmm, bmm and the patch convolution, forward and backward", 100),
        figure(f"vit: matrix-multiply kernels' FLOP/s of the {precision} peak", matmuls.rate / 1e9, "GFLOP/s",
               f"measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s (the profiler's FLOP count)", peak / 1e9),
        figure(f"vit: eval samples/s with attention maps, {precision}", ours_eval, "samples/s",
               f"transformers (eager, output_attentions=True), {precision}, {shape}", theirs_eval, goal=1.1),
    ]
