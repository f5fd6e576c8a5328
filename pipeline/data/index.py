"""Per-sample index of a shard set: any sample's JPEG bytes by one positional read.

For each split (``train``, ``holdout``; ``val`` and ``exemplars`` when they have shards) the
shard set directory ``OUT`` holds two files beside ``manifest.json``:

* ``index-<split>.json``, the header: ``format`` (``dml-pipeline/index-v1``), ``rows``, the
  ``columns`` (name -> little-endian dtype and byte offset in the ``.bin``), the split's
  ``shards`` in manifest order (``path`` relative to OUT, ``sha256``, ``bytes``, ``rows``,
  ``first_row``), the ``extra_fields`` and the ``skipped`` samples (shard, key, reason);
* ``index-<split>.bin``, the columns back to back (64-byte aligned), one value per sample:
  ``shard`` (uint32: position in the header's ``shards``, which for ``train`` is also the
  position in ``manifest["shards"]`` and in the sorted ``OUT/train`` listing the reader
  numbers shards by), ``offset`` (uint64: byte offset of the ``.jpg`` payload in the
  tar), ``size`` (uint32: its length), ``label`` (int32: class id) and one int32 column per
  extra field (``<key>.<field>`` of VehicleID: ``model``, ``color``; -1 when absent).

Rows go shard by shard in manifest order, samples in tar order, so the sample id is the row
and each class is one contiguous range of rows (:func:`class_ranges`). Only samples with a
``.jpg`` and a ``.cls`` naming a manifest class are rows; others are listed in ``skipped``.
Columns are memory-mapped: opening an index reads the header and nothing else, and a read
touches the pages of the rows it asks for.

Size: 20 bytes per sample (+4 per extra field) plus ~200 bytes of header per shard:
CASIA-WebFace (494k images, 10.5k classes, ~495 shards of 1000) 9.9 MB + 97 kB;
WebFace42M (42.5M images, 2.06M classes, ~42.5k shards) 849 MB + 8.3 MB, over all splits
(a ``val`` split moves rows out of ``train``: ``--val-fraction 0.01`` of WebFace42M's train
classes is ~8 MB of them). On disk; the
columns are memory-mapped, so a reader holds only the pages it touches (a batch of 384:
at most 384 pages per column), and :func:`class_ranges` reads the 170 MB ``label`` column once.

Why our own sidecar and not WebDataset's ``wids``: a ``wids`` index (``ShardListDataset``'s
JSON) holds per shard only its URL and sample count; each process rebuilds the sample
offsets by scanning every tar header when it first opens a shard (mmap), and keeps at most
``lru_size`` (default 10) shards open, re-scanning on a miss. Measured with
``python bench/bench_index.py`` (2026-12-01, 2-core CPU shared with other jobs, load 2.5-3,
shards in the page cache: the access path's CPU cost, not the disk's; 40 shards x 500
112 px JPEGs of ~4.3 kB, 30 batches of 384; wids 0.1.11), microseconds per sample:

=================================================  ============  ===========
access                                             uniform rows  classes x 2
=================================================  ============  ===========
ours, ``os.pread`` (:func:`read_samples`)                   6.3          5.5
ours, ``seek`` + ``read``                                   6.6          5.8
wids, every shard already open (``lru_size`` 40)           14.6         13.8
wids, default ``lru_size=10``                              3293         1676
=================================================  ============  ===========

("classes x 2": 192 random classes x 2 of their samples, the planner's pattern; an earlier
run under load 19 gave 6.4 / 3.3 for ours and 14.1 / 11.9 for warm wids.) Opening: ours
1.8 ms for the whole index (header, one ``stat`` per shard, memory maps); wids 3.9 ms per
shard (its header scan), paid by every process for every shard it opens, ~170 s of CPU per
process for WebFace42M's 42.5k shards. So our own index is kept (2.3-2.5x faster than warm
wids, nothing to rebuild per process), read with ``os.pread``: within noise of seek + read
(a 1-rep rerun had them the other way round), one syscall and no file position to share;
with a pyarrow filesystem it is ``read_at`` on the same offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.manifest import MANIFEST, ShardError
from pipeline.data.reader import TarReadError, iter_tar

FORMAT = "dml-pipeline/index-v1"
SPLITS = ("train", "holdout", "val", "exemplars")
_BASE_COLUMNS = (("shard", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<i4"))
_ALIGN = 64


@dataclass(frozen=True)
class SampleIndex:
    """The per-sample index of one split; row ``i`` is sample id ``i`` (module docstring)."""

    root: str
    """The shard set directory (holds ``manifest.json``)."""
    split: str
    paths: list[str]
    """Shard file paths (under ``root``); ``shard`` values index this list."""
    shard: np.ndarray
    offset: np.ndarray
    """Byte offset of each sample's ``.jpg`` payload in its shard."""
    size: np.ndarray
    label: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    """Per extra field (``manifest["extra_fields"]``), each sample's value (-1 = absent)."""
    shard_rows: np.ndarray | None = None
    """First row of each shard, plus the row count at the end (``len(paths) + 1`` values)."""
    cut: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Shards found shorter than indexed (opened with ``allow_cut``): path -> (bytes now, bytes indexed)."""

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass
class ShardScan:
    """What :func:`scan_shard` read from one tar: its checksum and one entry per sample."""

    sha256: str
    bytes: int
    offset: list[int]
    size: list[int]
    label: list[int]
    extras: dict[str, list[int]]
    skipped: list[tuple[str, str]]
    """``(key, reason)`` of samples that are not rows (no ``.jpg``, no or unknown label)."""


class _Tap:
    """A read-only file wrapper that hashes what passes and remembers where the last read began."""

    def __init__(self, f) -> None:
        self.f, self.pos, self.last = f, 0, 0
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.last, self.pos = self.pos, self.pos + len(b)
        self.h.update(b)
        return b


def _int(b: bytes | None) -> int | None:
    try:
        return int(b.decode("ascii").strip()) if b is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


def scan_shard(path: str | Path, fields: list[str] = (), num_classes: int | None = None) -> ShardScan:
    """Parse one tar shard (headers via ``pipeline.data.reader.iter_tar``) and hash it, in one pass.

    Samples are consecutive members sharing a WebDataset key (as the reader groups them);
    a sample is a row when it has a ``.jpg`` and a ``.cls`` holding a class id in
    ``[0, num_classes)`` (any integer when None). Returns a :class:`ShardScan`. Raises
    :class:`ShardError` naming the shard when it cannot be opened or parsed to its end.
    """
    scan = ShardScan("", 0, [], [], [], {f: [] for f in fields}, [])

    def add_sample(key, parts):
        jpg, label = parts.get("jpg"), _int(parts.get("cls", (None,))[0])
        if jpg is None:
            scan.skipped.append((key, "missing_image"))
        elif label is None:
            scan.skipped.append((key, "missing_label"))
        elif label < 0 or (num_classes is not None and label >= num_classes):
            scan.skipped.append((key, "unknown_label"))
        else:
            scan.offset.append(jpg[1]), scan.size.append(jpg[2]), scan.label.append(label)
            for f in fields:
                v = _int(parts.get(f, (None,))[0])
                scan.extras[f].append(-1 if v is None else v)

    try:
        with open(path, "rb", buffering=1 << 20) as f:
            tap = _Tap(f)
            key, parts = None, {}
            for name, data in iter_tar(tap, str(path)):
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                k, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])
                if k != key:
                    if key is not None:
                        add_sample(key, parts)
                    key, parts = k, {}
                # The payload began where the tap's last read (iter_tar's data read) began;
                # the JPEG's bytes are not kept, only where they are.
                parts[ext] = (None if ext == "jpg" else data, tap.last, len(data))
            if key is not None:
                add_sample(key, parts)
            while tap.read(1 << 20):  # the end-of-archive blocks still count in the checksum
                pass
    except TarReadError as e:
        raise ShardError(f"{e}: rewrite it with `python -m jobs.make_shards` (same arguments)") from e
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    scan.sha256, scan.bytes = tap.h.hexdigest(), tap.pos
    return scan


def _index_paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / f"index-{split}.json", root / f"index-{split}.bin"


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard entries of ``split``, in manifest order (exemplars: ``exemplar_shards``)."""
    if split == "exemplars":
        return list(manifest.get("exemplar_shards", []))
    return [s for s in manifest.get("shards", []) if s.get("split") == split]


