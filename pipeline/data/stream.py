"""The training stream: read shards -> compose batches of JPEG bytes -> decode + augment.

``pipeline.data.reader`` (parallel read tasks, our own tar parser) -> batch composer (one
stateful actor holding the class pool; it pools JPEG *bytes*) -> decode + flip (a pool of
``data.decode_concurrency`` actors, one composed row at a time) -> one row per per-rank
batch. Ray Train then hands each rank its rows with ``streaming_split(equal=True)``, so
every rank gets the same number of batches; ``iter_torch_batches(batch_size=1)`` yields one
whole batch per step. A row (not a block) is the unit the splitter never cuts, which keeps
N-pair batches whole.

Why compose before decoding: decoded pixels are ~10x the JPEG bytes, and decoding first
made them cross the object store twice (decode -> composer -> trainer) and ran the
composer's copies on pixels; now only bytes reach the composer and pixels cross once
(decode -> trainer). Measured effect and profile: BENCHMARKS.md ("Data stream vs the local
decode limit"). Rows may leave the decode pool out of composition order (``batch_index``
gives the order), so a cumulative column can step back by a few rows in arrival order.

Row columns: ``images`` (K*M, H, W, 3) uint8, ``labels`` (K*M,) int64, ``sample_ids``
(K*M,) int64 (unique per sample per pass, ``pipeline.data.reader``; -1 for an image that
did not decode and was replaced by another of its class), ``batch_index`` (the global
batch's number in composition order), ``bad_counts`` (``len(REASONS)``,) int64 cumulative
counts of skipped samples per reason (``pipeline.data.report``), ``samples_seen`` and
``resumed_skip`` (samples dropped because a resumed run had consumed them; see
``position`` in :func:`build_train_dataset`). :func:`data_metrics` turns a row into metrics.

With a miner (``miner`` settings for ``MinerClient``) the composer asks the miner actor for
the classes of each global batch and every row also carries, all fixed-shape so Ray Data
keeps tensor columns: ``select_ms`` (wall time of that batch's class selection),
``fallbacks`` (random selections so far because the miner did not answer),
``miner_version`` (index version the selection used; -1 = fallback, 0 = miner without
embeddings), ``trainer_step`` (the trainer's step as the gate last read it when the
batch was selected, a lower bound; -1 without a gate; see ``_TrainerGate``), and a random
batch "side by side": on every ``random_every``-th global batch, ``rand_images`` /
``rand_labels`` hold a batch of the same shape whose classes were drawn uniformly from the
same pool at the same moment (``has_rand`` True); other rows hold zeros and labels -1. The
side batch copies pool images (bytes, decoded by the same decode stage) without consuming
them and uses its own rng, so the trained stream is the same with or without it; the
trainer embeds it under no_grad to log how much harder the mined batches are than random ones.
"""

from __future__ import annotations

import math
import time

import numpy as np

from pipeline.data.batching import BatchComposer, RandomSelector
from pipeline.data.decode import decode_into
from pipeline.data.manifest import list_shards

GATE_BLOCK_BATCHES = 4
"""With a gate: Ray Data blocks of about this many global batches (see build_train_dataset).

Measured here (2 cores, quickstart shapes, two consumers at 0.05-0.1 s per step, lead 16-20):
blocks of 1 batch made the trainers wait for data 13% of the time (a coordinator round trip
per row), 4 or 8 batches ~0%; 4 keeps the lag closest to the gate's lead (mean 19-22 steps)."""

DECODE_IMAGES_PER_CALL = 256
"""Images one decode-stage call handles (whole rows): amortises Ray's per-call cost."""


