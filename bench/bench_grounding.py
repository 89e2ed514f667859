"""ClinKD's tiny grounding model (configs/clinkd/phantom-tiny.yaml's student, a from-scratch Qwen2-VL with
MCG-RoPE): training tokens/s, generation tokens/s with and without the KV cache, and peak memory.

Goal (issue 6): generation with the KV cache at least 3x the tokens/s of generation without it, every
sample writing the same number of new tokens (EOS is ignored), greedy. The cached path only stays right if
MCG-RoPE's rope deltas are consistent while decoding; tests/models/test_grounding_model.py checks that the
cached and uncached answers are the same, this measures what the cache buys.

Also the share of a training step that preparing its batch takes (tokenising, image patches): the trainer
prepares batches in the training process, which is right while this share stays small.

On `--device cuda` the model runs on the GPU (the batch is still prepared by the CPU); on the CPU with torch's
default threads (OMP_NUM_THREADS when set).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.common import best_times, figure, matmul_peak, profile_matmuls

REPO = Path(__file__).resolve().parents[1]


def measure(full: bool, device: str) -> dict[str, float]:
    """All figures, measured while the phantom images (read lazily by the collate) still exist."""
    with tempfile.TemporaryDirectory() as folder:
        return _measure_on(Path(folder) / "phantom", full, device)


def _measure_on(root: Path, full: bool, device: str) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from medistill.config import load_config
    from medistill.data.phantom import PhantomKnobs, write_phantom
    from medistill.methods.clinkd import (MODEL_INPUTS, Collate, build_grounder, load_samples,
                                          train_grounding_tokenizer)
    from medistill.models.grounding.model import vision_token_ids

    batch, new_tokens = (32, 80) if full else (16, 48)
    write_phantom(root, cases=60, seed=0, knobs=PhantomKnobs(image_size=64))
    config = load_config(REPO / "configs" / "clinkd" / "phantom-tiny.yaml",
                         [f"data.root={root / 'med-grit'}", "data.max_train=null", "data.max_test=null"])
    samples = load_samples(config)["train"]
    grounder = build_grounder(config.student, train_grounding_tokenizer(samples, config.student.vocab_size), 0)
    model = grounder.model.to(device)
    chosen = samples[:batch]
    collate = Collate(grounder)

    # training: forward + backward + AdamW under the trainer's precision (bf16 autocast on this CPU)
    train_batch = collate(chosen)
    inputs = {key: train_batch[key].to(device) for key in (*MODEL_INPUTS, "labels")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def train_step(data: dict[str, Any] = inputs) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**data, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    epoch_samples = samples[:8 * batch]

    def loader_epoch(workers: int) -> None:
        """An epoch as the trainer runs it: batches prepared inline or by worker processes (train.workers)."""
        # workers fork, as under the CLI on Linux (this benchmark's own process was spawned, which DataLoader
        # would otherwise copy: every worker re-importing torch and unpickling the model)
        loader = DataLoader(epoch_samples, batch_size=batch, collate_fn=collate, num_workers=workers,
                            pin_memory=device == "cuda", multiprocessing_context="fork" if workers else None)
        for data in loader:
            train_step({key: data[key].to(device, non_blocking=True) for key in (*MODEL_INPUTS, "labels")})

    tokens = int(train_batch["attention_mask"].sum())
    seconds = best_times({"train": train_step, "collate": lambda: collate(chosen)}, repeats=5 if full else 3)
    train_seconds = seconds["train"]
    step_flops = profile_matmuls(train_step).flops  # the profiler's count: vision tower and decoder alike

    # generation: greedy, exactly `new_tokens` per sample, with and without the KV cache
    model.eval()
    prompt = {key: value.to(device) for key, value in
              grounder.encode(chosen, answers=False, padding_side="left").items() if key != "labels"}

    def generate(use_cache: bool) -> None:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 use_cache=use_cache, pad_token_id=grounder.tokenizer.pad_token_id,
                                 suppress_tokens=vision_token_ids(model.config))
        assert out.shape[1] == prompt["input_ids"].shape[1] + new_tokens

    generation = best_times({"cached": lambda: generate(True), "uncached": lambda: generate(False)},
                            repeats=3 if full else 2)
    cached, uncached = generation["cached"], generation["uncached"]
    model.train()
    workers = 4 if device == "cuda" else 2
    epoch = best_times({"inline": lambda: loader_epoch(0), "workers": lambda: loader_epoch(workers)}, repeats=2)
    return {"train_tokens_per_s": tokens / train_seconds, "train_samples": batch,
            "train_flops_per_s": step_flops / train_seconds, "peak": matmul_peak("bfloat16", device),
            "epoch_samples": len(epoch_samples), "workers": workers,
            "epoch_per_s_inline": 1 / epoch["inline"], "epoch_per_s_workers": 1 / epoch["workers"],
            "collate_share": seconds["collate"] / train_seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "generated_per_s_cached": batch * new_tokens / cached,
            "generated_per_s_uncached": batch * new_tokens / uncached,
            "prompt_tokens": int(prompt["input_ids"].shape[1]), "new_tokens": new_tokens}


def run(full: bool, device: str = "cpu") -> list[dict[str, Any]]:
    result = measure(full, device)
    shape = f"batch {result['train_samples']}, {result['prompt_tokens']} prompt + {result['new_tokens']} new tokens"
    size = f"{result['parameters'] / 1e6:.1f} M parameters"
    return [
        figure("grounding: ClinKD generation tokens/s, KV cache", result["generated_per_s_cached"], "tokens/s",
               f"the same greedy generation without the cache ({shape})", result["generated_per_s_uncached"], goal=3.0),
        figure("grounding: ClinKD training tokens/s (tiny student)", result["train_tokens_per_s"], "tokens/s",
               f"none: forward + backward + AdamW, bf16 autocast, {size}, {device}", 0.0),
        figure("grounding: ClinKD training FLOP/s of the bf16 peak", result["train_flops_per_s"] / 1e9, "GFLOP/s",
               f"measured bf16 matmul peak {result['peak'] / 1e9:.0f} GFLOP/s (step FLOPs: the profiler's count of "
               f"its multiplies)", result["peak"] / 1e9),
        figure("grounding: batch preparation, share of a training step", 100 * result["collate_share"], "%",
               "the training step of the same batch (the collate runs in the training process)", 100.0),
        figure(f"grounding: training epochs/s, {result['workers']} loader workers", result["epoch_per_s_workers"],
               "epochs/s", f"batches prepared in the training process (train.workers 0); {result['epoch_samples']} "
               f"samples, batch {result['train_samples']}, {device}", result["epoch_per_s_inline"]),
    ]
