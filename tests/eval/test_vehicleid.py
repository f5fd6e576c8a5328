"""VehicleID protocol: test-list parsing, perfect embeddings, brute-force reference on random data."""

import numpy as np
import pytest

from pipeline.eval.vehicleid import read_test_list, sample_gallery, vehicleid_protocol

# the real test_list_800.txt line format: <7-digit image name> <vehicle id>
TEST_LIST = """0000084 0002
0000085 0002
0000129 0005
0000130 0005
0000131 0005
0000200 0011
0000201 0011
0000302 0017
"""


def test_read_test_list(tmp_path):
    path = tmp_path / "test_list_800.txt"
    path.write_text(TEST_LIST + "\n")
    rows = read_test_list(path)
    assert rows[0] == ("0000084", 2)
    assert [v for _, v in rows] == [2, 2, 5, 5, 5, 11, 11, 17]


@pytest.mark.parametrize("bad", ["0000099", "0000099 0002 extra", "0000099 car7"])
def test_read_test_list_bad_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "test_list_800.txt"
    path.write_text(TEST_LIST.replace("0000129 0005", bad))
    with pytest.raises(ValueError, match=r"test_list_800.txt:3: expected '<image name> <vehicle id>'"):
        read_test_list(path)


def test_perfect_embeddings(tmp_path):
    path = tmp_path / "test_list_800.txt"
    path.write_text(TEST_LIST)
    vids = np.array([v for _, v in read_test_list(path)])
    # one orthogonal direction per vehicle, so every probe's nearest gallery image is its own
    codes = np.unique(vids, return_inverse=True)[1]
    x = np.eye(8, dtype=np.float32)[codes] + np.float32(0.01) * np.random.default_rng(0).normal(size=(8, 8))
    m = vehicleid_protocol(x, vids, repeats=3, ks=(1, 2))
    assert m["top1"] == m["top2"] == m["map"] == 1.0
    assert m["top1_std"] == 0.0
    assert m["n_gallery"] == 4 and m["n_probes"] == 4  # vehicle 17 has one image: gallery only
    np.testing.assert_array_equal(m["cmc"], np.ones(4))


def test_known_partial_top1():
    # vehicles A (rows 0,1) and B (rows 2,3); B's images point opposite ways, and A's
    # images sit between them, so whichever B image is the gallery, the other B image
    # is nearer A's gallery image than B's: B's probe misses at Top-1, A's hits
    x = np.array([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.0, -1.0]], np.float32)
    m = vehicleid_protocol(x, np.array([0, 0, 1, 1]), repeats=5, ks=(1, 2))
    assert m["top1"] == 0.5 and m["top2"] == 1.0
    assert m["map"] == pytest.approx(0.75)  # AP 1 for A's probe, 1/2 for B's


def test_sample_gallery_one_per_vehicle():
    vids = np.array([3, 1, 3, 2, 1, 3])
    seen = set()
    for seed in range(30):
        g = sample_gallery(vids, np.random.default_rng(seed))
        np.testing.assert_array_equal(vids[g], [1, 2, 3])
        seen.add(tuple(g))
    assert len(seen) == 6  # 2 choices for vehicle 1 x 3 for vehicle 3, all drawn


def _protocol_reference(x, vids, repeats, seed, ks, max_rank=50):
    """Full float64 similarity matrix per repeat; rank = 1 + #gallery images scored higher."""
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = np.unique(vids, return_inverse=True)[1]
    tops = {k: [] for k in ks}
    maps, cmcs = [], []
    for r in range(repeats):
        gallery = sample_gallery(codes, np.random.default_rng(seed + r))
        probes = [i for i in range(len(x)) if i not in set(gallery.tolist())]
        ranks = []
        for p in probes:
            sims = x[gallery] @ x[p]
            own = sims[list(codes[gallery]).index(codes[p])]
            ranks.append(1 + int(np.sum(sims > own)))
        ranks = np.array(ranks)
        for k in ks:
            tops[k].append(np.mean(ranks <= k))
        maps.append(np.mean(1.0 / ranks))
        cmcs.append([np.mean(ranks <= k) for k in range(1, min(max_rank, len(gallery)) + 1)])
    return tops, maps, np.mean(cmcs, axis=0)


@pytest.mark.parametrize("seed, n_vehicles", [(0, 40), (1, 80), (2, 30)])
def test_matches_brute_force(seed, n_vehicles):
    rng = np.random.default_rng(seed)
    vids = rng.integers(0, n_vehicles, size=300) * 7 + 1000  # sparse, non-contiguous ids
    x = rng.normal(size=(300, 16)).astype(np.float32)
    tops, maps, cmc = _protocol_reference(x, vids, repeats=4, seed=seed, ks=(1, 5))
    m = vehicleid_protocol(x, vids, repeats=4, seed=seed, ks=(1, 5), chunk_size=13)
    for k in (1, 5):
        assert m[f"top{k}"] == pytest.approx(np.mean(tops[k]), abs=1e-6)
        assert m[f"top{k}_std"] == pytest.approx(np.std(tops[k]), abs=1e-6)
    assert m["map"] == pytest.approx(np.mean(maps), abs=1e-6)
    assert m["map_std"] == pytest.approx(np.std(maps), abs=1e-6)
    np.testing.assert_allclose(m["cmc"], cmc, atol=1e-6)
    assert len(m["cmc"]) == min(50, len(np.unique(vids)))


def test_k_beyond_curve_length():
    rng = np.random.default_rng(0)
    vids = np.repeat(np.arange(60), 2)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    m = vehicleid_protocol(x, vids, repeats=1, ks=(1, 55))
    tops, _, _ = _protocol_reference(x, vids, 1, 0, (55,))
    assert m["top55"] == pytest.approx(tops[55][0])
    assert len(m["cmc"]) == 50


def test_bad_inputs_raise():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no probes"):
        vehicleid_protocol(x, np.arange(3))
    with pytest.raises(ValueError, match="shape"):
        vehicleid_protocol(x, np.arange(4))
    with pytest.raises(ValueError, match="k must be in"):
        vehicleid_protocol(x, np.array([0, 0, 1]), ks=(3,))
