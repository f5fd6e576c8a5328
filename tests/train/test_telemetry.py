"""Mining hardness on the gathered global batch (pipeline.train.telemetry.global_hardness), 2 gloo ranks.

The reference is pipeline.mining.hardness.batch_hardness on the concatenation of every rank's
rows in rank order, computed in one process: the mined group of a step spans the ranks, and
so does the random side batch drawn beside it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.mining.hardness import batch_hardness
from pipeline.train.telemetry import global_hardness, selection_metrics

WORLD, B, D, PIX = 2, 6, 5, 12


class Linear(torch.nn.Module):
    """Embeds uint8 images (B, h, w, c) by a fixed linear map, as a model takes the stream's images."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(PIX, D, generator=torch.Generator().manual_seed(7)))

    def forward(self, x):
        return x.float().flatten(1) / 255 @ self.w


def rank_batch(rank: int):
    """Rank ``rank``'s trained embeddings/labels and its share of the side batch (deterministic)."""
    g = torch.Generator().manual_seed(100 + rank)
    emb = torch.randn(B, D, generator=g)
    labels = torch.arange(B) // 2 + 10 * rank  # 3 classes x 2 images per rank, distinct across ranks
    rand = torch.randint(0, 256, (B, 2, 2, 3), generator=g, dtype=torch.uint8)
    rand_labels = torch.arange(B) // 2 + 100 + 10 * rank
    batch = {"rand_images": rand[None], "rand_labels": rand_labels[None], "has_rand": torch.tensor([True])}
    return batch, emb, labels


def reference():
    module = Linear()
    parts = [rank_batch(r) for r in range(WORLD)]
    mined = batch_hardness(torch.cat([e for _, e, _ in parts]), torch.cat([y for _, _, y in parts]))
    with torch.no_grad():
        rand_emb = torch.cat([module(b["rand_images"][0]) for b, _, _ in parts])
    rand = batch_hardness(rand_emb, torch.cat([b["rand_labels"][0] for b, _, _ in parts]))
    return {**{f"mine/{k}": v for k, v in mined.items()}, **{f"mine/random_{k}": v for k, v in rand.items()}}


def worker(rank, init_file, expected):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch, emb, labels = rank_batch(rank)
        got = global_hardness(batch, emb, labels, Linear())
        if rank == 0:
            assert got.keys() == expected.keys()
            for k, v in expected.items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        else:
            assert got == {}
    finally:
        dist.destroy_process_group()


def test_hardness_is_measured_on_the_gathered_global_batch(tmp_path):
    expected = reference()
    # The gathered batch differs from rank 0's slice: otherwise the test could not tell them apart.
    batch, emb, labels = rank_batch(0)
    local = global_hardness(batch, emb, labels, Linear())  # no process group: this rank's rows only
    assert local["mine/hardest_neg_sim_mean"] != pytest.approx(expected["mine/hardest_neg_sim_mean"])
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), expected), nprocs=WORLD, join=True)


def test_selection_metrics_only_with_the_miners_answer():
    assert selection_metrics({"labels": torch.zeros(1, 4)}) == {}
    row = {"select_ms": torch.tensor([2.5]), "fallbacks": torch.tensor([3]), "miner_version": torch.tensor([7])}
    assert selection_metrics(row) == {"mine/select_ms": 2.5, "mine/fallbacks": 3.0, "mine/index_version": 7.0}
