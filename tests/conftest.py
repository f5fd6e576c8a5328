"""Shared fixtures: a local Ray instance (real, loopback) and tiny synthetic shard sets."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the tests that need one (started once, stopped at the end)."""
    import ray

    from pipeline.runtime import init_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_ray(8)  # loopback only, as a job's local instance
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Synthetic class-grouped shards: 40 classes x 8 images of 32x32, half held out, 2 exemplars per train class."""
    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_classes(40, 8, image_size=32, seed=1), out, holdout_fraction=0.5,
                 shard_size=40, seed=1, workers=1, progress=False, exemplars=2)
    return out
