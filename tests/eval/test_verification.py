"""LFW pairs parsing, 10-fold accuracy vs a brute-force threshold search, TAR@FAR, ROC, rank-1."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve

from pipeline.data.pairs import read_lfw_pairs
from pipeline.eval.verification import (
    cosine_scores,
    identification_rank1,
    roc_curve,
    tar_at_far,
    verification_metrics,
)

N_FOLDS, PER_SIDE = 10, 3


def _write_pairs(tmp_path, header="10\t3"):
    """A pairs.txt in LFW's real layout: per fold 3 matched then 3 mismatched lines."""
    lines = [header]
    for f in range(N_FOLDS):
        for i in range(PER_SIDE):
            lines.append(f"Person_{f}_{i}\t{i + 1}\t{i + 12}")
        for i in range(PER_SIDE):
            lines.append(f"Person_{f}_{i}\t{i + 1}\tOther_{f}_{i}\t{i + 3}")
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_real_layout(tmp_path):
    pairs = read_lfw_pairs(_write_pairs(tmp_path))
    assert len(pairs) == N_FOLDS * 2 * PER_SIDE
    first, fourth = pairs[0], pairs[3]
    assert (first.left, first.right, first.is_same, first.fold) == (
        "Person_0_0/Person_0_0_0001",
        "Person_0_0/Person_0_0_0012",
        True,
        0,
    )
    assert (fourth.left, fourth.right, fourth.is_same, fourth.fold) == (
        "Person_0_0/Person_0_0_0001",
        "Other_0_0/Other_0_0_0003",
        False,
        0,
    )
    folds = np.array([p.fold for p in pairs])
    np.testing.assert_array_equal(np.bincount(folds), [6] * 10)
    assert pairs[-1].fold == 9 and not pairs[-1].is_same


def test_parse_headerless_round_robin(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("A 1 2\nA 1 B 1\n\nC 3 4\n")
    pairs = read_lfw_pairs(path)
    assert [(p.is_same, p.fold) for p in pairs] == [(True, 0), (False, 1), (True, 2)]
    assert pairs[2].right == "C/C_0004"


def test_parse_dev_single_number_header(tmp_path):
    path = tmp_path / "pairsDevTest.txt"
    path.write_text("1\nA 1 2\nA 1 B 1\n")
    assert [(p.is_same, p.fold) for p in read_lfw_pairs(path)] == [(True, 0), (False, 0)]


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("10 3\nA 1 2\n", 1, "promises 60 pairs"),
        ("1 1\nA 1 2\nA x B 2\n", 3, "positive integer"),
        ("1 1\nA 1 B 2\nA 1 2\n", 2, "expected a matched"),
        ("1 1\nA 1 2\nA 1 2 3 4 5\n", 3, "got 6 fields"),
        ("A 1 2\nA 0 2\n", 2, "positive integer"),
    ],
)
def test_parse_errors_name_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "bad_pairs.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad_pairs.txt:{line}: .*{what}"):
        read_lfw_pairs(path)


