"""Gallery search without Ray: top-k against brute force, self-exclusion, Recall@K, index files, gallery files, the picture."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.gallery import folder_key_label, read_gallery, write_gallery
from pipeline.eval.retrieval import recall_at_k
from pipeline.eval.search import GREEN, RED, gallery_index, matches_picture, recall_at, search


def _data(n=60, d=8, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.asarray([f"c{i % classes}" for i in range(n)], dtype=object)
    keys = np.asarray([f"{lab}/{i}.jpg" for i, lab in enumerate(labels)], dtype=object)
    return emb, labels, keys


def test_top_k_is_brute_force_and_excludes_the_query_itself():
    emb, labels, keys = _data()
    index = gallery_index(emb, k=6)
    sims = emb @ emb.T
    scores, ids = search(index, emb, 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(emb)))  # without exclusion, a query finds itself
    scores, ids = search(index, emb, 5, keys, keys)
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(ids, np.argsort(-sims, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :5], atol=1e-6)
    # Search's Recall@K over the gallery as queries is retrieval's recall_at_k.
    assert recall_at(list(labels), labels, ids, ks=(1, 5)) == pytest.approx(recall_at_k(emb, labels.astype(str), ks=(1, 5)))
    # Queries not in the gallery keep all k (the k + 1-th is dropped instead).
    scores2, ids2 = search(index, emb[:3] + 0.01, 5, np.asarray(["new0", "new1", "new2"]), keys)
    assert ids2.shape == (3, 5) and (ids2[:, 0] == np.arange(3)).all()


def test_recall_ignores_unlabelled_queries_and_k_is_checked():
    emb, labels, keys = _data(n=10)
    _, ids = search(gallery_index(emb), emb, 2, keys, keys)
    assert recall_at([None] * 10, labels, ids) == {}
    with pytest.raises(ValueError, match="between 1 and 9"):
        search(gallery_index(emb), emb, 10, keys, keys)


def test_index_file_is_written_then_read_and_checked(tmp_path):
    emb, _, _ = _data()
    path = tmp_path / "g.faiss"
    built = gallery_index(emb, path)
    assert path.is_file()
    read = gallery_index(emb, path)
    np.testing.assert_array_equal(search(built, emb, 3)[1], search(read, emb, 3)[1])
    with pytest.raises(ValueError, match="built for another gallery"):
        gallery_index(emb[:10], path)


def test_gallery_file_round_trip_and_bad_files(tmp_path):
    emb, labels, keys = _data(n=5)
    labels[2] = None
    rows = {"key": keys, "label": labels, "source": np.asarray([f"/x/{k}" for k in keys], dtype=object), "embedding": emb}
    write_gallery(tmp_path / "g.parquet", rows, "runs:/abc/model", 32)
    g = read_gallery(tmp_path / "g.parquet")
    np.testing.assert_array_equal(g["embedding"], emb)
    assert list(g["key"]) == list(keys) and g["label"][2] is None and g["label"][0] == "c0"
    assert g["meta"] == {"model_uri": "runs:/abc/model", "image_size": "32", "dim": "8"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other.parquet' is not a gallery file of jobs.embed: no column embedding, label, source"):
        read_gallery(tmp_path / "other.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_gallery(tmp_path / "missing.parquet")


def test_folder_keys_and_labels():
    assert folder_key_label("/d/alice/1.jpg", "/d") == ("alice/1.jpg", "alice")
    assert folder_key_label("/d/1.jpg", "/d") == ("1.jpg", None)
    assert folder_key_label("/d/a/b/1.jpg", "/d") == ("a/b/1.jpg", None)


def test_matches_picture_frames_right_green_and_wrong_red(tmp_path):
    from PIL import Image

    img = tmp_path / "i.png"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(img)
    gallery = {"key": np.asarray(["a", "b", "c"]), "label": np.asarray(["x", "y", None], dtype=object),
               "source": np.asarray([str(img)] * 3)}
    queries = [{"key": "q", "label": "x", "source": str(img)}]
    path = matches_picture(tmp_path / "m.png", queries, gallery, np.asarray([[0, 1, 2]]), np.asarray([[0.9, 0.5, 0.1]]))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    frame = (96 + 12) ** 2 - 96 ** 2
    assert ((rgb == GREEN).all(axis=2)).sum() == frame and ((rgb == RED).all(axis=2)).sum() == frame
