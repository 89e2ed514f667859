"""Knowledge-distillation losses. Each returns a scalar; the method weights and names the terms.

Logit KD follows Hinton et al.: KL(teacher_T || student_T) scaled by T^2 so its gradients keep their size
as T changes. For multi-label and binary heads each label is an independent Bernoulli variable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def bernoulli_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * per-label Bernoulli KL(teacher_T || student_T), mean over (known) labels."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    p = torch.sigmoid(t)
    # KL(p || q) with q = sigmoid(s), written with log-sigmoids for stability
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    if mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2
    return kl.mean() * temperature**2


def feature_kd(student_features: torch.Tensor, teacher_features: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Distance between (projected) student features and teacher features: 1 - cosine, or MSE."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_features.float(), teacher_features.float(), dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student_features.float(), teacher_features.float())
    raise ValueError(f"feature KD kind must be cosine or mse, not {kind!r}")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token forward KL(softmax(teacher/T) || softmax(student/T)) over the vocabulary, no T^2 factor.

    Logits are (tokens, vocabulary); a teacher with a larger vocabulary is cut to the student's first entries
    (Qwen2-VL-7B's 152064 rows vs 2B's 151936: the extra rows are padding). Returns (tokens,).
    """
    vocabulary = student_logits.shape[-1]
    if teacher_logits.shape[-1] < vocabulary:
        raise ValueError(f"the teacher's vocabulary ({teacher_logits.shape[-1]}) is smaller than the student's "
                         f"({vocabulary}): distil from a teacher that shares the student's tokenizer")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[..., :vocabulary].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
