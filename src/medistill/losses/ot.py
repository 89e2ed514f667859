"""Batched optimal transport in torch: IPOT, log-domain Sinkhorn and AMiF's word-patch OT loss.

Every solver takes a batch of costs (B, n, m) with optional masks (B, n) and (B, m) (true or nonzero = a real
entry). Each sample is solved with uniform marginals over its real rows and columns only: its plan is the
plan of the unpadded problem and exactly zero on padded rows and columns. A sample without any real row or
column gets an all-zero plan. Float64 costs are solved in float64, anything else in float32; the plan has
the dtype of the cost. Plans carry no gradient (they are computed under ``torch.no_grad``).

The loops run over iterations only, never over samples, and ask the device nothing inside the loop: each
call makes one host synchronisation before iterating, to read the largest cost spread of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Entries of a rescaled kernel may span at most this fraction of the dtype's exponent range (log of its
# smallest normal number) before the solvers rescale: no subnormal numbers, no lost precision.
_IPOT_BUDGET = 0.25
_IPOT_MAX_FOLD = 8
_KERNEL_BUDGET = 0.5


class _Batch:
    """A validated batch: the cost in its working dtype (not copied), masks of real rows and columns
    (all false in a sample that has no real row or no real column) and the padded entries (None: none)."""

    def __init__(self, cost: Tensor, source_mask: Tensor | None, target_mask: Tensor | None) -> None:
        if cost.dim() != 3:
            raise ValueError(f"cost must have shape (batch, n, m), not {tuple(cost.shape)}")
        if not cost.is_floating_point():
            raise TypeError(f"cost must be a floating-point tensor, not {cost.dtype}")
        batch, n, m = cost.shape
        self.dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
        self.cost = cost.detach().to(self.dtype)
        rows = _mask(source_mask, (batch, n), cost.device, "source_mask")
        cols = _mask(target_mask, (batch, m), cost.device, "target_mask")
        alive = rows.any(-1, keepdim=True) & cols.any(-1, keepdim=True)
        self.rows, self.cols = rows & alive, cols & alive
        self.pad = None
        if source_mask is not None or target_mask is not None:
            self.pad = ~(self.rows[:, :, None] & self.cols[:, None, :])


def _mask(mask: Tensor | None, shape: tuple[int, int], device: torch.device, name: str) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, not {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _uniform(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform weights over the true entries of each row of `mask` (all zero where there are none)."""
    weights = mask.to(dtype)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)


def _spread(value: Tensor) -> float:
    """A tensor's largest entry as a Python float (a host sync); NaN or inf means a bad cost."""
    spread = float(value.amax())
    if not math.isfinite(spread):
        raise ValueError("cost has NaN or infinite values at real (unmasked) entries")
    return spread


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value}")


