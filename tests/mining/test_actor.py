"""MinerActor and MinerClient on a real local Ray: serving, crash, restart, fallback."""

import pickle
import time

import numpy as np
import pytest
import ray

from pipeline.mining.actor import MinerClient, get_or_create_miner
from pipeline.mining.class_index import ClassEmbeddingIndex

DIM = 8


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, namespace="test-mining")
    yield
    if started:
        ray.shutdown()


def embeddings(num, seed=0):
    return np.random.default_rng(seed).standard_normal((num, DIM)).astype(np.float32)


def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_without_ray_falls_back_and_pickles():
    # First in the file: Ray is not started yet (unless another module did it).
    client = pickle.loads(pickle.dumps(MinerClient("miner-none")))
    picked = client.select(np.arange(10), 4, np.random.default_rng(0))
    assert len(set(picked)) == 4 and client.fallbacks == 1 and client.last_error


def test_actor_serves_greedy_select(local_ray):
    handle = get_or_create_miner("miner-serve", dim=DIM)
    ids, emb = np.arange(100, 160), embeddings(60)
    assert ray.get(handle.ping.remote()) is True
    assert ray.get(handle.update.remote(ids, emb)) == 1
    # Same name -> the same actor, with its state.
    assert ray.get(get_or_create_miner("miner-serve", dim=DIM).version.remote()) == 1

    client = MinerClient("miner-serve", timeout_s=10.0)
    got = client.select(ids, 16, np.random.default_rng(7))
    assert client.fallbacks == 0 and client.last_version == 1

    local = ClassEmbeddingIndex(DIM)
    local.update(ids, emb)
    seed = int(np.random.default_rng(7).integers(2**63 - 1))  # the client's one draw
    assert got == local.select(ids, 16, np.random.default_rng(seed))

    nn_ids, _ = ray.get(handle.nearest_classes.remote(ids[:3], 4))
    assert nn_ids.shape == (3, 4)
    with pytest.raises(ValueError, match="duplicate class ids"):
        ray.get(handle.update.remote(np.zeros(60, dtype=np.int64), emb))


def test_client_falls_back_without_actor(local_ray):
    client = MinerClient("no-such-miner", cooldown_s=60.0)
    for _ in range(3):
        picked = client.select(np.arange(20), 5, np.random.default_rng(0))
        assert len(set(picked)) == 5 and set(picked) <= set(range(20))
    # One lookup failed; the next two skipped the actor during the cooldown.
    assert client.fallbacks == 3 and client.last_version == -1 and "no-such-miner" in client.last_error
    with pytest.raises(ValueError, match="n=21"):
        client.select(np.arange(20), 21, np.random.default_rng(0))


def test_kill_restart_falls_back_then_recovers(local_ray):
    handle = get_or_create_miner("miner-restart", dim=DIM, max_restarts=2)
    ids = np.arange(50)
    ray.get(handle.update.remote(ids, embeddings(50)))
    client = MinerClient("miner-restart", timeout_s=10.0, cooldown_s=0.0)
    client.select(ids, 8, np.random.default_rng(0))
    assert client.last_version == 1 and client.fallbacks == 0

    # ray.kill is asynchronous: the old actor may answer a call or two more. A
    # restart takes ~0.5-1 s here (new worker, imports), so calls bounded by
    # 0.1 s soon fall back.
    ray.kill(handle, no_restart=False)
    client.timeout_s = 0.1
    rng = np.random.default_rng(1)
    assert wait_for(lambda: len(set(client.select(ids, 8, rng))) == 8 and client.fallbacks > 0)

    # Restarted actors start empty (version 0) and answer again, at random.
    client.timeout_s = 10.0
    assert wait_for(lambda: len(set(client.select(ids, 8, rng))) == 8 and client.last_version == 0)
    assert ray.get(handle.version.remote()) == 0
    assert ray.get(handle.update.remote(ids, embeddings(50, seed=1))) == 1
    client.select(ids, 8, rng)
    assert client.last_version == 1


def test_client_finds_a_recreated_actor(local_ray):
    handle = get_or_create_miner("miner-dead", dim=DIM)
    client = MinerClient("miner-dead", timeout_s=5.0, cooldown_s=0.0)
    client.select(np.arange(10), 3, np.random.default_rng(0))
    assert client.last_version == 0 and client.fallbacks == 0

    ray.kill(handle, no_restart=True)  # dead for good
    assert wait_for(lambda: client.select(np.arange(10), 3, np.random.default_rng(0)) and client.fallbacks > 0)
    # Someone (the driver) creates it again under the same name; the client finds it.
    handles = []  # a non-detached actor dies when its last handle is dropped: keep it

    def recreate():  # the dead actor's name is released asynchronously
        try:
            handles.append(get_or_create_miner("miner-dead", dim=DIM))
            return ray.get(handles[-1].update.remote(np.arange(10), embeddings(10))) == 1
        except ray.exceptions.RayActorError:
            return False

    assert wait_for(recreate)
    assert wait_for(
        lambda: client.select(np.arange(10), 3, np.random.default_rng(0)) and client.last_version == 1
    ), (client.fallbacks, client.last_version, client.last_error)
