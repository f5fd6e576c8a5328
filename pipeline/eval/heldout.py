"""Evaluation during training: a bounded held-out set, decoded once, embedded in the training process.

Rank 0 of a run with ``data.eval`` (or ``eval.data``) loads :class:`HeldOutSet` once, before
its first step, and every ``eval.every`` steps embeds it with the live weights in eval mode
(the unwrapped module, so no DDP collective; the other ranks wait at their next gradient
all-reduce) and computes the retrieval metrics of ``pipeline.eval.retrieval``. The value of
``eval.metric`` scores the checkpoint of that step (``ray.train.CheckpointConfig``'s
``checkpoint_score_attribute``), and the run's best checkpoint is the one the end-of-run
evaluation and the logged model use.

Why in the training process, not Ray Data batch inference (``pipeline.eval.embed``): an
evaluation during training should cost seconds, not a fresh actor pool's start-up (4-5 s
of imports each time, measured in ``pipeline.mining.refresh``), and it uses the GPU the
rank already holds. The end-of-run evaluation of the whole ``data.eval`` stays on Ray Data.

Size: at most ``eval.max_images`` decoded images in rank 0's memory (uint8, s x s x 3 each):
2,000 images are 24 MB at 64 px, 75 MB at 112 px; the same whatever the size of the data
(CASIA-WebFace's or WebFace42M's hold-out), because the set is cut at ``max_images``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.decode import decode_images
from pipeline.data.manifest import ShardError, iter_labelled, list_shards


def embed_images(module: torch.nn.Module, images: np.ndarray, device, batch_size: int = 128) -> np.ndarray:
    """(n, d) float32 embeddings of uint8 NHWC ``images`` under ``module`` in eval mode, without
    gradients; the module's train/eval mode is restored afterwards. Call it on the unwrapped
    module: a DDP forward is a collective, and only this rank makes it."""
    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.inference_mode():
            for lo in range(0, len(images), batch_size):
                out.append(module(torch.from_numpy(images[lo:lo + batch_size]).to(device)).float().cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, 0), np.float32)


class HeldOutSet:
    """Up to ``max_images`` decoded images and labels of the shards at ``spec``.

    Shards are read in an order drawn with ``seed``, whole (a class never straddles two
    shards), until ``max_images`` samples are read; classes left with fewer than 2 images
    (the cut one) are dropped, since leave-one-out retrieval needs a second image. Samples
    that do not decode or have no label are skipped and counted in :attr:`skipped`.
    """

    def __init__(self, spec: str, image_size: int, max_images: int, seed: int = 0) -> None:
        paths, fs = list_shards(spec)
        order = np.random.default_rng(seed).permutation(len(paths))
        jpgs, labels, keys, self.skipped = [], [], [], 0
        for key, label, jpg in iter_labelled([paths[i] for i in order], fs):
            if label is None:
                self.skipped += 1
                continue
            jpgs.append(jpg)
            labels.append(label)
            keys.append(key.rsplit("/", 1)[-1])
            if len(jpgs) >= max_images:
                break
        images, ok = decode_images(jpgs, image_size)
        labels, keys = np.asarray(labels, dtype=np.int64)[ok], np.asarray(keys, dtype=object)[ok]
        self.skipped += int((~ok).sum())
        counts = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
        keep = counts[labels] >= 2 if labels.size else np.zeros(0, dtype=bool)
        self.images, self.labels, self.keys = images[keep], labels[keep], keys[keep]
        """(n, s, s, 3) uint8, (n,) int64 class ids, (n,) shard keys ``<class id>_<image stem>``."""
        if len(np.unique(self.labels)) < 2:
            raise ShardError(f"the held-out set at '{spec}' has fewer than 2 classes with 2 images among its "
                             f"first {max_images} samples: raise eval.max_images or check eval.data")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(len(np.unique(self.labels)))

    def embed(self, module: torch.nn.Module, device: torch.device, batch_size: int = 128) -> np.ndarray:
        """The (n, d) float32 embeddings of the set under ``module`` in eval mode (:func:`embed_images`)."""
        return embed_images(module, self.images, device, batch_size)

    def evaluate(self, module: torch.nn.Module, device: torch.device, ks=(1, 2, 4, 8), batch_size: int = 128,
                 seed: int = 0) -> dict[str, float]:
        """``pipeline.eval.retrieval.retrieval_metrics`` of the set under ``module``
        (``recall@K``, ``map@r``, ``nmi``, ``f1``)."""
        from pipeline.eval.retrieval import retrieval_metrics

        return retrieval_metrics(self.embed(module, device, batch_size), self.labels, ks=tuple(ks), seed=seed)
