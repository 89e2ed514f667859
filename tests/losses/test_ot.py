"""Our batched IPOT and log-domain Sinkhorn against POT, padding, and the word-patch OT loss.

References (all float64, each sample solved alone and unpadded, uniform marginals):
- Sinkhorn: ``ot.sinkhorn(method="sinkhorn_log")`` with the same number of iterations and no early stop, on
  the transposed problem (POT updates the column potential first, we update the row one first), and
  ``ot.batch.solve_batch(method="log_sinkhorn")`` on the padded batch (POT has no masks: zero weights plus a
  prohibitive cost on padded entries give the masked problem).
- IPOT (Xie et al. 2019, Algorithm 1): step t solves ``min <C, T> + beta KL(T || T_t)``, an entropic problem
  with cost ``C - beta log T_t`` and regularisation ``beta``, by ``inner_iterations`` Sinkhorn updates warm
  started from the previous step's scalings. POT builds it: one ``ot.bregman.sinkhorn_log`` call per step on
  ``(C - beta log T_t)^T`` with ``numItermax=inner_iterations`` and ``warmstart`` = the previous call's log
  scalings. With the inner problem converged each step is ``ot.sinkhorn(C - beta log T_t, reg=beta)``
  whatever the warm start, and many steps reach ``ot.emd``. POT's own batched proximal solver
  (``solve_batch(method="proximal")``) is not a reference: POT 0.9.7 uses ``+ log T`` in its kernel
  (PythonOT/POT#842) and its plans are not IPOT's.
Identical iterates agree to rounding, so those comparisons use 1e-10 (the requirement is 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medistill.losses.ot import ipot, sinkhorn_log, word_patch_ot_loss

ot = pytest.importorskip("ot")

SAME_ITERATES = 1e-10
REQUIRED = 1e-5


def _uniform(size: int) -> np.ndarray:
    return np.full(size, 1.0 / size)


def _padded_batch(seed: int = 0, n: int = 7, m: int = 11):
    """Costs in [0, 1] with different padding per sample (garbage, even NaN, in the padding)."""
    generator = torch.Generator().manual_seed(seed)
    cost = torch.rand(5, n, m, generator=generator, dtype=torch.float64)
    rows, cols = torch.tensor([7, 3, 5, 1, 6]), torch.tensor([11, 11, 4, 2, 9])
    source = torch.arange(n)[None] < rows[:, None]
    target = torch.arange(m)[None] < cols[:, None]
    padded = ~(source[:, :, None] & target[:, None, :])
    cost[padded] = torch.tensor([float("nan"), 1e6, -5.0, float("inf")], dtype=torch.float64).repeat(
        int(padded.sum()) // 4 + 1)[: int(padded.sum())]
    return cost, source, target, rows, cols


def _pot_sinkhorn(cost: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    n, m = cost.shape
    return ot.sinkhorn(_uniform(m), _uniform(n), cost.T, epsilon, method="sinkhorn_log", numItermax=iterations,
                       stopThr=0.0, warn=False).T


def _pot_ipot(cost: np.ndarray, beta: float, iterations: int, inner: int) -> np.ndarray:
    """IPOT built from POT's sinkhorn_log: one warm-started call per proximal step (see the module doc)."""
    n, m = cost.shape
    log_plan = np.zeros((n, m))
    warm = (np.log(_uniform(m)), np.zeros(n))
    for _ in range(iterations):
        plan, log = ot.bregman.sinkhorn_log(_uniform(m), _uniform(n), (cost - beta * log_plan).T, beta,
                                            numItermax=inner, stopThr=0.0, warn=False, log=True, warmstart=warm)
        warm = (log["log_u"], log["log_v"])
        log_plan = np.log(plan.T)
    return np.exp(log_plan)


def _check_against_pairs(plan, cost, rows, cols, reference, tolerance):
    """Each sample's real block matches its reference (plan and cost <C, T>); padding is exactly 0."""
    for i in range(plan.shape[0]):
        n, m = int(rows[i]), int(cols[i])
        block = plan[i, :n, :m].numpy()
        expected = reference(cost[i, :n, :m].numpy())
        np.testing.assert_allclose(block, expected, rtol=0, atol=tolerance)
        real_cost = cost[i, :n, :m].numpy()
        assert abs((block * real_cost).sum() - (expected * real_cost).sum()) < tolerance
        outside = plan[i].clone()
        outside[:n, :m] = 0
        assert torch.count_nonzero(outside) == 0


