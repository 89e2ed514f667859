"""Caption metrics of Med-GRIT's RC and MIA answers by BiRD's protocol: pycocoevalcap's BLEU-1..4, METEOR,
ROUGE-L and CIDEr(-D) per modality, then the plain mean over modalities; mBMR = the mean of BLEU-1..4, METEOR
and ROUGE-L.

Texts are tokenised by Stanford's PTB tokenizer that pycocoevalcap ships (lower case, punctuation dropped) and
scored with one reference per answer. METEOR and the PTB tokenizer run on Java: without a `java` on the PATH
(or with `meteor=False`) METEOR is left out (None, with the reason under `notes`) and mBMR is then the mean of
the five other scores; texts are then split into lower-cased words with punctuation dropped. SPICE is not
computed (it downloads Stanford models). pycocoevalcap is an optional dependency (`pip install
'medistill[grounding]'`); without it the metrics are reported as unavailable, never an error.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mBMR")
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
               "...", ";"}
INSTALL_HINT = "pip install 'medistill[grounding]' (pycocoevalcap)"
_WORDS = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_TAGS = re.compile(r"</?ref>|<box>.*?</box>|<\|[a-z_]+\|>", re.DOTALL)


def available() -> bool:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return True


def java_available() -> bool:
    return shutil.which("java") is not None


def clean(text: str) -> str:
    """Answer text for scoring: `<ref>` tags dropped (names kept), boxes (either form) and control tokens dropped."""
    from medistill.data.formats.med_grit import QWEN_TOKENS

    for token, tag in QWEN_TOKENS.items():
        text = text.replace(token, tag)
    return " ".join(_TAGS.sub(" ", text).split())


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTB tokenisation (lower case, punctuation tokens dropped), in one Java call, quietly."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [text.replace("\n", " ").strip() or "." for text in texts]  # an empty line would shift the output
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as handle:
        handle.write("\n".join(lines))
        name = handle.name
    try:
        result = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                 "-lowerCase", name], capture_output=True, text=True, check=True, timeout=600)
    finally:
        os.unlink(name)
    out = result.stdout.split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} texts")
    return [" ".join(word for word in line.rstrip().split(" ") if word and word not in PUNCTUATION)
            for line in out[:len(lines)]]


def _plain_tokenize(texts: Sequence[str]) -> list[str]:
    return [" ".join(_WORDS.findall(text.lower())) for text in texts]


@functools.lru_cache(maxsize=1)
def _meteor() -> Any:
    """One METEOR Java process per Python process (it takes seconds to start)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _scores(references: list[str], predictions: list[str], meteor: bool) -> dict[str, float | None]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [reference] for i, reference in enumerate(references)}
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)}
    scores["METEOR"] = float(_meteor().compute_score(gts, res)[0]) if meteor else None
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    parts = [scores[name] for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L")]
    known = [value for value in parts if value is not None]
    scores["mBMR"] = sum(known) / len(known)
    return scores


def caption_metrics(predictions: Sequence[str], references: Sequence[str], modalities: Sequence[str], *,
                    meteor: bool = True) -> dict[str, Any]:
    """Per-modality caption scores, their plain mean over modalities (`mean`), and `notes` on what was left out.

    One reference per prediction; `modalities` groups the items (BiRD: the image file's prefix).
    """
    if not len(predictions) == len(references) == len(modalities):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references and {len(modalities)} "
                         "modalities: pass one of each per item")
    notes: list[str] = []
    if not predictions:
        return {"mean": dict.fromkeys(METRICS), "per_modality": {}, "n": 0, "notes": notes}
    if not available():
        return {"mean": dict.fromkeys(METRICS), "per_modality": {}, "n": len(predictions),
                "notes": [f"caption metrics unavailable: {INSTALL_HINT}"]}
    java = java_available()
    use_meteor = meteor and java
    if not java:
        notes.append("no Java: METEOR skipped and texts split into words instead of the PTB tokenizer")
    elif not meteor:
        notes.append("METEOR skipped (eval.meteor=false); mBMR averages the other five")
    tokenize = _ptb_tokenize if java else _plain_tokenize
    tokens = tokenize([clean(text) for text in (*predictions, *references)])
    hypotheses, truths = tokens[:len(predictions)], tokens[len(predictions):]
    groups: dict[str, list[int]] = {}
    for index, modality in enumerate(modalities):
        groups.setdefault(modality, []).append(index)
    per = {}
    for modality, indices in groups.items():
        per[modality] = {**_scores([truths[i] for i in indices], [hypotheses[i] for i in indices], use_meteor),
                         "n": len(indices)}
    mean = {name: (sum(entry[name] for entry in per.values()) / len(per)
                   if all(entry[name] is not None for entry in per.values()) else None) for name in METRICS}
    return {"mean": mean, "per_modality": per, "n": len(predictions), "notes": notes}
