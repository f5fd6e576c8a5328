"""The training stream: Ray Data reads shards, decodes + augments, composes batches.

read_webdataset (undecoded bytes) -> decode/augment (parallel CPU tasks) -> batch composer
(one stateful actor holding the class pool) -> one row per per-rank batch. Ray Train then
hands each rank its rows with ``streaming_split(equal=True)``, so every rank gets the same
number of batches; ``iter_torch_batches(batch_size=1)`` yields one whole batch per step.
A row (not a block) is the unit the splitter never cuts, which keeps N-pair batches whole.

With a miner (``miner`` settings for ``MinerClient``) the composer asks the miner actor for
the classes of each global batch and every row also carries, all fixed-shape so Ray Data
keeps tensor columns: ``select_ms`` (wall time of that batch's class selection),
``fallbacks`` (random selections so far because the miner did not answer),
``miner_version`` (index version the selection used; -1 = fallback, 0 = miner without
embeddings), ``trainer_step`` (the trainer's step as the gate last read it when the
batch was selected, a lower bound; -1 without a gate; see ``_TrainerGate``), and a random
batch "side by side": on every ``random_every``-th global batch, ``rand_images`` /
``rand_labels`` hold a batch of the same shape whose classes were drawn uniformly from the
same pool at the same moment (``has_rand`` True); other rows hold zeros and labels -1. The side batch copies pool images without consuming them and uses its own
rng, so the trained stream is the same with or without it; the trainer embeds it under
no_grad to log how much harder the mined batches are than random ones.
"""

from __future__ import annotations

import math
import time
import zlib

import numpy as np

from pipeline.data.batching import BatchComposer, RandomSelector
from pipeline.data.shards import list_shards

GATE_BLOCK_BATCHES = 4
"""With a gate: Ray Data blocks of about this many global batches of images (see build_train_dataset).

Measured here (2 cores, quickstart shapes, two consumers at 0.05-0.1 s per step, lead 16-20):
blocks of 1 batch made the trainers wait for data 13% of the time (a coordinator round trip
per row), 4 or 8 batches ~0%; 4 keeps the lag closest to the gate's lead (mean 19-22 steps)."""


