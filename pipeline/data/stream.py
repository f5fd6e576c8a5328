"""Per-rank training streams: step range -> the planner's slice -> bytes by index -> decode.

One Ray Data dataset per rank (``train_0``, ``train_1``, ...): ``ray.data.range`` over the
run's steps, then one ``map_batches`` stage (a pool of ``data.decode_concurrency`` actors
per rank) that asks the planner actor (``pipeline.data.planner_actor``) for slice ``r`` of
step ``s``, reads those samples' JPEG bytes by positional reads through the per-sample
index (``pipeline.data.index``), checks and decodes them (``pipeline.data.decode``, with the
augmentation ``data.augment`` asks for: flip, crop, both or none). Execution keeps the range's order
(``preserve_order``), so rank r's i-th row is slice r of plan ``start + i``: the ranks'
rows of one step are exactly the planned global batch. The trainer passes the datasets
with ``DataConfig(datasets_to_split=[])``; Ray 2.60 then gives every rank an iterator of
every dataset (``ds.iterator()``, lazy), and rank r iterates only ``train_r``.

Why fetch and decode share one stage (DESIGN.md draws two): a read costs ~6 us per sample
against ~80-300 us to decode it (BENCHMARKS.md), so a stage of its own would add a
process hop and a copy of the bytes through the object store for ~2% of the work.

Row columns (one row per step): ``images`` (B, H, W, 3) uint8 (with ``data.decode_device:
cuda`` instead ``jpeg``, the slice's JPEG bytes packed in one ragged uint8 column, with
``jpeg_offsets`` (B + 1,) int64, ``flips`` (B,) bool and ``shifts`` (B, 2) int64, the
augmentation to apply: the training process decodes them on
its GPU; a row is then ~5-10x smaller than its pixels), ``labels`` (B,) int64,
``sample_ids`` (B,) int64 (rows of the index; -1 for a slot filled with a copy of a
classmate because its class had no unused sample left), ``step`` and ``pass`` (the planner's pass of the step's samples) int64, ``skip`` bool
(a step before the attempt's start: no images; the loop drops it), ``end`` bool (the
planner ran out of passes, ``data.epochs``: the stream is dry), ``bad`` (len(REASONS),)
int64: the bad samples this slice replaced, per reason.

With the miner on, every row also carries ``select_ms``, ``miner_version`` and ``fallbacks``
(the planner's selection of that step; rank 0's rows, -1/0 elsewhere) and a random side
batch ``rand_images`` / ``rand_labels`` with ``has_rand`` (every ``random_every``-th step,
every rank: its N/W classes of one uniform draw of N, not consumed), for ``mine/random_*``
metrics on the gathered global batch.

Bad input: a sample whose bytes cannot be read, lack JPEG markers or do not decode is
reported to the planner, which counts it and hands back another unused sample of the same
class; the slice stays whole.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.data.decode import crop_shifts, decode_into, pack_jpegs
from pipeline.data.reader import jpeg_problem
from pipeline.data.report import REASONS

MAX_REPLACEMENTS = 8
"""Replacements tried for one slot before it is filled with a copy of a classmate."""


def _mix64(x):
    """SplitMix64's finaliser on uint64 arrays: a cheap, well-mixed hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping multiplication is the point (NumPy warns on scalars)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FetchDecode:
    """Ray Data UDF (an actor pool per rank): steps -> that rank's decoded slice of each step's plan."""

    def __init__(self, planner: str, rank: int, start_step: int, index_root: str, size: int, augment: str,
                 seed: int, slice_images: int, mining: bool = False, timeout_s: float = 300.0,
                 cache_dir: str = "", prefetch: int = 1, end_step: int = 0, raw: bool = False) -> None:
        import ray

        from pipeline.data.cache import RemoteSet, is_remote
        from pipeline.data.index import load_index

        self.planner = ray.get_actor(planner)
        self.rank, self.start, self.size, self.augment = rank, start_step, size, augment
        self.seed = np.uint64(_mix64(np.uint64(seed)))
        # A shard set on an object store is read from this node's cache (pipeline.data.cache):
        # the index now, each shard before the first read that touches it.
        self.remote = RemoteSet(index_root, cache_dir) if is_remote(index_root) else None
        root = str(self.remote.localize()) if self.remote else index_root
        self.index = load_index(root, "train", missing_ok=self.remote is not None, allow_cut=True)
        self.cached = np.zeros(len(self.index.paths), dtype=bool)
        self.prefetch, self.ahead, self.end_step = max(1, prefetch), {}, end_step or (1 << 62)
        self.timeout_s, self.mining, self.slice_images = timeout_s, mining, slice_images
        self.raw = raw  # data.decode_device: cuda: rows carry the JPEG bytes, the trainer decodes

    def _slice(self, step: int) -> dict:
        """Rank ``rank``'s part of plan ``step``, from parts fetched ahead or from the planner.

        One planner call asks for ``step`` and the next ``ahead - 1`` steps (the planner hands out
        those it may plan now, waiting only for the first): Ray Data gives a block's rows to one
        actor in order, so the next rows' parts are usually here already. ~2 ms of the planner's
        CPU per call on this machine: one per row was a quarter of the stream's cost.
        """
        import ray

        part = self.ahead.pop(step, None)
        if part is not None:
            return part
        self.ahead.clear()  # parts of another actor's block, or of a step this actor will not get
        deadline = time.monotonic() + self.timeout_s
        while True:
            ask = list(range(step, max(step + 1, min(step + self.prefetch, self.end_step))))
            parts = ray.get(self.planner.slices.remote(ask, self.rank))
            if not parts[0].get("wait"):
                self.ahead = {step + i: p for i, p in enumerate(parts[1:], 1)}
                return parts[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"the batch planner kept rank {self.rank}'s slice of step {step} waiting for "
                                   f"{self.timeout_s:.0f}s (another rank stopped training?)")

    def _read(self, ids: np.ndarray) -> list[bytes | None]:
        from pipeline.data.index import read_samples
        from pipeline.data.manifest import ShardError

        if self.remote is not None:
            need = [int(s) for s in np.unique(np.asarray(self.index.shard[ids])) if not self.cached[s]]
            self.remote.fetch([os.path.relpath(self.index.paths[s], self.index.root) for s in need])
            self.cached[need] = True
        try:
            return read_samples(self.index, ids)
        except ShardError:  # a cut shard: read one by one, the unreadable ones become None
            out = []
            for i in ids:
                try:
                    out.append(read_samples(self.index, np.asarray([i]))[0])
                except ShardError:
                    out.append(None)
            return out

    def _augment(self, ids: np.ndarray, step: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``decode_into``'s ``(flip, shift)`` for ``data.augment`` (none, flip, crop, flip_crop; ``pipeline.config``)."""
        # A hash of (seed, step, sample id): the same flips and shifts when a step is redone after
        # a resume, fresh ones when a sample comes back in a later pass.
        if self.augment == "none":
            return None, None
        h = _mix64(ids.astype(np.uint64) ^ (self.seed ^ _mix64(np.uint64(step))))
        flip = (h >> np.uint64(63)) == 1 if "flip" in self.augment else None
        return flip, (crop_shifts(_mix64(h), self.size) if "crop" in self.augment else None)

    def _step(self, step: int, part: dict, images: np.ndarray, rand_images: np.ndarray | None) -> dict:
        """Row ``step`` from the planner's ``part``; its images are decoded into ``images`` (and the side
        batch's into ``rand_images``), views of the output block's column."""
        if part.get("skip") or part.get("end"):
            if not self.raw:
                images[...] = 0
            return part
        out = self._fill(step, part["sample_ids"].copy(), part["labels"], images, replace=True)
        if "side_ids" in part:
            side = self._fill(step, part["side_ids"].copy(), part["side_labels"], rand_images, replace=False)
            out.update(rand_labels=side["labels"], has_rand=True)
        elif rand_images is not None and not self.raw:
            rand_images[...] = 0
        out["pass"] = part["pass"]
        for k in ("select_ms", "miner_version", "fallbacks"):
            if k in part:
                out[k] = part[k]
        return out

    def _fill(self, step: int, ids: np.ndarray, labels: np.ndarray, images: np.ndarray, replace: bool) -> dict:
        """Read and decode ``ids`` into ``images``; bad ones are replaced through the planner (``replace``) or by classmates."""
        import ray

        bad = np.zeros(len(REASONS), dtype=np.int64)
        todo = np.flatnonzero(ids >= 0)  # -1: the planner had no sample left for the slot (a classmate's copy)
        for attempt in range(MAX_REPLACEMENTS + 1):
            jpgs = self._read(ids[todo])
            problems = ["truncated_tar" if b is None else jpeg_problem(b) for b in jpgs]
            readable = np.flatnonzero([p is None for p in problems])
            if self.raw:  # decoded by the trainer (data.decode_device: cuda), which reports what fails there
                for j in readable:
                    images[todo[j]] = jpgs[j]
            elif len(readable) == len(ids) == len(todo):  # the usual case: decode straight into the output
                decoded = decode_into(jpgs, images, *self._augment(ids, step))
            elif len(readable):
                buf = np.empty((len(readable), self.size, self.size, 3), dtype=np.uint8)
                decoded = decode_into([jpgs[j] for j in readable], buf, *self._augment(ids[todo[readable]], step))
                images[todo[readable[decoded]]] = buf[decoded]
            if len(readable) and not self.raw:
                for j in readable[~decoded]:
                    problems[j] = "corrupt_image"
            failed = [(slot, why) for slot, why in zip(todo, problems) if why is not None]
            if not failed:
                break
            for slot, why in failed:
                bad[REASONS.index(why)] += int(replace)  # a side batch's samples are counted when trained
                new = -1
                if replace and attempt < MAX_REPLACEMENTS:
                    new = ray.get(self.planner.replace.remote(step, self.rank, int(ids[slot]), why))
                ids[slot] = new
            todo = np.asarray([slot for slot, _ in failed if ids[slot] >= 0], dtype=np.int64)
            if not len(todo):
                break
        _copy_classmates(images, labels, ids)
        out = {"labels": labels, "sample_ids": ids, "bad": bad}
        if self.raw:  # the trainer augments as it decodes (decode_batch): the same pixels as decode_into's
            flip, shift = self._augment(np.maximum(ids, 0), step)
            out["flips"] = np.zeros(len(ids), dtype=bool) if flip is None else flip
            out["shifts"] = np.zeros((len(ids), 2), dtype=np.int64) if shift is None else shift
            _copy_classmates(out["flips"], labels, ids)
            _copy_classmates(out["shifts"], labels, ids)
        return out

    def __call__(self, batch: dict) -> dict:
        """The rows of ``batch``'s steps (Ray Data gives one at a time: ``batch_size=1``, see
        :func:`build_train_datasets`), their images decoded straight into the output column
        (or, ``raw``, their JPEG bytes packed by ``pipeline.data.decode.pack_jpegs``)."""
        steps = [self.start + int(s) for s in batch["id"]]
        b = self.slice_images
        shape = (len(steps), b, self.size, self.size, 3)
        if self.raw:
            out = {"images": [[None] * b for _ in steps]}
            if self.mining:
                out["rand_images"] = [[None] * b for _ in steps]
        else:
            out = {"images": np.empty(shape, np.uint8)}
            if self.mining:
                out["rand_images"] = np.empty(shape, np.uint8)
        empty = {"labels": np.full(b, -1, np.int64), "sample_ids": np.full(b, -1, np.int64),
                 "bad": np.zeros(len(REASONS), np.int64), "pass": -1}
        if self.raw:
            empty["flips"], empty["shifts"] = np.zeros(b, dtype=bool), np.zeros((b, 2), dtype=np.int64)
        if self.mining:  # fixed-shape columns on every row, so Ray Data keeps tensor columns
            empty.update(rand_labels=empty["labels"], has_rand=False, select_ms=0.0, miner_version=-1, fallbacks=0)
        rows = [self._step(step, self._slice(step), out["images"][i], out["rand_images"][i] if self.mining else None)
                for i, step in enumerate(steps)]
        if self.raw:
            for col in ("images", "rand_images") if self.mining else ("images",):
                packed = [pack_jpegs([j or b"" for j in slots]) for slots in out.pop(col)]
                prefix = "jpeg" if col == "images" else "rand_jpeg"
                out[prefix] = _ragged([buf for buf, _ in packed])
                out[f"{prefix}_offsets"] = np.stack([offs for _, offs in packed])
        out.update(step=np.asarray(steps, dtype=np.int64),
                   skip=np.asarray([bool(r.get("skip") or r.get("end")) for r in rows]),
                   end=np.asarray([bool(r.get("end")) for r in rows]))
        for k, default in empty.items():
            out[k] = np.stack([np.asarray(r.get(k, default)) for r in rows])
        return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of 1-d arrays of different lengths: a ragged Ray Data column."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _copy_classmates(images, labels: np.ndarray, ids: np.ndarray) -> None:
    """Fill each slot left without a sample (id -1: its class had no unused sample left) with a
    classmate's image (pixels, or JPEG bytes in a list), so the slice keeps its shape; the slot
    stays -1 in ``sample_ids``."""
    for slot in np.flatnonzero(ids < 0):
        mates = np.flatnonzero((labels == labels[slot]) & (ids >= 0))
        if isinstance(images, list):
            images[slot] = images[mates[0]] if len(mates) else None
        else:
            images[slot] = images[mates[0]] if len(mates) else 0


STEPS_PER_BLOCK = 32
"""Steps per Ray Data block at the default lead (``data.max_lead`` 0), with or without the miner. Why not 1: Ray Data's per-block cost was measured
here at ~13 ms per row with blocks of 100 rows and ~100 ms with blocks of 1 (and 145 s to
start 100k blocks), against ~6 ms with big blocks."""


def stream_shape(cfg) -> tuple[int, int]:
    """``(steps per Ray Data block, planner lead)`` for ``cfg``; the lead counts *trained* steps.

    A map task hands on its output block only when its input block is done, and the
    planner holds a slice more than ``lead`` steps past the slowest rank's training. So a
    block of more than ``lead`` steps would deadlock (the trainers wait for a task that waits
    for them), and every rank's ``data.decode_concurrency`` actors can only work side by
    side when ``lead`` covers that many blocks. One more bound: the trainer's iterator
    (``iter_torch_batches`` with ``prefetch_batches`` >= 1) hands on the rows of block k only
    once block k + 1 is done too, so block k + 1 must be plannable while the trainers are at
    the start of block k, whose steps before were reported done every lead / 4 steps:
    2 x steps per block + lead / 4 - 2 <= lead. With one actor per rank and blocks of lead / 2
    steps that fails: ``data.decode_concurrency=1 data.max_lead=32`` deadlocked at step 41
    on every try (until 2026-12-02; a bare Ray Data pipeline with one actor does the same at
    ``prefetch_batches`` 1 and 2, not at 0). So steps per block = lead / (2 x max(concurrency, 2)),
    at most a quarter of the lead. The lead is ``data.max_lead``, or by default
    2 x max(concurrency, 2) x :data:`STEPS_PER_BLOCK`, which keeps Ray Data's per-block cost
    small and still bounds the plans kept. The miner
    uses the same lead: until 2026-12-02 it asked for max(16, ``miner.refresh_every``) steps
    (blocks of 5 steps at the defaults) so that selections would use fresher embeddings; that
    cost +24% of wall time on 2 cores against lead 128 on the quickstart data (no Recall@1
    gained there) and +60-85% on a 1,200-class set, where the fresher selections gained 2.6
    points of Recall@1 at 1000 steps (0.656 vs 0.630, 3 seeds; BENCHMARKS.md, mining at 1000 steps).
    """
    slots = 2 * max(cfg.data.decode_concurrency, 2)
    lead = cfg.data.max_lead or slots * STEPS_PER_BLOCK
    return max(1, lead // slots), lead


def done_every(cfg) -> int:
    """Trained steps between a rank's ``done`` reports to the planner: a quarter of :func:`stream_shape`'s lead
    (the lead shrinks by that much at most; the bound in :func:`stream_shape` allows for it)."""
    return max(1, stream_shape(cfg)[1] // 4)


def build_train_datasets(cfg, planner: str, start_step: int, raw: bool | None = None) -> dict:
    """One Ray Data dataset per rank, ``{"train_0": ..., "train_<W-1>": ...}``, over steps ``start_step .. train.steps-1``.

    ``planner`` is the name of the run's planner actor, made with :func:`stream_shape`'s lead.
    Pass them to the trainer with
    :func:`data_config` (unsplit, order kept). ``raw``: rows carry JPEG bytes instead of pixels
    (default: ``data.decode_device == "cuda"``; tests set it on a CPU). Raises ShardError when ``data.train`` has no
    index (``python -m jobs.make_shards --reindex OUT`` writes one).
    """
    import ray.data

    from pipeline.data.cache import index_spec, is_remote, local_root
    from pipeline.data.index import load_index

    root = index_spec(cfg.data.train)
    per_block, _ = stream_shape(cfg)
    # Fail here, naming the fix, not in a Ray Data actor.
    index = load_index(local_root(root, cfg.data.cache_dir), "train", missing_ok=is_remote(root), allow_cut=True)
    for path, (now, then) in index.cut.items():
        print(f"[data] warning: shard {path} is cut short ({now} of {then} indexed bytes): its samples past the cut "
              "are counted as truncated_tar and replaced by classmates; rewrite it with `python -m jobs.make_shards`",
              flush=True)
    out = {}
    for rank in range(cfg.scaling.num_workers):
        n = max(0, cfg.train.steps - start_step)
        ds = ray.data.range(n, override_num_blocks=max(1, -(-n // per_block)))
        ds = ds.map_batches(
            # One row per call: a call that waits in the planner for the trainers must not hold rows
            # of an earlier block (a batch of a block's rows deadlocked here: the block never left).
            FetchDecode, batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=cfg.data.decode_concurrency),
            fn_constructor_kwargs={"planner": planner, "rank": rank, "start_step": start_step, "index_root": root,
                                   "size": cfg.data.image_size, "augment": cfg.data.augment,
                                   "seed": cfg.train.seed, "mining": cfg.miner.enabled,
                                   "cache_dir": cfg.data.cache_dir, "prefetch": per_block,
                                   "end_step": cfg.train.steps, "raw": cfg.data.decode_device == "cuda" if raw is None else raw,
                                   "slice_images": cfg.batch.classes_per_batch // cfg.scaling.num_workers
                                   * cfg.batch.images_per_class},
        )
        # Row i must be step start + i (a consumer other than the trainer, whose DataConfig sets it too).
        ds.context.execution_options.preserve_order = True
        out[f"train_{rank}"] = ds
    return out


def data_config():
    """Ray Train's ``DataConfig`` for :func:`build_train_datasets`: nothing split, execution in range order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def data_metrics(bad_total: np.ndarray) -> dict[str, float]:
    """``data/bad_<reason>`` metrics from per-reason counts (a rank's running total of its rows' ``bad``)."""
    return {f"data/bad_{r}": float(n) for r, n in zip(REASONS, np.asarray(bad_total))}
