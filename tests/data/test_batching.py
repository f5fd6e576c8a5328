"""Batch composition from a class-grouped stream: N distinct classes x M images, per-rank rows."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.data.batching import BatchComposer, RandomSelector


def _stream(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Class-grouped samples: image i is a 2x2 int32 'picture' whose pixels all hold its unique id i."""
    labels = np.repeat(np.arange(len(sizes)) * 10 + 7, sizes).astype(np.int64)  # ids need not be 0..n-1
    images = np.arange(len(labels), dtype=np.int32)[:, None, None] * np.ones((1, 2, 2), np.int32)
    return images, labels


def _feed(comp: BatchComposer, images, labels, chunk: int) -> tuple[list, list]:
    """Feed in chunks (as Ray Data batches arrive), composing after each, then drain."""
    xs, ys = [], []
    for s in range(0, len(labels), chunk):
        comp.add(images[s : s + chunk], labels[s : s + chunk])
        x, y = comp.compose()
        xs += x
        ys += y
    x, y = comp.compose(final=True)
    return xs + x, ys + y


def _check(xs, ys, labels, k: int, m: int, ranks: int) -> set[int]:
    """Assert every invariant of the composed rows; returns the ids of the images emitted."""
    assert len(xs) == len(ys) and len(xs) % ranks == 0
    seen: list[int] = []
    for x, y in zip(xs, ys):
        assert x.shape == (k * m, 2, 2) and y.shape == (k * m,) and y.dtype == np.int64
        ids = x[:, 0, 0]
        assert (x == ids[:, None, None]).all()
        assert (labels[ids] == y).all(), "an image carries another class's label"
        groups = y.reshape(k, m)
        assert (groups == groups[:, :1]).all(), "the M images of a class are consecutive"
        assert len(set(groups[:, 0].tolist())) == k
        seen += ids.tolist()
    for g in range(0, len(ys), ranks):
        classes = np.concatenate(ys[g : g + ranks])
        assert len(set(classes.tolist())) == k * ranks, "a class repeats within a global batch"
    assert len(seen) == len(set(seen)), "an image was emitted twice"
    return set(seen)


def _pool_size(comp: BatchComposer) -> int:
    return sum(len(v) for v in comp.pool.values())


@pytest.mark.parametrize("k, m, ranks, pool, chunk", [
    (2, 2, 2, 8, 7),
    (3, 2, 1, 5, 4),
    (1, 2, 3, 6, 16),
    (2, 4, 2, 6, 9),  # M-per-class mode
    (4, 4, 1, 4, 1),
])
def test_composed_rows_keep_invariants(k, m, ranks, pool, chunk):
    sizes = np.random.default_rng(k * 100 + m * 10 + ranks).integers(1, 12, size=60).tolist()
    sizes[:4] = [1, 3, 5, 1]  # singletons and odd counts
    images, labels = _stream(sizes)
    comp = BatchComposer(k, m, pool_classes=pool, num_ranks=ranks, seed=0)
    xs, ys = _feed(comp, images, labels, chunk)
    emitted = _check(xs, ys, labels, k, m, ranks)
    assert comp.batches == len(xs) // ranks > 0
    assert len(labels) == len(emitted) + comp.dropped + _pool_size(comp)
    # After draining fewer than N classes can still make a batch.
    assert sum(len(v) >= m for v in comp.pool.values()) < k * ranks
    # The stream is mostly used: only leftovers below M per class and a last partial batch are lost.
    assert len(emitted) >= 0.5 * len(labels)


def test_same_seed_same_batches():
    images, labels = _stream([2, 3, 4, 5, 6, 2, 2, 3, 9, 4, 4, 2])
    a = _feed(BatchComposer(2, 2, 4, num_ranks=2, seed=5), images, labels, 5)
    b = _feed(BatchComposer(2, 2, 4, num_ranks=2, seed=5), images, labels, 5)
    c = _feed(BatchComposer(2, 2, 4, num_ranks=2, seed=6), images, labels, 5)
    assert all((p == q).all() for p, q in zip(a[0], b[0])) and len(a[0]) == len(b[0])
    assert len(a[0]) != len(c[0]) or any((p != q).any() for p, q in zip(a[0], c[0]))


