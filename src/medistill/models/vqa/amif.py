"""The AMiF Med-VQA model (METHODS.md section 2): two encoders, projections to a shared space, co-attention
fusion with modality-type embeddings, an image-text matching head, Gated Cross-Attention over the embedded
answer vocabulary, and an answer head (a small generative decoder used for rank classification, or a
classification head).

The answer vocabulary lives in the model as buffers (`answer_sequences` for the decoder, `answer_words` for
GCA), built from training answers only, so a checkpoint carries everything it needs to answer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medistill.errors import ConfigError
from medistill.models.text import ScratchTextSpec, TextEncoder
from medistill.models.vit import VisionTransformer, vit_from_architecture
from medistill.models.vqa.layers import AnswerDecoder, CoAttentionLayer, GatedCrossAttention

ANSWER_HEADS = ("decoder", "classifier")
TEMPERATURES = ("image_text", "image_image", "text_text")


@dataclass
class AMiFSpec:
    """Everything needed to rebuild the model; saved in the checkpoint's config.json."""

    image: dict[str, Any]  # the ViT's architecture (models.vit)
    text_encoder: str = "minilm-l6"  # 'minilm-l6', a local BERT-family directory, or 'scratch'
    text_scratch: dict[str, Any] = field(default_factory=dict)  # ScratchTextSpec fields when text_encoder=scratch
    text_max_length: int = 40
    embed_dim: int = 128
    fusion_width: int = 192
    fusion_layers: int = 2
    fusion_heads: int = 4
    dropout: float = 0.1
    answer_head: str = "decoder"
    decoder_layers: int = 2
    decoder_vocab: int = 3  # answer tokens + PAD / BOS / EOS
    answer_length: int = 8  # decoder tokens per answer, EOS included
    answers: int = 1
    answer_word_length: int = 8
    gca: bool = True
    use_image: bool = True
    use_question: bool = True

    def __post_init__(self) -> None:
        if self.answer_head not in ANSWER_HEADS:
            raise ConfigError(f"model.answer_head must be one of {', '.join(ANSWER_HEADS)}, not {self.answer_head!r}")
        if not (self.use_image or self.use_question):
            raise ConfigError("a VQA model needs the image, the question or both")