@pytest.mark.parametrize("use_kernel", [None, True, False])
def test_sinkhorn_matches_pot_pair_by_pair(use_kernel):
    cost, source, target, rows, cols = _padded_batch()
    plan = sinkhorn_log(cost, source, target, epsilon=0.05, iterations=40, use_kernel=use_kernel)
    assert plan.dtype == torch.float64 and not torch.isnan(plan).any()
    _check_against_pairs(plan, cost, rows, cols, lambda c: _pot_sinkhorn(c, 0.05, 40), SAME_ITERATES)
    # the last update is the column one: column marginals are exact
    torch.testing.assert_close(plan.sum(1), target.double() / cols[:, None], rtol=0, atol=1e-12)


def test_sinkhorn_matches_pot_solve_batch():
    cost, source, target, rows, cols = _padded_batch(seed=1)
    a = source.double() / rows[:, None]
    b = target.double() / cols[:, None]
    walled = cost.masked_fill(~(source[:, :, None] & target[:, None, :]), 1e4)
    expected = ot.batch.solve_batch(walled, 0.1, a, b, method="log_sinkhorn", max_iter=25, tol=0).plan
    plan = sinkhorn_log(cost, source, target, epsilon=0.1, iterations=25)
    torch.testing.assert_close(plan, expected, rtol=0, atol=SAME_ITERATES)
    assert abs(float((plan * walled.nan_to_num()).sum() - (expected * walled.nan_to_num()).sum())) < REQUIRED


def test_sinkhorn_small_epsilon_takes_the_logsumexp_path_and_still_matches_pot():
    cost, source, target, rows, cols = _padded_batch(seed=2)
    # spread of C / epsilon up to 2000: beyond the shifted kernel's range even in float64
    plan = sinkhorn_log(cost, source, target, epsilon=5e-4, iterations=30)
    assert torch.isfinite(plan).all()
    _check_against_pairs(plan, cost, rows, cols, lambda c: _pot_sinkhorn(c, 5e-4, 30), SAME_ITERATES)
    # in float32 the kernel path would lose mass to underflow; auto must notice and agree with float64
    plan32 = sinkhorn_log(cost.float(), source, target, epsilon=0.005, iterations=30)
    assert plan32.dtype == torch.float32
    reference = sinkhorn_log(cost, source, target, epsilon=0.005, iterations=30)
    torch.testing.assert_close(plan32.double(), reference, rtol=0, atol=REQUIRED)


def test_ipot_matches_pot_built_reference():
    cost, source, target, rows, cols = _padded_batch(seed=3)
    for inner in (1, 3):
        plan = ipot(cost, source, target, beta=0.5, iterations=50, inner_iterations=inner)
        assert plan.dtype == torch.float64
        _check_against_pairs(plan, cost, rows, cols, lambda c: _pot_ipot(c, 0.5, 50, inner), SAME_ITERATES)
    # a different beta, and enough steps to fold the scalings back into the plan many times in float32
    plan = ipot(cost, source, target, beta=0.1, iterations=60)
    _check_against_pairs(plan, cost, rows, cols, lambda c: _pot_ipot(c, 0.1, 60, 1), SAME_ITERATES)
    plan32 = ipot(cost.float(), source, target, beta=0.1, iterations=60)
    assert plan32.dtype == torch.float32
    torch.testing.assert_close(plan32.double(), plan, rtol=0, atol=REQUIRED)


