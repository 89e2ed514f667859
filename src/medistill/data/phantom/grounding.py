"""Med-GRIT (BiRD) grounding conversations: VG, ROC, RC and MIA over findings and normal structures.

Boxes are `<box>(x1,y1),(x2,y2)</box>` with integer corners on a 0..999 grid; objects are
`<ref>name</ref>`; every question carries the image as `<img>{image id}.png</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medistill.data.phantom.anatomy import Anatomy
from medistill.data.phantom.findings import Finding
from medistill.data.phantom.geometry import mask_box
from medistill.data.phantom.spec import SPECS

PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Conversation:
    task: str  # VG, ROC, RC or MIA
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class GroundedObject:
    name: str
    box: PixelBox
    description: str


def grid_box(box: PixelBox, size: int) -> str:
    """A pixel box (x2/y2 exclusive) on the 0..999 grid, as BiRD writes it."""
    x1, y1 = (int(np.floor(c * 1000 / size)) for c in box[:2])
    x2, y2 = (min(999, int(np.ceil(c * 1000 / size))) for c in box[2:])
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _objects(anatomy: Anatomy, findings: list[Finding]) -> list[GroundedObject]:
    objects = []
    for finding in findings:
        name = finding.label.replace("_", " ")
        description = f"{name} in the {finding.location['phrase']}, about {max(1, round(finding.size_mm))} mm"
        objects.append(GroundedObject(name, finding.box, description))
    for name, profile in anatomy.structures.items():
        box = mask_box(profile > 0.5)
        if box is not None:
            objects.append(GroundedObject(name, box, f"normal-appearing {name}"))
    return objects


def make_conversations(modality: str, image_id: str, anatomy: Anatomy, findings: list[Finding],
                       rng: np.random.Generator) -> list[Conversation]:
    size = anatomy.frame.size
    image = f"<img>{image_id}.png</img>"
    objects = _objects(anatomy, findings)
    # prefer findings: they are what the phantom is about; structures keep normal images groundable
    target = objects[0] if findings else objects[int(rng.integers(len(objects)))]
    same = [o for o in objects if o.name == target.name]
    conversations = [
        Conversation("VG", ((
            f"{image}\nPlease output the bounding box of <ref>{target.name}</ref> in this image.",
            f"<ref>{target.name}</ref>" + "".join(grid_box(o.box, size) for o in same),
        ),)),
        Conversation("ROC", ((
            f"{image}\nWhat is the object in {grid_box(target.box, size)}?",
            target.name,
        ),)),
        Conversation("RC", ((
            f"{image}\nPlease describe the region {grid_box(target.box, size)} in detail.",
            target.description,
        ),)),
    ]
    spec = SPECS[modality]
    seen = "; ".join(f"{f.label.replace('_', ' ')} in the {f.location['phrase']}" for f in findings)
    summary = f"This {spec.words} image shows the {spec.organ_words} in the {anatomy.view} view. " + (
        f"Findings: {seen}." if findings else "No abnormality is seen.")
    conversations.append(Conversation("MIA", ((f"{image}\nPlease describe this image.", summary),)))
    return conversations
