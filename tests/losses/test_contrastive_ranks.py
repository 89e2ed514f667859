"""The contrastive losses across processes: features gathered from every rank with their gradient (open_clip's
gather_with_grad + local loss), checked with 2 gloo processes against one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medistill.losses.contrastive import gather_features, soft_contrastive_loss


def _features(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, generator=generator).requires_grad_(requires_grad)
    b = torch.randn(8, 6, generator=generator).requires_grad_(requires_grad)
    return a, b


def _worker(rank: int, store_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        a, b = _features()
        local_a, local_b = a.detach()[rank * 4:(rank + 1) * 4].requires_grad_(), \
            b.detach()[rank * 4:(rank + 1) * 4].requires_grad_()
        gathered, offset = gather_features(local_b)
        loss = soft_contrastive_loss(local_a, local_b, temperature=torch.tensor(0.1))
        loss.backward()
        results[rank] = {"gathered": gathered.detach(), "offset": offset, "loss": loss.item(),
                         "grad_a": local_a.grad, "grad_b": local_b.grad}
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_with_gradient_and_match_one_process(tmp_path) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    a, b = _features()
    whole = soft_contrastive_loss(a, b, temperature=torch.tensor(0.1))
    whole.backward()
    whole = whole.detach()
    for rank in (0, 1):
        part = results[rank]
        assert torch.equal(part["gathered"], b.detach()) and part["offset"] == rank * 4
        rows = slice(rank * 4, (rank + 1) * 4)
        # local loss over the local rows against all columns; DDP averages the ranks' gradients, so the
        # mean of the two ranks' losses is the one-process loss and each rank's gradient is twice its share
        assert torch.allclose(part["grad_a"] / 2, a.grad[rows], atol=1e-6)
        assert torch.allclose(part["grad_b"] / 2, b.grad[rows], atol=1e-6)
    assert (results[0]["loss"] + results[1]["loss"]) / 2 == pytest.approx(whole.item(), rel=1e-6)
