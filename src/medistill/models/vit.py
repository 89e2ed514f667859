"""A Vision Transformer for grey medical images that can return its attention maps.

Attention uses the fused `scaled_dot_product_attention` unless the caller asks for the weights
(`return_attentions=True`), in which case each block computes them explicitly, with no forward hooks.
One exception, measured: training on the CPU with short sequences, where PyTorch's fused backward is
slower than the plain product-softmax-product (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medistill.errors import ConfigError
from medistill.models.registry import register_model


@dataclass(frozen=True)
class ViTSpec:
    """Everything needed to rebuild the architecture; saved in the checkpoint's config.json."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    num_classes: int = 2
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    activation: str = "gelu"  # gelu | quick_gelu (CLIP)
    norm_eps: float = 1e-6
    pre_norm: bool = False  # a LayerNorm after the embeddings (CLIP's pre_layrnorm)
    stem: str = "patch"  # patch: one strided convolution (ViT); conv: stacked 3x3 convolutions (Xiao et al. 2021)
    stem_width: int = 0  # conv stem: channels of its first stage, doubling per stage up to `width`; 0: max(16, width // 8)
    stem_convs: int = 1  # conv stem: 3x3 convolutions per stage, the first with stride 2, the others stride 1

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} does not divide into {self.heads} heads")
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"stem must be patch or conv, not {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"a conv stem needs a power-of-two patch size, not {self.patch_size}")
        if self.stem_width < 0 or self.stem_convs < 1:
            raise ConfigError(f"stem_width must be >= 0 and stem_convs >= 1, not {self.stem_width} and {self.stem_convs}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if need_weights or _explicit_attention_is_faster(q):
            weights = attention_weights(q, k)
            out = F.dropout(weights, p) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width)), weights if need_weights else None


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)), scaling q (tokens x d) rather than the scores (tokens x tokens)."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)


# Up to this many tokens the CPU backward of the explicit attention beats the fused one (bf16, 64-wide heads:
# 2.2x at 197 tokens, 1.4x at 577, 0.5x at 1025); the fused forward is faster at every length.
CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 768


def _explicit_attention_is_faster(q: torch.Tensor) -> bool:
    short = q.shape[-2] <= CPU_EXPLICIT_ATTENTION_MAX_TOKENS
    return q.device.type == "cpu" and torch.is_grad_enabled() and short


class Block(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.attn = Attention(spec.width, spec.heads, spec.dropout)
        self.norm2 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        hidden = int(round(spec.width * spec.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(spec.width, hidden), ACTIVATIONS[spec.activation](), nn.Dropout(spec.dropout),
                                 nn.Linear(hidden, spec.width), nn.Dropout(spec.dropout))

    def forward(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), need_weights)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


def conv_stem(spec: ViTSpec) -> nn.Sequential:
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection to the token width.

    Each stage (one per halving) holds `stem_convs` 3x3 convolutions with batch norm and ReLU, the first
    strided; `stem_width` sets the first stage's channels.

    Early convolutions give a ViT the locality prior that small data sets cannot teach it
    ("Early Convolutions Help Transformers See Better", Xiao et al., 2021); the tokens, the CLS token
    and the attention maps stay exactly those of a ViT.
    """
    layers: list[nn.Module] = []
    channels, width = spec.in_chans, spec.stem_width or max(16, spec.width // 8)
    for _ in range(spec.patch_size.bit_length() - 1):
        for k in range(spec.stem_convs):
            layers += [nn.Conv2d(channels, width, 3, stride=1 if k else 2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        width = min(width * 2, spec.width)
    layers.append(nn.Conv2d(channels, spec.width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """ViT with a CLS token. `forward` returns a dict: logits, embedding (CLS), tokens, optional attentions."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = conv_stem(spec) if spec.stem == "conv" else nn.Conv2d(
            spec.in_chans, spec.width, spec.patch_size, stride=spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos_embed = nn.Parameter(torch.randn(1, spec.grid**2 + 1, spec.width) * 0.02)
        self.pre_norm = nn.LayerNorm(spec.width, eps=spec.norm_eps) if spec.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.head = nn.Linear(spec.width, spec.num_classes)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor, *, return_attentions: bool = False) -> dict[str, Any]:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = self.pre_norm(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, return_attentions)
            if weights is not None:
                attentions.append(weights)
        tokens = self.norm(x)
        out: dict[str, Any] = {"logits": self.head(tokens[:, 0]), "embedding": tokens[:, 0], "tokens": tokens}
        if return_attentions:
            out["attentions"] = attentions
        return out

    def architecture(self) -> dict[str, Any]:
        return {"name": "vit", **asdict(self.spec)}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


VARIANTS: dict[str, dict[str, int]] = {
    "vit-nano": {"width": 96, "depth": 4, "heads": 3},  # for tests and quick CPU runs
    "vit-tiny": {"width": 192, "depth": 12, "heads": 3},
    "vit-small": {"width": 384, "depth": 12, "heads": 6},
    "vit-base": {"width": 768, "depth": 12, "heads": 12},
}


def _register(name: str, sizes: dict[str, int]) -> None:
    @register_model(name)
    def factory(**kwargs: Any) -> VisionTransformer:
        return VisionTransformer(ViTSpec(**{**sizes, **kwargs}))

    factory.__doc__ = f"{name}: width {sizes['width']}, depth {sizes['depth']}, {sizes['heads']} heads."


for _name, _sizes in VARIANTS.items():
    _register(_name, _sizes)


def vit_from_architecture(architecture: dict[str, Any]) -> VisionTransformer:
    """Rebuild a ViT from the `architecture` entry of a checkpoint's config.json."""
    fields = {k: v for k, v in architecture.items() if k != "name"}
    return VisionTransformer(ViTSpec(**fields))
