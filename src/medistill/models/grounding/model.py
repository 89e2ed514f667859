"""Qwen2-VL (and Qwen2.5-VL) with MCG-RoPE position ids, tiny configs, checkpoints and image preprocessing.

**Where MCG-RoPE goes in.** In transformers 5.23 every multimodal position id of Qwen2-VL comes from one
method, the inner model's `get_rope_index`:
- a forward pass without `position_ids` (training with labels, evaluation, a prefill) calls
  `Qwen2VLModel.compute_3d_position_ids`, which calls `get_rope_index` when there is no cache yet and stores
  its `rope_deltas`; later cached steps without `position_ids` (a hand-written decoding loop) get
  `cumsum(attention_mask) - 1 + rope_deltas` of their new tokens (`decode_position_ids`; done here, since
  transformers 5.23 returns the whole mask's positions there and the step fails on a shape mismatch);
- `generate()` calls `Qwen2VLForConditionalGeneration._prepare_position_ids_for_generation` once, which
  calls `get_rope_index` on the prompt, keeps `(4, batch, length)` ids (text row + 3 M-RoPE rows) and extends
  them by `last + 1` per new token, with or without the KV cache. Our prompts end in text, so the new tokens
  continue at `max(prompt positions) + 1 + k`, which is what `rope_deltas` gives (a prompt ending in an image
  would continue at its last image token's position + 1, in stock transformers as here).
`MCGQwen2VLModel.get_rope_index` returns `mcg_rope_index(...)` with the gaps stored in
`config.mcg_rope = {"inter_gap": [...], "intra_stride": [...]}`. Transformers finds image tokens through
`mm_token_type_ids` and refuses images without them; ours come from `image_token_id`, so both callers get
`mm_token_type_ids` filled in from `input_ids` when they are missing (never used for the positions). Videos are
refused. `inter_gap=(1, 1, 1), intra_stride=(1, 1)` is stock Qwen2-VL exactly.

Checkpoints are Hugging Face directories (`config.json` with `mcg_rope`, `model.safetensors`, the tokenizer,
`preprocessor_config.json`), loaded with `local_files_only=True`; a real Qwen2-VL directory loads the same
way with our class swapped in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, PreTrainedConfig  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from medistill.data.imaging import DICOM_SUFFIXES, load_image  # noqa: E402
from medistill.engine.distributed import main_only  # noqa: E402
from medistill.errors import UsageError  # noqa: E402
from medistill.models.grounding.rope import decode_position_ids, mcg_rope_index  # noqa: E402
from medistill.models.grounding.tokenizer import (  # noqa: E402
    Example,
    PromptStyle,
    build_example,
    load_tokenizer,
    pad_examples,
)

try:  # Qwen2.5-VL: same position-id machinery, another vision tower
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLModel,
        Qwen2_5_VLPreTrainedModel,
    )
except ImportError:  # pragma: no cover - older transformers
    Qwen2_5_VLConfig = None  # type: ignore[assignment,misc]

hf_logging.disable_progress_bar()

MCG_KEY = "mcg_rope"
CLINKD_GAPS: dict[str, list[int]] = {"inter_gap": [2, 2, 2], "intra_stride": [1, 1]}
STOCK_GAPS: dict[str, list[int]] = {"inter_gap": [1, 1, 1], "intra_stride": [1, 1]}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


# ----------------------------------------------------------------------------------------------- MCG-RoPE
def mcg_rope_settings(config: Any) -> dict[str, list[int]]:
    """`{"inter_gap": [a, b, c], "intra_stride": [d, e]}` from `config.mcg_rope` (ClinKD's default if unset)."""
    raw = getattr(config, MCG_KEY, None) or CLINKD_GAPS
    if not isinstance(raw, Mapping) or set(raw) - {"inter_gap", "intra_stride"}:
        raise UsageError(f"config.{MCG_KEY} must be a mapping with inter_gap and intra_stride, got {raw!r}")
    settings = {"inter_gap": [int(v) for v in raw.get("inter_gap", CLINKD_GAPS["inter_gap"])],
                "intra_stride": [int(v) for v in raw.get("intra_stride", CLINKD_GAPS["intra_stride"])]}
    if len(settings["inter_gap"]) != 3 or len(settings["intra_stride"]) != 2 or \
            min(settings["inter_gap"] + settings["intra_stride"]) < 1:
        raise UsageError(f"config.{MCG_KEY}: inter_gap needs 3 and intra_stride 2 integers >= 1, got {raw!r}")
    return settings


def vision_token_ids(config: Any) -> list[int]:
    """The image, video and vision start / end token ids: never part of an answer, so generation suppresses
    them (an untrained model may pick one, which re-read as an image placeholder breaks the next step)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(config, n)) for n in names if getattr(config, n, None) is not None]


def vision_token_types(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Transformers' `mm_token_type_ids` (0 text, 1 image, 2 video) read from the image and video token ids."""
    types = (input_ids == config.image_token_id).int()
    return types + 2 * (input_ids == config.video_token_id).int()


class _MCGRopeIndex:
    """Mixin for the inner Qwen2-VL model: `get_rope_index` is MCG-RoPE on `image_token_id`."""

    config: Any

    def get_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """MCG-RoPE `(position_ids (3, batch, length), rope_deltas (batch, 1))`; `mm_token_type_ids` unused."""
        if video_grid_thw is not None:
            raise NotImplementedError("MCG-RoPE covers images only; videos are not supported")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("MCG-RoPE needs a 2-D attention mask (batch, length) to place the positions")
        settings = mcg_rope_settings(self.config)
        return mcg_rope_index(input_ids, image_grid_thw, attention_mask, image_token_id=self.config.image_token_id,
                              spatial_merge_size=self.config.vision_config.spatial_merge_size, **settings)

    def compute_3d_position_ids(self, input_ids: torch.Tensor | None = None,
                                inputs_embeds: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                                video_grid_thw: torch.Tensor | None = None,
                                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                                mm_token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
        """Transformers' own, with `mm_token_type_ids` read from `input_ids` when missing, and cached steps
        placed by `decode_position_ids` (transformers 5.23 gives a cached step with a 2-D mask the whole
        mask's positions instead of the new tokens', which breaks a hand-written decoding loop)."""
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = vision_token_types(input_ids, self.config)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        deltas = getattr(self, "rope_deltas", None)
        text_only = mm_token_type_ids is None or not bool(mm_token_type_ids.any())
        if past and deltas is not None and inputs_embeds is not None and text_only:
            batch, length = inputs_embeds.shape[:2]
            if attention_mask is None or tuple(attention_mask.shape) == (batch, past + length):
                deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
                return decode_position_ids(deltas, past, length, attention_mask).to(inputs_embeds.device)
        return super().compute_3d_position_ids(  # type: ignore[misc]
            input_ids=input_ids, inputs_embeds=inputs_embeds, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask=attention_mask, past_key_values=past_key_values,
            mm_token_type_ids=mm_token_type_ids, **kwargs)


class _MCGGeneration:
    """Mixin for the generation class: `generate()` gets `mm_token_type_ids` from `input_ids` when missing."""

    config: Any

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor,
                                             model_kwargs: dict[str, Any]) -> torch.Tensor:
        ids = model_kwargs.get("input_ids")
        if ids is None or ids.shape[1] == 0:
            ids = inputs_tensor
        if (model_kwargs.get("mm_token_type_ids") is None and model_kwargs.get("image_grid_thw") is not None
                and ids.ndim == 2 and not torch.is_floating_point(ids)):
            model_kwargs = {**model_kwargs, "mm_token_type_ids": vision_token_types(ids, self.config)}
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)  # type: ignore[misc]


