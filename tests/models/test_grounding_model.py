from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image

from medistill.models.grounding.model import (
    MCG_KEY,
    MODEL_CLASSES,
    STOCK_CLASSES,
    STOCK_GAPS,
    GroundingImageProcessor,
    create_grounding_model,
    encode_batch,
    load_grounding_checkpoint,
    load_grounding_model,
    save_grounding_model,
    smart_resize,
    tiny_qwen2vl_config,
    vision_token_ids,
)
from medistill.models.grounding.rope import decode_position_ids, mcg_rope_index
from medistill.models.grounding.tokenizer import (
    IGNORE_INDEX,
    QWEN_STYLE,
    build_example,
    decode_answers,
    load_tokenizer,
    prompt_style,
    special_token_ids,
    to_med_grit_boxes,
    to_qwen_boxes,
    train_tokenizer,
)

ORGANS = ["right lung", "left lung", "liver", "heart", "left kidney", "spleen", "tumor", "effusion"]
QUESTIONS = ["Please output the bounding box of <ref>{}</ref> in this image.",
             "What is the object in <box>{}</box>?", "Please describe the region <box>{}</box> in detail."]
IMAGE_SIZES = [(32, 32), (24, 16)]  # (height, width): grids (1, 8, 8) and (1, 6, 4) with 4-pixel patches


def random_box(rng: random.Random) -> str:
    x1, y1 = rng.randrange(0, 900), rng.randrange(0, 900)
    return f"({x1},{y1}),({rng.randrange(x1 + 1, 1000)},{rng.randrange(y1 + 1, 1000)})"


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = []
    for _ in range(200):
        organ, box = rng.choice(ORGANS), random_box(rng)
        texts += [rng.choice(QUESTIONS).format(organ if "ref" in QUESTIONS[0] else box),
                  f"<ref>{organ}</ref><box>{box}</box>", f"The {organ} appears normal in this CT image."]
    return train_tokenizer(texts, vocab_size=400)


def tiny_config(tokenizer, architecture: str = "qwen2_vl", **gaps):
    return tiny_qwen2vl_config(len(tokenizer), **special_token_ids(tokenizer), hidden=64, heads=4, kv_heads=2,
                               layers=2, vision_depth=1, vision_embed=32, vision_heads=2, patch_size=4,
                               architecture=architecture, **gaps)


def tiny_model(config, seed: int = 0):
    torch.manual_seed(seed)
    return create_grounding_model(config).eval()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return GroundingImageProcessor.for_model(tiny_config(tokenizer), min_pixels=8 * 8, max_pixels=32 * 32)


def images(sizes=IMAGE_SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]


def batch(tokenizer, processor, *, answers: bool, padding_side: str):
    questions = ["Please output the bounding box of <ref>liver</ref> in this image.",
                 "What is in <box>(10,20),(30,40)</box>?"]
    replies = ["<ref>liver</ref><box>(120,340),(560,780)</box>", "heart"] if answers else None
    return encode_batch(tokenizer, processor, images(), questions, replies, padding_side=padding_side)


def prompt_inputs(data):
    return {key: value for key, value in data.items() if key != "labels"}


def capture_positions(model) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Every position-id tensor the language model receives, in call order."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_boxes_digits_and_special_tokens(tokenizer, tmp_path) -> None:
    rng = random.Random(1)
    for _ in range(50):
        text = f"<ref>{rng.choice(ORGANS)}</ref><box>{random_box(rng)}</box> and <box>{random_box(rng)}</box>"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
        assert tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert all(len(piece) == 1 for piece in pieces if any(ch.isdigit() for ch in piece))
    for token in ["<s>", "</s>", "<pad>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|answer|>",
                  "<ref>", "</ref>", "<box>", "</box>"]:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    ids = tokenizer.encode("<s><|vision_start|><|image_pad|><|vision_end|>lung<box>(1,2),(3,4)</box></s>",
                           add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "lung<box>(1,2),(3,4)</box>"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.image_token == "<|image_pad|>"
    text = "<ref>liver</ref><box>(5,6),(7,8)</box>"
    assert loaded.encode(text) == tokenizer.encode(text)


def test_box_forms_convert_both_ways() -> None:
    med_grit = "<ref>liver</ref><box>(12,34),(560,789)</box>"
    qwen = "<|object_ref_start|>liver<|object_ref_end|><|box_start|>(12,34),(560,789)<|box_end|>"
    assert to_qwen_boxes(med_grit) == qwen and to_med_grit_boxes(qwen) == med_grit
    assert to_med_grit_boxes(to_qwen_boxes(med_grit)) == med_grit


def test_example_labels_cover_the_answer_and_end_token_only(tokenizer) -> None:
    answer = "<ref>liver</ref><box>(120,340),(560,780)</box>"
    example = build_example(tokenizer, "Where is the liver?", to_qwen_boxes(answer), [6], uid="ct_1/0")
    assert example.input_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 6
    labelled = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert labelled == [label for label in example.labels if label != IGNORE_INDEX]
    assert example.input_ids[-len(labelled):] == labelled and labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled, clean_up_tokenization_spaces=False) == answer + "</s>"
    prompt = build_example(tokenizer, "Where is the liver?", None, [6])
    assert prompt.input_ids == example.input_ids[:len(prompt.input_ids)]
    assert set(prompt.labels) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="record ct_1/0.*no image"):
        build_example(tokenizer, "Where is the liver?", answer, [], uid="ct_1/0")
    with pytest.raises(ValueError, match="record ct_2/0.*reserved"):
        build_example(tokenizer, "Where <|image_pad|> is it?", answer, [4], uid="ct_2/0")
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        build_example(tokenizer, "<image><image>Where?", answer, [4])


