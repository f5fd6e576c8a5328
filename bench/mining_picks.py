"""What Sohn's greedy step picks on a synthetic_shapes set: look-alike classes or a dense region?

    python bench/mining_picks.py --data data/shapes2k --run bench/out/runs/dml-XXXXXXXX [--norm group] [--pools 200]

For each kept checkpoint of a ``jobs.train`` run (``train.storage_path``/``dml-<run>``), embeds
the exemplars of ``--data`` (``DIR/exemplars``, 2 per train class), takes each class's mean
direction, and over ``--pools`` random pools of ``--pool`` classes compares the greedy
selection of N classes (``pipeline.mining.class_index.greedy_select``) with N random classes
of the same pool: mirror-twin pairs per batch (``synthetic_shapes``: identity 2k+1 is the
mirror image of 2k), same-family pairs per batch (families of 4 identities), and the mean
pairwise cosine of the batch's classes. Identities come from the sample keys
(``<n>_s<identity>_<image>``). Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="a run's checkpoint directory (dml-<run id prefix>)")
    p.add_argument("--norm", default="group", choices=["group", "batch"])
    p.add_argument("--backbone", default="small")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--pools", type=int, default=200)
    args = p.parse_args()

    import torch
    from PIL import Image

    from pipeline.config import ModelConfig
    from pipeline.data.manifest import iter_labelled
    from pipeline.eval.heldout import embed_images
    from pipeline.mining.class_index import greedy_select
    from pipeline.models import build_model
    from pipeline.train.checkpoint import load_checkpoint_dir

    torch.set_num_threads(1)
    keys, labels, images = [], [], []
    for key, cls, jpg in iter_labelled(sorted(glob.glob(str(args.data / "exemplars" / "*.tar")))):
        if cls is None:
            continue
        keys.append(key)
        labels.append(cls)
        with Image.open(io.BytesIO(jpg)) as im:
            images.append(np.asarray(im.convert("RGB").resize((args.image_size, args.image_size))))
    images, labels = np.stack(images), np.asarray(labels)
    ident = np.asarray([int(k.split("_s")[1].split("_")[0]) for k in keys])
    classes = np.unique(labels)
    class_ident = np.asarray([ident[labels == c][0] for c in classes])
    model = build_model(ModelConfig(backbone=args.backbone, embedding_dim=args.dim, norm=args.norm))
    rng = np.random.default_rng(0)
    for ckpt in sorted(glob.glob(str(args.run / "checkpoint_2*"))):
        state = load_checkpoint_dir(ckpt)
        model.load_state_dict(state["model"])
        emb = embed_images(model, images, "cpu")
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        cemb = np.stack([emb[labels == c].mean(0) for c in classes])
        cemb /= np.linalg.norm(cemb, axis=1, keepdims=True)
        sums = {"mined": np.zeros(3), "random": np.zeros(3)}
        n = args.n
        for _ in range(args.pools):
            pool = rng.choice(len(classes), args.pool, replace=False)
            for name, pick in (("mined", pool[greedy_select(cemb[pool], n, rng)]), ("random", pool[:n])):
                ids = class_ident[pick]
                twins = sum(int((i ^ 1) in set(ids.tolist())) for i in ids) / 2
                fam = ids // 4
                family = sum(int(np.sum(fam == f) - 1) for f in fam) / 2
                sims = cemb[pick] @ cemb[pick].T
                sums[name] += (twins, family, (sims.sum() - n) / (n * (n - 1)))
        print(json.dumps({"checkpoint": Path(ckpt).name, "step": state.get("step"),
                          **{f"{name}_{k}": round(float(v) / args.pools, 3) for name, tot in sums.items()
                             for k, v in zip(("twin_pairs", "family_pairs", "mean_cos"), tot)},
                          "class_pairs": n * (n - 1) // 2}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
