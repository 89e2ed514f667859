"""Tokenizers and prompts of grounding models (ClinKD, METHODS.md section 3).

Two kinds of tokenizer, one prompt builder:

- **from scratch** (`train_tokenizer`): a byte-level BPE trained with the `tokenizers` library on the training
  text and saved beside the checkpoint as a `PreTrainedTokenizerFast` directory. Every digit is its own
  token (no merge crosses a digit), so box corners round-trip exactly; boxes and objects are written in
  Med-GRIT's form `<ref>name</ref><box>(x1,y1),(x2,y2)</box>` on the 0-1000 grid, each tag one token that
  decoding keeps (`skip_special_tokens=True` drops only the control tokens). Control tokens: `<pad>`, `<s>`,
  `</s>`, the image token `<|image_pad|>` (and `<|video_pad|>`, never used), `<|vision_start|>`,
  `<|vision_end|>` (Qwen2-VL's names) and `<|answer|>` between question and answer. A prompt is
  `<s><|vision_start|><|image_pad|>...<|vision_end|>{question}<|answer|>{answer}</s>`.
- **real checkpoints** (Qwen2-VL's own tokenizer, loaded from the checkpoint directory): Qwen2-VL's chat form
  (system, user turn with the image first, assistant turn ended by `<|im_end|>`) and its box tokens
  `<|object_ref_start|>name<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`.

`build_example` writes both forms (boxes converted to the tokenizer's form) with labels that are -100 on every
token but the answer's and the closing end token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medistill.data.formats.med_grit import QWEN_TOKENS
from medistill.errors import UsageError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMAGE, VIDEO = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
ANSWER = "<|answer|>"
MED_GRIT_TAGS = ("<ref>", "</ref>", "<box>", "</box>")
IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100

_TO_QWEN = {value: key for key, value in QWEN_TOKENS.items()}
_NAMED_TOKENS = {"image_token": IMAGE, "video_token": VIDEO, "vision_start_token": VISION_START,
                 "vision_end_token": VISION_END, "answer_token": ANSWER}


@dataclass(frozen=True)
class PromptStyle:
    """How a tokenizer's prompts are written: text before the user content, between question and answer,
    after the answer (the labelled end token), and whether boxes use Qwen2-VL's tokens."""

    name: str
    prefix: str
    answer_prefix: str
    end: str
    qwen_boxes: bool


MED_GRIT_STYLE = PromptStyle("med-grit", BOS, ANSWER, EOS, qwen_boxes=False)
QWEN_STYLE = PromptStyle(
    "qwen2-vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", qwen_boxes=True)


def to_qwen_boxes(text: str) -> str:
    """Med-GRIT's `<ref>`/`<box>` tags as Qwen2-VL's `<|object_ref_start|>`/`<|box_start|>` tokens."""
    for tag, token in _TO_QWEN.items():
        text = text.replace(tag, token)
    return text


def to_med_grit_boxes(text: str) -> str:
    """Qwen2-VL's `<|object_ref_start|>`/`<|box_start|>` tokens as Med-GRIT's `<ref>`/`<box>` tags."""
    for token, tag in QWEN_TOKENS.items():
        text = text.replace(token, tag)
    return text