def _set_mcg(config: Any) -> None:
    setattr(config, MCG_KEY, mcg_rope_settings(config))


class MCGQwen2VLModel(_MCGRopeIndex, Qwen2VLModel):
    """Qwen2-VL's inner model with MCG-RoPE position ids."""


class MCGQwen2VLForConditionalGeneration(_MCGGeneration, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with MCG-RoPE (`config.mcg_rope`) in training, evaluation and generation; same weights and
    parameter names as the stock class, so stock checkpoints load into it and its checkpoints into stock."""

    def __init__(self, config: Qwen2VLConfig) -> None:
        _set_mcg(config)
        Qwen2VLPreTrainedModel.__init__(self, config)
        self.model = MCGQwen2VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def _share_weight_names(ours: type[Any], stock: type[Any]) -> None:
    """Give our class the stock class's checkpoint key conversions (transformers looks them up by class name
    and skips classes defined outside transformers): real checkpoints' `model.layers.*` / `visual.*` keys load,
    and ours are saved in the same layout, loadable by the stock class."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(stock.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(ours.__name__, mapping, overwrite=True)


_share_weight_names(MCGQwen2VLModel, Qwen2VLModel)
_share_weight_names(MCGQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration)
MODEL_CLASSES: dict[str, type[Any]] = {"qwen2_vl": MCGQwen2VLForConditionalGeneration}
STOCK_CLASSES: dict[str, type[Any]] = {"qwen2_vl": Qwen2VLForConditionalGeneration}