def write_index(root: str | Path, split: str, entries: list[dict], scans: dict[str, ShardScan],
                fields: list[str]) -> dict:
    """Write ``index-<split>.json`` / ``.bin`` under ``root`` for the shards ``entries`` (manifest order).

    ``scans`` maps each entry's ``path`` to its :class:`ShardScan`. The old header is removed
    first and the new one renamed into place last, so a crash leaves no header that
    describes other columns. Returns ``{"split", "header", "rows", "shards", "bytes", "skipped"}``.
    Raises :class:`ShardError` when a scan's checksum is not the one the manifest records.
    """
    root = Path(root)
    header_path, bin_path = _index_paths(root, split)
    for e in entries:
        if scans[e["path"]].sha256 != e["sha256"]:
            raise ShardError(f"{root / e['path']}: sha256 {scans[e['path']].sha256[:12]}... differs from the "
                             f"manifest's {e['sha256'][:12]}...: the shard changed after it was written; rerun "
                             "`python -m jobs.make_shards` with the same arguments (it rewrites such shards)")
    counts = [len(scans[e["path"]].label) for e in entries]
    rows = int(sum(counts))
    cols = {
        "shard": np.repeat(np.arange(len(entries), dtype="<u4"), counts),
        "offset": np.concatenate([np.asarray(scans[e["path"]].offset, "<u8") for e in entries] or [np.zeros(0, "<u8")]),
        "size": np.concatenate([np.asarray(scans[e["path"]].size, "<u4") for e in entries] or [np.zeros(0, "<u4")]),
        "label": np.concatenate([np.asarray(scans[e["path"]].label, "<i4") for e in entries] or [np.zeros(0, "<i4")]),
    }
    for f in fields:
        cols[f] = np.concatenate([np.asarray(scans[e["path"]].extras[f], "<i4") for e in entries]
                                 or [np.zeros(0, "<i4")])
    header_path.unlink(missing_ok=True)
    layout, pos = {}, 0
    tmp = bin_path.with_suffix(".bin.tmp")
    with open(tmp, "wb") as out:
        for name, arr in cols.items():
            pad = -pos % _ALIGN
            out.write(b"\0" * pad)
            pos += pad
            layout[name] = {"dtype": arr.dtype.str, "offset": pos}
            out.write(arr.tobytes())
            pos += arr.nbytes
    os.replace(tmp, bin_path)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    header = {
        "format": FORMAT,
        "split": split,
        "rows": rows,
        "bin": bin_path.name,
        "bin_bytes": pos,
        "columns": layout,
        "extra_fields": list(fields),
        "shards": [{"path": e["path"], "sha256": e["sha256"], "bytes": scans[e["path"]].bytes, "rows": n,
                    "first_row": r} for e, n, r in zip(entries, counts, first)],
        "skipped": [{"shard": e["path"], "key": k, "reason": why}
                    for e in entries for k, why in scans[e["path"]].skipped],
    }
    tmp = header_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, header_path)
    return {"split": split, "header": str(header_path), "rows": rows, "shards": len(entries), "bytes": pos,
            "skipped": len(header["skipped"])}