def test_decode_answers_stops_at_the_end_token(tokenizer) -> None:
    answer = tokenizer.encode("<ref>liver</ref><box>(1,2),(3,4)</box></s><pad><pad>", add_special_tokens=False)
    sequences = torch.tensor([[7, 7] + answer])
    assert decode_answers(tokenizer, sequences, 2) == ["<ref>liver</ref><box>(1,2),(3,4)</box>"]


def test_qwen_tokenizers_get_the_chat_form_and_box_tokens() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["system user assistant You are a helpful assistant. Where is the liver?"],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    qwen = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert prompt_style(qwen) is QWEN_STYLE and special_token_ids(qwen)["eos_token_id"] == qwen.eos_token_id
    answer = "<ref>liver</ref><box>(120,340),(560,780)</box>"
    example = build_example(qwen, "Where is the <ref>liver</ref>?", answer, [2])
    text = qwen.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Where is the "
                           "<|object_ref_start|>liver<|object_ref_end|>?<|im_end|>\n<|im_start|>assistant\n")
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    assert qwen.decode(labelled) == to_qwen_boxes(answer) + "<|im_end|>"
    prompt = len(build_example(qwen, "Where is the <ref>liver</ref>?", None, [2]).input_ids)
    padded = torch.tensor([example.input_ids + [qwen.pad_token_id] * 3])
    assert decode_answers(qwen, padded, prompt) == [answer]


# -------------------------------------------------------------------------------------- preprocessing
def test_preprocessing_matches_transformers_image_processor() -> None:
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_resize
        reference = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                             min_pixels=8 * 8, max_pixels=40 * 40)
        stock_sized = Qwen2VLImageProcessorPil()
    except Exception as error:  # no PIL backend or a changed API: nothing to compare against offline
        pytest.skip(f"transformers' Qwen2-VL image processor cannot be built offline: {error}")
    ours = GroundingImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8,
                                   max_pixels=40 * 40)
    rng = np.random.default_rng(0)
    samples = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
               Image.fromarray(rng.integers(0, 256, (29, 18), dtype=np.uint8)),  # grey: resized, then 3 channels
               Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="RGBA")]
    expected = reference(samples, return_tensors="pt")
    got = ours(samples)
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert torch.allclose(got["pixel_values"], expected["pixel_values"].float(), atol=1e-6, rtol=0)
    # Qwen2-VL's real sizes (14-pixel patches) on a grey medical-sized image, given as a uint8 array
    grey = rng.integers(0, 256, (300, 220), dtype=np.uint8)
    expected = stock_sized(Image.fromarray(grey).convert("RGB"), return_tensors="pt")
    got = GroundingImageProcessor()([grey])
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert torch.allclose(got["pixel_values"], expected["pixel_values"].float(), atol=1e-6, rtol=0)
    for height, width in [(17, 900), (1000, 1000), (3, 3), (224, 448), (513, 129)]:
        assert smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280) == \
            reference_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)


def test_grey_float_images_and_one_channel_towers(tokenizer) -> None:
    ours = GroundingImageProcessor(patch_size=4, min_pixels=8 * 8, max_pixels=32 * 32)
    grey = np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(24, 16)
    out = ours([grey])
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]] and out["pixel_values"].shape == (24, 3 * 2 * 4 * 4)
    config = tiny_qwen2vl_config(len(tokenizer), **special_token_ids(tokenizer), hidden=32, heads=2, kv_heads=1,
                                 layers=1, vision_depth=1, vision_embed=16, vision_heads=2, patch_size=4,
                                 in_channels=1)
    one = GroundingImageProcessor.for_model(config, min_pixels=8 * 8, max_pixels=32 * 32)
    assert one.channels == 1 and one([grey])["pixel_values"].shape == (24, 1 * 2 * 4 * 4)
    data = encode_batch(tokenizer, one, [grey], ["Where is the liver?"], ["<ref>liver</ref>"])
    assert (data["input_ids"] == config.image_token_id).sum() == 6 * 4 // 4
    assert torch.isfinite(tiny_model(config)(**data).loss)


