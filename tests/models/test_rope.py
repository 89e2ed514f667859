from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medistill.models.grounding import decode_position_ids, mcg_rope_index

PAD, BOS, EOS, VISION_START, VISION_END, IMAGE = 0, 1, 2, 3, 4, 5
STOCK = {"inter_gap": (1, 1, 1), "intra_stride": (1, 1)}


@pytest.fixture(scope="module")
def qwen():
    """A tiny Qwen2-VL (one text layer, one vision block) whose own get_rope_index and generate are the reference."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                     "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS},
        vision_config={"depth": 1, "embed_dim": 8, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 1,
                       "patch_size": 2, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=IMAGE, video_token_id=6, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2VLForConditionalGeneration(config).eval()


def stock_index(qwen, ids, grids, mask):
    return qwen.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=grids,
                                     attention_mask=mask)


def sample_tokens(segments: list) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Token ids and (t, h, w) grids (merge 2) of segments: an int is that many text tokens, a tuple an image."""
    ids: list[int] = []
    grids = []
    for segment in segments:
        if isinstance(segment, tuple):
            t, h, w = segment
            ids += [IMAGE] * (t * (h // 2) * (w // 2))
            grids.append(segment)
        else:
            ids += [7 + (len(ids) * 5 + k) % 20 for k in range(segment)]
    return ids, grids


def batch_of(samples: list[list], side: str | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Padded (left or right) input ids, attention mask (None when `side` is None) and the batch's grids."""
    rows = [sample_tokens(segments) for segments in samples]
    width = max(len(ids) for ids, _ in rows)
    ids, mask, grids = [], [], []
    for tokens, sample_grids in rows:
        pad = width - len(tokens)
        if side is None and pad:
            raise ValueError("samples of different lengths need padding")
        ids.append([PAD] * pad + tokens if side == "left" else tokens + [PAD] * pad)
        mask.append([0] * pad + [1] * len(tokens) if side == "left" else [1] * len(tokens) + [0] * pad)
        grids += sample_grids
    grid_tensor = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    return torch.tensor(ids), (None if side is None else torch.tensor(mask)), grid_tensor


def random_samples(rng: random.Random, count: int, video: bool) -> list[list]:
    """Random text / image structures; consecutive images are separated by text, as the chat template does."""
    samples = []
    for _ in range(count):
        segments: list = [rng.randint(1, 4)]
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            t = rng.choice([1, 2, 3]) if video else 1
            segments += [(t, 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)), rng.randint(1, 4)]
        if len(segments) > 1 and rng.random() < 0.3:
            segments = segments[1:]  # starts with an image
        if len(segments) > 1 and rng.random() < 0.3:
            segments = segments[:-1]  # ends with an image
        samples.append(segments)
    return samples


def reference(segments: list, gap: tuple[int, int, int], stride: tuple[int, int]) -> tuple[list[list[int]], int]:
    """The documented rule, token by token: (3 lists of positions, rope delta)."""
    axes: list[list[int]] = [[], [], []]
    cursor = 0
    for segment in segments:
        if isinstance(segment, tuple):
            t, h, w = segment
            start = [cursor - 1 + g for g in gap]
            for f in range(t):
                for i in range(h // 2):
                    for j in range(w // 2):
                        for axis, value in enumerate((start[0] + f, start[1] + stride[0] * i,
                                                      start[2] + stride[1] * j)):
                            axes[axis].append(value)
            cursor = max(start[0] + gap[0], start[1] + stride[0] * (h // 2 - 1) + gap[1],
                         start[2] + stride[1] * (w // 2 - 1) + gap[2])
        else:
            for _ in range(segment):
                for axis in axes:
                    axis.append(cursor)
                cursor += 1
    count = len(axes[0])
    return axes, (max(max(axis) for axis in axes) + 1 - count if count else 0)


# --- the worked example of METHODS.md 3.1 ---------------------------------------------------------------

EXAMPLE = [3, (1, 4, 4), 3]


@pytest.mark.parametrize(("settings_", "expected"), [
    (STOCK, [[0, 1, 2, 3, 3, 3, 3, 5, 6, 7], [0, 1, 2, 3, 3, 4, 4, 5, 6, 7], [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]]),
    ({}, [[0, 1, 2, 4, 4, 4, 4, 7, 8, 9], [0, 1, 2, 4, 4, 5, 5, 7, 8, 9], [0, 1, 2, 4, 5, 4, 5, 7, 8, 9]]),
])
@pytest.mark.parametrize("side", [None, "left", "right"])
def test_worked_example(settings_, expected, side):
    samples = [EXAMPLE] if side is None else [EXAMPLE, [2, (1, 2, 2), 1]]
    ids, mask, grids = batch_of(samples, side)
    positions, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, **settings_)
    assert positions.shape == (3, len(samples), ids.shape[1]) and positions.dtype == torch.long
    assert deltas.shape == (len(samples), 1) and deltas.dtype == torch.long
    assert positions[:, 0].tolist() == expected
    assert deltas[0, 0].item() == expected[0][-1] + 1 - 10
    if side is not None:
        tail = positions[:, 1, mask[1].bool()]
        assert (positions[:, 1, ~mask[1].bool()] == 0).all()  # padding: 0 on every axis
        first = tail[:, 2].tolist()
        assert first == ([2, 2, 2] if settings_ == STOCK else [3, 3, 3])


def test_the_default_is_clinkd():
    ids, _, grids = batch_of([EXAMPLE], None)
    default = mcg_rope_index(ids, grids, image_token_id=IMAGE)
    explicit = mcg_rope_index(ids, grids, image_token_id=IMAGE, spatial_merge_size=2, inter_gap=(2, 2, 2),
                              intra_stride=(1, 1))
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_intra_stride_and_per_axis_gaps():
    ids, _, grids = batch_of([[2, (1, 4, 6), 2]], None)
    positions, deltas = mcg_rope_index(ids, grids, image_token_id=IMAGE, inter_gap=(1, 2, 3), intra_stride=(2, 3))
    t, h, w = positions[:, 0].tolist()
    assert t[2:8] == [2] * 6                      # last text 1, + gap 1
    assert h[2:8] == [3, 3, 3, 5, 5, 5]           # 1 + 2, rows 2 apart
    assert w[2:8] == [4, 7, 10, 4, 7, 10]         # 1 + 3, columns 3 apart
    assert t[8:] == h[8:] == w[8:] == [13, 14]    # max(2 + 1, 5 + 2, 10 + 3)
    assert deltas.item() == 14 + 1 - 10


# --- against transformers' own get_rope_index ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("side", ["left", "right"])
def test_stock_settings_match_transformers(qwen, seed, side):
    rng = random.Random(seed)
    samples = random_samples(rng, rng.randint(1, 5), video=seed % 3 == 2)
    samples.append([rng.randint(1, 6)])  # a text-only sample in every batch
    rng.shuffle(samples)
    ids, mask, grids = batch_of(samples, side)
    expected_positions, expected_deltas = stock_index(qwen, ids, grids, mask)
    positions, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, **STOCK)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(deltas, expected_deltas.long())


def test_stock_settings_match_transformers_without_mask(qwen):
    samples = [[2, (1, 4, 2), 3, (1, 2, 6), 1], [4, (3, 2, 2), 4]]  # equal lengths; a video-like grid, t > h, w
    ids, mask, grids = batch_of(samples, None)
    expected = stock_index(qwen, ids, grids, None)
    positions, deltas = mcg_rope_index(ids, grids, image_token_id=IMAGE, **STOCK)
    assert torch.equal(positions, expected[0]) and torch.equal(deltas, expected[1].long())


def test_text_only_batch_without_grids(qwen):
    ids, mask, _ = batch_of([[5], [3]], "left")
    positions, deltas = mcg_rope_index(ids, None, mask, image_token_id=IMAGE)
    assert positions[:, 1].tolist() == [[0, 0, 0, 1, 2]] * 3
    assert deltas.tolist() == [[0], [0]]
    expected = stock_index(qwen, ids, torch.zeros(0, 3, dtype=torch.long), mask)
    assert torch.equal(positions, expected[0])


def test_rule_matches_token_by_token_reference():
    rng = random.Random(7)
    for _ in range(10):
        segments = random_samples(rng, 1, video=True)[0]
        gap = (rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        ids, _, grids = batch_of([segments], None)
        positions, deltas = mcg_rope_index(ids, grids, image_token_id=IMAGE, inter_gap=gap, intra_stride=stride)
        axes, delta = reference(segments, gap, stride)
        assert positions[:, 0].tolist() == axes and deltas.item() == delta


# --- batches, generation and rope deltas ------------------------------------------------------------------

segments_strategy = st.lists(
    st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 2), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4]))),
    min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(samples=st.lists(segments_strategy, min_size=1, max_size=4), side=st.sampled_from(["left", "right"]),
       gap=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_batch_size_independence(samples, side, gap, stride):
    ids, mask, grids = batch_of(samples, side)
    positions, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, inter_gap=gap, intra_stride=stride)
    for b, segments in enumerate(samples):
        alone_ids, _, alone_grids = batch_of([segments], None)
        alone, alone_delta = mcg_rope_index(alone_ids, alone_grids, image_token_id=IMAGE, inter_gap=gap,
                                            intra_stride=stride)
        assert torch.equal(positions[:, b, mask[b].bool()], alone[:, 0])
        assert (positions[:, b, ~mask[b].bool()] == 0).all()
        assert deltas[b].item() == alone_delta.item() == reference(segments, gap, stride)[1]
        axes = alone[:, 0]
        is_text = alone_ids[0] != IMAGE
        assert (axes[0, is_text] == axes[1, is_text]).all() and (axes[0, is_text] == axes[2, is_text]).all()


def test_consecutive_images_are_split_by_their_grids():
    ids, _, grids = batch_of([[1, (1, 2, 2), (1, 4, 2), 1]], None)
    positions, _ = mcg_rope_index(ids, grids, image_token_id=IMAGE)
    # text 0; image 1 at 2; as if an empty text run (cursor 4) followed: image 2 at 5, 5-6 on h; text at 8
    assert positions[:, 0].tolist() == [[0, 2, 5, 5, 8], [0, 2, 5, 6, 8], [0, 2, 5, 5, 8]]


@pytest.mark.parametrize("settings_", [STOCK, {}])
def test_first_decoded_token_follows_the_maximum(settings_):
    ids, mask, grids = batch_of([[3, (1, 4, 4), 2], [1, (1, 6, 2), 1, (1, 2, 2), 4], [2]], "left")
    positions, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, **settings_)
    start = ids.shape[1]
    grown = torch.cat([mask, torch.ones(3, 2, dtype=mask.dtype)], dim=1)
    new = decode_position_ids(deltas, start, 2, grown)
    top = positions.amax(dim=(0, 2))
    assert new.shape == (3, 3, 2)
    assert new[:, :, 0].tolist() == [(top + 1).tolist()] * 3
    assert new[:, :, 1].tolist() == [(top + 2).tolist()] * 3
    # the prompts end in text, so this is also the last prompt position + 1
    assert torch.equal(new[:, :, 0], positions[:, :, -1] + 1)


def test_decode_positions_match_transformers_generate(qwen):
    ids, mask, grids = batch_of([[3, (1, 4, 4), 2], [1, (1, 2, 4), 2, (1, 2, 2), 5]], "left")
    pixels = torch.randn(int(grids.prod(dim=1).sum()), 3 * 2 * 2 * 2)
    seen: list[torch.Tensor] = []
    hook = qwen.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        out = qwen.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids,
                            mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=3, min_new_tokens=3,
                            do_sample=False)
    finally:
        hook.remove()
    assert out.shape[1] == ids.shape[1] + 3
    positions, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, **STOCK)
    assert torch.equal(seen[0][1:], positions)  # rows 1-3 are the M-RoPE ids (row 0: text positions)
    for step, captured in enumerate(seen[1:], start=1):
        start = ids.shape[1] + step - 1
        grown = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        assert torch.equal(captured[1:], decode_position_ids(deltas, start, 1, grown))


