"""Like-for-like peer: a plain PyTorch loop with pytorch-metric-learning's NPairsLoss vs jobs.train.

    python bench/peer_npair.py [--data DIR] [--steps 1500] [--n 32] [--dim 64] [--backbone small]
                               [--seeds 0 1 2] [--mine [--mined-only]] [--dot] [--only peer|ours]
                               [--device auto|cpu|cuda] [--out FILE] [-- key=value ...]

On one shard set (``--data``: ``DIR/train``, ``DIR/holdout``, ``DIR/exemplars`` as
``jobs.make_shards`` writes them; default the quickstart data, made if missing) both sides
get the same images, image size, steps, N classes x 2 images per step, embedding size,
optimizer (Adam, ``--lr``, no weight decay), backbone (``pipeline.models``, the same
seeded initial weights), no augmentation, and the same held-out evaluation
(``pipeline.eval.retrieval.retrieval_metrics`` on the embeddings of ``DIR/holdout``: what
``jobs.train``'s end-of-run evaluation computes).

* **peer**: one process, every training image decoded into memory once, a ~40-line loop:
  per step N classes drawn uniformly, 2 images each, ``NPairsLoss`` (PML's default: cosine
  similarity; ``--dot``: unnormalised inner products, Sohn's form) + ``LpRegularizer``
  (power 2, weight ``--l2-reg``: Sohn's penalty on squared norms). With ``--mine``, also
  Sohn's hard class mining in the loop: every 20 steps 2 images of every class are embedded
  (eval mode) and their normalised means kept; each step draws ``--pool`` candidate classes
  and picks N greedily (a random first class, then the candidate most similar to any chosen).
* **ours**: ``python -m jobs.train`` (``configs/quickstart.yaml`` plus the same settings as
  overrides; 2 Ray Train workers, N/2 classes per rank, cross-rank negatives, N-pair-mc as
  the config sets it (16 x cosine, ``loss.scale: 16``) with L2 penalty ``--l2-reg``); ``--mine`` adds a run with
  ``miner.enabled=true``, the same pool and refresh interval. Overrides after ``--`` go to
  ours only (e.g. ``model.norm=group``). Ours runs with ``eval.every=0``: like the peer, it
  reports the network of its last step. (Until 2026-12-07 it kept the quickstart config's
  ``eval.every: 100``, which makes the best of 15 checkpoints, chosen on (a 2,000-image part
  of) the held-out set, the run's result: that flattered ours by 0.1-0.4 points per arm on the
  quickstart data, 1.5 in one run; BENCHMARKS.md, session of 2026-12-07 03:43 UTC.)

Prints one line per run (Recall@1, untrained Recall@1, train wall seconds), a table of means
and standard deviations over seeds, and a final JSON line; writes ``--out`` (default
``bench/out/peer_npair-<data name>.json``) after every run, so a run cut short by a time
limit (a lent GPU machine) keeps what it finished.

``--device cuda`` (``auto``: cuda when torch sees a GPU): the peer trains and embeds on the
GPU, and ours runs with ``scaling.use_gpu=true scaling.num_workers=1`` (one GPU: one DDP
worker holding all N classes; override after ``--`` on a machine with more).
Both sides share the 2 cores of this machine in turn, never at once; wall-time ratios are
within one side (mined vs random), measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loss_ordering import quickstart_data, run_job  # noqa: E402

REFRESH_EVERY = 20
"""Sohn's refresh interval for the class embeddings (steps), both sides."""