def decode_images(jpgs, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode JPEG bytes to ``(B, size, size, 3)`` uint8, resizing when needed.

    Returns the images and a boolean mask of the inputs that decoded (bad ones are dropped
    from the images, not replaced).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resize

    out, ok = [], np.zeros(len(jpgs), dtype=bool)
    for i, b in enumerate(jpgs):
        try:
            t = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            continue
        if t.shape[1] != size or t.shape[2] != size:
            t = resize(t, [size, size], antialias=True)
        out.append(t.permute(1, 2, 0))
        ok[i] = True
    imgs = torch.stack(out).numpy() if out else np.zeros((0, size, size, 3), dtype=np.uint8)
    return imgs, ok


class DecodeAugment:
    """Ray Data UDF: ``{jpg, cls, __key__}`` rows -> ``{image, label}`` rows (flip augmentation)."""

    def __init__(self, size: int, augment: bool, seed: int) -> None:
        self.size, self.augment, self.seed = size, augment, seed

    def __call__(self, batch: dict):
        imgs, ok = decode_images(batch["jpg"], self.size)
        if not len(imgs):
            return  # a generator UDF yields nothing rather than an empty tensor column
        labels = np.asarray([int(bytes(c).decode()) for c in batch["cls"]], dtype=np.int64)[ok]
        if self.augment and len(imgs):
            # Seed from the batch's first key so a rerun sees the same flips.
            rng = np.random.default_rng([self.seed, zlib.crc32(str(batch["__key__"][0]).encode())])
            flip = rng.random(len(imgs)) < 0.5
            imgs[flip] = imgs[flip, :, ::-1]
        yield {"image": imgs, "label": labels}


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


class ComposeBatches:
    """Ray Data UDF (stateful actor): decoded rows -> one row per per-rank batch.

    With ``miner`` (``MinerClient`` keyword arguments) the classes come from the miner and
    the rows carry the mining columns described in the module docstring.
    """

    def __init__(self, classes_per_rank: int, images_per_class: int, pool_classes: int, num_ranks: int,
                 seed: int, miner: dict | None = None, random_every: int = 10, gate: dict | None = None) -> None:
        selector = RandomSelector()
        self.side = None
        self.gate = _TrainerGate(**gate) if gate else None
        if miner:
            from pipeline.mining.actor import MinerClient

            self.client = MinerClient(**miner)
            selector = self.side = _SideBySideSelector(self.client, images_per_class, random_every, seed)
        self.composer = BatchComposer(classes_per_rank, images_per_class, pool_classes, num_ranks, selector, seed)
        if self.side is not None:
            self.side.pool = self.composer.pool  # the same dict object for the composer's lifetime

    def __call__(self, batch: dict):
        self.composer.add(batch["image"], batch["label"])
        if self.gate is not None:
            self.gate.wait(self.composer.batches)
            if self.side is not None:
                self.side.trainer_step = self.gate.step
        xs, ys = self.composer.compose()
        # A generator UDF: yield nothing while the pool fills. An empty 5-D batch would
        # make Ray Data fall back to pickled objects for the whole column.
        if not xs:
            return
        out = {"images": np.stack(xs), "labels": np.stack(ys)}
        if self.side is not None:
            out.update(self._mining_columns(out["images"], out["labels"]))
        yield out

    def _mining_columns(self, images: np.ndarray, labels: np.ndarray) -> dict:
        calls = self.side.take()
        ranks, per_rank = self.composer.ranks, labels.shape[1]
        if len(calls) * ranks != len(labels):
            raise RuntimeError(f"composer made {len(labels)} rows from {len(calls)} selections of {ranks} ranks")
        rand_x, rand_y = np.zeros_like(images), np.full_like(labels, -1)
        has = np.zeros(len(labels), dtype=bool)
        for g, (_, _, cls, imgs, _) in enumerate(calls):
            if cls is None:
                continue
            rows = slice(g * ranks, (g + 1) * ranks)
            rand_x[rows] = np.stack(imgs).reshape(ranks, per_rank, *images.shape[2:])
            rand_y[rows] = np.repeat(np.asarray(cls, dtype=np.int64), self.composer.m).reshape(ranks, per_rank)
            has[rows] = True
        # One selection per global batch -> the same value on each of its `ranks` rows.
        return {
            "select_ms": np.repeat(np.asarray([c[0] for c in calls], dtype=np.float32), ranks),
            "miner_version": np.repeat(np.asarray([c[1] for c in calls], dtype=np.int64), ranks),
            "trainer_step": np.repeat(np.asarray([c[4] for c in calls], dtype=np.int64), ranks),
            "fallbacks": np.full(len(labels), self.client.fallbacks, dtype=np.int64),
            "has_rand": has,
            "rand_images": rand_x,
            "rand_labels": rand_y,
        }


def epochs_needed(cfg, num_images: int | None) -> int:
    """Passes over the shards so that ``train.steps`` global batches can be drawn (with slack)."""
    if cfg.data.epochs:
        return cfg.data.epochs
    if not num_images:
        return 1
    per_step = cfg.batch.classes_per_batch * cfg.batch.images_per_class
    # Pool leftovers and odd images are lost; 1.5x + 1 keeps the stream from running dry.
    return max(1, math.ceil(cfg.train.steps * per_step * 1.5 / num_images) + 1)


def build_train_dataset(cfg, num_images: int | None = None, miner: dict | None = None, random_every: int = 10,
                        gate: dict | None = None):
    """The training ``ray.data.Dataset``: one row = one rank's batch (``images``, ``labels``).

    ``miner``: keyword arguments of ``MinerClient`` (at least ``name``) to select classes
    with the miner actor; the rows then also hold the mining columns (module docstring),
    with a random side-by-side batch every ``random_every`` global batches (0 = never).
    ``gate``: keyword arguments of ``_TrainerGate`` (``actor``, ``max_lead``) to keep the
    composer close to the trainer, so that selections use recent class embeddings.

    Shards are listed in a fresh random order each epoch (class-grouping is kept within a
    shard). Raises ``ShardError`` when ``data.train`` matches no shards.
    """
    import ray.data

    paths, fs = list_shards(cfg.data.train)
    rng = np.random.default_rng(cfg.train.seed)
    epochs = epochs_needed(cfg, num_images)
    order = [p for _ in range(epochs) for p in rng.permutation(paths).tolist()]
    world = cfg.scaling.num_workers
    ds = ray.data.read_webdataset(order, filesystem=fs, decoder=None, suffixes=["jpg", "cls"])
    ds = ds.map_batches(
        DecodeAugment,
        fn_constructor_kwargs={"size": cfg.data.image_size, "augment": cfg.data.augment, "seed": cfg.train.seed},
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.decode_concurrency),
        num_cpus=0.5,
    )
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
        },
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    if gate:
        # Ray Data buffers a task's output until it reaches target_max_block_size (128 MiB by
        # default), so the composer's rows would reach the trainer only when its task ends and
        # the gate would wait on rows it is holding back itself. Blocks of a few global
        # batches let rows leave as they are made and cut the decoded stream into composer
        # calls of a few batches, which keeps the lead bound tight.
        per_batch = cfg.batch.classes_per_batch * cfg.batch.images_per_class * cfg.data.image_size ** 2 * 3
        ds.context.target_max_block_size = max(GATE_BLOCK_BATCHES * per_batch, 16 * 1024)
    return ds