def test_decode_positions_match_transformers_cache_branch(qwen):
    class Cache:
        def __init__(self, length: int) -> None:
            self.length = length

        def get_seq_length(self) -> int:
            return self.length

    ids, mask, grids = batch_of([[3, (1, 4, 4), 2], [1, (1, 2, 2), 5]], "left")
    _, deltas = mcg_rope_index(ids, grids, mask, image_token_id=IMAGE, **STOCK)
    qwen.model.rope_deltas = deltas
    try:
        embeds = torch.zeros(2, 1, 16)
        without = qwen.model.compute_3d_position_ids(input_ids=None, inputs_embeds=embeds,
                                                     past_key_values=Cache(ids.shape[1]))
        grown = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        masked = qwen.model.compute_3d_position_ids(input_ids=None, inputs_embeds=embeds, attention_mask=grown,
                                                    past_key_values=Cache(ids.shape[1]))
    finally:
        qwen.model.rope_deltas = None
    assert torch.equal(decode_position_ids(deltas, ids.shape[1]), without)
    assert torch.equal(decode_position_ids(deltas, ids.shape[1], 1, grown), masked[..., -1:])


# --- bad input --------------------------------------------------------------------------------------------

def test_mismatched_images_are_clear_errors():
    ids, _, grids = batch_of([[2, (1, 4, 4), 1]], None)
    with pytest.raises(ValueError, match="more image tokens"):
        mcg_rope_index(ids, grids[:0], image_token_id=IMAGE)
    with pytest.raises(ValueError, match="lists 2 images"):
        mcg_rope_index(ids, torch.cat([grids, grids]), image_token_id=IMAGE)
    with pytest.raises(ValueError, match="needs 9 image tokens"):
        mcg_rope_index(ids, torch.tensor([[1, 6, 6]]), image_token_id=IMAGE)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        mcg_rope_index(ids, torch.tensor([[1, 4, 3]]), image_token_id=IMAGE)
    with pytest.raises(ValueError, match="inter_gap"):
        mcg_rope_index(ids, grids, image_token_id=IMAGE, inter_gap=(0, 1, 1))
    with pytest.raises(ValueError, match="intra_stride"):
        mcg_rope_index(ids, grids, image_token_id=IMAGE, intra_stride=(1,))
    with pytest.raises(ValueError, match="differ in shape"):
        mcg_rope_index(ids, grids, torch.ones(1, 3), image_token_id=IMAGE)
