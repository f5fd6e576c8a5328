"""PKU VehicleID evaluation protocol (Liu et al., 2016).

For each repeat one random image per vehicle forms the gallery and every other
image is a probe; a probe is ranked against the whole gallery (cosine
similarity, exact FAISS search in probe chunks), and the rank of its vehicle's
single gallery image gives CMC (match rate at Top-k) and AP = 1 / rank.
Results are averaged over repeats with seeds ``seed .. seed + repeats - 1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pipeline.eval.retrieval import build_index, iter_knn, normalize

CMC_MAX_RANK = 50
"""Length of the returned CMC curve (capped at the number of vehicles)."""


def read_test_list(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse a VehicleID split file (``test_list_800.txt`` etc.) into ``(image_name, vehicle_id)``.

    Each non-blank line is ``<image name> <vehicle id>`` (e.g. ``0000084 0002``);
    the vehicle id is returned as an int. Raises ValueError naming the file and
    line for a line without exactly two fields or with a non-integer id;
    OSError if the file cannot be read.
    """
    path = os.fspath(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2 or not tokens[1].isdigit():
                raise ValueError(f"{path}:{line_no}: expected '<image name> <vehicle id>', got {line.strip()!r}")
            out.append((tokens[0], int(tokens[1])))
    return out


def sample_gallery(vehicle_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the row indices of one uniformly random image per vehicle, ordered by vehicle id."""
    vehicle_ids = np.asarray(vehicle_ids)
    # a random key per row, then sort by (vehicle, key): the first row of each vehicle is a uniform pick
    order = np.lexsort((rng.random(len(vehicle_ids)), vehicle_ids))
    sorted_ids = vehicle_ids[order]
    first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]
    return order[first]


def vehicleid_protocol(
    embeddings: np.ndarray,
    vehicle_ids: np.ndarray,
    repeats: int = 10,
    seed: int = 0,
    ks: Sequence[int] = (1, 5),
    *,
    chunk_size: int = 4096,
) -> dict:
    """Return VehicleID CMC and mAP, averaged over ``repeats`` random gallery draws.

    Keys: ``top{k}`` and ``top{k}_std`` for each k (match rate: fraction of
    probes whose vehicle's gallery image is within the k nearest gallery images);
    ``map`` and ``map_std`` (mean over probes of 1 / rank of that image); ``cmc``,
    a float64 array whose entry r-1 is the mean match rate at rank r, for r up to
    min(50, number of vehicles); ``n_gallery`` and ``n_probes`` (the same every
    repeat). Std is over repeats (ddof=0). Vehicles with a single image appear
    only in the gallery. Ties between gallery images are ordered arbitrarily by
    FAISS. Raises ValueError on mismatched shapes, repeats < 1, a k < 1 or
    larger than the number of vehicles, or when no vehicle has two images.
    """
    x = normalize(embeddings)
    vids = np.asarray(vehicle_ids)
    if vids.shape != (len(x),):
        raise ValueError(f"vehicle_ids must have shape ({len(x)},) to match the embeddings, got {vids.shape}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    vehicles, codes = np.unique(vids, return_inverse=True)
    codes = codes.reshape(-1)
    n_gallery = len(vehicles)
    n_probes = len(x) - n_gallery
    if n_probes == 0:
        raise ValueError("no vehicle has two images, so there are no probes")
    ks = [int(k) for k in ks]
    if any(not 1 <= k <= n_gallery for k in ks):
        raise ValueError(f"every k must be in [1, {n_gallery}] (the number of vehicles), got ks={ks}")

    max_rank = min(CMC_MAX_RANK, n_gallery)
    curve_len = max([max_rank] + ks)
    cmc = np.empty((repeats, curve_len))
    maps = np.empty(repeats)
    for r in range(repeats):
        gallery = sample_gallery(codes, np.random.default_rng(seed + r))
        probes = np.setdiff1d(np.arange(len(x)), gallery, assume_unique=True)
        ranks = _true_match_ranks(x[gallery], codes[gallery], x[probes], codes[probes], chunk_size)
        cmc[r] = np.searchsorted(np.sort(ranks), np.arange(1, curve_len + 1), side="right") / len(ranks)
        maps[r] = np.mean(1.0 / ranks)

    out: dict = {}
    for k in ks:
        top = cmc[:, k - 1]
        out[f"top{k}"] = float(top.mean())
        out[f"top{k}_std"] = float(top.std())
    out["map"] = float(maps.mean())
    out["map_std"] = float(maps.std())
    out["cmc"] = cmc[:, :max_rank].mean(axis=0)
    out["n_gallery"] = n_gallery
    out["n_probes"] = n_probes
    return out


def _true_match_ranks(
    gallery: np.ndarray, gallery_codes: np.ndarray, probes: np.ndarray, probe_codes: np.ndarray, chunk_size: int
) -> np.ndarray:
    """Return the 1-based rank of each probe's own-vehicle gallery image among all gallery images."""
    # gallery_codes is sorted and holds each vehicle once, so code -> gallery row is a lookup
    target = np.searchsorted(gallery_codes, probe_codes)
    n_gallery = len(gallery)
    index = build_index(gallery, k=n_gallery)
    ranks = np.empty(len(probes), dtype=np.int64)
    # full ranking (k = gallery size, chunk rows shrink to bound memory) so that AP = 1 / rank
    # is exact rather than truncated at rank 50
    for start, _, ids in iter_knn(index, probes, n_gallery, chunk_size=chunk_size):
        hit = ids == target[start : start + len(ids), None]
        ranks[start : start + len(ids)] = hit.argmax(axis=1) + 1
    return ranks
