"""Class-grouped WebDataset shards and their manifest.

``write_shards`` turns identities (from a layout) into tar shards where all images of a
class are contiguous and a class never straddles two shards (a class larger than a
shard gets consecutive shards of its own). Classes fill the train and holdout shards in a
seeded random order (by ``seed``; not name order), so neighbouring shards hold unrelated
classes (exemplar shards keep id order); class ids stay the index of the class in name
order, and each shard's manifest entry lists its classes in tar order (``class_order``).
Each sample is ``<key>.jpg`` + ``<key>.cls`` (the integer class id as ASCII), plus
``<key>.<field>`` (an ASCII integer) for each per-image extra label the layout gives
(``ClassItems.extras``; VehicleID: ``model``, ``color``); the manifest lists them in
``extra_fields`` (and, per class, ``classes[i].extras``: the value its images share, or null).
Readers that ask only for ``jpg`` and ``cls`` never see them.
``OUT/manifest.json`` records class id <-> name, image counts, the shards holding each
class and every shard's SHA-256, which also makes conversion resumable: a rerun keeps
shards whose checksum matches and rewrites the rest. Beside it, ``OUT/index-<split>.json``
and ``.bin`` index every sample (shard, byte offset and size of its ``.jpg``, label, extra
fields) for positional reads: ``pipeline.data.index``, which also builds it for a shard set
written before it existed (``python -m jobs.make_shards --reindex OUT``).

With ``exemplars=k`` it also writes ``OUT/exemplars/``: the first k images of every
TRAIN class, class-grouped in the same sample format, which the hard negative class
miner embeds at each refresh (``data.exemplars``). They are listed apart from the
train/holdout shards (``manifest["exemplar_shards"]``, ``splits.exemplars``) so that
everything keyed on ``shards`` still sees each image once; ``OUT/train`` never holds them.

Splits: a random ``holdout_fraction`` of the classes, or a fixed set of class names
(``holdout_classes``: VehicleID's test lists, all of LFW).

Image size: with ``image_size`` > 0 every image is resized to image_size x image_size at
conversion (exactly what the stream would otherwise do at every read), decoding JPEGs with
libjpeg's DCT-domain downscaling (``Image.draft``: 250 -> 125 before the resize to 112).
Why at conversion, measured with ``python bench/bench_shards.py`` (2026-11-29, 2-core CPU
under load average 15-40, one process, ratios of the same run): converting 250x250 faces to
112 runs at 0.76-1.05x a plain PIL decode+encode loop of the same images (keeping the bytes:
0.8-1.4x), while the stream's decode of the stored 112x112 JPEGs is 5.9-7.1x faster than of
250x250 ones plus resize, every epoch, and shards are 5x smaller (3.5 vs 18.3 kB/image). For
320x320 -> 224 (vehicles): conversion 0.53-0.56x the loop, read 1.9-2.9x faster, 2x smaller;
the extra conversion cost is repaid within ~2 epochs. 0 keeps the source bytes (JPEGs are
copied byte for byte; the stream then resizes at read time). The size is recorded in the
manifest; a rerun with another size rewrites every shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.layouts import ClassItems
from pipeline.data.manifest import MANIFEST, ShardError


@dataclass
class _Planned:
    path: str  # relative to OUT
    split: str
    members: list[tuple[int, ClassItems]]


def _encode(src: Path | bytes, size: int = 0) -> bytes:
    """Return JPEG bytes for an image, re-encoding non-JPEG sources and, with ``size`` > 0,
    images that are not ``size`` x ``size`` (resized to it); raises on unreadable input."""
    from PIL import Image

    data = src if isinstance(src, bytes) else Path(src).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        resize = size > 0 and im.size != (size, size)
        if resize and im.format == "JPEG":
            im.draft("RGB", (size, size))  # libjpeg decodes at the smallest 1/k scale still >= size
        im.load()  # full decode: catches truncated files that verify() lets through
        if not resize and im.format == "JPEG" and im.mode == "RGB":
            return data
        out = im.convert("RGB")
        if resize:
            out = out.resize((size, size), Image.BILINEAR, reducing_gap=None)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes -> stable checksums across reruns
    tar.addfile(info, io.BytesIO(data))


def _write_one(out: str, plan: _Planned, image_size: int = 0, fields: list[str] = (),
               num_classes: int | None = None):
    """Write one shard atomically (tmp file + rename), then scan it for the per-sample index.

    Returns ``(manifest entry with its problems, pipeline.data.index.ShardScan)``; the scan's
    checksum is the entry's (one read of the written file for both).
    """
    from pipeline.data.index import scan_shard  # here: index.py imports this module (ShardError)

    final = Path(out) / plan.path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".tar.tmp")
    counts: dict[int, int] = {}
    problems, seen = [], set()
    with tarfile.open(tmp, "w") as tar:
        for cid, items in plan.members:
            for i, (src, key) in enumerate(zip(items.images, items.keys)):
                try:
                    jpg = _encode(src, image_size)
                except FileNotFoundError:
                    problems.append(f"missing image (skipped): {src}")
                    continue
                except Exception as e:  # PIL raises many types for bad files
                    where = src if isinstance(src, Path) else f"{items.name}/{key}"
                    problems.append(f"unreadable image (skipped): {where}: {type(e).__name__}: {e}")
                    continue
                base = f"{cid:07d}_{key}".replace(".", "_")
                skey, n = base, 1
                while skey in seen:  # x.jpg + x.png, or x.y + x_y: WebDataset rejects a repeated key
                    skey, n = f"{base}_{n}", n + 1
                seen.add(skey)
                _add(tar, f"{skey}.jpg", jpg)
                _add(tar, f"{skey}.cls", str(cid).encode())
                for fname, values in sorted(items.extras.items()):
                    _add(tar, f"{skey}.{fname}", str(int(values[i])).encode())
                counts[cid] = counts.get(cid, 0) + 1
    os.replace(tmp, final)
    scan = scan_shard(final, list(fields), num_classes)
    return {
        "path": plan.path,
        "split": plan.split,
        "classes": sorted(counts),
        "class_order": [cid for cid, _ in plan.members if cid in counts],
        "counts": {str(k): v for k, v in sorted(counts.items())},
        "count": sum(counts.values()),
        "sha256": scan.sha256,
        "problems": problems,
    }, scan


def _check_extras(classes: list[ClassItems]) -> list[str]:
    """Return the sorted extra field names shared by all classes; ValueError when they differ or misalign."""
    fields = sorted(classes[0].extras) if classes else []
    for c in classes:
        if sorted(c.extras) != fields:
            raise ValueError(f"class '{c.name}' has extra fields {sorted(c.extras)}, others have {fields}: "
                             "every sample of a shard set must carry the same fields")
        for f, values in c.extras.items():
            if len(values) != len(c.images):
                raise ValueError(f"class '{c.name}': extra field '{f}' has {len(values)} values "
                                 f"for {len(c.images)} images")
    bad = [f for f in fields if f in ("jpg", "cls") or not f.isidentifier()]
    if bad:
        raise ValueError(f"extra field names {bad} are reserved or not plain names (letters, digits, _)")
    return fields


def _class_extras(items: ClassItems) -> dict[str, int | None]:
    """Per extra field, the class's value when all its images share it (VehicleID's model
    and colour are vehicle attributes), else None. Lets a reader map class id -> label
    from the manifest without reading the per-sample fields."""
    return {f: (int(v[0]) if v and all(x == v[0] for x in v) else None) for f, v in sorted(items.extras.items())}


def _plan(split: str, members: list[tuple[int, ClassItems]], shard_size: int) -> list[_Planned]:
    plans, cur, n = [], [], 0

    def flush():
        nonlocal cur, n
        if cur:
            plans.append(_Planned(f"{split}/{split}-{len(plans):06d}.tar", split, cur))
        cur, n = [], 0

    for cid, items in members:
        m = len(items.images)
        if m > shard_size:
            # A huge class gets shards of its own, cut into chunks of whole pairs.
            flush()
            step = max(2, shard_size - shard_size % 2)
            for s in range(0, m, step):
                cur = [(cid, items.subset(slice(s, s + step)))]
                flush()
            continue
        if n + m > shard_size:
            flush()
        cur.append((cid, items))
        n += m
    flush()
    return plans


def write_shards(
    classes: list[ClassItems],
    out: str | Path,
    *,
    holdout_fraction: float = 0.5,
    shard_size: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    layout: str = "imagefolder",
    problems: list[str] | None = None,
    progress: bool = True,
    exemplars: int = 0,
    holdout_classes: set[str] | None = None,
    image_size: int = 0,
    val_fraction: float = 0.0,
) -> dict:
    """Write class-grouped shards of ``classes`` to ``OUT/train`` and ``OUT/holdout`` (and ``OUT/val``).

    With ``exemplars`` > 0 also ``OUT/exemplars``: the first ``exemplars`` images of each
    train class (for the miner's refresh; ``jobs.make_shards`` writes 2 by default).

    A random ``holdout_fraction`` of the classes (by ``seed``) goes to ``holdout``, or, when
    ``holdout_classes`` is given, exactly the classes with those names (all of them is
    allowed: an evaluation-only set such as LFW); class ids are the index of the class in
    name order, while the order in which classes fill each split's shards is a permutation
    drawn from ``seed`` (reproducible, independent of the holdout draw). With
    ``val_fraction`` > 0, that fraction of the classes not held out (rounded, by its own
    generator from ``seed``: the held-out classes stay those of ``val_fraction`` 0, while the
    order of the classes in the shards is drawn anew) goes to ``OUT/val`` instead of
    ``train``: a validation split for
    ``eval.data``, so that choosing the best checkpoint does not look at the held-out
    classes whose figures are reported (Musgrave et al. 2020, "A Metric Learning Reality
    Check"). Per-image
    ``extras`` of the classes are written as ``<key>.<field>``; every class must carry the
    same fields. ``image_size`` > 0 resizes images to that square side.
    Unreadable and missing images are skipped and listed in the manifest's ``problems``
    (after the ``problems`` of the layout scan). Shards already on disk with the checksum
    recorded in an existing manifest (written with the same ``image_size`` and extra
    fields, and classes in the same order) are kept (resume). The per-sample index of each
    split (``pipeline.data.index``) is written after the manifest.
    Returns the manifest (also written to ``OUT/manifest.json``). Raises ValueError for an
    argument out of range, a holdout class name that is not a class, or extras that differ
    between classes or do not match the number of images.
    """
    out = Path(out)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 2:
        raise ValueError(f"--shard-size must be >= 2, got {shard_size}")
    if image_size < 0:
        raise ValueError(f"--image-size must be >= 0 (0 = keep), got {image_size}")
    classes = sorted(classes, key=lambda c: c.name)
    extra_fields = _check_extras(classes)
    if holdout_classes is not None:
        unknown = set(holdout_classes) - {c.name for c in classes}
        if unknown:
            raise ValueError(f"{len(unknown)} holdout classes are not among the classes (first: {sorted(unknown)[:3]})")
        hold_ids = {cid for cid, c in enumerate(classes) if c.name in holdout_classes}
    else:
        rng = np.random.default_rng(seed)
        n_hold = int(round(len(classes) * holdout_fraction))
        hold_ids = set(rng.permutation(len(classes))[:n_hold].tolist())
    kept = [cid for cid in range(len(classes)) if cid not in hold_ids]
    n_val = int(round(len(kept) * val_fraction))
    if n_val and n_val >= len(kept) - 1:
        raise ValueError(f"--val-fraction {val_fraction:g} leaves {len(kept) - n_val} of {len(kept)} classes not held "
                         f"out for training: at least 2 are needed")
    val_ids = {kept[i] for i in np.random.default_rng([seed, 2]).permutation(len(kept))[:n_val].tolist()}
    split_of = {cid: "holdout" if cid in hold_ids else "val" if cid in val_ids else "train"
                for cid in range(len(classes))}
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "holdout": []} | ({"val": []} if val_ids else {})
    for cid, items in enumerate(classes):
        splits[split_of[cid]].append((cid, items))
    # Shards hold classes in a seeded random order, not name order, so that the classes read
    # together (a shard, neighbouring shards) are a random set. Its own generator: the
    # holdout draw above stays what it was for a seed.
    order_rng = np.random.default_rng([seed, 1])
    for split, members in splits.items():
        splits[split] = [members[i] for i in order_rng.permutation(len(members))]
    if exemplars < 0:
        raise ValueError(f"--exemplars-per-class must be >= 0, got {exemplars}")
    plans = [p for split, members in splits.items() for p in _plan(split, members, shard_size)]
    # Exemplars stay in id order: the miner embeds them all at each refresh, nothing samples them.
    by_id = sorted(splits["train"], key=lambda member: member[0])
    ex_members = [(cid, it.subset(slice(0, exemplars))) for cid, it in by_id] if exemplars else []
    ex_plans = _plan("exemplars", ex_members, shard_size)

    old = {}
    if (out / MANIFEST).exists():
        try:
            prev_manifest = json.loads((out / MANIFEST).read_text())
            old = {s["path"]: s for s in prev_manifest["shards"] + prev_manifest.get("exemplar_shards", [])}
            same_bytes = (prev_manifest.get("image_size", 0), prev_manifest.get("extra_fields", [])) == (
                image_size, extra_fields)
            if not same_bytes:
                old = {}  # same classes, different bytes: nothing on disk can be kept
        except (ValueError, KeyError, TypeError):
            old = {}
    # Imported here: index.py imports this module (ShardError, MANIFEST).
    from pipeline.data.index import remove_index, scan_shard, write_index

    entries, scans, todo = {}, {}, []
    for p in plans + ex_plans:
        prev = old.get(p.path)
        f = out / p.path
        scan = None
        if (prev and f.exists() and prev["classes"] == sorted({c for c, _ in p.members})
                and prev.get("class_order") == [c for c, _ in p.members]):
            try:
                scan = scan_shard(f, extra_fields, len(classes))
            except ShardError:
                scan = None  # unreadable: rewritten below
        if scan is not None and scan.sha256 == prev["sha256"]:
            entries[p.path], scans[p.path] = prev, scan
        else:
            todo.append(p)
    t0 = time.time()
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    if progress:
        print(f"[make_shards] {len(plans) + len(ex_plans)} shards ({len(plans) + len(ex_plans) - len(todo)} already done), "
              f"{sum(len(c.images) for c in classes)} images, {workers} workers", flush=True)
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(_write_one, str(out), p, image_size, extra_fields, len(classes)): p for p in todo}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            e, scan = fut.result()
            entries[e["path"]], scans[e["path"]] = e, scan
            if progress:
                print(f"[make_shards] {i}/{len(todo)} {e['path']}: {e['count']} images "
                      f"({time.time() - t0:.1f}s)", flush=True)
    shard_list = [entries[p.path] for p in plans]
    # Exemplars are copies of train images: their problems are already reported by the train shards.
    ex_list = [entries[p.path] for p in ex_plans]
    all_problems = list(problems or []) + [q for e in shard_list for q in e.get("problems", [])]
    per_class: dict[int, dict] = {}
    for e in shard_list:
        for cid_s, cnt in e["counts"].items():
            c = per_class.setdefault(int(cid_s), {"count": 0, "shards": []})
            c["count"] += cnt
            c["shards"].append(e["path"])
    manifest = {
        "format": "dml-pipeline/shards-v1",
        "layout": layout,
        "seed": seed,
        "holdout_fraction": holdout_fraction if holdout_classes is None else len(hold_ids) / max(1, len(classes)),
        "holdout_fixed": holdout_classes is not None,
        "val_fraction": val_fraction,
        "image_size": image_size,
        "extra_fields": extra_fields,
        "classes": [
            {
                "id": cid,
                "name": items.name,
                "split": split_of[cid],
                "count": per_class.get(cid, {}).get("count", 0),
                "shards": per_class.get(cid, {}).get("shards", []),
            }
            | ({"extras": _class_extras(items)} if extra_fields else {})
            for cid, items in enumerate(classes)
        ],
        # Per-shard problems stay in the entry: a resumed run keeps the shard and must still report them.
        "shards": shard_list,
        "splits": {
            s: {
                "classes": len({c for e in shard_list if e["split"] == s for c in e["classes"]}),
                "images": sum(e["count"] for e in shard_list if e["split"] == s),
                "shards": sum(1 for e in shard_list if e["split"] == s),
            }
            for s in splits
        }
        | {
            "exemplars": {
                "classes": len({c for e in ex_list for c in e["classes"]}),
                "images": sum(e["count"] for e in ex_list),
                "shards": len(ex_list),
                "per_class": exemplars,
            }
        },
        "exemplar_shards": ex_list,
        "problems": all_problems,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for split in splits:
        write_index(out, split, [e for e in shard_list if e["split"] == split], scans, extra_fields)
    if "val" not in splits:
        remove_index(out, "val")
    if ex_list:
        write_index(out, "exemplars", ex_list, scans, extra_fields)
    else:
        remove_index(out, "exemplars")
    return manifest