class AMiFModel(nn.Module):
    def __init__(self, spec: AMiFSpec, *, image_encoder: VisionTransformer | None = None,
                 text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder or vit_from_architecture(spec.image)
        scratch = ScratchTextSpec(**spec.text_scratch) if spec.text_encoder == "scratch" else None
        self.text_encoder = text_encoder or TextEncoder(spec.text_encoder, max_length=spec.text_max_length,
                                                        scratch=scratch)
        image_width, text_width, width = self.image_encoder.spec.width, self.text_encoder.width, spec.fusion_width
        self.image_projection = nn.Linear(image_width, spec.embed_dim)
        self.text_projection = nn.Linear(text_width, spec.embed_dim)
        self.log_temperatures = nn.Parameter(torch.full((len(TEMPERATURES),), math.log(0.07)))
        self.image_to_fusion = nn.Linear(image_width, width)
        self.text_to_fusion = nn.Linear(text_width, width)
        self.type_embedding = nn.Embedding(2, width)  # 0 = text, 1 = image
        self.fusion = nn.ModuleList(CoAttentionLayer(width, spec.fusion_heads, spec.dropout)
                                    for _ in range(spec.fusion_layers))
        self.itm_head = nn.Linear(2 * width, 2)
        self.answer_projection = nn.Linear(text_width, width)
        self.gca = GatedCrossAttention(width, spec.fusion_heads, spec.dropout) if spec.gca else None
        if spec.answer_head == "decoder":
            self.decoder: AnswerDecoder | None = AnswerDecoder(spec.decoder_vocab, width, spec.fusion_heads,
                                                               spec.decoder_layers, spec.answer_length, spec.dropout)
            self.classifier: nn.Module | None = None
        else:
            self.decoder = None
            self.classifier = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width),
                                            nn.Linear(2 * width, spec.answers))
        self.register_buffer("answer_sequences", torch.zeros(spec.answers, spec.answer_length, dtype=torch.long))
        self.register_buffer("answer_words", torch.zeros(spec.answers, spec.answer_word_length, dtype=torch.long))
        self.register_buffer("answer_word_mask", torch.zeros(spec.answers, spec.answer_word_length, dtype=torch.long))

    # -- encoders and the shared space -------------------------------------------------------------

    def temperature(self, name: str) -> torch.Tensor:
        return self.log_temperatures[TEMPERATURES.index(name)].exp()

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All ViT tokens (CLS first) of normalised images (B, 1, H, W)."""
        return self.image_encoder(images)["tokens"]

    def text_tokens(self, batch: dict[str, Any], prefix: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """Token features and mask of a text field: cached features when the batch has them, else the encoder."""
        if f"{prefix}_features" in batch:
            return batch[f"{prefix}_features"].float(), batch[f"{prefix}_mask"]
        mask = batch[f"{prefix}_mask"]
        return self.text_encoder(batch[f"{prefix}_ids"], mask)["tokens"], mask

    def image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.image_projection(tokens[:, 0])

    def text_embedding(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return self.text_projection((tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0))

    # -- fusion --------------------------------------------------------------------------------------

    def fuse(self, text: torch.Tensor | None, text_mask: torch.Tensor | None,
             image: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Co-attention over both modalities (either may be None for the single-modality baselines)."""
        t = None if text is None else self.text_to_fusion(text) + self.type_embedding.weight[0]
        v = None if image is None else self.image_to_fusion(image) + self.type_embedding.weight[1]
        for layer in self.fusion:
            t, v = layer(t, text_mask, v, None)
        return t, v

    def itm_logits(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.itm_head(torch.cat([text[:, 0], image[:, 0]], dim=-1))

    def answer_memory(self, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                      image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """X = [fused question tokens; fused image tokens] (after GCA when enabled) and its padding mask."""
        parts, masks = [], []
        if text is not None:
            parts.append(text)
            masks.append(text_mask if text_mask is not None else torch.ones(text.shape[:2], device=text.device))
        if image is not None:
            parts.append(image)
            masks.append(torch.ones(image.shape[:2], device=image.device, dtype=masks[0].dtype if masks else torch.long))
        memory, mask = torch.cat(parts, dim=1), torch.cat([m.long() for m in masks], dim=1)
        if self.gca is not None:
            memory = self.gca(memory, self.answer_embeddings())
        return memory, mask

    def answer_embeddings(self) -> torch.Tensor:
        """P: each training answer as the mean of its words' embeddings (the embedding table only), projected."""
        words = self.text_encoder.word_embeddings(self.answer_words)
        weights = self.answer_word_mask.unsqueeze(-1).to(words.dtype)
        return self.answer_projection((words * weights).sum(1) / weights.sum(1).clamp(min=1.0))

    # -- answering -------------------------------------------------------------------------------------

    def _pooled(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(memory.dtype)
        return torch.cat([memory[:, 0], (memory * weights).sum(1) / weights.sum(1).clamp(min=1.0)], dim=-1)

    def answer_loss(self, memory: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the right answer (indices into the vocabulary): per token for the decoder."""
        if self.decoder is None:
            return F.cross_entropy(self.classifier(self._pooled(memory, mask)).float(), targets)
        answers = self.answer_sequences[targets]
        inputs = torch.cat([torch.full_like(answers[:, :1], AnswerDecoder.BOS), answers[:, :-1]], dim=1)
        logits = self.decoder(inputs, memory, mask)
        return F.cross_entropy(logits.float().flatten(0, 1), answers.flatten(), ignore_index=AnswerDecoder.PAD)

    @torch.no_grad()
    def rank_answers(self, memory: torch.Tensor, mask: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `top_k` best answers (indices, scores as log-probabilities), best first.

        Decoder: rank classification, i.e. candidates by the probability of their first token, rescored by
        their whole sequence's likelihood. Classifier: the top of its softmax.
        """
        k = min(top_k, self.spec.answers)
        if self.decoder is None:
            scores, indices = self.classifier(self._pooled(memory, mask)).float().log_softmax(-1).topk(k, dim=-1)
            return indices, scores
        bos = torch.full((memory.shape[0], 1), AnswerDecoder.BOS, dtype=torch.long, device=memory.device)
        first = self.decoder(bos, memory, mask)[:, 0].float().log_softmax(-1)  # (B, vocab)
        candidate_first = first[:, self.answer_sequences[:, 0]]  # (B, answers)
        candidates = candidate_first.topk(k, dim=-1).indices  # (B, k)
        batch = memory.shape[0]
        rows = self.answer_sequences[candidates.flatten()]  # (B * k, L)
        repeated_mask = mask.repeat_interleave(k, dim=0)
        likelihood = self.decoder.sequence_log_likelihood(rows, memory.repeat_interleave(k, dim=0), repeated_mask)
        scores, order = likelihood.view(batch, k).sort(dim=-1, descending=True)
        return candidates.gather(1, order), scores

    def architecture(self) -> dict[str, Any]:
        return {"name": "amif", **asdict(self.spec)}


def amif_from_architecture(architecture: dict[str, Any]) -> AMiFModel:
    """Rebuild an AMiF model from a checkpoint's `architecture` entry (weights are loaded separately)."""
    return AMiFModel(AMiFSpec(**{k: v for k, v in architecture.items() if k != "name"}))
