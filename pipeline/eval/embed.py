"""Embed a shard set with Ray Data batch inference (model actors; GPU ones when asked)."""

from __future__ import annotations

import numpy as np

from pipeline.data.decode import decode_images
from pipeline.data.manifest import list_shards


class Embedder:
    """Ray Data UDF (actor): JPEG rows -> ``{embedding, label}`` with a model built once per actor."""

    def __init__(self, model_cfg: dict, state_ref: list, image_size: int, use_gpu: bool = False) -> None:
        import ray
        import torch

        from pipeline.config import ModelConfig
        from pipeline.models import build_model

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(ModelConfig(**model_cfg))
        # The state dict travels through the object store inside a list, so Ray does not
        # resolve it before the actor exists (one copy per node, not per actor).
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.to(self.device).eval()
        self.size = image_size

    def __call__(self, batch: dict) -> dict:
        import torch

        imgs, ok = decode_images(batch["jpg"], self.size)
        labels = np.asarray([int(bytes(c).decode()) for c in batch["cls"]], dtype=np.int64)[ok]
        with torch.inference_mode():
            emb = self.model(torch.from_numpy(imgs).to(self.device)).float().cpu().numpy()
        keys = np.asarray([str(k) for k in batch["__key__"]], dtype=object)[ok]
        out = {"embedding": emb.astype(np.float32), "label": labels, "key": keys}
        if "__url__" in batch:  # read with include_paths: the shard of each sample
            out["source"] = np.asarray([str(u) for u in batch["__url__"]], dtype=object)[ok]
        return out


def embed_shards(spec: str, model_cfg: dict, state_dict: dict, image_size: int, batch_size: int = 128,
                 concurrency: int = 1, use_gpu: bool = False, with_sources: bool = False) -> tuple:
    """Embed every image of the shards at ``spec``.

    Returns ``(embeddings (n, d) float32, labels (n,) int64, keys (n,) str)`` where a key is
    the sample's shard key ``<class id>_<image stem>``, plus ``sources (n,) str`` (the shard
    holding each sample) when ``with_sources``. Undecodable images are dropped.
    Raises ``ShardError`` when ``spec`` matches no shards.
    """
    import ray
    import ray.data

    paths, fs = list_shards(spec)
    ref = ray.put(state_dict)
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, suffixes=["jpg", "cls"],
                                  include_paths=with_sources)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_cfg": model_cfg, "state_ref": [ref], "image_size": image_size, "use_gpu": use_gpu},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    embs, labels, keys, sources = [], [], [], []
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        embs.append(b["embedding"])
        labels.append(b["label"])
        keys.append(b["key"])
        sources.append(b.get("source", np.zeros(0, dtype=object)))
    if not embs:
        raise ValueError(f"no decodable images in the shards at '{spec}'")
    out = (np.concatenate(embs), np.concatenate(labels), np.concatenate(keys).astype(str))
    return (*out, np.concatenate(sources).astype(str)) if with_sources else out