def _split_blob(blob: bytes, offsets: np.ndarray) -> list[bytes]:
    """The byte strings packed by ``_pack``: ``blob[offsets[i]:offsets[i+1]]``."""
    o = offsets.tolist()
    return [blob[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def _pack(parts: list[bytes]) -> tuple[bytes, np.ndarray]:
    """One blob + int64 offsets (len + 1): fixed-shape columns instead of a list-of-bytes
    column, which Ray Data would pickle."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return b"".join(parts), offsets


def _mix64(x):
    """splitmix64's finaliser: a well-mixed 64-bit hash of each uint64 (array or scalar)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _repair(images: np.ndarray, ok: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray | None) -> bool:
    """Fill each image that failed to decode with a decoded image of the same class in the row.

    ``sample_ids`` of the filled slots become -1 (a copy, not a sample). Returns False when a
    class of the row has no decoded image at all (the row cannot be an N-pair batch).
    """
    for i in np.flatnonzero(~ok):
        same = np.flatnonzero((labels == labels[i]) & ok)
        if not len(same):
            return False
        images[i] = images[same[0]]
        if sample_ids is not None:
            sample_ids[i] = -1
    return True


class _TrainerGate:
    """Keeps the composer at most ``max_lead`` global batches ahead of the trainer.

    Ray Data streams as fast as it can: unchecked, the composer selects the classes of the
    whole run with the first class embeddings, long before the trainer gets there. Before
    each composer call the gate asks the actor named ``actor`` for the trainer's step
    (``step()``) and waits, polling, while the composer is more than ``max_lead`` batches
    ahead. A wait never exceeds ``max_wait_s`` and a missing actor disables the gate, so the
    stream can be slowed but never stopped. ``max_lead`` must exceed what Ray Data and the
    trainers' prefetch hold (a few blocks of rows), or the gate would wait on rows that
    never reach the trainer; the bounded wait then only costs time.
    """

    def __init__(self, actor: str, max_lead: int, max_wait_s: float = 30.0, namespace: str | None = None) -> None:
        self.actor, self.max_lead, self.max_wait_s, self.namespace = actor, max_lead, max_wait_s, namespace
        self.step = 0
        """The trainer's step as last read."""
        self.waited_s = 0.0
        self._handle = None
        self._off = False

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def wait(self, made: int) -> None:
        """Return once ``made`` (global batches composed so far) - trainer step <= ``max_lead``, or on timeout."""
        import ray

        t0 = time.monotonic()
        while not self._off and made - self.step > self.max_lead and time.monotonic() - t0 < self.max_wait_s:
            try:
                if self._handle is None:
                    self._handle = ray.get_actor(self.actor, namespace=self.namespace)
                self.step = ray.get(self._handle.step.remote(), timeout=5.0)
            except (ray.exceptions.RayError, ValueError):
                self._off = True  # no trainer progress to follow: do not slow the stream
            if made - self.step > self.max_lead:
                time.sleep(0.02)
        self.waited_s += time.monotonic() - t0


class _SideBySideSelector:
    """Wraps the real selector: times each selection and, every ``random_every``-th one, draws
    as many random classes from the same candidates, with images copied from the pool, not taken.

    ``calls`` holds one entry per selection since the last ``take()``, in order:
    ``(select_ms, version, rand_classes or None, rand_images or None, trainer_step)``.
    """

    def __init__(self, inner, images_per_class: int, random_every: int, seed: int) -> None:
        self.inner, self.m, self.random_every = inner, images_per_class, random_every
        self.rng = np.random.default_rng([seed, 0x5EED])  # own stream: the composer's draws stay unchanged
        self.pool: dict | None = None
        self.trainer_step = -1
        """The trainer's step as known to the gate (-1 without a gate), recorded with each selection."""
        self.count = 0
        self.calls: list = []

    def select(self, candidates, n: int, rng: np.random.Generator) -> list[int]:
        t0 = time.perf_counter()
        chosen = self.inner.select(candidates, n, rng)
        ms = 1000.0 * (time.perf_counter() - t0)
        self.count += 1
        rand_cls = rand_imgs = None
        if self.random_every and self.count % self.random_every == 0:
            rand_cls = [int(c) for c in self.rng.choice(np.asarray(candidates), size=n, replace=False)]
            rand_imgs = []
            for c in rand_cls:
                imgs = self.pool[c]
                rand_imgs += [imgs[i] for i in self.rng.choice(len(imgs), size=self.m, replace=False)]
        self.calls.append((ms, getattr(self.inner, "last_version", -1), rand_cls, rand_imgs, self.trainer_step))
        return chosen

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def _shard_of(sample_id: int) -> int:
    """Shard index of a sample id, or of a shard-level marker row (id -1 - shard index)."""
    from pipeline.data.reader import decode_sample_ids

    return -1 - sample_id if sample_id < 0 else int(decode_sample_ids(sample_id)[1])


class _ReportClient:
    """The stages' side of the ``DataReport`` actor: fire-and-forget pushes, never fatal."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def _call(self, method: str, *args, wait: bool = False):
        if self.handle is None:
            return None
        import ray

        try:
            ref = getattr(self.handle, method).remote(*args)
            return ray.get(ref, timeout=10.0) if wait else ref
        except Exception:  # noqa: BLE001 - a lost report must never stop training
            self.handle = None
            return None

    def push(self, items: list, seen: int | None = None, resumed_skip: int | None = None, wait: bool = False):
        """Send bad items and the sender's cumulative totals; ``wait`` at the end of the stream,
        so that nothing is still in flight when the stage's actor is shut down."""
        return self._call("add", items, seen, resumed_skip, wait=wait)

    def unused(self, sample_ids, wait: bool = False) -> None:
        if len(sample_ids) or wait:
            self._call("add_unused", np.asarray(sample_ids, dtype=np.int64), wait=wait)

    def decode_failures(self, items: list) -> int | None:
        """Record decode failures; returns the run's total decode failures (None without the actor)."""
        total = self._call("add_decode_failures", items, wait=True)
        return None if total is None else int(total)

    def items(self) -> list:
        """The report's bad items so far (for an error message); [] without the actor."""
        report = self._call("fetch", wait=True)
        return [(i["shard"], i["key"], i["reason"]) for i in report["items"]] if report else []


class ComposeBatches:
    """Ray Data UDF (one stateful actor): reader rows (JPEG bytes) -> one row per per-rank batch.

    Counts the reader's bad rows per reason (cumulative, carried by every output row as
    ``bad_counts``, with ``samples_seen``), pushes them to the report actor, enforces
    ``max_bad_fraction``, drops samples a resumed run already consumed (``position``), and
    composes N-pair batches of JPEG bytes, packed as ``jpg_blob`` + ``jpg_offsets``.
    With ``miner`` (a picklable factory of the miner's selector, e.g. ``functools.partial(
    pipeline.mining.actor.MinerClient, name=...)``; the stream never imports mining) the classes come from the miner and
    the rows carry the mining columns described in the module docstring (the random side
    batch as ``rand_blob`` / ``rand_offsets`` until the decode stage decodes it).
    """

    def __init__(self, classes_per_rank: int, images_per_class: int, pool_classes: int, num_ranks: int,
                 seed: int, miner=None, random_every: int = 10, gate: dict | None = None,
                 paths: list[str] | None = None, report=None, position: str | None = None,
                 max_bad_fraction: float = 1.0, shard_reads: int = 0) -> None:
        from pipeline.data.report import REASONS

        selector = RandomSelector()
        self.side = None
        self.gate = _TrainerGate(**gate) if gate else None
        if miner:
            self.client = miner()
            selector = self.side = _SideBySideSelector(self.client, images_per_class, random_every, seed)
        self.composer = BatchComposer(classes_per_rank, images_per_class, pool_classes, num_ranks, selector, seed)
        if self.side is not None:
            self.side.pool = self.composer.pool  # the same dict object for the composer's lifetime
        self.paths = list(paths or [])
        self.report = _ReportClient(report)
        self.position, self.skip = position, None
        self.max_bad_fraction = max_bad_fraction
        self.shard_reads, self.shards_done = shard_reads, 0
        """Shard reads the stream holds (``END_OF_SHARD`` rows to expect; 0 = unknown) and seen so far."""
        self.composer.on_drop = lambda items: self.report.unused([it[0] for it in items])
        self.counts = np.zeros(len(REASONS), dtype=np.int64)
        self.seen = 0
        self.resumed_skip = 0
        self.items: list[tuple[str, str, str]] = []
        """The first bad items (for the error message; the report actor keeps the full list)."""

    def _path(self, sample_id: int) -> str:
        s = _shard_of(int(sample_id))
        return self.paths[s] if 0 <= s < len(self.paths) else f"shard #{s}"

    def _load_position(self) -> None:
        """Fetch the consumed sample ids once, on the first call (the actor may not exist at build time)."""
        import ray

        self.skip = np.zeros(0, dtype=np.int64)
        if self.position:
            try:
                handle = ray.get_actor(self.position)
            except ValueError as e:
                raise ValueError(f"data position actor '{self.position}' not found: create it with "
                                 "pipeline.data.position.get_or_create_position before the stream starts") from e
            self.skip = np.asarray(ray.get(handle.get.remote(), timeout=60.0), dtype=np.int64)

    def _count_bad(self, batch: dict, resumed: np.ndarray) -> np.ndarray:
        """Count and report the bad rows; returns the mask of good rows to pool."""
        from pipeline.data.report import REASONS, check_bad_fraction

        bad = batch["bad"]
        is_bad = (bad >= 0) & ~resumed
        if is_bad.any():
            new = []
            for i in np.flatnonzero(is_bad):
                reason = REASONS[int(bad[i])]
                self.counts[bad[i]] += 1
                new.append((self._path(batch["sample_id"][i]), str(batch["key"][i]), reason))
            self.items += new[: max(0, 100 - len(self.items))]
            self.report.push(new, self.seen, self.resumed_skip)
        check_bad_fraction(self.counts, self.seen, self.max_bad_fraction, self.items)
        return (bad == -1) & ~resumed

    def _before_batch(self, made: int) -> None:
        if self.gate is not None:
            self.gate.wait(made)
            if self.side is not None:
                self.side.trainer_step = self.gate.step

    def __call__(self, batch: dict):
        from pipeline.data.reader import END_OF_SHARD

        if self.skip is None:
            self._load_position()
        ids, bad = batch["sample_id"], batch["bad"]
        ends = bad == END_OF_SHARD
        resumed = np.zeros(len(ids), dtype=bool)
        if len(self.skip):
            pos = np.clip(np.searchsorted(self.skip, ids), 0, len(self.skip) - 1)
            resumed = (self.skip[pos] == ids) & (ids >= 0)
            self.resumed_skip += int(resumed.sum())
        self.shards_done += int(ends.sum())
        self.seen += int(len(ids) - resumed.sum() - ends.sum())
        good = self._count_bad(batch, resumed)
        idx = np.flatnonzero(good)
        jpg, keys = batch["jpg"], batch["key"]
        self.composer.add([(int(ids[i]), jpg[i], keys[i]) for i in idx.tolist()], batch["label"][idx])
        # With a gate, one global batch per yield: the gate may wait before the next one, and
        # rows still held in this call would be rows the trainer is waiting for.
        step = 1 if self.gate is not None else None
        while True:
            xs, ys = self.composer.compose_items(before_batch=self._before_batch, max_batches=step)
            if not xs:
                break
            yield self._rows(xs, ys)
            if step is None:
                break
        if self.shard_reads and self.shards_done >= self.shard_reads:
            # The last shard has been read: draw what the pool still holds (fewer than
            # pool_classes classes are enough now), then account for what is left.
            xs, ys = self.composer.compose_items(final=True)
            left = [it[0] for items in self.composer.pool.values() for it in items]
            self.composer.pool.clear()
            self.report.unused(left, wait=True)
            self.report.push([], self.seen, self.resumed_skip, wait=True)
            if xs:  # a generator UDF yields nothing rather than an empty tensor column
                yield self._rows(xs, ys)
        elif self.composer.batches % 16 == 0 or ends.any():
            self.report.push([], self.seen, self.resumed_skip)

    def _rows(self, xs: list[list], ys: list[np.ndarray]) -> dict:
        blobs, offsets = zip(*(_pack([it[1] for it in row]) for row in xs))
        n, ranks = len(xs), self.composer.ranks
        first = self.composer.batches - n // ranks
        out = {
            "batch_index": np.repeat(np.arange(first, self.composer.batches, dtype=np.int64), ranks),
            "jpg_blob": _objects(blobs),
            "jpg_offsets": np.stack(offsets),
            "keys": _objects(["\n".join(str(it[2]) for it in row) for row in xs]),
            "sample_ids": np.asarray([[it[0] for it in row] for row in xs], dtype=np.int64),
            "labels": np.stack(ys),
            "bad_counts": np.repeat(self.counts[None], n, axis=0),
            "samples_seen": np.full(n, self.seen, dtype=np.int64),
            "resumed_skip": np.full(n, self.resumed_skip, dtype=np.int64),
        }
        if self.side is not None:
            out.update(self._mining_columns(out["labels"]))
        return out

    def _mining_columns(self, labels: np.ndarray) -> dict:
        calls = self.side.take()
        ranks, per_rank = self.composer.ranks, labels.shape[1]
        if len(calls) * ranks != len(labels):
            raise RuntimeError(f"composer made {len(labels)} rows from {len(calls)} selections of {ranks} ranks")
        rand_y = np.full_like(labels, -1)
        blobs, offsets = [b""] * len(labels), np.zeros((len(labels), per_rank + 1), dtype=np.int64)
        has = np.zeros(len(labels), dtype=bool)
        for g, (_, _, cls, items, _) in enumerate(calls):
            if cls is None:
                continue
            for r in range(ranks):
                row = g * ranks + r
                blobs[row], offsets[row] = _pack([it[1] for it in items[r * per_rank : (r + 1) * per_rank]])
                has[row] = True
            rand_y[g * ranks : (g + 1) * ranks] = np.repeat(np.asarray(cls, dtype=np.int64),
                                                            self.composer.m).reshape(ranks, per_rank)
        # One selection per global batch -> the same value on each of its `ranks` rows.
        return {
            "select_ms": np.repeat(np.asarray([c[0] for c in calls], dtype=np.float32), ranks),
            "miner_version": np.repeat(np.asarray([c[1] for c in calls], dtype=np.int64), ranks),
            "trainer_step": np.repeat(np.asarray([c[4] for c in calls], dtype=np.int64), ranks),
            "fallbacks": np.full(len(labels), self.client.fallbacks, dtype=np.int64),
            "has_rand": has,
            "rand_blob": _objects(blobs),
            "rand_offsets": offsets,
            "rand_labels": rand_y,
        }


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class DecodeBatches:
    """Ray Data UDF (a pool of actors): composed rows of JPEG bytes -> rows of decoded images.

    Decodes (and flips, when ``augment``) the row's images into ``images`` (K*M, H, W, 3)
    uint8, and the random side batch into ``rand_images``. An image that does not decode is
    replaced by a decoded image of the same class in its row (its ``sample_ids`` entry
    becomes -1) and counted as ``corrupt_image``; a row whose class has no decodable image
    is dropped (a side batch in that state is turned off: ``has_rand`` False). Counts: the
    composer's cumulative ``bad_counts`` plus the run's decode failures as the report actor
    last told this actor (other actors' failures show up with a lag).
    """

    def __init__(self, size: int, augment: bool, seed: int, paths: list[str] | None = None, report=None,
                 max_bad_fraction: float = 1.0) -> None:
        self.size, self.augment, self.seed = size, augment, seed
        self.paths = list(paths or [])
        self.report = _ReportClient(report)
        self.max_bad_fraction = max_bad_fraction
        self.failures = 0
        """Decode failures of the whole run as last known (this actor's own when no report actor)."""
        self.items: list[tuple[str, str, str]] = []

    def _flips(self, sample_ids: np.ndarray) -> np.ndarray | None:
        if not self.augment:
            return None
        # A hash of (seed, sample id): the same flip for a sample in a rerun, another one in
        # the next pass (the id holds the pass). Cheaper than an rng per row (py-spy: 5% of
        # the decode actor's time went to seeding one).
        return _mix64(sample_ids.astype(np.uint64) ^ np.uint64(_mix64(np.uint64(self.seed)))) >> np.uint64(63) == 1

    def _decode_row(self, blob: bytes, offsets: np.ndarray, out: np.ndarray, labels: np.ndarray,
                    sample_ids: np.ndarray | None, keys: str | None, flip_ids: np.ndarray) -> tuple[bool, list]:
        ok = decode_into(_split_blob(blob, offsets), out, self._flips(flip_ids))
        if ok.all():
            return True, []
        bad = []
        if sample_ids is not None:
            key_list = keys.split("\n") if keys else []
            for i in np.flatnonzero(~ok):
                s = _shard_of(int(sample_ids[i]))
                path = self.paths[s] if 0 <= s < len(self.paths) else f"shard #{s}"
                bad.append((path, key_list[i] if i < len(key_list) else f"#{int(sample_ids[i])}", "corrupt_image"))
        return _repair(out, ok, labels, sample_ids), bad

    def __call__(self, batch: dict):
        from pipeline.data.report import MIN_SEEN, REASONS, bad_fraction, check_bad_fraction

        labels, n = batch["labels"], len(batch["labels"])
        images = np.empty((n, labels.shape[1], self.size, self.size, 3), dtype=np.uint8)
        sample_ids = batch["sample_ids"].copy()
        keep, bad = np.ones(n, dtype=bool), []
        for r in range(n):
            keep[r], new = self._decode_row(batch["jpg_blob"][r], batch["jpg_offsets"][r], images[r], labels[r],
                                            sample_ids[r], batch["keys"][r], batch["sample_ids"][r])
            bad += new
        out = {"images": images, "labels": labels, "sample_ids": sample_ids, "batch_index": batch["batch_index"],
               "bad_counts": batch["bad_counts"].copy(), "samples_seen": batch["samples_seen"],
               "resumed_skip": batch["resumed_skip"]}
        if "rand_blob" in batch:
            rand = np.zeros_like(images)
            has = batch["has_rand"].copy()
            for r in np.flatnonzero(has):
                # The side batch's images are copies of pool images: a failure is counted once, with the trained one.
                has[r], _ = self._decode_row(batch["rand_blob"][r], batch["rand_offsets"][r], rand[r],
                                             batch["rand_labels"][r], None, None, ~batch["sample_ids"][r])
                if not has[r]:
                    rand[r] = 0
            out.update({k: batch[k] for k in ("select_ms", "miner_version", "trainer_step", "fallbacks")})
            out.update({"has_rand": has, "rand_images": rand,
                        "rand_labels": np.where(has[:, None], batch["rand_labels"], -1)})
        if bad:
            self.items += bad[: max(0, 100 - len(self.items))]
            total = self.report.decode_failures(bad)
            self.failures = total if total is not None else self.failures + len(bad)
        out["bad_counts"][:, REASONS.index("corrupt_image")] += self.failures
        last = int(np.argmax(out["samples_seen"]))
        counts, seen = out["bad_counts"][last], int(out["samples_seen"][last])
        if bad and seen >= MIN_SEEN and bad_fraction(counts, seen) > self.max_bad_fraction:
            # Name the run's first bad files (the report's list), not only this actor's.
            check_bad_fraction(counts, seen, self.max_bad_fraction, self.report.items() or self.items)
        if not keep.all():
            lost = out["sample_ids"][~keep]
            self.report.unused(lost[lost >= 0], wait=True)
            out = {k: v[keep] for k, v in out.items()}
        if len(out["labels"]):  # a generator UDF yields nothing rather than an empty tensor column
            yield out


def data_metrics(batch: dict) -> dict[str, float]:
    """Per-step data metrics of one row of the training stream (a batch of ``iter_torch_batches(batch_size=1)``
    or ``iter_batches(batch_size=1)``): ``data/bad_<reason>`` for each of ``REASONS`` (cumulative),
    ``data/bad_total``, ``data/samples_seen``, ``data/bad_fraction`` (over ``FRACTION_REASONS``),
    ``data/resumed_skip``. Raises KeyError when the row lacks ``bad_counts``.
    """
    from pipeline.data.report import REASONS, bad_fraction

    counts = np.asarray(batch["bad_counts"][0]).astype(np.int64)
    seen = int(np.asarray(batch["samples_seen"][0]))
    out = {f"data/bad_{r}": float(c) for r, c in zip(REASONS, counts)}
    out["data/bad_total"] = float(counts.sum())
    out["data/samples_seen"] = float(seen)
    out["data/bad_fraction"] = bad_fraction(counts, seen)
    out["data/resumed_skip"] = float(np.asarray(batch["resumed_skip"][0]))
    return out


def epochs_needed(cfg, num_images: int | None) -> int:
    """Passes over the shards so that ``train.steps`` global batches can be drawn (with slack)."""
    if cfg.data.epochs:
        return cfg.data.epochs
    if not num_images:
        return 1
    per_step = cfg.batch.classes_per_batch * cfg.batch.images_per_class
    # Pool leftovers and odd images are lost; 1.5x + 1 keeps the stream from running dry.
    return max(1, math.ceil(cfg.train.steps * per_step * 1.5 / num_images) + 1)


def _mean_sample_bytes(paths: list[str], fs, manifest: dict | None) -> float:
    """Bytes per sample in the shards (file sizes over the manifest's image count; 8 KiB without one)."""
    if fs is not None or not manifest:
        return 8192.0
    import os

    total = sum(os.path.getsize(p) for p in paths)
    n = sum(int(s.get("count", 0)) for s in manifest.get("shards", []))
    return total / n if n else 8192.0


def build_train_dataset(cfg, num_images: int | None = None, miner=None, random_every: int = 10,
                        gate: dict | None = None, position: str | None = None, report: str | None = None):
    """The training ``ray.data.Dataset``: one row = one rank's batch.

    Row columns: ``images`` (K*M, H, W, 3) uint8, ``labels`` (K*M,) int64, ``sample_ids``
    (K*M,) int64 (``pipeline/data/reader.py``; -1 for an image replaced by another of its
    class), ``bad_counts`` (len(REASONS),) int64 cumulative, ``samples_seen`` and
    ``resumed_skip`` int64 (see :func:`data_metrics`).
    ``miner``: a picklable factory of ``MinerClient`` (``functools.partial(MinerClient,
    name=..., timeout_s=...)``) to select classes with the miner actor; the rows then also hold the mining columns (module docstring),
    with a random side-by-side batch every ``random_every`` global batches (0 = never).
    ``gate``: keyword arguments of ``_TrainerGate`` (``actor``, ``max_lead``) to keep the
    composer close to the trainer, so that selections use recent class embeddings.
    ``position``: name of a ``DataPosition`` actor (``pipeline/data/position.py``) whose
    sample ids are skipped (a resumed run). ``report``: name of the ``DataReport`` actor
    the stages send bad items to (``pipeline/data/report.py``); created here when it does
    not exist (keep a handle from ``create_report`` in the driver to read it after the
    fit); None: an unnamed one that lives as long as the dataset.

    Shards are listed in a fresh random order each pass (class-grouping is kept within a
    shard). Raises ``ShardError`` when ``data.train`` matches no shards.
    """
    import ray.data

    from pipeline.data.manifest import find_manifest
    from pipeline.data.reader import read_dataset, shard_spec_from_manifest
    from pipeline.data.report import create_report

    paths, fs = list_shards(cfg.data.train)
    manifest = find_manifest(cfg.data.train)
    rng = np.random.default_rng(cfg.train.seed)
    epochs = epochs_needed(cfg, num_images)
    order = [(e, int(s)) for e in range(epochs) for s in rng.permutation(len(paths))]
    world = cfg.scaling.num_workers
    per_rank = cfg.batch.classes_per_batch // world * cfg.batch.images_per_class
    if report is None:
        import uuid

        report = f"data-report-{uuid.uuid4().hex[:12]}"
    report_handle = create_report(report)  # held by the UDFs' constructor arguments
    spec = shard_spec_from_manifest(manifest, paths, cfg.batch.images_per_class, filesystem=fs)
    ds = read_dataset(order, paths, spec)
    ds = ds.map_batches(
        ComposeBatches,
        fn_constructor_kwargs={
            "classes_per_rank": cfg.batch.classes_per_batch // world,
            "images_per_class": cfg.batch.images_per_class,
            "pool_classes": cfg.miner.pool_classes,
            "num_ranks": world,
            "seed": cfg.train.seed,
            "miner": miner,
            "random_every": random_every,
            "gate": gate,
            "paths": paths,
            "report": report_handle,
            "position": position,
            "max_bad_fraction": cfg.data.max_bad_fraction,
            "shard_reads": len(order),
        },
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    rows_per_call = max(1, DECODE_IMAGES_PER_CALL // per_rank)
    if gate:
        rows_per_call = min(rows_per_call, GATE_BLOCK_BATCHES * world)
    ds = ds.map_batches(
        DecodeBatches,
        fn_constructor_kwargs={"size": cfg.data.image_size, "augment": cfg.data.augment, "seed": cfg.train.seed,
                               "paths": paths, "report": report_handle,
                               "max_bad_fraction": cfg.data.max_bad_fraction},
        batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.decode_concurrency),
        num_cpus=0.5,
    )
    if gate:
        # Ray Data buffers a task's output until it reaches target_max_block_size (128 MiB by
        # default), so the composer's rows would reach the trainer only when its task ends and
        # the gate would wait on rows it is holding back itself. A target below one global
        # batch of JPEG bytes (what the composer yields at a time with a gate) lets each row
        # leave as it is made; the decode stage's calls of GATE_BLOCK_BATCHES global batches
        # then bound how far rows run ahead of the gate.
        per_batch = cfg.batch.classes_per_batch * cfg.batch.images_per_class * _mean_sample_bytes(paths, fs, manifest)
        ds.context.target_max_block_size = int(max(per_batch / 2, 1024))
    return ds