if Qwen2_5_VLConfig is not None:
    class MCGQwen2_5_VLModel(_MCGRopeIndex, Qwen2_5_VLModel):
        """Qwen2.5-VL's inner model with MCG-RoPE position ids (images; videos are refused)."""

    class MCGQwen2_5_VLForConditionalGeneration(_MCGGeneration, Qwen2_5_VLForConditionalGeneration):
        """Qwen2.5-VL with MCG-RoPE, as `MCGQwen2VLForConditionalGeneration`."""

        def __init__(self, config: Qwen2_5_VLConfig) -> None:
            _set_mcg(config)
            Qwen2_5_VLPreTrainedModel.__init__(self, config)
            self.model = MCGQwen2_5_VLModel(config)
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
            self.post_init()

    _share_weight_names(MCGQwen2_5_VLModel, Qwen2_5_VLModel)
    _share_weight_names(MCGQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    MODEL_CLASSES["qwen2_5_vl"] = MCGQwen2_5_VLForConditionalGeneration
    STOCK_CLASSES["qwen2_5_vl"] = Qwen2_5_VLForConditionalGeneration


# --------------------------------------------------------------------------------------------- configs
def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary frequency pairs over (t, h, w): a quarter to t, the rest halved."""
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise UsageError(f"the attention head size {head_dim} must be even and at least 6")
    t = half // 4 or 1
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_qwen2vl_config(
    vocab_size: int,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vision_depth: int = 2,
    vision_embed: int = 64,
    vision_heads: int = 4,
    patch_size: int = 8,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    in_channels: int = 3,
    max_positions: int = 4096,
    rope_theta: float = 10000.0,
    inter_gap: Sequence[int] = (2, 2, 2),
    intra_stride: Sequence[int] = (1, 1),
    architecture: str = "qwen2_vl",
) -> PreTrainedConfig:
    """A from-scratch Qwen2-VL (or Qwen2.5-VL: `architecture="qwen2_5_vl"`) config small enough for a CPU.

    The token ids come from our tokenizer (`special_token_ids(tokenizer)` gives them all as keywords).
    """
    if hidden % heads or heads % kv_heads or vision_embed % vision_heads:
        raise UsageError(f"hidden {hidden} must divide by heads {heads}, heads by kv_heads {kv_heads} and "
                         f"vision_embed {vision_embed} by vision_heads {vision_heads}")
    text = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate or 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_positions, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": _mrope_section(hidden // heads)}}
    vision: dict[str, Any] = {"depth": vision_depth, "num_heads": vision_heads, "in_channels": in_channels,
                              "patch_size": patch_size, "temporal_patch_size": temporal_patch_size,
                              "spatial_merge_size": merge_size}
    if architecture == "qwen2_vl":
        vision |= {"embed_dim": vision_embed, "hidden_size": hidden}
        config_class: Any = Qwen2VLConfig
    elif architecture == "qwen2_5_vl" and Qwen2_5_VLConfig is not None:
        vision |= {"hidden_size": vision_embed, "intermediate_size": 4 * vision_embed, "out_hidden_size": hidden,
                   "window_size": 2 * patch_size * merge_size, "fullatt_block_indexes": [vision_depth - 1]}
        config_class = Qwen2_5_VLConfig
    else:
        raise UsageError(f"architecture must be one of {sorted(MODEL_CLASSES)}, got {architecture!r}")
    return config_class(
        text_config=text, vision_config=vision, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        **{MCG_KEY: {"inter_gap": list(inter_gap), "intra_stride": list(intra_stride)}})


def create_grounding_model(config: PreTrainedConfig) -> Any:
    """A randomly initialised MCG model of `config` (Qwen2-VL or Qwen2.5-VL by `config.model_type`)."""
    if config.model_type not in MODEL_CLASSES:
        raise UsageError(f"model type {config.model_type!r} is not a supported grounding model "
                         f"({sorted(MODEL_CLASSES)})")
    return MODEL_CLASSES[config.model_type](config)


# ----------------------------------------------------------------------------------------- checkpoints
def load_grounding_model(directory: str | Path, *, mcg_rope: Mapping[str, Sequence[int]] | None = None,
                         dtype: torch.dtype | str | None = None, **kwargs: Any) -> Any:
    """Our MCG class loaded from a local Qwen2-VL / Qwen2.5-VL checkpoint directory (ours or a real one).

    `mcg_rope` overrides the gaps saved in the config (a real checkpoint has none: ClinKD's default then);
    `kwargs` go to `from_pretrained` (e.g. `attn_implementation`). Never downloads.
    """
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory: config.json is missing")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type not in MODEL_CLASSES:
        raise UsageError(f"{path} holds a {config.model_type!r} model; grounding needs one of "
                         f"{sorted(MODEL_CLASSES)}")
    if mcg_rope is not None:
        setattr(config, MCG_KEY, {key: list(value) for key, value in mcg_rope.items()})
    _set_mcg(config)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return MODEL_CLASSES[config.model_type].from_pretrained(str(path), config=config, local_files_only=True,
                                                            **kwargs)


@main_only
def save_grounding_model(directory: str | Path, model: Any, tokenizer: Any | None = None,
                         image_processor: GroundingImageProcessor | None = None,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (safetensors + config.json), tokenizer and preprocessing into `directory`, replacing it
    whole: everything is written beside it first, so a kill during the write leaves the old one intact.
    `state_dict` replaces the model's own (the full weights of an FSDP-sharded model)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if image_processor is not None:
        image_processor.save(tmp)
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_grounding_checkpoint(directory: str | Path, **kwargs: Any) -> tuple[Any, Any, GroundingImageProcessor]:
    """Model, tokenizer and image processor of a checkpoint directory (ours or a real Qwen2-VL's)."""
    model = load_grounding_model(directory, **kwargs)
    return model, load_tokenizer(directory), GroundingImageProcessor.from_pretrained(directory, model.config)


# ------------------------------------------------------------------------------------ image processing
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as well as possible (transformers' `smart_resize`)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


ImageInput = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class GroundingImageProcessor:
    """Qwen2-VL's image preprocessing without the hub processor, for grey and colour medical images.

    Resize (bicubic) to `smart_resize`'s size, scale to [0, 1], normalise per channel, and flatten patches in
    Qwen2-VL's order: `pixel_values` (sum of t*h*w patches, channels * temporal_patch_size * patch_size**2)
    and `image_grid_thw` (images, 3) = (1, height / patch, width / patch). 8-bit images (PIL `L`/`RGB`/...,
    uint8 arrays, PNG/JPEG files) follow transformers' `Qwen2VLImageProcessorPil` exactly (grey resized then
    copied to 3 channels); float arrays in [0, 1] (our `load_image`, DICOM, 16-bit files) are resized in float.
    `channels=1` feeds grey directly to a vision tower built with `in_channels=1`.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    channels: int = 3
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.image_mean) != self.channels or len(self.image_std) != self.channels:
            raise UsageError(f"image_mean and image_std need {self.channels} values each")

    @classmethod
    def for_model(cls, config: Any, **overrides: Any) -> GroundingImageProcessor:
        """Patch sizes and channels from a model config's vision tower; sizes and statistics from `overrides`."""
        vision = config.vision_config
        channels = int(vision.in_channels)
        values: dict[str, Any] = {"patch_size": int(vision.patch_size), "merge_size": int(vision.spatial_merge_size),
                                  "temporal_patch_size": int(vision.temporal_patch_size), "channels": channels}
        if channels == 1:
            values |= {"image_mean": (0.5,), "image_std": (0.5,)}
        return cls(**(values | overrides))

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: Any | None = None) -> GroundingImageProcessor:
        """From a directory's `preprocessor_config.json` (ours or Qwen2-VL's), else from `config`'s vision tower."""
        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            if config is None:
                raise UsageError(f"{path} is missing and no model config was given to derive preprocessing from")
            return cls.for_model(config)
        raw = json.loads(path.read_text(encoding="utf-8"))
        size = raw.get("size") or {}
        channels = int(raw.get("channels", 3))
        return cls(patch_size=int(raw.get("patch_size", 14)),
                   temporal_patch_size=int(raw.get("temporal_patch_size", 2)), merge_size=int(raw.get("merge_size", 2)),
                   min_pixels=int(raw.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                   max_pixels=int(raw.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
                   channels=channels,
                   image_mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN if channels == 3 else (0.5,))),
                   image_std=tuple(raw.get("image_std", OPENAI_CLIP_STD if channels == 3 else (0.5,))))

    def to_dict(self) -> dict[str, Any]:
        """Qwen2-VL's `preprocessor_config.json` fields (plus `channels`)."""
        return {"image_processor_type": "Qwen2VLImageProcessor", **asdict(self),
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "do_convert_rgb": True, "resample": 3}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PREPROCESSOR_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """`image_grid_thw` of an image of `height` x `width` pixels."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, grid: Sequence[int] | torch.Tensor) -> int:
        """Image tokens of one image in the language model: its patches over `merge_size**2`."""
        t, h, w = (int(v) for v in grid)
        return t * h * w // self.merge_size ** 2

    def _pixels(self, image: ImageInput) -> np.ndarray:
        """(channels, H, W) float32, resized, scaled to [0, 1] and normalised."""
        image = _as_pil(image)
        floating = image.mode == "F"
        if not floating:
            grey = image.mode == "L"
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
            image = image.convert("L") if grey or self.channels == 1 else image.convert("RGB")
        height, width = smart_resize(image.height, image.width, self.factor, self.min_pixels, self.max_pixels)
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
        array = np.asarray(image)
        if not floating:
            array = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
        array = array.astype(np.float32)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if array.shape[0] != self.channels:  # grey for a 3-channel tower: copied, as converting to RGB does
            array = np.repeat(array, self.channels, axis=0)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return ((array.T - mean) / std).T

    def patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(patches, channels * temporal * patch**2) in Qwen2-VL's order, and the grid (1, h, w)."""
        channels, height, width = pixels.shape
        gh, gw, m, p = height // self.patch_size, width // self.patch_size, self.merge_size, self.patch_size
        patches = pixels.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None],
                                  (*patches.shape[:5], self.temporal_patch_size, *patches.shape[5:]))
        return patches.reshape(gh * gw, channels * self.temporal_patch_size * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """`pixel_values` (float32) and `image_grid_thw` (long) of `images`, in order."""
        flat, grids = [], []
        for image in images:
            patches, grid = self.patchify(self._pixels(image))
            flat.append(patches)
            grids.append(grid)
        if not flat:
            raise UsageError("no images to preprocess")
        return {"pixel_values": torch.from_numpy(np.concatenate(flat, axis=0).astype(np.float32)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _as_pil(image: ImageInput) -> Image.Image:
    """An 8-bit PIL image (any mode) or a float one (mode `F`, values in [0, 1])."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.suffix.lower() in DICOM_SUFFIXES:
            return Image.fromarray(load_image(path))
        with Image.open(path) as opened:
            if opened.mode in (*_DEEP_MODES, "F"):
                return Image.fromarray(load_image(path))
            opened.load()
            return opened.copy()
    if isinstance(image, Image.Image):
        if image.mode in _DEEP_MODES:
            raise UsageError(f"a PIL image of mode {image.mode}: pass deep images as float arrays in [0, 1] "
                             "(medistill.data.imaging.load_image) or as files")
        return image
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
            return Image.fromarray(array)
        if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
            return Image.fromarray(array.astype(np.float32))
        raise UsageError(f"images must be uint8 (H, W) / (H, W, 3) or float (H, W) in [0, 1] arrays, got "
                         f"{array.dtype} {array.shape}")
    raise UsageError(f"cannot read an image from a {type(image).__name__}")


def encode_batch(tokenizer: Any, image_processor: GroundingImageProcessor, images: Sequence[ImageInput],
                 questions: Sequence[str], answers: Sequence[str] | None = None, *,
                 padding_side: str = "right", uids: Sequence[str] | None = None,
                 style: PromptStyle | None = None) -> dict[str, torch.Tensor]:
    """Model inputs of one image and one question (and answer, for training) per sample.

    Each question gets as many image tokens as its image's grid holds; `answers=None` gives generation prompts
    (use `padding_side="left"`). Returns `input_ids`, `attention_mask`, `labels`, `pixel_values`,
    `image_grid_thw`.
    """
    if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise ValueError(f"{len(images)} images, {len(questions)} questions"
                         f"{'' if answers is None else f' and {len(answers)} answers'}: pass one of each per sample")
    vision = image_processor(images)
    examples: list[Example] = []
    for index, (grid, question) in enumerate(zip(vision["image_grid_thw"], questions)):
        examples.append(build_example(tokenizer, question, None if answers is None else answers[index],
                                      [image_processor.num_image_tokens(grid)], style=style,
                                      uid=None if uids is None else uids[index]))
    return {**pad_examples(examples, tokenizer.pad_token_id, padding_side=padding_side), **vision}
