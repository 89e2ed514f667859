"""Med-GRIT-270k (BiRD, Huang et al. 2024) and the conversions ClinKD trains on.

Three JSON forms, one per record, all read from `*.json` files whose name says the split
(train / val / test) with images in `images/`:
- BiRD: `{"id": <image stem>, "conversations": [[question, answer], ...]}`, image `<id>.png`;
- LLaVA: `{"image": path, "conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`;
- ShareGPT: `{"images": [path], "messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`.
`<ref>name</ref>` names objects and `<box>(x1,y1),(x2,y2)</box>` (also Qwen2-VL's `<|box_start|>` tokens)
gives boxes on a 0-1000 grid, turned into pixels of the image. Each question-answer turn is one record;
its task is VG (a phrase in, boxes out), ROC (a box in, a name out), RC (a box in, a description out) or MIA
(no box), and its modality is the file-name prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, as_object, inside, make_box, read_json_list, text_field, to_float
from medistill.data.imaging import image_size
from medistill.data.records import GROUNDING_TASKS, Region, Record, Turn
from medistill.errors import DataError

MODALITIES = ("ct", "mr", "x_ray", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
GRID = 1000.0
SPLIT_WORDS = (("train", "train"), ("val", "val"), ("test", "test"))
QWEN_TOKENS = {"<|object_ref_start|>": "<ref>", "<|object_ref_end|>": "</ref>",
               "<|box_start|>": "<box>", "<|box_end|>": "</box>"}
_BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_CORNERS = re.compile(r"\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)")
_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
_IMAGE_TAG = re.compile(r"<img>.*?</img>|<image>|<\|vision_start\|>.*?<\|vision_end\|>", re.DOTALL)
_DESCRIBE = re.compile(r"\b(describe|description|caption|detail)", re.IGNORECASE)


def modality_of(stem: str) -> str | None:
    """The modality from the file-name prefix: one of Med-GRIT's eight ('x_ray_0001' -> 'x_ray'), else
    the text before the first '_' ('mammo_12' -> 'mammo'), else None."""
    lower = stem.lower()
    known = next((name for name in MODALITIES if lower.startswith(name + "_")), None)
    return known or (lower.split("_", 1)[0] if "_" in lower else None)


def task_of(question: str, answer: str) -> str:
    """VG, ROC, RC or MIA from where the boxes are: in the answer (VG), in the question (ROC, or RC when
    the question asks for a description), nowhere (MIA)."""
    if _BOX.search(question):
        return "RC" if _DESCRIBE.search(question) else "ROC"
    return "VG" if _BOX.search(answer) else "MIA"


@register_format
class MedGritReader(Reader):
    name = "med-grit"
    description = "Med-GRIT-270k: BiRD, LLaVA or ShareGPT JSON + images/"

    def referenced_image_dir(self) -> Path:
        return self.root / "images"

    def _read(self) -> Iterator[Record]:
        sizes: dict[Path, tuple[int, int]] = {}
        files = sorted(self.root.glob("*.json"))
        if not files:
            self.fail(At(str(self.root)).error("no *.json annotation file"))
        for path in files:
            split = next((split for word, split in SPLIT_WORDS if word in path.stem.lower()), "train")
            for number, item in enumerate(self.attempt(read_json_list, path) or [], start=1):
                records = self.attempt(self._records, item, At(str(path), number), split, sizes)
                yield from records or []

    def _records(self, item: Any, at: At, split: str, sizes: dict[Path, tuple[int, int]]) -> list[Record]:
        item = as_object(item, at)
        image, turns = self._image(item, at), _turns(item, at)
        stem = image.stem
        records = []
        for index, (question, answer) in enumerate(turns):
            task = item.get("task") if item.get("task") in GROUNDING_TASKS else task_of(question, answer)
            regions = []
            if _BOX.search(question) or _BOX.search(answer):
                if image not in sizes:
                    sizes[image] = image_size_at(image, at)
                regions = [*_regions(question, "question", sizes[image], at),
                           *_regions(answer, "answer", sizes[image], at)]
            records.append(Record(
                uid=f"{Path(at.file).stem}/{at.record}/{index}", image=str(image), split=split, modality=modality_of(stem),
                image_size=sizes.get(image), regions=regions, conversations=[Turn(question, answer)],
                task=task, meta={"id": item.get("id", stem)}))
        return records

    def _image(self, item: Mapping[str, Any], at: At) -> Path:
        images = self.referenced_image_dir()
        if "images" in item:
            listed = item["images"]
            if not isinstance(listed, list) or len(listed) != 1 or not isinstance(listed[0], str):
                raise at.error("expected a list with one image path", field="images")
            relative = listed[0]
        elif "image" in item:
            relative = text_field(item, "image", at) or ""
        elif "id" in item:
            relative = f"{text_field(item, 'id', at, numbers=True)}.png"
        else:
            raise at.error("a conversation without an image: give it image, images or an id naming "
                           "images/<id>.png", field="image")
        for base in (images, self.root):
            candidate = inside(base, relative, at, "image")
            if candidate.exists():
                return candidate
        return inside(images, relative, at, "image")


def image_size_at(image: Path, at: At) -> tuple[int, int]:
    try:
        return image_size(image)
    except DataError as error:
        raise at.error(f"cannot place the boxes in pixels: {error}", field="image") from None


def _turns(item: Mapping[str, Any], at: At) -> list[tuple[str, str]]:
    if "messages" in item:
        messages = _message_pairs(item["messages"], at, "messages", "role", "content", ("user", "assistant"))
    elif "conversations" in item:
        value = item["conversations"]
        if isinstance(value, list) and value and all(isinstance(turn, list) for turn in value):
            messages = [_pair(turn, at) for turn in value]
        else:
            messages = _message_pairs(value, at, "conversations", "from", "value", ("human", "gpt"))
    else:
        raise at.error("missing field: expected conversations or messages", field="conversations")
    if not messages:
        raise at.error("no question-answer turn", field="conversations")
    tags = sum(len(_IMAGE_TAG.findall(text)) for pair in messages for text in pair)
    if tags > 1:
        raise at.error(f"{tags} image tokens but one image per conversation: split it into one record per image",
                       field="conversations")
    return [(_clean(question, at, "question"), _clean(answer, at, "answer")) for question, answer in messages]


def _pair(turn: list[Any], at: At) -> tuple[str, str]:
    if len(turn) != 2 or not all(isinstance(text, str) for text in turn):
        raise at.error("expected [question, answer] text pairs", field="conversations")
    return turn[0], turn[1]


def _message_pairs(value: Any, at: At, field: str, speaker: str, text: str,
                   roles: tuple[str, str]) -> list[tuple[str, str]]:
    if not isinstance(value, list) or len(value) % 2:
        raise at.error(f"expected a list of alternating {roles[0]} / {roles[1]} messages", field=field)
    pairs = []
    for ask, reply in zip(value[::2], value[1::2]):
        for message, role in ((ask, roles[0]), (reply, roles[1])):
            if not isinstance(message, dict) or message.get(speaker) != role:
                raise at.error(f"expected a message with {speaker} {role!r}", field=field)
        pairs.append((text_field(ask, text, at, allow_empty=True) or "",
                      text_field(reply, text, at, allow_empty=True) or ""))
    return pairs


def _clean(text: str, at: At, field: str) -> str:
    for token, replacement in QWEN_TOKENS.items():
        text = text.replace(token, replacement)
    text = " ".join(_IMAGE_TAG.sub(" ", text).split())
    if not text:
        raise at.error("empty text", field=field)
    return text


def _regions(text: str, source: str, size: tuple[int, int], at: At) -> list[Region]:
    """Pixel boxes of every `<box>` in `text`, each labelled by the `<ref>` just before it (if any)."""
    width, height = size
    regions = []
    for match in _BOX.finditer(text):
        refs = _REF.findall(text[:match.start()])
        label = refs[-1].strip() if refs else "object"
        corners = _CORNERS.findall(match.group(1))
        if not corners:
            raise at.error(f"unreadable box {match.group(0)[:60]!r}; expected <box>(x1,y1),(x2,y2)</box>",
                           field=source)
        for values in corners:
            x1, y1, x2, y2 = (to_float(value, at, source) for value in values)
            make_box(x1, y1, x2, y2, at, source, size=(int(GRID), int(GRID)), tolerance=0.0)
            box = make_box(x1 * width / GRID, y1 * height / GRID, x2 * width / GRID, y2 * height / GRID,
                           at, source)
            regions.append(Region(label, box=box, attributes={"source": source}))
    return regions