def test_ipot_with_converged_inner_steps_is_the_proximal_point_method():
    generator = torch.Generator().manual_seed(4)
    cost = torch.rand(3, 5, 8, generator=generator, dtype=torch.float64)
    beta, steps = 0.5, 6
    plan = ipot(cost, beta=beta, iterations=steps, inner_iterations=400)
    for i in range(3):
        c, current = cost[i].numpy(), np.ones((5, 8))
        for _ in range(steps):  # T_{t+1} = argmin <C, T> + beta KL(T || T_t)
            current = ot.sinkhorn(_uniform(5), _uniform(8), c - beta * np.log(current), beta, method="sinkhorn_log",
                                  numItermax=10000, stopThr=1e-14)
        np.testing.assert_allclose(plan[i].numpy(), current, rtol=0, atol=REQUIRED)


def test_ipot_converges_to_exact_optimal_transport():
    generator = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 6, 9, generator=generator, dtype=torch.float64)
    plan = ipot(cost, iterations=2000)
    for i in range(3):
        c = cost[i].numpy()
        exact = ot.emd(_uniform(6), _uniform(9), c)
        assert abs(float((plan[i] * cost[i]).sum()) - ot.emd2(_uniform(6), _uniform(9), c)) < REQUIRED
        np.testing.assert_allclose(plan[i].numpy(), exact, rtol=0, atol=1e-4)
    # 50 steps (AMiF's setting) are still visibly regularised: the check above can fail
    short = ipot(cost, iterations=50)
    gaps = [float((short[i] * cost[i]).sum()) - ot.emd2(_uniform(6), _uniform(9), cost[i].numpy()) for i in range(3)]
    assert max(gaps) > 1e-4


