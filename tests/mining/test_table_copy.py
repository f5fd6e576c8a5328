"""TableCopyClient (``miner.select_at: planner``): selection on a copy of a real miner actor's class table."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mining.actor import MinerClient, TableCopyClient, get_or_create_miner

DIM = 8


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def table(seed, n=50):
    return np.arange(n, dtype=np.int64) * 2 + 1, unit(np.random.default_rng(seed).standard_normal((n, DIM)))


@pytest.fixture
def miner(ray_local, request):
    name = f"miner-copy-{request.node.name}"
    handle = get_or_create_miner(name, dim=DIM)
    yield name, handle
    ray_local.kill(handle)


def test_the_copy_selects_what_the_miner_selects_and_follows_its_versions(miner, ray_local):
    name, handle = miner
    ids, emb = table(0)
    assert ray_local.get(handle.update.remote(ids, emb)) == 1
    local, remote = TableCopyClient(name, DIM, every=3), MinerClient(name)
    cand = ids[::2]
    for seed in range(5):
        assert local.select(cand, 10, np.random.default_rng(seed)) == remote.select(cand, 10, np.random.default_rng(seed))
    assert local.version == 1 and local.copies == 1 and local.fallbacks == 0
    # A new table: the copy keeps selecting on version 1 until `every` selections have passed,
    # then asks without waiting and installs the answer at a later selection.
    ids2, emb2 = table(1)
    assert ray_local.get(handle.update.remote(ids2, emb2)) == 2
    rng = np.random.default_rng(7)
    for _ in range(3):
        local.select(cand, 10, rng)
        assert local.last_version == 1
    local.sync(wait=True)  # the call the third selection sent
    assert local.version == 2 and local.copies == 2
    for seed in range(5):
        assert local.select(cand, 10, np.random.default_rng(seed)) == remote.select(cand, 10, np.random.default_rng(seed))
    # Nothing changed since: the miner answers None and nothing is copied again.
    for _ in range(3):
        local.select(cand, 10, rng)
    local.sync(wait=True)
    stats = ray_local.get(handle.stats.remote())
    assert local.copies == 2 and stats["tables"] == 2


def test_counts_reach_the_miner_and_knn_uses_the_copy(miner, ray_local):
    name, handle = miner
    ids, emb = table(2)
    ray_local.get(handle.update.remote(ids, emb))
    local = TableCopyClient(name, DIM, every=2)
    before = ray_local.get(handle.stats.remote())
    # Two candidates without an embedding fill the places the known ones cannot.
    picked = local.select(np.concatenate([ids[:3], [1000, 1002]]), 5, np.random.default_rng(0), filled=4)
    assert sorted(picked) == sorted(ids[:3].tolist() + [1000, 1002])
    local.select(ids[:10], 4, np.random.default_rng(1))
    local.sync(wait=True)  # the call after two selections carries their counts
    after = ray_local.get(handle.stats.remote())
    assert after["unembedded"] - before["unembedded"] == 2
    assert after["filled"] - before["filled"] == 4 and after["selects"] - before["selects"] == 2
    # knn: the copy's exact nearest classes, as the miner's flat index finds them.
    for cid in ids[:5]:
        near = local.neighbours(int(cid), 6)
        sims = emb @ emb[ids.tolist().index(int(cid))]
        order = [int(ids[i]) for i in np.argsort(-sims) if ids[i] != cid][:6]
        assert near.tolist() == order
        assert near.tolist() == ray_local.get(handle.neighbours.remote(int(cid), 6))[1].tolist()


def test_no_miner_is_random_and_a_lost_miner_leaves_the_copy_serving(ray_local):
    lost = TableCopyClient("miner-copy-nobody", DIM, timeout_s=0.5)
    rng = np.random.default_rng(0)
    got = lost.select(np.arange(20), 5, rng)
    assert len(set(got)) == 5 and lost.fallbacks == 1 and lost.last_version == -1
    name = "miner-copy-lost"
    handle = get_or_create_miner(name, dim=DIM)
    ids, emb = table(3)
    ray_local.get(handle.update.remote(ids, emb))
    local = TableCopyClient(name, DIM, every=1, timeout_s=0.5, cooldown_s=60)
    first = local.select(ids, 6, np.random.default_rng(1))
    ray_local.kill(handle, no_restart=True)
    for seed in range(4):  # the calls fail; selections go on, on the copy of version 1
        assert local.select(ids, 6, np.random.default_rng(seed))
        assert local.last_version == 1
    assert local.select(ids, 6, np.random.default_rng(1)) == first and local.fallbacks == 0
    local.sync(wait=True)  # the call in flight fails (dead actor) or times out: recorded, the copy stays
    assert local.last_error is not None and local.version == 1


def test_a_restarted_miner_sends_its_whole_table(ray_local):
    """A new actor of the same name counts versions from 0 again: equal version numbers must not keep the old copy."""
    name = "miner-copy-restart"
    handle = get_or_create_miner(name, dim=DIM)
    ids, emb = table(4)
    ray_local.get(handle.update.remote(ids, emb))
    local = TableCopyClient(name, DIM, every=1)
    local.select(ids, 3, np.random.default_rng(0))
    ray_local.kill(handle, no_restart=True)
    handle = get_or_create_miner(name, dim=DIM)
    ids2, emb2 = table(5, n=20)
    assert ray_local.get(handle.update.remote(ids2, emb2)) == 1  # the same version number as the old copy
    for _ in range(20):  # the dead actor's handle fails once, then the name is looked up again
        local._skip_until = 0.0
        local.sync(wait=True)
        if local.copies == 2:
            break
    assert local.copies == 2 and local.version == 1
    assert set(local.select(ids2, 20, np.random.default_rng(0))) == set(ids2.tolist())
    ray_local.kill(handle)
