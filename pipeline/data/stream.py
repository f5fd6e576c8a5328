"""The training stream: Ray Data reads shards, decodes + augments, composes batches.

read_webdataset (undecoded bytes) -> decode/augment (parallel CPU tasks) -> batch composer
(one stateful actor holding the class pool) -> one row per per-rank batch. Ray Train then
hands each rank its rows with ``streaming_split(equal=True)``, so every rank gets the same
number of batches; ``iter_torch_batches(batch_size=1)`` yields one whole batch per step.
A row (not a block) is the unit the splitter never cuts, which keeps N-pair batches whole.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from pipeline.data.batching import BatchComposer, RandomSelector
from pipeline.data.shards import list_shards


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


class ComposeBatches:
    """Ray Data UDF (stateful actor): decoded rows -> one row per per-rank batch."""

    def __init__(self, classes_per_rank: int, images_per_class: int, pool_classes: int, num_ranks: int,
                 seed: int, miner: dict | None = None) -> None:
        selector = RandomSelector()
        if miner:
            from pipeline.mining.actor import MinerClient

            selector = MinerClient(**miner)
        self.composer = BatchComposer(classes_per_rank, images_per_class, pool_classes, num_ranks, selector, seed)

    def __call__(self, batch: dict):
        self.composer.add(batch["image"], batch["label"])
        xs, ys = self.composer.compose()
        # A generator UDF: yield nothing while the pool fills. An empty 5-D batch would
        # make Ray Data fall back to pickled objects for the whole column.
        if xs:
            yield {"images": np.stack(xs), "labels": np.stack(ys)}


def epochs_needed(cfg, num_images: int | None) -> int:
    """Passes over the shards so that ``train.steps`` global batches can be drawn (with slack)."""
    if cfg.data.epochs:
        return cfg.data.epochs
    if not num_images:
        return 1
    per_step = cfg.batch.classes_per_batch * cfg.batch.images_per_class
    # Pool leftovers and odd images are lost; 1.5x + 1 keeps the stream from running dry.
    return max(1, math.ceil(cfg.train.steps * per_step * 1.5 / num_images) + 1)


def build_train_dataset(cfg, num_images: int | None = None, miner: dict | None = None):
    """The training ``ray.data.Dataset``: one row = one rank's batch (``images``, ``labels``).

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
        },
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    return ds
