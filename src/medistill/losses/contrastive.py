"""Contrastive alignment with soft targets (AMiF's global, multi-view and text-text losses).

Each loss has the form `KL(Q || softmax(a b^T / tau))`, averaged over both directions. The target Q is
either the soft label of a frozen teacher, `softmax_row(s * a_hat b_hat^T + lambda * I)`, or, without a
teacher, the label-smoothed identity (InfoNCE with label smoothing).

Across processes the features are gathered with gradient and each rank computes the loss of its own rows
against every column (open_clip's "local loss"): the sum of the ranks' losses equals the loss of the
whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated (gradient flows back to the local part) and this rank's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed._functional_collectives import all_gather_single_autograd

    # the successor torch names for torch.distributed.nn.functional.all_gather: the backward pass sends each
    # rank the gradient of its own rows from every rank's loss (open_clip's gather_with_grad)
    gathered = all_gather_single_autograd(features.contiguous(), 0, dist.group.WORLD)
    return gathered, dist.get_rank() * features.shape[0]


def teacher_targets(teacher_a: torch.Tensor, teacher_b: torch.Tensor, scale: float, flexibility: float,
                    offset: int = 0) -> torch.Tensor:
    """Soft labels `softmax_row(scale * a_hat b_hat^T + flexibility * I)` from L2-normalised teacher embeddings.

    Rows are the local samples `teacher_a`, columns every sample `teacher_b`; sample i's positive is column
    `offset + i`. `flexibility` (AMiF's lambda, 0.01 by default) adds to the positive pair's logit.
    """
    logits = scale * F.normalize(teacher_a.float(), dim=-1) @ F.normalize(teacher_b.float(), dim=-1).T
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits[rows, rows + offset] += flexibility
    return logits.softmax(dim=-1)


def smoothed_targets(rows: int, columns: int, smoothing: float, offset: int = 0,
                     device: torch.device | None = None) -> torch.Tensor:
    """The identity with label smoothing: `1 - smoothing` on the positive, the rest spread over every column."""
    targets = torch.full((rows, columns), smoothing / columns, device=device)
    index = torch.arange(rows, device=device)
    targets[index, index + offset] += 1.0 - smoothing
    return targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`KL(targets || softmax(logits))` per row, averaged; zero when the prediction equals the target."""
    log_probs = logits.float().log_softmax(dim=-1)
    entropy = torch.xlogy(targets, targets).sum(dim=-1)
    return (entropy - (targets * log_probs).sum(dim=-1)).mean()


def soft_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: torch.Tensor,
    *,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_scale: float = 100.0,
    flexibility: float = 0.01,
    smoothing: float = 0.1,
) -> torch.Tensor:
    """Symmetric soft-label contrastive loss between paired embeddings `a` and `b` (rows are pairs).

    `temperature` is a positive scalar tensor (learnable through its logarithm). With `teacher` =
    (teacher_a, teacher_b) the targets are the teacher's soft labels; otherwise label-smoothed identity.
    Features from other ranks take part as negatives when torch.distributed is initialised.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, offset = gather_features(a)
    all_b, _ = gather_features(b)
    logits_ab = a @ all_b.T / temperature
    logits_ba = b @ all_a.T / temperature
    rows, columns = a.shape[0], all_b.shape[0]
    if teacher is None:
        target = smoothed_targets(rows, columns, smoothing, offset, a.device)
        targets = (target, target)
    else:
        teacher_a, teacher_b = teacher
        all_teacher_a, _ = gather_features(teacher_a.detach())
        all_teacher_b, _ = gather_features(teacher_b.detach())
        targets = (teacher_targets(teacher_a, all_teacher_b, teacher_scale, flexibility, offset),
                   teacher_targets(teacher_b, all_teacher_a, teacher_scale, flexibility, offset))
    return 0.5 * (soft_cross_entropy(logits_ab, targets[0]) + soft_cross_entropy(logits_ba, targets[1]))