# ------------------------------------------------------------------------------------------------ model
def test_tiny_model_trains_on_a_repeated_batch(tokenizer, processor) -> None:
    model = tiny_model(tiny_config(tokenizer)).train()
    data = batch(tokenizer, processor, answers=True, padding_side="right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the image reaches the loss


@pytest.mark.parametrize("architecture", sorted(MODEL_CLASSES))
def test_generation_with_cache_equals_generation_without(tokenizer, processor, architecture) -> None:
    model = tiny_model(tiny_config(tokenizer, architecture))
    data = prompt_inputs(batch(tokenizer, processor, answers=False, padding_side="left"))
    assert data["attention_mask"][:, 0].tolist() == [1, 0]  # the second sample is left-padded
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        cached = model.generate(**data, use_cache=True, **settings)
        uncached = model.generate(**data, use_cache=False, **settings)
    assert cached.shape == (2, data["input_ids"].shape[1] + 12)
    assert torch.equal(cached, uncached)


def test_generation_never_writes_vision_tokens(tokenizer, processor) -> None:
    """A model whose favourite next token is the image placeholder (forced here through the output layer)
    writes it unless generation suppresses the vision tokens; suppressed, both decoding paths still agree."""
    model = tiny_model(tiny_config(tokenizer))
    image = model.config.image_token_id

    def favour_the_image_token(module, inputs, logits):
        logits[..., image] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_the_image_token)
    data = prompt_inputs(batch(tokenizer, processor, answers=False, padding_side="left"))
    start = data["input_ids"].shape[1]
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        unsuppressed = model.generate(**data, use_cache=True, **settings)
        assert (unsuppressed[:, start] == image).all()
        suppressed = {cache: model.generate(**data, use_cache=cache, suppress_tokens=vision_token_ids(model.config),
                                            **settings) for cache in (True, False)}
    assert set(vision_token_ids(model.config)) >= {image, model.config.video_token_id}
    assert not torch.isin(suppressed[True][:, start:], torch.tensor(vision_token_ids(model.config))).any()
    assert torch.equal(suppressed[True], suppressed[False])


