"""Search a gallery with query embeddings: a FAISS index, each query's top-k, Recall@K, and a picture of the matches.

The index is exact inner product over the L2-normalised gallery embeddings (cosine
similarity; ``pipeline.eval.retrieval.build_index``: a GPU index when FAISS sees a GPU). It
holds the gallery once: 4 x d bytes per image, ~0.26 GB at d = 128 for CASIA-WebFace
(0.5M images), ~21.5 GB for WebFace42M (42M images): past a few million images an IVF or
HNSW index would be the choice (not built here). Queries are searched in chunks
(``iter_knn``), so the results are ``queries x k``, never ``queries x gallery``.

``matches.png``: one row per query (at most ``max_rows``), the query image, then its top-k
gallery images; with labels known, a match of the query's label is framed green, another
red (grey when a label is unknown).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from pipeline.eval.retrieval import GPU_MAX_K, drop_self, build_index, faiss, iter_knn, normalize

GREEN = (0, 170, 0)
RED = (220, 0, 0)
GREY = (150, 150, 150)
QUERY = (40, 90, 200)
"""Frame colours of matches.png: same label, other label, unknown, the query itself."""


def gallery_index(embeddings: np.ndarray, path: str | Path | None = None, k: int = 1):
    """The index over ``embeddings``: read from ``path`` when that file exists, else built (and written there).

    A read index must hold as many vectors as the gallery (else ValueError naming the file:
    it belongs to another gallery). Returns the index (on the GPU when FAISS sees one).
    """
    if path is not None and Path(path).is_file():
        index = faiss.read_index(str(path))
        if index.ntotal != len(embeddings) or index.d != embeddings.shape[1]:
            raise ValueError(f"index '{path}' holds {index.ntotal} vectors of dimension {index.d}, the gallery "
                             f"{len(embeddings)} of {embeddings.shape[1]}: it was built for another gallery")
        return index
    index = build_index(normalize(embeddings, name="gallery embeddings"), k=k)
    if path is not None:
        cpu = faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ \
            else index
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(cpu, str(path))
    return index


def search(index, queries: np.ndarray, k: int, query_keys=None, gallery_keys=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows of each query: ``(scores (q, k), ids (q, k))``, best first.

    With ``query_keys`` and ``gallery_keys`` a query never matches the gallery row with its
    own key (the query is part of the gallery): k + 1 are searched and that row dropped.
    Raises ValueError when k exceeds the gallery (minus one when excluding itself).
    """
    q = normalize(queries, name="query embeddings")
    exclude = query_keys is not None and gallery_keys is not None
    n = index.ntotal - (1 if exclude else 0)
    if not 1 <= k <= n:
        raise ValueError(f"--k {k} must be between 1 and {n} (the gallery's size{' minus the query' if exclude else ''})")
    if k + 1 > GPU_MAX_K and "Gpu" in type(index).__name__:
        raise ValueError(f"--k {k}: FAISS GPU search returns at most {GPU_MAX_K - 1} neighbours here")
    where = {key: i for i, key in enumerate(gallery_keys)} if exclude else {}
    scores, ids = [], []
    for start, s, i in iter_knn(index, q, k + 1 if exclude else k):
        if exclude:
            own = np.asarray([where.get(key, -2) for key in query_keys[start : start + len(s)]], dtype=np.int64)
            s, i = drop_self(s, i, own)  # a query not in the gallery drops its last (k + 1-th) row
        scores.append(s)
        ids.append(i)
    return np.concatenate(scores), np.concatenate(ids)


def recall_at(query_labels, gallery_labels, ids: np.ndarray, ks=(1,)) -> dict[int, float]:
    """``{k: fraction of labelled queries with a same-label row among their first k}``; {} when no query has a label."""
    has = np.asarray([lab is not None for lab in query_labels])
    if not has.any():
        return {}
    ql = np.asarray(query_labels, dtype=object)[has]
    hit = np.asarray(gallery_labels, dtype=object)[ids[has]] == ql[:, None]
    return {k: float(hit[:, :k].any(axis=1).mean()) for k in ks if k <= ids.shape[1]}


def results_lines(query_keys, query_labels, gallery: dict, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
    """One dict per query: ``{"query", "label", "matches": [{"key", "label", "score"}, ...]}``."""
    out = []
    for qi, key in enumerate(query_keys):
        matches = [{"key": str(gallery["key"][g]), "label": gallery["label"][g], "score": round(float(s), 6)}
                   for s, g in zip(scores[qi], ids[qi])]
        out.append({"query": str(key), "label": query_labels[qi], "matches": matches})
    return out


def load_image(source: str, key: str) -> np.ndarray | None:
    """The pixels of a gallery or query row: the image file ``source``, or sample ``key`` of the tar shard ``source``.

    Returns uint8 (H, W, 3), or None when it cannot be read (a remote shard, a deleted file).
    """
    from PIL import Image

    try:
        if source.endswith(".tar"):
            with tarfile.open(source) as t:
                data = t.extractfile(f"{key}.jpg").read()
        else:
            data = Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, KeyError, AttributeError, tarfile.TarError):
        return None


def matches_picture(path: str | Path, queries: list[dict], gallery: dict, ids: np.ndarray, scores: np.ndarray,
                    max_rows: int = 20, cell: int = 96, frame: int = 6) -> Path:
    """Draw ``matches.png``: per query a row of the query then its matches, framed by correctness.

    ``queries``: per query ``{"key", "label", "source"}``. Unreadable images are drawn as a
    grey cell. Returns the path.
    """
    from PIL import Image, ImageDraw

    rows = min(len(queries), max_rows)
    k = ids.shape[1]
    pad, text_h = 4, 14
    w = (k + 1) * (cell + 2 * frame + pad) + pad
    h = rows * (cell + 2 * frame + text_h + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def put(col: int, row: int, pixels, colour, caption: str) -> None:
        x = pad + col * (cell + 2 * frame + pad)
        y = pad + row * (cell + 2 * frame + text_h + pad)
        draw.rectangle([x, y, x + cell + 2 * frame - 1, y + cell + 2 * frame - 1], fill=colour)
        tile = Image.new("RGB", (cell, cell), GREY) if pixels is None else Image.fromarray(pixels).resize((cell, cell))
        canvas.paste(tile, (x + frame, y + frame))
        draw.text((x, y + cell + 2 * frame), caption[:18], fill=(0, 0, 0))

    for r in range(rows):
        q = queries[r]
        put(0, r, load_image(q["source"], q["key"]), QUERY, f"query {q['label'] or ''}")
        for c in range(k):
            g = int(ids[r, c])
            glabel = gallery["label"][g]
            colour = GREY if q["label"] is None or glabel is None else (GREEN if glabel == q["label"] else RED)
            put(c + 1, r, load_image(gallery["source"][g], gallery["key"][g]), colour,
                f"{glabel or '?'} {scores[r, c]:.3f}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
