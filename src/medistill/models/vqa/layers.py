"""Building blocks of the AMiF model: masked attention, co-attention fusion, gated cross-attention, decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, L) padding mask (1 = real token) as a boolean attention mask broadcastable to (B, heads, Lq, L)."""
    return None if mask is None else mask.bool()[:, None, None, :]


class MaskedAttention(nn.Module):
    """Multi-head attention of `query` over `context` with a key padding mask; fused SDPA kernel."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} does not divide into {heads} heads")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        batch, length, width = query.shape
        head = width // self.heads
        q = self.q(query).view(batch, length, self.heads, head).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, head).permute(2, 0, 3, 1, 4)
        mask = key_mask(context_mask)
        if causal:
            causal_mask = torch.ones(length, context.shape[1], dtype=torch.bool, device=query.device).tril()
            mask = causal_mask if mask is None else mask & causal_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(batch, length, width))


def feed_forward(width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width),
                         nn.Dropout(dropout))


class FusionBlock(nn.Module):
    """One side of a co-attention layer: self-attention, cross-attention to the other modality, feed-forward
    (post-norm, as in METER / M3AE). Without the other modality the cross-attention is skipped."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = MaskedAttention(width, heads, dropout)
        self.cross_attention = MaskedAttention(width, heads, dropout)
        self.ffn = feed_forward(width, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, other: torch.Tensor | None,
                other_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norms[0](x + self.drop(self.self_attention(x, x, mask)))
        if other is not None:
            x = self.norms[1](x + self.drop(self.cross_attention(x, other, other_mask)))
        return self.norms[2](x + self.ffn(x))


class CoAttentionLayer(nn.Module):
    """A fusion layer for both modalities; each side reads the other's input of this layer."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.text = FusionBlock(width, heads, dropout)
        self.image = FusionBlock(width, heads, dropout)

    def forward(self, text: torch.Tensor | None, text_mask: torch.Tensor | None, image: torch.Tensor | None,
                image_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        new_text = None if text is None else self.text(text, text_mask, image, image_mask)
        new_image = None if image is None else self.image(image, image_mask, text, text_mask)
        return new_text, new_image


class ResidualAttention(nn.Module):
    """METHODS.md's `MHA_a(Q, K, V) = LN(Q + MHA(Q, K, V))`."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = MaskedAttention(width, heads, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(query + self.attention(query, context, mask))


class GatedCrossAttention(nn.Module):
    """AMiF's Gated Cross-Attention over the embedded answer vocabulary P.

    `P1 = MHA_a(P, P, P)`, `P2 = LN(FFN(P1) + P1)`; `X1 = MHA_a(X, P2, P2)`; `G = sigmoid(W X1 + b)`;
    `Y = G * X1 + (1 - G) * X`; output `LN(FFN(Y) + Y)`. X holds the fused question and image tokens.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.answer_self = ResidualAttention(width, heads, dropout)
        self.answer_ffn = feed_forward(width, dropout)
        self.answer_norm = nn.LayerNorm(width)
        self.cross = ResidualAttention(width, heads, dropout)
        self.gate = nn.Linear(width, width)
        self.ffn = feed_forward(width, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        # P's self-attention does not depend on the sample: computed once per batch, not once per sample
        # (with ~400 answers it was 80% of a training step when expanded to the batch first).
        answers = answers.unsqueeze(0)
        p1 = self.answer_self(answers, answers)
        p2 = self.answer_norm(self.answer_ffn(p1) + p1)
        x1 = self.cross(tokens, p2.expand(tokens.shape[0], -1, -1))
        gate = torch.sigmoid(self.gate(x1))
        y = gate * x1 + (1 - gate) * tokens
        return self.norm(self.ffn(y) + y)


class AnswerDecoder(nn.Module):
    """A small causal transformer that writes the answer token by token, reading the fused tokens.

    Its vocabulary is the set of tokens that occur in the training answers (plus BOS / EOS / PAD), enough to
    score every candidate answer by its sequence likelihood (rank classification).
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, vocab_size: int, width: int, heads: int, layers: int, max_length: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(1, max_length + 1, width) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "self": MaskedAttention(width, heads, dropout), "cross": MaskedAttention(width, heads, dropout),
            "ffn": feed_forward(width, dropout), "norms": nn.ModuleList(nn.LayerNorm(width) for _ in range(3))})
            for _ in range(layers))
        self.head = nn.Linear(width, vocab_size)

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits (B, L, vocab) for input token ids (B, L) that start with BOS."""
        x = self.embed(inputs) + self.position[:, : inputs.shape[1]]
        for layer in self.layers:
            norms = layer["norms"]
            x = norms[0](x + layer["self"](x, x, inputs != self.PAD, causal=True))
            x = norms[1](x + layer["cross"](x, memory, memory_mask))
            x = norms[2](x + layer["ffn"](x))
        return self.head(x)

    def sequence_log_likelihood(self, answers: torch.Tensor, memory: torch.Tensor,
                                memory_mask: torch.Tensor | None) -> torch.Tensor:
        """log p(answer | memory) summed over tokens, for answer token rows (B, L) ending with EOS then PAD."""
        bos = torch.full_like(answers[:, :1], self.BOS)
        logits = self(torch.cat([bos, answers[:, :-1]], dim=1), memory, memory_mask)
        log_probs = logits.float().log_softmax(-1).gather(-1, answers.unsqueeze(-1)).squeeze(-1)
        return (log_probs * (answers != self.PAD)).sum(-1)
