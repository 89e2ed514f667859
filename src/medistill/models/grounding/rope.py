"""MCG-RoPE: Qwen2-VL's multimodal rotary position ids with a gap between modalities (METHODS.md 3.1).

Every token gets three position ids (temporal, height, width). Per sample, over its attended tokens only, a
cursor `c` (the position the next text token would get) starts at 0 and advances segment by segment:

- text: each token gets `(c, c, c)` and `c += 1` (text to text stays +1, whatever the gaps);
- an image of merged grid `(t, H, W)` (`H = h // spatial_merge_size`, `W` likewise) starts, per axis `a`,
  at `s_a = c - 1 + inter_gap[a]` ("last text position + gap"); its token of frame `f`, row `i`, column `j`
  (frame-major, then row, then column, the vision tower's order) gets
  `(s_t + f, s_h + intra_stride[0] * i, s_w + intra_stride[1] * j)`;
- **text after an image** starts at
  `c = max(s_t + inter_gap[0], last_h + inter_gap[1], last_w + inter_gap[2])`, where
  `last_h = s_h + intra_stride[0] * (H - 1)` and `last_w = s_w + intra_stride[1] * (W - 1)` are the image's
  largest height and width positions: every axis is at least its gap past the image. For an image (t = 1)
  this is the maximum over all axes of (the image's largest position on the axis + that axis' gap), i.e.
  `max(image positions) + gap` when the gaps are equal (ClinKD's `+ 2`). The temporal axis counts its first
  frame only, as transformers 5.x does (`current_pos += max(h, w) // merge`): frames of a video-like grid
  (t > 1) do not push the following text.

An image at the very start of a sample starts at `inter_gap[a] - 1` (as if the last text position were
-1); two images with no token between them are placed as if an empty text run separated them.
With `inter_gap=(1, 1, 1)` and `intra_stride=(1, 1)` this is transformers' `Qwen2VLModel.get_rope_index`
exactly; the default `(2, 2, 2)` gives METHODS.md's worked example (text 0, 1, 2; image t 4,4,4,4,
h 4,4,5,5, w 4,5,4,5; text 7, 8, 9).

Padded positions (attention mask 0) get 0 on every axis, as in transformers 5.x. `rope_deltas[b]` is
`max(positions of b) + 1 - (attended tokens of b)` (transformers' and the ClinKD release's definition; 0 for
a sample without attended tokens), so that token `k` after the prompt (k = 0, 1, ...) continues at
`max + 1 + k` on every axis: see `decode_position_ids`.

Images are matched to runs of `image_token_id` in order over the whole batch; a run may hold several
images back to back (unlike transformers, which would read such a run as a single image). All state is per
sample: the ClinKD release's segment type carried across samples is not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_ints(name: str, values: Sequence[int], size: int) -> tuple[int, ...]:
    result = tuple(int(value) for value in values)
    if len(result) != size or any(value < 1 for value in result) or list(result) != list(values):
        raise ValueError(f"{name} must be {size} integer(s) >= 1, got {tuple(values)!r}")
    return result


def _image_positions(cursor: int, grid: tuple[int, int, int], gap: tuple[int, ...],
                     stride: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """(3, t * H * W) positions of one merged image grid starting after `cursor`, and the next cursor."""
    frames, rows, cols = grid
    start_t, start_h, start_w = (cursor - 1 + g for g in gap)
    t = torch.arange(frames).repeat_interleave(rows * cols)
    h = torch.arange(rows).repeat_interleave(cols).repeat(frames)
    w = torch.arange(cols).repeat(frames * rows)
    positions = torch.stack([start_t + t, start_h + stride[0] * h, start_w + stride[1] * w])
    after = max(start_t + gap[0], start_h + stride[0] * (rows - 1) + gap[1],
                start_w + stride[1] * (cols - 1) + gap[2])
    return positions, after


def _runs(flags: torch.Tensor) -> list[tuple[bool, int]]:
    """Runs of equal values of a 1-D bool tensor as (value, length) pairs."""
    if not len(flags):
        return []
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(flags[1:] != flags[:-1]).flatten() + 1])
    lengths = torch.diff(starts, append=torch.tensor([len(flags)]))
    return list(zip(flags[starts].tolist(), lengths.tolist()))


def mcg_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    inter_gap: Sequence[int] = (2, 2, 2),
    intra_stride: Sequence[int] = (1, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a batch with images (see the module docstring for the exact rule).

    `input_ids` (batch, length); `image_grid_thw` (num_images, 3): each image's (t, h, w) patch grid before
    merging, all images of the batch in order (None or empty for text only); `attention_mask` (batch, length),
    nonzero where attended, any padding side. Returns `position_ids` (3, batch, length), long, 0 where padded,
    and `rope_deltas` (batch, 1), long. Raises ValueError when the image tokens do not match the grids.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} "
                         "differ in shape")
    gap = _check_ints("inter_gap", inter_gap, 3)
    stride = _check_ints("intra_stride", intra_stride, 2)
    merge = _check_ints("spatial_merge_size", [spatial_merge_size], 1)[0]
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in row) for row in image_grid_thw.tolist()]
    for index, (t, h, w) in enumerate(grids):
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(f"image {index}: grid (t={t}, h={h}, w={w}) needs t >= 1 and h, w positive "
                             f"multiples of spatial_merge_size {merge}")
    merged = [(t, h // merge, w // merge) for t, h, w in grids]

    batch, length = input_ids.shape
    attended = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool()).cpu()
    is_image = (input_ids == image_token_id).cpu()
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    next_image = 0
    for b in range(batch):
        cursor, pieces = 0, []
        for image_run, run_length in _runs(is_image[b][attended[b]]):
            if not image_run:
                pieces.append(torch.arange(cursor, cursor + run_length).expand(3, -1))
                cursor += run_length
                continue
            left = run_length
            while left:
                if next_image == len(merged):
                    raise ValueError(f"sample {b}: more image tokens than image_grid_thw lists images "
                                     f"({len(merged)})")
                grid = merged[next_image]
                tokens = grid[0] * grid[1] * grid[2]
                if tokens > left:
                    raise ValueError(f"sample {b}: image {next_image} needs {tokens} image tokens, its run of "
                                     f"image tokens has {left} left")
                positions, cursor = _image_positions(cursor, grid, gap, stride)
                pieces.append(positions)
                left -= tokens
                next_image += 1
        if pieces:
            sample = torch.cat(pieces, dim=1)
            position_ids[:, b, attended[b]] = sample
            deltas[b, 0] = int(sample.max()) + 1 - sample.shape[1]
    if next_image != len(merged):
        raise ValueError(f"image_grid_thw lists {len(merged)} images, the batch's image tokens hold {next_image}")
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def decode_position_ids(
    rope_deltas: torch.Tensor,
    start: int,
    length: int = 1,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position ids (3, batch, length) of `length` new tokens decoded after `start` cached ones.

    Every axis gets `offset + rope_delta`, the offset being the cache position `start + i` without a mask
    (transformers' `compute_3d_position_ids` without a mask; right only without left padding), or, given the
    (batch, start + length) mask of cached and new tokens, the number of attended tokens before the token
    (its cumulative sum - 1, 0 where masked, as transformers does). With a mask this is what `generate`
    yields (the previous position + 1 per step): after a prompt ending in text, token k sits at
    `max(prompt positions) + 1 + k`, for stock and MCG settings alike.
    """
    if rope_deltas.ndim != 2 or rope_deltas.shape[1] != 1:
        raise ValueError(f"rope_deltas must be (batch, 1), got shape {tuple(rope_deltas.shape)}")
    if attention_mask is None:
        offsets = torch.arange(start, start + length, device=rope_deltas.device).expand(rope_deltas.shape[0], -1)
    else:
        if attention_mask.shape != (rope_deltas.shape[0], start + length):
            raise ValueError(f"attention_mask must be (batch, start + length) = "
                             f"({rope_deltas.shape[0]}, {start + length}), got {tuple(attention_mask.shape)}")
        mask = attention_mask.long()
        offsets = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, start:].to(rope_deltas.device)
    return (offsets + rope_deltas).unsqueeze(0).expand(3, -1, -1)