def test_known_accuracy(tmp_path):
    pairs = read_lfw_pairs(_write_pairs(tmp_path))
    is_same = np.array([p.is_same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    # genuine around 0.8, impostor around 0.2; one genuine pair in fold 0 and one impostor
    # pair in fold 3 sit on the wrong side, so those folds score 5/6 and the rest 6/6
    rng = np.random.default_rng(0)
    scores = np.where(is_same, 0.8, 0.2) + rng.uniform(-0.05, 0.05, size=len(pairs))
    scores[0] = 0.1
    scores[3 * 6 + 4] = 0.9
    m = verification_metrics(scores, is_same, folds)
    expected = np.array([5 / 6, 1, 1, 5 / 6, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(m["accuracy_per_fold"], expected)
    assert m["accuracy"] == pytest.approx(expected.mean())
    assert m["accuracy_std"] == pytest.approx(expected.std())
    assert np.all((m["threshold_per_fold"] > 0.25) & (m["threshold_per_fold"] < 0.75))


def _kfold_reference(scores, is_same, folds):
    """Try every candidate threshold with an explicit loop; lowest wins ties."""
    accs = []
    for f in np.unique(folds):
        train = folds != f
        u = sorted(set(scores[train].tolist()))
        candidates = [u[0]] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [np.nextafter(u[-1], np.inf)]
        best_t, best_acc = None, -1.0
        for t in candidates:
            acc = sum((s >= t) == y for s, y in zip(scores[train], is_same[train])) / train.sum()
            if acc > best_acc:
                best_t, best_acc = t, acc
        test = ~train
        accs.append(np.mean((scores[test] >= best_t) == is_same[test]))
    return np.array(accs)


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, None), (2, 1), (3, 2)])
def test_kfold_accuracy_matches_brute_force(seed, decimals):
    rng = np.random.default_rng(seed)
    n = 120
    is_same = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 1.0 * is_same
    if decimals is not None:  # many tied scores
        scores = np.round(scores, decimals)
    folds = np.arange(n) % 10
    m = verification_metrics(scores, is_same, folds)
    np.testing.assert_allclose(m["accuracy_per_fold"], _kfold_reference(scores, is_same, folds), atol=1e-12)


def _tar_reference(scores, is_same, far):
    """Smallest threshold (accept score > t) over all distinct scores whose FAR <= far."""
    neg, pos = scores[~is_same], scores[is_same]
    for t in sorted(set(scores.tolist())):
        if np.mean(neg > t) <= far:
            return np.mean(pos > t), t
    raise AssertionError("unreachable: the top score has FAR 0")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("far", [1e-3, 1e-2, 0.1, 0.25])
def test_tar_at_far_matches_brute_force(seed, far):
    rng = np.random.default_rng(seed)
    is_same = rng.random(2000) < 0.3
    scores = np.round(rng.normal(size=2000) + 2 * is_same, 2)
    tar, t, achieved = tar_at_far(scores, is_same, far)
    want_tar, want_t = _tar_reference(scores, is_same, far)
    assert (tar, t) == pytest.approx((want_tar, want_t))
    assert achieved <= far


def test_tar_keys_and_tiny_far():
    is_same = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = np.r_[np.linspace(0.5, 1.0, 50), np.linspace(0.0, 0.6, 50)]
    m = verification_metrics(scores, is_same, np.arange(100) % 10)
    # 50 impostors: far * 50 < 1, so the threshold is the top impostor score (0.6)
    assert m["threshold@far=1e-04"] == pytest.approx(0.6)
    assert m["far@far=1e-04"] == 0.0
    assert m["tar@far=1e-04"] == pytest.approx(np.mean(scores[:50] > 0.6))


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_matches_sklearn(decimals):
    rng = np.random.default_rng(0)
    is_same = rng.random(300) < 0.5
    scores = rng.normal(size=300) + is_same
    if decimals is not None:
        scores = np.round(scores, decimals)
    fpr, tpr, thr = roc_curve(scores, is_same)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(is_same, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf


def test_bad_metric_inputs_raise():
    with pytest.raises(ValueError, match="both matched"):
        verification_metrics(np.ones(4), np.ones(4, bool), np.arange(4))
    with pytest.raises(ValueError, match="at least 2 folds"):
        verification_metrics(np.arange(4.0), np.array([1, 0, 1, 0], bool), np.zeros(4))
    with pytest.raises(ValueError, match="far must be"):
        tar_at_far(np.arange(4.0), np.array([1, 0, 1, 0], bool), 0.0)


def test_cosine_scores():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [1.0, 0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(50, 8)).astype(np.float32)
    g_labels = rng.permutation(50) % 40  # some identities twice in the gallery
    p = rng.normal(size=(200, 8)).astype(np.float32)
    p_labels = rng.choice(g_labels, size=200)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    want = np.mean(g_labels[np.argmax(pn.astype(np.float64) @ gn.T.astype(np.float64), axis=1)] == p_labels)
    assert identification_rank1(g, g_labels, p, p_labels, chunk_size=7) == pytest.approx(want, abs=1e-12)


def test_rank1_open_set_raises():
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="not in the gallery"):
        identification_rank1(g, np.arange(3), g, np.array([0, 1, 5]))