def load_split(data: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``data``'s ``split`` decoded to (n, size, size, 3) uint8, and its labels (n,) int64,
    sorted by label (each class's images contiguous)."""
    from pipeline.data.decode import decode_images
    from pipeline.data.index import load_index, read_samples

    index = load_index(data, split)
    ids = np.argsort(np.asarray(index.label), kind="stable")
    images, ok = decode_images(read_samples(index, ids), size)
    return images, np.asarray(index.label, dtype=np.int64)[ids][ok]


def embed(model, images: np.ndarray, batch: int = 256, device: str = "cpu") -> np.ndarray:
    """The model's embeddings of ``images`` in eval mode (no gradients), float32."""
    import torch

    model.eval()
    with torch.inference_mode():
        out = [model(torch.from_numpy(images[i:i + batch]).to(device)).float().cpu().numpy()
               for i in range(0, len(images), batch)]
    model.train()
    return np.concatenate(out)


def greedy_classes(class_emb: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sohn's greedy pick of ``n`` classes from ``pool``: a random first one, then each time the
    candidate whose highest cosine to the chosen ones is largest."""
    e = class_emb[pool]
    chosen = [int(rng.integers(len(pool)))]
    best = e @ e[chosen[0]]
    best[chosen[0]] = -np.inf
    for _ in range(n - 1):
        j = int(np.argmax(best))
        chosen.append(j)
        best = np.maximum(best, e @ e[j])
        best[chosen] = -np.inf
    return pool[chosen]


def train_peer(args, seed: int, mine: bool, train: tuple[np.ndarray, np.ndarray], hold: tuple[np.ndarray, np.ndarray]) -> dict:
    """One peer run; returns ``recall@1``, ``untrained_recall@1``, ``train_s`` (the loop's wall time)."""
    import torch
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.losses import NPairsLoss
    from pytorch_metric_learning.regularizers import LpRegularizer

    from pipeline.config import ModelConfig
    from pipeline.eval.retrieval import retrieval_metrics
    from pipeline.models import build_model

    images, labels = train
    classes, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    if (counts < 2).any():
        raise SystemExit(f"peer: {int((counts < 2).sum())} training classes have fewer than 2 images")
    torch.manual_seed(seed)  # the same initial weights as jobs.train (pipeline.models.initial_state)
    device = args.device
    model = build_model(ModelConfig(backbone=args.backbone, embedding_dim=args.dim, norm=args.norm)).to(device)
    untrained = retrieval_metrics(embed(model, hold[0], device=device), hold[1], ks=(1,), seed=seed)["recall@1"]
    distance = DotProductSimilarity(normalize_embeddings=not args.dot)
    loss_fn = NPairsLoss(distance=distance, embedding_regularizer=LpRegularizer(power=2),
                         embedding_reg_weight=args.l2_reg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(seed)
    class_emb = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        if mine and step % REFRESH_EVERY == 0:
            pick = np.stack([starts + rng.integers(0, counts), starts + rng.integers(0, counts)], axis=1)
            e = embed(model, images[pick.ravel()], device=device).reshape(len(classes), 2, -1).mean(1)
            class_emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        if mine:
            pool = rng.choice(len(classes), size=min(args.pool, len(classes)), replace=False)
            chosen = greedy_classes(class_emb, pool, args.n, rng)
        else:
            chosen = rng.choice(len(classes), size=args.n, replace=False)
        rows = np.concatenate([starts[c] + rng.choice(counts[c], size=2, replace=False) for c in chosen])
        emb = model(torch.from_numpy(images[rows]).to(device))
        loss = loss_fn(emb, torch.from_numpy(labels[rows]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    r1 = retrieval_metrics(embed(model, hold[0], device=device), hold[1], ks=(1,), seed=seed)["recall@1"]
    return {"recall@1": r1, "untrained_recall@1": untrained, "train_s": train_s}


def ours_command(args, seed: int, mine: bool, data: Path, out_dir: Path) -> list[str]:
    """The ``jobs.train`` command line of one run at the peer's settings (``args`` as ``main`` parses them)."""
    return [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
           f"data.train={data / 'train'}", f"data.eval={data / 'holdout'}", f"data.exemplars={data / 'exemplars'}",
           f"data.image_size={args.image_size}", "data.augment=none", f"model.backbone={args.backbone}",
           f"model.embedding_dim={args.dim}", f"model.norm={args.norm}", f"batch.classes_per_batch={args.n}",
           f"train.steps={args.steps}", "train.optimizer=adam", f"train.lr={args.lr}", "train.weight_decay=0",
           f"loss.l2_reg={args.l2_reg}", f"train.seed={seed}", f"miner.enabled={str(mine).lower()}",
           f"miner.pool_classes={args.pool}", f"miner.refresh_every={REFRESH_EVERY}", "miner.exemplars_per_class=2",
           f"train.log_every={max(1, args.steps // 10)}", "eval.every=0", f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}",
           "tracking.experiment=peer-npair", f"train.storage_path={out_dir / 'runs'}",
           *(["scaling.use_gpu=true", "scaling.num_workers=1"] if args.device == "cuda" else []), *args.overrides]


def train_ours(args, seed: int, mine: bool, data: Path, out_dir: Path) -> dict:
    """One ``jobs.train`` run at the peer's settings; returns its ``recall@1``, ``untrained_recall@1``, ``train_s``."""
    m = run_job(ours_command(args, seed, mine, data, out_dir))["metrics"]
    return {"recall@1": m["recall@1"], "untrained_recall@1": m["untrained_recall@1"], "train_s": m["train_time_s"]}


def summarise(runs: list[dict]) -> dict:
    """Per (side, batches): Recall@1 mean, population sd and per seed, and the mean train seconds."""
    summary = {}
    for key in dict.fromkeys(f"{r['side']}_{'mined' if r['mined'] else 'random'}" for r in runs):
        rows = [r for r in runs if f"{r['side']}_{'mined' if r['mined'] else 'random'}" == key]
        r1 = [r["recall@1"] for r in rows]
        summary[key] = {"recall@1_mean": statistics.mean(r1), "recall@1_std": statistics.pstdev(r1), "per_seed": r1,
                        "train_s_mean": statistics.mean(r["train_s"] for r in rows)}
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="shard set (default: the quickstart data, made if missing)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n", type=int, default=32, help="classes per step (x 2 images)")
    p.add_argument("--dim", type=int, default=64, help="embedding size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--l2-reg", type=float, default=0.002, help="weight of the mean squared embedding norm")
    p.add_argument("--backbone", default="small")
    p.add_argument("--norm", default="batch", choices=["batch", "group"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--pool", type=int, default=0, help="candidate classes per mined step (default 4 N)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mine", action="store_true", help="also run both sides with hard class mining")
    p.add_argument("--mined-only", action="store_true", help="with --mine: only the mined runs (random ones made earlier)")
    p.add_argument("--dot", action="store_true", help="peer: unnormalised inner products (Sohn) instead of cosine")
    p.add_argument("--only", choices=["peer", "ours"], default=None, help="run one side only")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="peer: torch threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both sides train (auto: cuda when torch sees a GPU)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/out/peer_npair-<data name>.json)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for jobs.train (after --)")
    args = p.parse_args()
    args.pool = args.pool or 4 * args.n
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    data = args.data.resolve() if args.data else quickstart_data()
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = [s for s in ("peer", "ours") if args.only in (None, s)]
    modes = ([True] if args.mined_only else [False, True]) if args.mine else [False]
    if "peer" in sides:
        import torch

        torch.set_num_threads(args.threads)
        train, hold = load_split(data, "train", args.image_size), load_split(data, "holdout", args.image_size)
        print(f"[peer] {len(train[1])} train images ({len(np.unique(train[1]))} classes), {len(hold[1])} held out "
              f"({len(np.unique(hold[1]))} classes)", flush=True)
    settings = {k: getattr(args, k) for k in ("steps", "n", "dim", "lr", "l2_reg", "backbone", "norm", "image_size",
                                              "pool", "seeds", "dot", "device", "overrides")}
    out_file = args.out or out_dir / f"peer_npair-{data.name}.json"
    runs = []
    for seed in args.seeds:
        for side in sides:
            for mine in modes:
                res = (train_peer(args, seed, mine, train, hold) if side == "peer"
                       else train_ours(args, seed, mine, data, out_dir))
                row = {"side": side, "mined": mine, "seed": seed, **res}
                runs.append(row)
                print(f"{side:>4} {'mined ' if mine else 'random'} seed {seed}: R@1 {res['recall@1']:.4f} "
                      f"(untrained {res['untrained_recall@1']:.4f}), train {res['train_s']:.1f}s", flush=True)
                summary = summarise(runs)
                out_file.write_text(json.dumps({"bench": "peer_npair", "data": str(data), "settings": settings,
                                                "summary": summary, "runs": runs}, indent=1))
    print(f"\n{'side':>4} {'batches':>7} {'R@1 mean':>9} {'std':>7} {'train s':>8}   per seed")
    for key, s in summary.items():
        side, batches = key.split("_")
        print(f"{side:>4} {batches:>7} {s['recall@1_mean']:9.4f} {s['recall@1_std']:7.4f} {s['train_s_mean']:8.1f}   "
              f"{', '.join(f'{x:.3f}' for x in s['per_seed'])}")
    print(json.dumps({"bench": "peer_npair", "data": data.name, "steps": args.steps,
                      "recall@1": {k: round(v["recall@1_mean"], 4) for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
