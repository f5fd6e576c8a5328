import itertools

import torch

from pipeline.losses.pairs import positive_pair_count, triplet_count


def test_counts_match_enumeration():
    labels = torch.tensor([4, 4, 1, 4, 9, 1, 7])
    idx = range(len(labels))
    pairs = [(a, p) for a, p in itertools.product(idx, idx) if a != p and labels[a] == labels[p]]
    triplets = [(a, p, n) for (a, p), n in itertools.product(pairs, idx) if labels[n] != labels[a]]
    assert positive_pair_count(labels) == len(pairs)
    assert triplet_count(labels) == len(triplets)