@pytest.mark.parametrize("solver", [
    lambda c, s, t: ipot(c, s, t, iterations=30),
    lambda c, s, t: sinkhorn_log(c, s, t, epsilon=0.05, iterations=30),
    lambda c, s, t: sinkhorn_log(c, s, t, epsilon=0.05, iterations=30, use_kernel=False),
], ids=["ipot", "sinkhorn-kernel", "sinkhorn-logsumexp"])
def test_padding_gives_the_unpadded_plan(solver):
    cost, source, target, rows, cols = _padded_batch(seed=6)
    plan = solver(cost, source, target)
    for i in range(cost.shape[0]):
        n, m = int(rows[i]), int(cols[i])
        alone = solver(cost[i : i + 1, :n, :m].clone(), None, None)[0]
        torch.testing.assert_close(plan[i, :n, :m], alone, rtol=0, atol=1e-12)
        assert torch.count_nonzero(plan[i, n:]) == 0 and torch.count_nonzero(plan[i, :, m:]) == 0
    # a sample without real rows (or columns) transports nothing and leaves the others alone
    source_empty, target_empty = source.clone(), target.clone()
    source_empty[1] = False
    target_empty[3] = False
    emptied = solver(cost, source_empty, target_empty)
    assert torch.count_nonzero(emptied[1]) == 0 and torch.count_nonzero(emptied[3]) == 0
    keep = [0, 2, 4]
    torch.testing.assert_close(emptied[keep], plan[keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_costs_do_not_underflow(dtype):
    # adding a constant (or a constant per row) changes no plan, but exp(-offset / beta) alone underflows
    cost, source, target, _, _ = _padded_batch(seed=9)
    cost = cost.to(dtype)
    offset = 1000.0 if dtype == torch.float64 else 100.0  # float32 keeps ~1e-5 of the cost at 100
    shifted = cost + offset + torch.arange(7, dtype=dtype)[None, :, None]
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ipot(shifted, source, target), ipot(cost, source, target), rtol=0, atol=tolerance)
    torch.testing.assert_close(sinkhorn_log(shifted, source, target, epsilon=0.05, iterations=20),
                               sinkhorn_log(cost, source, target, epsilon=0.05, iterations=20),
                               rtol=0, atol=tolerance)


def test_plans_carry_no_gradient_and_keep_the_dtype():
    cost = torch.rand(2, 4, 6, requires_grad=True)
    for plan in (ipot(cost), sinkhorn_log(cost, epsilon=0.1, iterations=10)):
        assert not plan.requires_grad and plan.dtype == torch.float32
    assert cost.grad is None


def test_bad_input_is_refused():
    cost = torch.rand(2, 4, 6)
    with pytest.raises(ValueError, match="shape"):
        ipot(torch.rand(4, 6))
    with pytest.raises(ValueError, match="source_mask"):
        ipot(cost, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        ipot(cost, beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_log(cost, epsilon=-1.0, iterations=3)
    with pytest.raises(ValueError, match="NaN"):
        ipot(torch.full((1, 2, 2), float("nan")))


def _tokens(seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(3, 6, 16, generator=generator, dtype=torch.float64)
    image = torch.randn(3, 10, 16, generator=generator, dtype=torch.float64)
    text_mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    image_mask = torch.arange(10)[None] < torch.tensor([10, 7, 9])[:, None]
    return text.requires_grad_(), image.requires_grad_(), text_mask, image_mask


def test_word_patch_loss_is_the_cost_of_the_ipot_plan_over_real_tokens():
    text, image, text_mask, image_mask = _tokens()
    with torch.no_grad():
        text[~text_mask] = float("nan")  # padding must not reach the loss
    loss = word_patch_ot_loss(text, text_mask, image, image_mask)
    assert loss.shape == (3,)
    for i in range(3):
        words = F.normalize(text[i, text_mask[i]], dim=-1).detach().numpy()
        patches = F.normalize(image[i, image_mask[i]], dim=-1).detach().numpy()
        cost = 1.0 - words @ patches.T
        # as UNITER / ViLT: IPOT on the patch-by-word cost
        plan = _pot_ipot(cost.T, 0.5, 50, 1).T
        assert abs(float(loss[i].detach()) - float((cost * plan).sum())) < REQUIRED


def test_word_patch_loss_gradient_flows_through_the_cost_only():
    text, image, text_mask, image_mask = _tokens(seed=8)
    loss = word_patch_ot_loss(text, text_mask, image, image_mask)
    text_grad, image_grad = torch.autograd.grad(loss.sum(), (text, image))
    assert torch.isfinite(text_grad).all() and text_grad[text_mask].abs().sum() > 0
    assert torch.count_nonzero(text_grad[~text_mask]) == 0 and torch.count_nonzero(image_grad[~image_mask]) == 0
    # the same gradient as <C(x), T> with T a constant ...
    words, patches = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    cost = 1.0 - words @ patches.transpose(1, 2)
    plan = ipot(cost.detach().transpose(1, 2), image_mask, text_mask).transpose(1, 2)
    constant = torch.autograd.grad((cost * plan).sum(), text, retain_graph=True)[0]
    torch.testing.assert_close(text_grad, constant, rtol=0, atol=1e-12)
    # ... and not the gradient through an unrolled (differentiable) IPOT, which differs
    unrolled = torch.autograd.grad((cost * _differentiable_ipot(cost, text_mask, image_mask)).sum(), text)[0]
    assert (unrolled - text_grad).abs().max() > 1e-4


def _differentiable_ipot(cost, text_mask, image_mask, beta=0.5, iterations=50):
    """Plain UNITER-style IPOT in autograd (patches as rows), for the contrast above."""
    kernel = torch.exp(-cost.transpose(1, 2) / beta) * (image_mask[:, :, None] & text_mask[:, None, :])
    mu = (image_mask / image_mask.sum(1, keepdim=True))[:, :, None].double()
    nu = (text_mask / text_mask.sum(1, keepdim=True))[:, :, None].double()
    plan, b = torch.ones_like(kernel), nu
    for _ in range(iterations):
        q = kernel * plan
        a = mu / (q @ b + (~image_mask)[:, :, None])
        b = nu / (q.transpose(1, 2) @ a + (~text_mask)[:, :, None])
        plan = a * q * b.transpose(1, 2)
    return plan.transpose(1, 2)


@pytest.mark.parametrize("shape", [(64, 10), (10, 64), (196, 3), (5, 5)])
def test_ipot_with_a_flat_cost_stays_finite(shape):
    """A near-constant cost (early training: every token alike) once overflowed the row / column scalings."""
    for cost in (torch.ones(2, *shape), 1 + 1e-7 * torch.rand(2, *shape)):
        plan = ipot(cost, beta=0.5, iterations=50)
        assert torch.isfinite(plan).all()
        assert torch.allclose(plan.sum((1, 2)), torch.ones(2), atol=1e-5)