def test_model_uses_mcg_positions_in_training_and_generation(tokenizer, processor) -> None:
    model = tiny_model(tiny_config(tokenizer))
    config = model.config
    rope = {"image_token_id": config.image_token_id, **config.mcg_rope}
    seen, handle = capture_positions(model)
    try:
        data = batch(tokenizer, processor, answers=True, padding_side="right")
        with torch.no_grad():
            model(**data)
        expected, _ = mcg_rope_index(data["input_ids"], data["image_grid_thw"], data["attention_mask"], **rope)
        assert torch.equal(seen[-1], expected)
        stock, _ = mcg_rope_index(data["input_ids"], data["image_grid_thw"], data["attention_mask"],
                                  image_token_id=config.image_token_id, **STOCK_GAPS)
        assert not torch.equal(expected, stock)

        seen.clear()
        prompt = prompt_inputs(batch(tokenizer, processor, answers=False, padding_side="left"))
        expected, deltas = mcg_rope_index(prompt["input_ids"], prompt["image_grid_thw"], prompt["attention_mask"],
                                          **rope)
        steps = 6
        with torch.no_grad():
            model.generate(**prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        assert len(seen) == steps
        assert seen[0].shape[0] == 4 and torch.equal(seen[0][1:], expected)  # text row + 3 M-RoPE rows
        assert torch.equal(model.model.rope_deltas, deltas)
        length = prompt["input_ids"].shape[1]
        mask = torch.cat([prompt["attention_mask"], torch.ones(2, steps, dtype=torch.long)], dim=1)
        for step, positions in enumerate(seen[1:], start=1):
            assert torch.equal(positions[1:], decode_position_ids(deltas, length + step - 1, 1,
                                                                  mask[:, :length + step]))
        top = expected.amax(dim=(0, 2))
        assert seen[1][1:, :, 0].tolist() == [(top + 1).tolist()] * 3  # decoding continues at max + 1

        # a hand-written decoding loop (no position ids given) goes through the stored rope deltas
        seen.clear()
        with torch.no_grad():
            out = model(**prompt, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            step_mask = torch.cat([prompt["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
            model(input_ids=token, attention_mask=step_mask, past_key_values=out.past_key_values, use_cache=True)
        assert torch.equal(seen[0], expected)
        assert torch.equal(seen[1], decode_position_ids(deltas, length, 1, step_mask))
    finally:
        handle.remove()


@pytest.mark.parametrize("architecture", sorted(MODEL_CLASSES))
def test_stock_gaps_reproduce_stock_transformers(tokenizer, processor, architecture) -> None:
    config = tiny_config(tokenizer, architecture, inter_gap=(1, 1, 1), intra_stride=(1, 1))
    ours = tiny_model(config)
    stock = STOCK_CLASSES[architecture](copy.deepcopy(config)).eval()
    stock.load_state_dict(ours.state_dict())
    data = batch(tokenizer, processor, answers=True, padding_side="right")
    types = (data["input_ids"] == config.image_token_id).int()
    with torch.no_grad():
        mine, theirs = ours(**data), stock(**data, mm_token_type_ids=types)
        clinkd = tiny_model(tiny_config(tokenizer, architecture))
        clinkd.load_state_dict(ours.state_dict())
        other = clinkd(**data)
    assert torch.equal(mine.logits, theirs.logits) and torch.equal(mine.loss, theirs.loss)
    assert not torch.allclose(other.logits, theirs.logits)  # the default gaps do move the positions
    prompt = prompt_inputs(batch(tokenizer, processor, answers=False, padding_side="left"))
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(ours.generate(**prompt, **settings),
                           stock.generate(**prompt, mm_token_type_ids=(prompt["input_ids"] == config.image_token_id)
                                          .int(), **settings))


def test_checkpoint_round_trip(tokenizer, processor, tmp_path) -> None:
    model = tiny_model(tiny_config(tokenizer, inter_gap=(3, 2, 2), intra_stride=(1, 2)))
    directory = save_grounding_model(tmp_path / "checkpoint", model, tokenizer, processor)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= \
        {path.name for path in directory.iterdir()}
    save_grounding_model(directory, model, tokenizer, processor)  # replacing a checkpoint leaves no leftovers
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]
    loaded, loaded_tokenizer, loaded_processor = load_grounding_checkpoint(directory)
    assert type(loaded) is type(model) and loaded.config.mcg_rope == {"inter_gap": [3, 2, 2], "intra_stride": [1, 2]}
    assert loaded_processor == processor and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    data = batch(loaded_tokenizer, loaded_processor, answers=True, padding_side="right")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**data).logits, model(**data).logits)
    stock = STOCK_CLASSES["qwen2_vl"].from_pretrained(directory, local_files_only=True)  # same weight layout
    expected = model.state_dict()
    assert stock.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in stock.state_dict().items())


def test_stock_checkpoint_directory_loads_into_the_mcg_class(tokenizer, processor, tmp_path) -> None:
    config = tiny_config(tokenizer, inter_gap=(1, 1, 1))
    delattr(config, MCG_KEY)
    torch.manual_seed(0)
    stock = STOCK_CLASSES["qwen2_vl"](config).eval()
    stock.save_pretrained(tmp_path)
    loaded = load_grounding_model(tmp_path)
    assert isinstance(loaded, MODEL_CLASSES["qwen2_vl"]) and loaded.config.mcg_rope["inter_gap"] == [2, 2, 2]
    as_stock = load_grounding_model(tmp_path, mcg_rope=STOCK_GAPS).eval()
    data = batch(tokenizer, processor, answers=True, padding_side="right")
    with torch.no_grad():
        expected = stock(**data, mm_token_type_ids=(data["input_ids"] == config.image_token_id).int()).logits
        assert torch.equal(as_stock(**data).logits, expected)


def test_phantom_med_grit_records_train_end_to_end(tiny_phantom) -> None:
    from medistill.data.formats.med_grit import MedGritReader

    records = [record for record in MedGritReader(tiny_phantom / "med-grit").records() if record.split == "train"]
    texts = [text for record in records for turn in record.conversations for text in (turn.question, turn.answer)]
    tokenizer = train_tokenizer(texts, vocab_size=500)
    for text in texts:  # every question and answer, boxes included, decodes back exactly
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    config = tiny_config(tokenizer)
    processor = GroundingImageProcessor.for_model(config, min_pixels=16 * 16, max_pixels=64 * 64)
    picked = [next(record for record in records if record.task == task) for task in ("VG", "ROC", "RC", "MIA")]
    data = encode_batch(tokenizer, processor, [record.image for record in picked],
                        [record.conversations[0].question for record in picked],
                        [record.conversations[0].answer for record in picked], uids=[r.uid for r in picked])
    assert data["image_grid_thw"].tolist() == [[1, 16, 16]] * 4  # 64-pixel images, 4-pixel patches
    assert (data["input_ids"] == config.image_token_id).sum(1).tolist() == [64] * 4
    assert torch.isfinite(tiny_model(config)(**data).loss)