def test_compose_waits_for_a_full_pool_then_final_drains():
    images, labels = _stream([2] * 7)
    comp = BatchComposer(2, 2, pool_classes=6, num_ranks=2, seed=0)  # N = 4 classes per global batch
    for c in range(5):
        comp.add(images[2 * c : 2 * c + 2], labels[2 * c : 2 * c + 2])
        assert comp.compose() == ([], [])  # 5 ready classes < pool of 6: no choice made yet
    comp.add(images[10:11], labels[10:11])
    assert comp.compose() == ([], [])  # the 6th class has 1 of its 2 images: not ready
    comp.add(images[11:12], labels[11:12])
    xs, ys = comp.compose()
    assert len(xs) == 2 and comp.batches == 1  # one global batch = one row per rank
    assert len(comp.pool) == 2 and comp.dropped == 0  # used classes (0 left) leave the pool
    assert comp.compose(final=True) == ([], [])  # 2 ready < N = 4
    comp.add(images[12:14], labels[12:14])
    assert comp.compose() == ([], [])  # 3 ready < pool of 6
    xs, ys = comp.compose(final=True)
    assert len(xs) == 0 and len(comp.pool) == 3
    _check(xs, ys, labels, 2, 2, 2)


def test_final_drains_when_n_ready():
    images, labels = _stream([2] * 8)
    comp = BatchComposer(2, 2, pool_classes=100, num_ranks=1, seed=0)
    comp.add(images, labels)
    assert comp.compose() == ([], [])
    xs, ys = comp.compose(final=True)
    _check(xs, ys, labels, 2, 2, 1)
    assert len(xs) == 4 and comp.pool == {} and comp.dropped == 0


def test_dropped_counts_leftovers():
    # 4 classes x 3 images, M = 2: each chosen class leaves one image that cannot make a pair.
    images, labels = _stream([3, 3, 3, 3])
    comp = BatchComposer(2, 2, pool_classes=4, num_ranks=2, seed=0)
    comp.add(images, labels)
    xs, ys = comp.compose()
    assert len(xs) == 2 and comp.dropped == 4 and comp.pool == {}
    assert len(_check(xs, ys, labels, 2, 2, 2)) == 8


def test_unready_classes_stay_in_pool():
    images, labels = _stream([1, 1, 2, 2])
    comp = BatchComposer(2, 2, pool_classes=2, seed=0)
    comp.add(images, labels)
    xs, _ = comp.compose(final=True)
    assert len(xs) == 1 and comp.dropped == 0 and _pool_size(comp) == 2
    assert sorted(comp.pool) == [7, 17]


class _Fixed:
    def __init__(self, out):
        self.out = out

    def select(self, candidates, n, rng):
        return self.out(candidates)


@pytest.mark.parametrize("bad", [
    lambda c: c[:1] * 2,  # the same class twice
    lambda c: c[:1],  # too few
    lambda c: c[:2] + c[1:2],  # right set size, one repeated
    lambda c: [c[0], 999],  # not a ready class
    lambda c: c[:3],  # too many
])
def test_bad_selector_raises(bad):
    images, labels = _stream([2, 2, 2, 1])
    comp = BatchComposer(2, 2, pool_classes=3, selector=_Fixed(bad), seed=0)
    comp.add(images, labels)
    with pytest.raises(RuntimeError, match="class selector"):
        comp.compose()


def test_custom_selector_is_followed():
    images, labels = _stream([2, 2, 2, 2])
    comp = BatchComposer(2, 2, pool_classes=4, selector=_Fixed(lambda c: [c[-1], c[0]]), seed=0)
    comp.add(images, labels)
    xs, ys = comp.compose(final=True)
    assert [y.tolist() for y in ys] == [[37, 37, 7, 7], [27, 27, 17, 17]]


def test_random_selector_distinct_and_uniform():
    sel, rng = RandomSelector(), np.random.default_rng(0)
    candidates = list(range(100, 110))
    counts: Counter[int] = Counter()
    draws = 3000
    for _ in range(draws):
        got = sel.select(candidates, 3, rng)
        assert len(got) == len(set(got)) == 3 and set(got) <= set(candidates)
        assert all(type(c) is int for c in got)
        counts.update(got)
    expected = draws * 3 / len(candidates)
    assert set(counts) == set(candidates)
    assert all(abs(v - expected) < 0.1 * expected for v in counts.values()), counts


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BatchComposer(1, 2, 4, num_ranks=1)  # one class: no negatives
    with pytest.raises(ValueError):
        BatchComposer(0, 2, 4, num_ranks=2)
    with pytest.raises(ValueError):
        BatchComposer(2, 2, 4, num_ranks=0)
    assert BatchComposer(4, 2, pool_classes=2, num_ranks=2).pool_target == 8  # the pool holds at least N


def test_distinct_draws_are_uniform_subsets():
    from pipeline.data.batching import _distinct

    rng = np.random.default_rng(0)
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(6000):
        a, b = _distinct(4, rng.random(2).tolist())
        assert a != b and 0 <= a < 4 and 0 <= b < 4
        counts[tuple(sorted((a, b)))] += 1
    assert len(counts) == 6 and all(abs(v - 1000) < 120 for v in counts.values()), counts
    assert sorted(_distinct(3, [0.99, 0.99, 0.99])) == [0, 1, 2]