def _backend() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import transformers

    return transformers


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2048, min_frequency: int = 2) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (questions and answers, either box form).

    Tags and control tokens are taken out of the training text (they are single tokens); digits never merge.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    transformers = _backend()
    controls = [PAD, BOS, EOS, IMAGE, VIDEO, VISION_START, VISION_END, ANSWER]
    if vocab_size < 256 + len(controls) + len(MED_GRIT_TAGS):
        raise UsageError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (at least 268)")
    pattern = re.compile("|".join(re.escape(token) for token in [*controls, *MED_GRIT_TAGS, *QWEN_TOKENS]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(MED_GRIT_TAGS), min_frequency=min_frequency,
                                  special_tokens=controls, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator((pattern.sub(" ", to_med_grit_boxes(text)) for text in texts), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in MED_GRIT_TAGS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens=dict(_NAMED_TOKENS), padding_side="left", clean_up_tokenization_spaces=False)


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in a local checkpoint directory (ours or a real Qwen2-VL's); never the hub."""
    path = Path(directory)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UsageError(f"{path} holds no tokenizer (tokenizer.json or tokenizer_config.json)")
    return _backend().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def prompt_style(tokenizer: Any) -> PromptStyle:
    """Med-GRIT's form for our from-scratch tokenizers, Qwen2-VL's chat form for tokenizers that have it."""
    vocab = tokenizer.get_vocab()
    if ANSWER in vocab:
        return MED_GRIT_STYLE
    if "<|im_start|>" in vocab and "<|box_start|>" in vocab:
        return QWEN_STYLE
    raise UsageError("the tokenizer has neither medistill's <|answer|> token nor Qwen2-VL's chat and box "
                     "tokens: use train_tokenizer or a Qwen2-VL checkpoint's tokenizer")


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The ids a Qwen2-VL config needs (`image_token_id`, ..., `pad_token_id`) from the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {f"{name}_id": vocab.get(token) for name, token in _NAMED_TOKENS.items() if name != "answer_token"}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise UsageError(f"the tokenizer lacks the vision tokens {missing}")
    style = prompt_style(tokenizer)
    ids["bos_token_id"] = tokenizer.bos_token_id
    ids["eos_token_id"] = vocab[style.end]
    ids["pad_token_id"] = tokenizer.pad_token_id
    return ids


@dataclass(frozen=True)
class Example:
    """One tokenised conversation turn: `input_ids`, and `labels` (-100 except the answer and end token)."""

    input_ids: list[int]
    labels: list[int]


def _image_block(tokens: int) -> str:
    if tokens < 1:
        raise ValueError(f"an image needs at least one image token, got {tokens}")
    return VISION_START + IMAGE * tokens + VISION_END


def build_example(tokenizer: Any, question: str, answer: str | None, image_tokens: Sequence[int], *,
                  style: PromptStyle | None = None, uid: str | None = None) -> Example:
    """Tokenise one question (with its images) and answer; `answer=None` gives the generation prompt.

    `image_tokens` holds each image's number of image tokens (`GroundingImageProcessor.num_image_tokens`).
    Images go where the question has `<image>` markers (one per image), else all before the question.
    Boxes are converted to the tokenizer's form. Errors name `uid`.
    """
    style = style or prompt_style(tokenizer)
    where = f"record {uid}: " if uid is not None else ""
    if not image_tokens:
        raise ValueError(f"{where}the conversation has no image; grounding models need one")
    reserved = [token for token in (IMAGE, VIDEO, VISION_START, VISION_END, ANSWER, style.end, style.answer_prefix)
                if token in question or (answer is not None and token in answer)]
    if reserved:
        raise ValueError(f"{where}the text holds reserved tokens {reserved}")
    markers = question.count(IMAGE_MARKER)
    if markers and markers != len(image_tokens):
        raise ValueError(f"{where}the question has {markers} {IMAGE_MARKER} markers for {len(image_tokens)} images")
    convert = to_qwen_boxes if style.qwen_boxes else to_med_grit_boxes
    if markers:
        parts = question.split(IMAGE_MARKER)
        user = parts[0] + "".join(_image_block(n) + part for n, part in zip(image_tokens, parts[1:]))
    else:
        user = "".join(_image_block(n) for n in image_tokens) + question
    prompt = tokenizer.encode(style.prefix + convert(user) + style.answer_prefix, add_special_tokens=False)
    if answer is None:
        return Example(prompt, [IGNORE_INDEX] * len(prompt))
    reply = tokenizer.encode(convert(answer) + style.end, add_special_tokens=False)
    return Example(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)


def pad_examples(examples: Sequence[Example], pad_token_id: int, *, padding_side: str = "right"
                 ) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` (batch, longest) padded on `padding_side` ('left' to generate)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("no examples to pad")
    length = max(len(example.input_ids) for example in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[row, span] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, span] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def decode_answers(tokenizer: Any, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """Generated answers (the tokens after `prompt_length`) as Med-GRIT text: control tokens dropped, boxes
    in `<box>` form."""
    texts = tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    style = prompt_style(tokenizer)
    ends = [token for token in (style.end, tokenizer.eos_token, tokenizer.pad_token) if token]
    answers = []
    for text in texts:
        cut = min((text.find(token) for token in ends if token in text), default=len(text))
        answers.append(to_med_grit_boxes(text[:cut]).strip())
    return answers