@torch.no_grad()
def ipot(cost: Tensor, source_mask: Tensor | None = None, target_mask: Tensor | None = None, *,
         beta: float = 0.5, iterations: int = 50, inner_iterations: int = 1) -> Tensor:
    """IPOT (Xie et al. 2019, Algorithm 1): proximal point OT plan for each (n, m) cost of the batch.

    Each outer step solves ``min <C, T> + beta * KL(T || T_prev)`` approximately with ``inner_iterations``
    warm-started Sinkhorn updates (rows first, then columns), starting from ``T_0 = 1 1^T``; as the
    iterations grow the plan approaches the exact (unregularised) optimal plan. This is the algorithm
    UNITER, ViLT and AMiF use for word-patch alignment (beta 0.5, 50 iterations, one inner update).
    """
    _check_positive(beta=beta, iterations=iterations, inner_iterations=inner_iterations)
    batch = _Batch(cost, source_mask, target_mask)
    dtype, pad = batch.dtype, batch.pad
    # Shift each row by its smallest real cost: IPOT begins each step with a row scaling, which absorbs a
    # row factor of the kernel, so the plan is unchanged, and every real row of the kernel peaks at 1.
    kernel = batch.cost.clone() if pad is None else torch.where(pad, math.inf, batch.cost)
    shift = kernel.amin(-1, keepdim=True).masked_fill_(~batch.rows[:, :, None], 0.0)
    kernel.sub_(shift)
    if pad is not None:
        kernel.masked_fill_(pad, 0.0)
    spread = _spread(kernel) / beta
    kernel.mul_(-1.0 / beta).exp_()
    if pad is not None:
        kernel.masked_fill_(pad, 0.0)
    # Q_t = kernel * T_t is kept as diag(row) R diag(col): R <- kernel * R is one pass per step, and the
    # scalings are folded back into R every `fold` steps, before R's entries could leave the normal range
    # (floored there, far below anything a plan entry can resolve).
    exponent = -math.log(torch.finfo(dtype).tiny)
    # The scalings drift apart even with a flat kernel (a near-constant cost, as early in training): by up to
    # about the row / column count ratio per step, so they are folded at least every _IPOT_MAX_FOLD steps.
    fold = min(_IPOT_MAX_FOLD, max(1, int(_IPOT_BUDGET * exponent / spread)) if spread > 0 else _IPOT_MAX_FOLD)
    floor = math.exp(-(1.0 - _IPOT_BUDGET) * exponent)
    plan = kernel.clone()
    mu, nu = _uniform(batch.rows, dtype)[:, :, None], _uniform(batch.cols, dtype)[:, None, :]
    # a padded row or column gets the scaling 0 / (0 + 1) = 0: exact zeros, never 0 / 0
    dead_rows, dead_cols = (~batch.rows).to(dtype)[:, :, None], (~batch.cols).to(dtype)[:, None, :]
    row, col = torch.ones_like(mu), torch.ones_like(nu)
    a, b = mu, nu.clone()
    for step in range(iterations):
        if step:
            plan.mul_(kernel)
            if step % fold == 0:
                plan.mul_(row).mul_(col).clamp_min_(floor)
                row.fill_(1.0)
                col.fill_(1.0)
        for _ in range(inner_iterations):  # a = mu / (Q b), then b = nu / (Q^T a)
            a = mu / torch.addcmul(dead_rows, row, torch.bmm(plan, (col * b).transpose(1, 2)))
            b = nu / torch.addcmul(dead_cols, col, torch.bmm((row * a).transpose(1, 2), plan))
        row.mul_(a)
        col.mul_(b)
    return plan.mul_(row).mul_(col).to(cost.dtype)  # padded rows and columns: row or col is exactly 0


@torch.no_grad()
def sinkhorn_log(cost: Tensor, source_mask: Tensor | None = None, target_mask: Tensor | None = None, *,
                 epsilon: float, iterations: int, use_kernel: bool | None = None) -> Tensor:
    """Entropic OT plan, ``argmin <C, T> + epsilon * sum T log T``, by log-domain Sinkhorn.

    Runs exactly ``iterations`` updates of the log-potentials, each the row update
    ``u = log a - LSE_j(-C_ij / epsilon + v_j)`` followed by the column update, from ``v = 0``; the plan is
    ``exp(-C / epsilon + u_i + v_j)`` and meets the column marginals exactly. ``use_kernel`` picks how each
    log-sum-exp is computed: with a batched matrix-vector product against the kernel ``exp(-C / epsilon)``
    shifted by its row maximum (exact while a row's spread of ``C / epsilon`` stays inside half of the dtype's
    exponent range, which ``None`` checks), or with ``torch.logsumexp`` over the whole matrix (any epsilon,
    several times slower). Both give the same plan up to rounding.
    """
    _check_positive(epsilon=epsilon, iterations=iterations)
    batch = _Batch(cost, source_mask, target_mask)
    dtype, rows, cols = batch.dtype, batch.rows, batch.cols
    if batch.pad is None:
        logits, inner_pad = batch.cost.clone(), None
        low, high = logits.amin(-1, keepdim=True), logits.amax(-1, keepdim=True)
    else:
        # a sample without real entries is solved as an unpadded problem on a zero cost, then zeroed
        empty = ~rows.any(-1, keepdim=True)
        rows, cols = rows | empty, cols | empty
        inner_pad = ~(rows[:, :, None] & cols[:, None, :])
        logits = torch.where(batch.pad, 0.0, batch.cost)
        low = logits.masked_fill_(inner_pad, math.inf).amin(-1, keepdim=True)
        high = logits.masked_fill_(inner_pad, -math.inf).amax(-1, keepdim=True)
        logits.masked_fill_(inner_pad, 0.0)  # finite; cancelled by the -inf potentials of padded rows/columns
        low.masked_fill_(~rows[:, :, None], 0.0)
        high.masked_fill_(~rows[:, :, None], 0.0)
    logits.mul_(-1.0 / epsilon)
    top = low * (-1.0 / epsilon)  # each real row's largest logit
    if use_kernel is None:
        use_kernel = _spread((high - low) / epsilon) <= _KERNEL_BUDGET * -math.log(torch.finfo(dtype).tiny)
    log_a = torch.where(rows, -rows.sum(-1, keepdim=True).to(dtype).log(), -math.inf)[:, :, None]
    log_b = torch.where(cols, -cols.sum(-1, keepdim=True).to(dtype).log(), -math.inf)[:, None, :]
    v = torch.where(cols, 0.0, -math.inf).to(dtype)[:, None, :]
    if use_kernel:
        u, v = _sinkhorn_kernel(logits, top, inner_pad, log_a, log_b, v, iterations)
    else:
        u, v = _sinkhorn_logsumexp(logits, log_a, log_b, v, iterations)
    plan = logits.add_(u).add_(v).exp_()
    if batch.pad is not None:
        plan.masked_fill_(batch.pad, 0.0)
    return plan.to(cost.dtype)


