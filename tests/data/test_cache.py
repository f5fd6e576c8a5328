"""Shard sets on an object store: copied per node on first use, checked against the manifest.

The store is a real S3 API (moto's server on 127.0.0.1, port chosen by the OS) reached
through pyarrow's own S3 client, as a job would reach AWS; the URIs carry the endpoint and
dummy credentials (``s3://key:secret@bucket/path?endpoint_override=...&scheme=http``).
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.cache import RemoteSet, local_root
from pipeline.data.index import load_index, read_samples
from pipeline.data.manifest import ShardError, find_manifest



@pytest.fixture(scope="module")
def s3():
    """``(fs, uri(path) -> str)`` on a moto S3 server for this module, bucket ``sets`` created."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def uri(path: str) -> str:
        return f"s3://k:s@{path}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    fs, _ = pafs.FileSystem.from_uri(uri("sets") + "&allow_bucket_creation=true")
    fs.create_dir("sets")
    yield fs, uri
    server.stop()


def _upload(fs, local: Path, prefix: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(str(local), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@pytest.fixture(scope="module")
def remote_set(s3, tiny_shards):
    fs, uri = s3
    prefix = f"sets/{uuid.uuid4().hex[:8]}/out"
    _upload(fs, tiny_shards, prefix)
    return uri(f"{prefix}/train"), prefix


def test_first_use_copies_the_index_then_each_shard_once_and_reads_match_the_original(remote_set, tiny_shards,
                                                                                    tmp_path):
    spec, _ = remote_set
    assert find_manifest(spec) == find_manifest(str(tiny_shards / "train"))  # read from the store
    remote = RemoteSet(spec, str(tmp_path))
    root = remote.localize()
    assert sorted(p.name for p in root.iterdir()) == [".lock", "index-train.bin", "index-train.json", "manifest.json"]
    assert local_root(spec, str(tmp_path)) == str(root)
    index = load_index(root, "train", missing_ok=True)
    with pytest.raises(ShardError, match="missing"):
        load_index(root, "train")  # not a cache: an absent shard is an error
    original = load_index(tiny_shards, "train")
    rels = [str(Path(p).relative_to(root)) for p in index.paths]
    assert remote.fetch(rels[:2]) == 2 and remote.fetch(rels) == len(rels) - 2 and remote.fetch(rels) == 0
    for rel in rels:
        assert (root / rel).read_bytes() == (tiny_shards / rel).read_bytes()
    ids = np.random.default_rng(0).choice(len(index), 50, replace=False)
    assert read_samples(index, ids) == read_samples(original, ids)


def test_an_object_that_changed_after_writing_is_refused_naming_it_and_nothing_is_kept(s3, tiny_shards, tmp_path):
    fs, uri = s3
    prefix = f"sets/{uuid.uuid4().hex[:8]}/out"
    _upload(fs, tiny_shards, prefix)
    index = load_index(tiny_shards, "train")
    rel = str(Path(index.paths[1]).relative_to(tiny_shards))
    raw = bytearray((tiny_shards / rel).read_bytes())
    raw[700] ^= 0xFF  # same size, other bytes
    with fs.open_output_stream(f"{prefix}/{rel}") as f:
        f.write(bytes(raw))
    remote = RemoteSet(uri(f"{prefix}/train"), str(tmp_path))
    root = remote.localize()
    with pytest.raises(ShardError, match=rf"s3://{prefix}/{rel}: .*sha256.*manifest") as e:
        remote.fetch([rel])
    assert "k:s@" not in str(e.value)  # credentials never in a message
    assert not any((root / (rel + ext)).exists() for ext in ("", ".part", ".sha256"))  # nothing kept
    assert remote.fetch([str(Path(index.paths[0]).relative_to(tiny_shards))]) == 1  # the good ones still come


def test_a_remote_directory_without_a_manifest_is_refused(s3, tmp_path):
    fs, uri = s3
    with fs.open_output_stream("sets/loose/a.tar") as f:
        f.write(b"\0" * 1024)
    assert find_manifest(uri("sets/loose")) is None
    with pytest.raises(ShardError, match="no manifest.json .*jobs.make_shards"):
        RemoteSet(uri("sets/loose"), str(tmp_path))


def _fetch_all(args) -> int:
    spec, cache, rels = args
    return RemoteSet(spec, cache).fetch(rels)


def test_processes_of_one_node_copy_each_shard_once(remote_set, tmp_path):
    spec, _ = remote_set
    remote = RemoteSet(spec, str(tmp_path))
    root = remote.localize()
    rels = [str(Path(p).relative_to(root)) for p in load_index(root, "train", missing_ok=True).paths]
    with mp.get_context("spawn").Pool(3) as pool:  # spawn: the AWS SDK's threads do not survive a fork
        copied = pool.map(_fetch_all, [(spec, str(tmp_path), rels)] * 3)
    assert sum(copied) == len(rels), copied


def test_a_stream_over_an_s3_shard_set_delivers_the_planned_batches(ray_local, remote_set, tiny_shards, tmp_path):
    from tests.data.test_stream import _cfg, _consume, _planner, _reference

    from pipeline.data.stream import build_train_datasets

    ray = ray_local
    spec, _ = remote_set
    steps = 6
    cfg = _cfg(spec, steps, extra=[f"data.cache_dir={tmp_path}"])
    name, actor = _planner(spec, cfg, cache_dir=str(tmp_path))
    ray.get(actor.begin.remote(0, None))
    rows = _consume(build_train_datasets(cfg, name, 0))
    ref = _reference(tiny_shards)
    original = load_index(tiny_shards, "train")
    for s in range(steps):
        plan = ref.plan(s)
        got = np.concatenate([rows[r][s]["sample_ids"] for r in range(2)])
        assert np.array_equal(got, plan.sample_ids)
        assert not any(rows[r][s]["bad"].any() for r in range(2))
        for r in range(2):
            ref.take(s, r)
    assert read_samples(original, got[:4]) == read_samples(load_index(local_root(spec, str(tmp_path)), "train",
                                                                      missing_ok=True), got[:4])
    ray.kill(actor)
