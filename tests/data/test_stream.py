"""Per-rank streams on a real local Ray: each rank's row of step s is exactly its slice of plan s.

The reference is an in-process BatchPlanner with the same arguments: the streams must
deliver its plans, whole, in step order, on every rank.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.index import class_ranges, load_index
from pipeline.data.planner import BatchPlanner
from pipeline.data.planner_actor import create_planner
from pipeline.data.stream import build_train_datasets, data_config

N, M, W = 4, 2, 2


def _cfg(train, steps, workers=W, extra=()):
    return load_config(None, [f"data.train={train}", "data.image_size=32", f"batch.classes_per_batch={N}",
                              f"scaling.num_workers={workers}", f"train.steps={steps}", "train.seed=3",
                              "data.decode_concurrency=2", *extra])


def _planner(root, cfg, **kw):
    name = f"planner-test-{uuid.uuid4().hex[:8]}"
    return name, create_planner(name, str(root), N, M, cfg.scaling.num_workers, cfg.train.seed, **kw)


def _reference(root, workers=W, seed=3):
    ids, starts, counts = class_ranges(load_index(str(root), "train"))
    keep = counts >= M
    return BatchPlanner(ids[keep], starts[keep], counts[keep], classes_per_batch=N, images_per_class=M,
                        world_size=workers, seed=seed, max_lead=64)


def _consume(datasets) -> list[list[dict]]:
    rows = [[] for _ in datasets]

    def run(i, ds):
        for b in ds.iter_batches(batch_size=1, batch_format="numpy"):
            rows[i].append({k: v[0] for k, v in b.items()})

    threads = [threading.Thread(target=run, args=(i, ds)) for i, ds in enumerate(datasets.values())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    return rows


def test_every_rank_gets_its_slice_of_every_planned_step(ray_local, tiny_shards):
    ray = ray_local
    steps = 12
    cfg = _cfg(tiny_shards / "train", steps)
    name, actor = _planner(tiny_shards, cfg)
    ray.get(actor.begin.remote(0, None))
    datasets = build_train_datasets(cfg, name, 0)
    assert sorted(datasets) == ["train_0", "train_1"]
    rows = _consume(datasets)
    ref = _reference(tiny_shards)
    seen = []
    for rank in range(W):
        assert [int(r["step"]) for r in rows[rank]] == list(range(steps)), "one row per step, in step order"
    for s in range(steps):
        plan = ref.plan(s)
        got = np.concatenate([rows[r][s]["sample_ids"] for r in range(W)])
        assert np.array_equal(got, plan.sample_ids), f"step {s}: the ranks' rows are not plan {s}"
        assert np.array_equal(np.concatenate([rows[r][s]["labels"] for r in range(W)]), plan.labels)
        a, b = (set(rows[r][s]["labels"].tolist()) for r in range(W))
        assert len(a) == len(b) == N // W and not a & b
        for r in range(W):
            assert rows[r][s]["images"].shape == (N // W * M, 32, 32, 3) and rows[r][s]["images"].any()
            assert not rows[r][s]["skip"] and not rows[r][s]["bad"].any()
        for r in range(W):
            ref.take(s, r)
        seen += got.tolist()
    assert len(seen) == len(set(seen)) == steps * N * M  # one pass holds them all: no sample twice
    ray.kill(actor)


def test_a_resumed_attempt_skips_earlier_steps_and_continues_the_plans(ray_local, tiny_shards):
    ray = ray_local
    steps, start = 10, 6
    ref = _reference(tiny_shards, workers=1)
    for s in range(start):
        ref.plan(s)
    state = ref.state_dict(start)
    cfg = _cfg(tiny_shards / "train", steps, workers=1)
    name, actor = _planner(tiny_shards, cfg)
    ray.get(actor.begin.remote(start, state))
    rows = _consume(build_train_datasets(cfg, name, 2))  # the job started at step 2, the attempt at 6
    assert [int(r["step"]) for r in rows[0]] == list(range(2, steps))
    assert [bool(r["skip"]) for r in rows[0]] == [True] * (start - 2) + [False] * (steps - start)
    for r in rows[0][start - 2:]:
        assert np.array_equal(r["sample_ids"], ref.plan(int(r["step"])).sample_ids)
    ray.kill(actor)


@pytest.fixture(scope="module")
def corrupt_set(tiny_shards, tmp_path_factory):
    """A copy of tiny_shards whose first train shard has two JPEG payloads overwritten in place
    (same length, so the index still matches): one without the JPEG start marker, one cut short."""
    out = tmp_path_factory.mktemp("corrupt") / "set"
    shutil.copytree(tiny_shards, out)
    index = load_index(str(out), "train")
    path = Path(index.paths[0])
    raw = bytearray(path.read_bytes())
    first = np.flatnonzero(index.shard == 0)[:2]
    o, n = int(index.offset[first[0]]), int(index.size[first[0]])
    raw[o:o + n] = b"\x00" * n  # corrupt_image
    o, n = int(index.offset[first[1]]), int(index.size[first[1]])
    raw[o + n - 64:o + n] = b"\x00" * 64  # truncated_image (no end-of-image marker)
    path.write_bytes(bytes(raw))
    return out, [int(i) for i in first], path


def test_bad_samples_are_replaced_by_classmates_and_counted(ray_local, corrupt_set):
    ray = ray_local
    root, bad_ids, shard = corrupt_set
    steps = 16  # 16 x 8 of the 160 train samples (one pass): the test checks that a bad one was drawn
    cfg = _cfg(root / "train", steps, workers=1)
    name, actor = _planner(root, cfg)
    ray.get(actor.begin.remote(0, None))
    rows = _consume(build_train_datasets(cfg, name, 0))[0]
    trained = np.concatenate([r["sample_ids"] for r in rows])
    bad = np.sum([r["bad"] for r in rows], axis=0)
    hit = [i for i in bad_ids if i in _planned_ids(root, steps)]
    assert hit, "the plans never drew a corrupted sample: pick another seed"
    assert not set(bad_ids) & set(trained.tolist())
    assert (trained >= 0).all() and len(set(trained.tolist())) == len(trained)
    for r in rows:  # whole slices: N/W classes x M, pairs of one class
        labels = r["labels"]
        assert (labels[0::2] == labels[1::2]).all() and len(set(labels.tolist())) == N
    report = ray.get(actor.fetch.remote())
    assert int(bad.sum()) == report["counts"]["corrupt_image"] + report["counts"]["truncated_image"] == len(hit)
    assert {i["shard"] for i in report["items"]} == {str(shard)}
    ray.kill(actor)


def _planned_ids(root, steps) -> set[int]:
    ref = _reference(root, workers=1)
    return {int(i) for s in range(steps) for i in ref.plan(s).sample_ids}


def test_too_many_bad_samples_stop_the_stream_naming_the_shard(ray_local, corrupt_set):
    ray = ray_local
    root, _, shard = corrupt_set
    cfg = _cfg(root / "train", 40, workers=1, extra=["data.max_bad_fraction=0.001"])
    name, actor = _planner(root, cfg, max_bad_fraction=0.001)
    ray.get(actor.begin.remote(0, None))
    ds = build_train_datasets(cfg, name, 0)["train_0"]
    with pytest.raises(Exception) as e:
        for _ in ds.iter_batches(batch_size=1, batch_format="numpy"):
            pass
    msg = str(e.value)
    assert "DataQualityError" in msg and "above data.max_bad_fraction=0.001" in msg and shard.name in msg
    ray.kill(actor)


def test_data_config_keeps_order_and_splits_nothing():
    dc = data_config()
    assert dc._datasets_to_split == [] and dc._resolve_execution_options("train_0").preserve_order


def test_a_shard_cut_short_trains_what_it_still_holds_and_replaces_the_rest(ray_local, tiny_shards, tmp_path):
    ray = ray_local
    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    index = load_index(str(root), "train")
    victim = int(index.shard[0])
    rows_of = np.flatnonzero(index.shard == victim)
    keep = rows_of[: len(rows_of) // 2]  # the first half of its samples survive the cut
    path = Path(index.paths[victim])
    with open(path, "r+b") as f:
        f.truncate(int(index.offset[rows_of[len(keep)]]) + 5)
    steps = len(index) // (N * M)  # one pass
    cfg = _cfg(root / "train", steps, workers=1)
    name, actor = _planner(root, cfg)
    ray.get(actor.begin.remote(0, None))
    rows = _consume(build_train_datasets(cfg, name, 0))[0]
    trained = np.concatenate([r["sample_ids"] for r in rows])
    lost = set(rows_of[len(keep):].tolist())
    assert set(keep.tolist()) & set(trained.tolist()), "samples before the cut still train"
    assert not lost & set(trained.tolist())
    bad = np.sum([r["bad"] for r in rows], axis=0)
    report = ray.get(actor.fetch.remote())
    assert 0 < report["counts"]["truncated_tar"] == int(bad.sum()) <= len(lost)
    assert {i["shard"] for i in report["items"]} == {str(path)}
    ray.kill(actor)


def test_a_sample_found_bad_is_not_handed_out_again_in_a_pass_planned_before(tiny_shards):
    import asyncio

    from pipeline.data.planner_actor import PlannerActor

    actor = PlannerActor(str(tiny_shards), N, M, 1, 3, max_lead=100)  # the class itself: no Ray needed
    passes = len(load_index(str(tiny_shards), "train")) // (N * M)

    async def run():
        await actor.begin(0, None)
        first = await actor.slices(list(range(2 * passes)), 0)  # both passes planned before anything is read
        bad = int(first[0]["sample_ids"][0])
        again = [s for s in range(passes, 2 * passes) if bad in first[s]["sample_ids"]]
        assert again, "the second pass draws every sample again"
        await actor.replace(0, 0, bad, "corrupt_image")
        later = [await actor.slice(s, 0) for s in range(passes, 2 * passes)]
        return bad, later, again

    bad, later, again = asyncio.run(run())
    assert not any(bad in part["sample_ids"] for part in later)
    # Pass 2 was planned whole: no unused classmate was left, so the slot says -1 (a classmate's copy).
    assert sum(int((part["sample_ids"] == -1).sum()) for part in later) == len(again)
    report = asyncio.run(actor.fetch())
    assert report["counts"]["corrupt_image"] == 1


def test_rows_of_jpeg_bytes_decode_in_the_trainer_to_the_same_pixels(ray_local, tiny_shards):
    """data.decode_device: cuda, run on the CPU: rows carry packed JPEG bytes and flips; the
    trainer's decode (``decode_batch``) gives exactly the pixel stream's images (same decoder)."""
    import torch

    from pipeline.data.decode import decode_batch

    ray = ray_local
    steps = 6
    cfg = _cfg(tiny_shards / "train", steps, workers=1, extra=["data.augment=flip_crop"])
    datasets, actors = {}, []
    for raw in (False, True):  # two planners with the same seed: the same plans; both streams at once
        name, actor = _planner(tiny_shards, cfg)
        ray.get(actor.begin.remote(0, None))
        datasets[raw] = build_train_datasets(cfg, name, 0, raw=raw)["train_0"]
        actors.append(actor)
    got = _consume(datasets)
    rows = {False: got[0], True: got[1]}
    for actor in actors:
        ray.kill(actor)
    flipped = shifted = 0  # flip_crop: some images of the rows are mirrored, most are moved
    for pix, jpg in zip(rows[False], rows[True]):
        assert "images" not in jpg and jpg["jpeg"].dtype == np.uint8 and jpg["jpeg_offsets"].shape == (N * M + 1,)
        assert jpg["jpeg"].size == jpg["jpeg_offsets"][-1] < pix["images"].size / 3  # far smaller than pixels
        np.testing.assert_array_equal(jpg["sample_ids"], pix["sample_ids"])
        images, ok = decode_batch(torch.from_numpy(jpg["jpeg"]), jpg["jpeg_offsets"], jpg["flips"], 32, "cpu",
                                  jpg["shifts"])
        assert bool(ok.all())
        np.testing.assert_array_equal(images.numpy(), pix["images"])
        flipped += int(jpg["flips"].sum())
        shifted += int(jpg["shifts"].any(axis=1).sum())
    assert 0 < flipped < steps * N * M and shifted > steps * N * M // 2


def test_an_image_that_fails_the_trainers_decode_is_replaced_by_a_classmate_and_counted(ray_local, tiny_shards):
    import torch

    from pipeline.data.decode import pack_jpegs
    from pipeline.train.loop import step_images

    ray = ray_local
    cfg = _cfg(tiny_shards / "train", 4, workers=1)
    name, actor = _planner(tiny_shards, cfg)
    index = load_index(str(tiny_shards), "train")
    good = [open(index.paths[int(index.shard[i])], "rb").read()[int(index.offset[i]):int(index.offset[i] + index.size[i])]
            for i in range(3)]
    bad = b"\xff\xd8" + b"\x13" * 200 + b"\xff\xd9"  # the markers pass the stream's check; it does not decode
    buf, offsets = pack_jpegs([good[0], good[1], bad, good[2]])
    labels = torch.tensor([7, 7, 9, 9])
    batch = {"jpeg": torch.from_numpy(buf.copy())[None], "jpeg_offsets": torch.from_numpy(offsets)[None],
             "flips": torch.zeros(1, 4, dtype=torch.bool), "sample_ids": torch.tensor([[0, 1, 2, 3]])}
    images = step_images(batch, 32, torch.device("cpu"), labels, actor)
    assert torch.equal(images[2], images[3]) and images[3].float().std() > 0  # slot 2: its classmate's image
    assert not torch.equal(images[0], images[1])
    import time

    deadline = time.monotonic() + 10  # the report is fire and forget; an async actor runs calls in any order
    while (report := ray.get(actor.fetch.remote()))["counts"]["corrupt_image"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert report["counts"]["corrupt_image"] == 1 and report["items"][0]["key"] == "sample 2"
    ray.kill(actor)


def test_the_miner_streams_with_the_same_lead_and_blocks_as_random_batches():
    """``data.max_lead`` 0 (default): lead 2 x decode_concurrency x 32 and blocks of 32 steps, with
    or without the miner (a miner lead of 20 made blocks of 5 steps: +24% wall time, BENCHMARKS.md);
    an explicit lead is kept as given, also below the default; a negative one names the key."""
    from pipeline.config import ConfigError
    from pipeline.data.stream import STEPS_PER_BLOCK, stream_shape

    for miner in ("false", "true"):
        assert stream_shape(load_config(None, [f"miner.enabled={miner}"])) == (STEPS_PER_BLOCK, 4 * STEPS_PER_BLOCK)
        assert stream_shape(load_config(None, [f"miner.enabled={miner}", "data.decode_concurrency=3"])) == (32, 192)
        assert stream_shape(load_config(None, [f"miner.enabled={miner}", "data.max_lead=20"])) == (5, 20)
    assert stream_shape(load_config(None, ["data.max_lead=3"])) == (1, 3)
    with pytest.raises(ConfigError, match="data.max_lead"):
        load_config(None, ["data.max_lead=-1"])


def test_blocks_leave_the_next_block_plannable_at_every_concurrency_and_lead():
    """The trainer's iterator hands on block k only once block k + 1 is done (``stream_shape``): block
    k + 1's last step must be plannable while the trainers, reporting every lead / 4 steps, start
    block k. One actor per rank gets blocks of a quarter of the lead, not half (that deadlocked)."""
    from pipeline.data.stream import stream_shape

    for conc in (1, 2, 3, 4, 8):
        for lead in [0, *range(1, 300)]:
            per_block, got = stream_shape(load_config(None, [f"data.decode_concurrency={conc}", f"data.max_lead={lead}"]))
            assert got == (lead or 2 * max(conc, 2) * 32)
            assert 1 <= per_block <= got and 2 * per_block + max(1, got // 4) - 2 <= got, (conc, lead, per_block)
    assert stream_shape(load_config(None, ["data.decode_concurrency=1"])) == (32, 128)
    assert stream_shape(load_config(None, ["data.decode_concurrency=1", "data.max_lead=32"])) == (8, 32)


def test_one_decode_actor_per_rank_streams_past_its_lead_while_the_trainers_report_done(ray_local, tiny_shards):
    """``data.decode_concurrency=1``: the ranks consume as the train loop does (``prefetch_batches`` 2,
    ``done`` every lead / 4 steps) for about 3 leads' worth of steps; every step arrives, in order.
    With blocks of half the lead (before 2026-12-02: 16 steps, which Ray Data cut to 15 for 90
    steps) the rows of steps 15-29 waited for steps up to 44, plannable only after step 15 was trained."""
    from pipeline.data.stream import stream_shape

    ray = ray_local
    steps = 90
    cfg = _cfg(tiny_shards / "train", steps, extra=("data.decode_concurrency=1", "data.max_lead=32"))
    _, lead = stream_shape(cfg)
    name, actor = _planner(tiny_shards, cfg, max_lead=lead)
    ray.get(actor.begin.remote(0, None))
    datasets = build_train_datasets(cfg, name, 0)
    got = [[] for _ in datasets]

    def run(rank, ds):
        for b in ds.iter_torch_batches(batch_size=1, prefetch_batches=2):
            got[rank].append(int(b["step"][0]))
            if len(got[rank]) % max(1, lead // 4) == 0:
                actor.done.remote(got[rank][-1], rank)

    threads = [threading.Thread(target=run, args=(r, datasets[f"train_{r}"]), daemon=True) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert [g == list(range(steps)) for g in got] == [True] * W, [g[-3:] for g in got]
    ray.kill(actor)