def _sinkhorn_kernel(logits: Tensor, top: Tensor, pad: Tensor | None, log_a: Tensor, log_b: Tensor, v: Tensor,
                     iterations: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn with LSE_j(L_ij + v_j) = top_i + max v + log sum_j K_ij exp(v_j - max v), where
    K = exp(L - top) is computed once; z = u + top is iterated in place of u."""
    kernel = (logits - top).exp_()  # each real row peaks at 1
    if pad is not None:
        kernel.masked_fill_(pad, 1.0)  # padded rows must sum to > 0; their potentials are -inf
    z = log_a
    for _ in range(iterations):
        v_max = v.amax(-1, keepdim=True)
        z = (log_a - v_max).sub_(torch.bmm(kernel, (v - v_max).exp_().transpose(1, 2)).log_())
        z_max = z.amax(1, keepdim=True)
        v = (log_b - z_max).sub_(torch.bmm((z - z_max).exp_().transpose(1, 2), kernel).log_())
    return z - top, v


def _sinkhorn_logsumexp(logits: Tensor, log_a: Tensor, log_b: Tensor, v: Tensor,
                        iterations: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn with torch.logsumexp over the whole (B, n, m) matrix."""
    work = torch.empty_like(logits)
    u = log_a
    for _ in range(iterations):
        u = log_a - torch.logsumexp(torch.add(logits, v, out=work), -1, keepdim=True)
        v = log_b - torch.logsumexp(torch.add(logits, u, out=work), -2, keepdim=True)
    return u, v


def word_patch_ot_loss(text_tokens: Tensor, text_mask: Tensor | None, image_tokens: Tensor,
                       image_mask: Tensor | None, *, beta: float = 0.5, iterations: int = 50) -> Tensor:
    """AMiF / UNITER word-patch alignment: ``sum_ij C_ij T_ij`` per pair, shape (B,).

    ``C_ij = 1 - cos(text token i, image patch j)`` over real tokens only; ``T`` is the IPOT plan of ``C``
    (uniform marginals, no gradient), so the gradient flows through ``C`` into the token features. As in
    UNITER's and ViLT's code, IPOT runs on the patch-by-word cost (its row update over patches first, the
    word marginals met exactly).
    """
    if text_tokens.dim() != 3 or image_tokens.dim() != 3 or text_tokens.shape[0] != image_tokens.shape[0] \
            or text_tokens.shape[-1] != image_tokens.shape[-1]:
        raise ValueError(f"expected text (B, n, d) and image (B, m, d) tokens, not {tuple(text_tokens.shape)} "
                         f"and {tuple(image_tokens.shape)}")
    dtype = torch.float64 if torch.float64 in (text_tokens.dtype, image_tokens.dtype) else torch.float32
    text = F.normalize(_zero_padding(text_tokens.to(dtype), text_mask), dim=-1)
    image = F.normalize(_zero_padding(image_tokens.to(dtype), image_mask), dim=-1)
    cost = 1.0 - torch.bmm(text, image.transpose(1, 2))
    plan = ipot(cost.transpose(1, 2), image_mask, text_mask, beta=beta, iterations=iterations)
    return (cost * plan.transpose(1, 2)).sum((1, 2))


def _zero_padding(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Padded token features set to 0, so that no value there (not even NaN) reaches the loss or gradient."""
    if mask is None:
        return tokens
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(tokens.shape[:2])}, not {tuple(mask.shape)}")
    return tokens.masked_fill(~mask.to(device=tokens.device, dtype=torch.bool)[:, :, None], 0.0)