def remove_index(root: str | Path, split: str) -> None:
    """Delete the index files of ``split`` under ``root`` (a split that no longer has shards)."""
    for p in _index_paths(Path(root), split):
        p.unlink(missing_ok=True)


def _scan_job(args) -> ShardScan:
    path, fields, num_classes = args
    return scan_shard(path, fields, num_classes)


def build_index(root: str | Path, workers: int | None = None) -> list[dict]:
    """Index an existing shard set in place (``jobs.make_shards --reindex``): scan every shard, write every split.

    Shards are read (never rewritten); ``workers`` processes scan them in parallel (default:
    the cores). Returns :func:`write_index`'s summary per split. Raises :class:`ShardError`
    when ``root`` has no manifest, a shard is missing or unreadable, or differs from its
    manifest checksum.
    """
    import concurrent.futures as cf

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise ShardError(f"{root}: no {MANIFEST} (not a shard set written by `python -m jobs.make_shards`)")
    manifest = json.loads((root / MANIFEST).read_text())
    fields, num_classes = list(manifest.get("extra_fields", [])), len(manifest.get("classes", []))
    per_split = {s: split_shards(manifest, s) for s in SPLITS}
    todo = [e["path"] for s in SPLITS for e in per_split[s]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    jobs = [(str(root / p), fields, num_classes) for p in todo]
    if workers == 1:
        scans = dict(zip(todo, map(_scan_job, jobs)))
    else:
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            scans = dict(zip(todo, pool.map(_scan_job, jobs, chunksize=max(1, len(jobs) // (8 * workers)))))
    out = []
    for split in SPLITS:
        if split in ("val", "exemplars") and not per_split[split]:
            remove_index(root, split)
            continue
        out.append(write_index(root, split, per_split[split], scans, fields))
    return out


def _find_root(where: str | Path) -> Path:
    p = Path(where)
    if p.name == MANIFEST and p.is_file():
        return p.parent
    for d in (p, p.parent):
        if (d / MANIFEST).is_file():
            return d
    raise ShardError(f"no {MANIFEST} in {p} or its parent: give the directory `python -m jobs.make_shards` wrote")


def load_index(where: str | Path, split: str = "train", verify: bool = False, missing_ok: bool = False,
               allow_cut: bool = False) -> SampleIndex:
    """Open the ``split`` index of the shard set at ``where`` (OUT, ``OUT/<split>`` or ``OUT/manifest.json``).

    Checks that the index describes the shards the manifest lists now (same paths, in the
    same order, same sha256) and that each shard file has the size the index recorded;
    ``verify`` also re-hashes every shard (reads them all); ``missing_ok`` lets shards be absent
    (a node's cache of a remote set, ``pipeline.data.cache``, fetches them before reading);
    ``allow_cut`` opens an index whose shards were cut short since (a copy that stopped
    early): they are listed in ``cut`` and the samples past the cut fail at read time (the
    training stream counts them as ``truncated_tar`` and replaces them). Returns a :class:`SampleIndex`
    whose columns are memory-mapped. Raises :class:`ShardError` when there is no manifest
    or no index, or the index is stale (shards rewritten since), each saying to run
    ``python -m jobs.make_shards --reindex OUT``; ValueError for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = _find_root(where)
    fix = f"run `python -m jobs.make_shards --reindex {root}`"
    header_path, bin_path = _index_paths(root, split)
    if not header_path.is_file():
        raise ShardError(f"{root}: no {split} index ({header_path.name}); {fix}")
    header = json.loads(header_path.read_text())
    if header.get("format") != FORMAT:
        raise ShardError(f"{header_path}: format {header.get('format')!r}, expected {FORMAT!r}; {fix}")
    manifest = json.loads((root / MANIFEST).read_text())
    now = [(e["path"], e["sha256"]) for e in split_shards(manifest, split)]
    then = [(s["path"], s["sha256"]) for s in header["shards"]]
    if now != then:
        changed = next((a, b) for a, b in zip(now + [("-", "")] * len(then), then + [("-", "")] * len(now)) if a != b)
        raise ShardError(f"{header_path} is stale: the manifest's {split} shards were rewritten since it was "
                         f"written (first difference: manifest {changed[0][0]} vs index {changed[1][0]}); {fix}")
    cut: dict[str, tuple[int, int]] = {}
    for s in header["shards"]:
        p = root / s["path"]
        try:
            got = p.stat().st_size
        except FileNotFoundError:
            if missing_ok:
                continue
            raise ShardError(f"{p}: listed in the {split} index but missing; {fix} after restoring the shard set") from None
        except OSError as e:
            raise ShardError(f"{p}: listed in the {split} index but cannot be read ({e}); {fix} after "
                             "restoring the shard set") from e
        if got < s["bytes"] and allow_cut:
            cut[str(p)] = (got, int(s["bytes"]))
            continue
        if got != s["bytes"]:
            why = f"{got} bytes, {s['bytes']} indexed"
        elif verify and scan_shard(p).sha256 != s["sha256"]:
            why = "same size, other sha256"
        else:
            continue
        raise ShardError(f"{header_path} is stale: shard {p} changed since it was indexed ({why}) and no longer "
                         "matches the manifest: rerun `python -m jobs.make_shards` with the arguments that wrote "
                         "it (it rewrites such shards, and the index)")
    rows = int(header["rows"])
    if not bin_path.is_file() or bin_path.stat().st_size != header["bin_bytes"]:
        raise ShardError(f"{bin_path}: missing or not the size its header records; {fix}")
    cols = {}
    for name, c in header["columns"].items():
        if rows == 0:
            cols[name] = np.zeros(0, dtype=c["dtype"])
        else:
            cols[name] = np.memmap(bin_path, dtype=c["dtype"], mode="r", offset=c["offset"], shape=(rows,))
    return SampleIndex(
        root=str(root),
        split=split,
        paths=[str(root / s["path"]) for s in header["shards"]],
        shard=cols["shard"],
        offset=cols["offset"],
        size=cols["size"],
        label=cols["label"],
        extras={f: cols[f] for f in header.get("extra_fields", [])},
        shard_rows=np.asarray([s["first_row"] for s in header["shards"]] + [rows], dtype=np.int64),
        cut=cut,
    )


def class_ranges(index: SampleIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each class's rows as one range: ``(class_ids, starts, counts)`` int64 arrays, in row order.

    Raises :class:`ShardError` naming the class and the shards of two of its runs when a
    class's rows are not contiguous (shards not class-grouped).
    """
    label = np.asarray(index.label, dtype=np.int64)
    if label.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.diff(label)) + 1
    starts = np.concatenate([[0], starts]).astype(np.int64)
    ids = label[starts]
    counts = np.diff(np.append(starts, label.size)).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        a, b = starts[order[dup[0]]], starts[order[dup[0] + 1]]
        raise ShardError(f"class {int(ids[order[dup[0]]])} is not contiguous in the {index.split} index: rows "
                         f"from {a} (shard {index.paths[int(index.shard[a])]}) and from {b} (shard "
                         f"{index.paths[int(index.shard[b])]}); rewrite the shards with `python -m jobs.make_shards`")
    return ids, starts, counts


def _positional_reader(path: str, filesystem):
    """``(read(size, offset) -> bytes, close())`` on one shard; ShardError when it cannot be opened."""
    try:
        if filesystem is None:
            fd = os.open(path, os.O_RDONLY)
            return (lambda n, off: os.pread(fd, n, off)), (lambda: os.close(fd))
        f = filesystem.open_input_file(path)
        return (lambda n, off: bytes(f.read_at(n, off))), f.close
    except OSError as e:
        raise ShardError(f"cannot open shard {path}: {e}") from e


def read_samples(index: SampleIndex, ids, filesystem=None) -> list[bytes]:
    """The ``.jpg`` bytes of samples ``ids`` (rows of ``index``), in the order of ``ids``.

    Reads are grouped by shard (one open file per shard per call) and issued in offset
    order: ``os.pread`` for local shards, ``read_at`` of a pyarrow ``filesystem``
    (``index.paths`` in its namespace). Raises IndexError for an id out of range and
    :class:`ShardError` naming the shard and the offset when a shard cannot be opened or a
    read comes back short (the shard was truncated or rewritten: rerun
    ``jobs.make_shards``, then ``--reindex``).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(index)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"sample ids must be in [0, {n}) for the {index.split} index, got "
                         f"{int(ids.min())}..{int(ids.max())}")
    shard = np.asarray(index.shard[ids], dtype=np.int64)
    offset = np.asarray(index.offset[ids], dtype=np.int64)
    order = np.lexsort((offset, shard))
    shard_l, off_l, size_l = shard[order].tolist(), offset[order].tolist(), np.asarray(index.size[ids])[order].tolist()
    out: list[bytes] = [b""] * ids.size
    pos_l = order.tolist()
    i = 0
    while i < len(pos_l):
        s = shard_l[i]
        j = i
        while j < len(pos_l) and shard_l[j] == s:
            j += 1
        path = index.paths[s]
        read, close = _positional_reader(path, filesystem)
        try:
            for k in range(i, j):
                b = read(size_l[k], off_l[k])
                if len(b) != size_l[k]:
                    raise ShardError(f"{path}: short read at byte {off_l[k]}: {len(b)} of {size_l[k]} bytes "
                                     f"(sample {int(ids[pos_l[k]])}; the shard was truncated or rewritten since "
                                     f"it was indexed: rerun `python -m jobs.make_shards`, then --reindex)")
                out[pos_l[k]] = b
        finally:
            close()
        i = j
    return out
