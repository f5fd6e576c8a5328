"""Forward + backward time of our npair_mc against pytorch-metric-learning's NPairsLoss.

    python bench/bench_losses.py [--reps 25]

Both run on the same (2N, d) float32 batch laid out as pairs (rows 2i, 2i+1 of class i,
N distinct classes), on the CPU with 2 threads. What each computes:

* PML ``NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False))``: mines
  every positive pair, keeps one per label (``convert_to_pos_pairs_with_unique_labels``,
  which goes through numpy), then the mean cross-entropy of the anchor-positive
  dot-product matrix with the diagonal as target; no L2 term, no label masking (it relies
  on one pair per label). PML's default distance L2-normalises the embeddings first
  (cosine similarity), which is not Sohn's loss, so the bench turns that off.
* ours ``build_loss("npair_mc")``: slices anchors = rows 0::2 and positives = rows 1::2,
  checks the pair layout, masks same-label columns to -inf when a label repeats (a class
  drawn twice is never a negative; labels are distinct here, so only the check runs) and
  adds Sohn's L2 term (0.002 * mean squared norm).

With distinct labels and ``l2_reg=0`` the two are the same number (checked below); the
timed "ours" keeps the default l2_reg=0.002, i.e. what training runs.
Prints a table, then one JSON line with the ratios ours / PML (target <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import NPairsLoss

from pipeline.losses import build_loss

SIZES = [(n, d) for n in (128, 512, 1024) for d in (128, 512)]


def time_forward_backward(
    loss_fns: list, emb: torch.Tensor, labels: torch.Tensor, reps: int, warmup: int = 3
) -> list[float]:
    """Return, per loss, the median seconds of ``loss_fn(emb, labels).backward()`` over ``reps`` runs.

    The losses take turns within each repetition, so a load change on the machine hits
    them alike rather than whichever happened to run during it.
    """
    times: list[list[float]] = [[] for _ in loss_fns]
    for i in range(warmup + reps):
        for fn, fn_times in zip(loss_fns, times):
            emb.grad = None
            start = time.perf_counter()
            fn(emb, labels).backward()
            if i >= warmup:
                fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    """Run the benchmark and print the table and the JSON line of ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25, help="timed repetitions per size (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours, ours_no_l2 = build_loss("npair_mc"), build_loss("npair_mc", l2_reg=0.0)
    pml = NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs, float32, "
        f"median of {args.reps} interleaved reps, load average {load}"
    )
    print(f"{'N':>5} {'d':>4} {'ours ms':>9} {'pml ms':>9} {'ours/pml':>9}")
    ratios = {}
    for n, d in SIZES:
        gen = torch.Generator().manual_seed(0)
        emb = (torch.randn(2 * n, d, generator=gen) / d**0.25).requires_grad_()
        labels = torch.arange(n).repeat_interleave(2)
        # same computation when labels are distinct and the L2 term is off
        torch.testing.assert_close(ours_no_l2(emb, labels), pml(emb, labels), rtol=1e-5, atol=1e-6)
        t_ours, t_pml = time_forward_backward([ours, pml], emb, labels, args.reps)
        ratios[f"N{n}_d{d}"] = round(t_ours / t_pml, 3)
        print(f"{n:>5} {d:>4} {1e3 * t_ours:>9.3f} {1e3 * t_pml:>9.3f} {t_ours / t_pml:>9.3f}")
    print(json.dumps({"bench": "npair_mc_vs_pml_NPairsLoss", "ratio_ours_over_pml": ratios}))


if __name__ == "__main__":
    main()
