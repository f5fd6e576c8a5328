"""Node-local copies of shard sets kept on an object store (``data.train=s3://bucket/OUT/train``).

The planned stream reads every sample by a positional read through the per-sample index
(``pipeline.data.index``): ~6 us a sample on a local disk, one HTTP range request (~10-50
ms) on S3 or GCS. So a shard set given as a URI is copied, per node, to
``data.cache_dir`` on first use, and every read is local:

* :func:`localize` (the driver, the planner actor and each fetch actor call it on their
  node) copies ``manifest.json`` and the split's index files (``index-<split>.json`` /
  ``.bin``) into ``<cache_dir>/<key>/``, ``<key>`` naming the URI. A remote manifest that
  changed (bytes differ from the cached copy) replaces the copy and drops the cached
  indexes; shards whose checksum the new manifest no longer lists are fetched again.
* :meth:`RemoteSet.fetch` copies the shards a read is about to touch that the node does not
  have yet, each streamed to a temporary file while it is hashed, checked against the
  manifest's ``sha256`` (a mismatch raises :class:`ShardError` naming the URI and keeps
  nothing) and renamed into place with a ``<shard>.sha256`` stamp beside it. A shard is
  fetched once per node: an exclusive ``flock`` per shard makes the other processes of
  the node wait for the copy instead of starting their own.

Any URI ``pyarrow.fs.FileSystem.from_uri`` understands works (``s3://``, ``gs://``,
``hdfs://``, ``abfs://``), query options included (``?endpoint_override=host:port&scheme=http``
for an S3-compatible store); credentials come from the usual environment of each node.

Size on each node's disk: the shard set itself (JPEG bytes in tar: CASIA-WebFace at 112 px
~2-3 GB; WebFace42M ~0.4-1 TB) plus its index (20 B per sample: 9.9 MB / 850 MB), the
manifest (~200 B per class and shard: 2.2 MB / ~0.5 GB) and 64 B of stamp per shard. A
node fetches only the shards its fetch actors read, which over one pass is all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import re
from pathlib import Path

from pipeline.data.manifest import MANIFEST, ShardError, find_remote_manifest

DEFAULT_CACHE_DIR = "~/.cache/dml-pipeline/shards"
"""Where :func:`localize` keeps copies when ``data.cache_dir`` is empty."""

CHUNK = 8 << 20
"""Bytes per read when copying a shard (8 MiB)."""


def is_remote(spec: str) -> bool:
    """True for a shard spec on a pyarrow filesystem URI (``s3://``...), False for a local path or ``file://``."""
    from pipeline.runtime import is_uri

    return is_uri(spec)


def cache_dir(configured: str = "") -> Path:
    """``data.cache_dir`` (or :data:`DEFAULT_CACHE_DIR`), ``~`` expanded, absolute."""
    return Path(os.path.expanduser(configured or DEFAULT_CACHE_DIR)).resolve()


def _key(scheme: str, root: str, query: str) -> str:
    """A directory name for the shard set at ``scheme://root`` (``query``: its endpoint options): readable,
    and unique by a hash. Credentials in the URI (``s3://key:secret@bucket``) are not part of it."""
    digest = hashlib.sha256(f"{scheme}://{root}?{query}".encode()).hexdigest()[:12]
    return f"{scheme}-{re.sub(r'[^A-Za-z0-9._-]+', '_', root.strip('/'))[-80:]}-{digest}"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (created when missing), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _copy(fs, src: str, dst: Path, uri: str, sha256: str | None = None, size: int | None = None) -> None:
    """Stream ``src`` of ``fs`` to ``dst`` through a temporary file, checking ``sha256``/``size`` when given."""
    tmp = dst.with_name(dst.name + ".part")
    h, n = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(src) as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
    except (OSError, FileNotFoundError) as e:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"cannot copy {uri} to the node's cache {dst}: {e}") from e
    if (sha256 is not None and h.hexdigest() != sha256) or (size is not None and n != size):
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{uri}: {n} bytes with sha256 {h.hexdigest()[:12]}..., but its manifest records "
                         f"{'' if size is None else f'{size} bytes, '}sha256 {str(sha256)[:12]}...: the object "
                         "changed after the shard set was written; rewrite it with `python -m jobs.make_shards` "
                         "and upload the whole set again")
    os.replace(tmp, dst)


class RemoteSet:
    """A shard set on a pyarrow filesystem and its copy in one node's cache (see the module docstring)."""

    def __init__(self, spec: str, configured_cache_dir: str = "") -> None:
        import pyarrow.fs as pafs

        self.spec = spec
        found = find_remote_manifest(spec)
        if found is None:
            raise ShardError(f"no {MANIFEST} at '{spec}' or its parent: a shard set on an object store must be a "
                             "directory written by `python -m jobs.make_shards` (upload OUT whole), so that its "
                             "index and checksums travel with it")
        self.manifest_bytes, self.root, self.sub = found
        self.fs, _ = pafs.FileSystem.from_uri(spec)
        self.scheme = spec.split("://", 1)[0]
        query = spec.split("?", 1)[1] if "?" in spec else ""
        self.local = cache_dir(configured_cache_dir) / _key(self.scheme, self.root, query)
        self.manifest = json.loads(self.manifest_bytes)
        self.sha = {e["path"]: e["sha256"] for e in self.manifest.get("shards", []) + self.manifest.get(
            "exemplar_shards", [])}

    def uri(self, rel: str) -> str:
        return f"{self.scheme}://{posixpath.join(self.root, rel)}"

    def localize(self, splits=("train",)) -> Path:
        """Copy the manifest and the ``splits``' indexes into the cache (once); returns the local OUT."""
        with _locked(self.local / ".lock"):
            mine = self.local / MANIFEST
            if not mine.is_file() or mine.read_bytes() != self.manifest_bytes:
                for old in self.local.glob("index-*"):
                    old.unlink()
                tmp = mine.with_name(MANIFEST + ".part")
                tmp.write_bytes(self.manifest_bytes)
                os.replace(tmp, mine)
            for split in splits:
                header, binary = self.local / f"index-{split}.json", self.local / f"index-{split}.bin"
                if header.is_file() and binary.is_file():
                    continue
                _copy(self.fs, posixpath.join(self.root, header.name), header, self.uri(header.name))
                head = json.loads(header.read_text())
                if int(head["bin_bytes"]) > 64 << 20:
                    print(f"[data] copying the {split} index of {self.uri('')} ({int(head['bin_bytes']) >> 20} MB) "
                          f"to {self.local}", flush=True)
                try:
                    _copy(self.fs, posixpath.join(self.root, binary.name), binary, self.uri(binary.name),
                          size=int(head["bin_bytes"]))
                except ShardError:
                    header.unlink(missing_ok=True)
                    raise
        return self.local

    def fetch(self, rel_paths) -> int:
        """Copy the shards ``rel_paths`` (relative to OUT) the cache lacks; returns how many were copied."""
        copied = 0
        for rel in rel_paths:
            dst = self.local / rel
            stamp = dst.with_name(dst.name + ".sha256")
            want = self.sha.get(rel)
            if want is None:
                raise ShardError(f"{self.uri(rel)} is not a shard of the manifest at {self.uri(MANIFEST)}")
            if dst.is_file() and stamp.is_file() and stamp.read_text() == want:
                continue
            with _locked(dst.with_name(dst.name + ".lock")):
                if dst.is_file() and stamp.is_file() and stamp.read_text() == want:
                    continue  # another process of the node copied it while this one waited
                stamp.unlink(missing_ok=True)
                _copy(self.fs, posixpath.join(self.root, rel), dst, self.uri(rel), sha256=want)
                stamp.write_text(want)
                copied += 1
        return copied


def index_spec(spec: str) -> str:
    """What the planner and the fetch actors are given for ``data.train``: the URI as it is, or the
    local directory of its manifest (``spec`` when it has none); :func:`local_root` opens either."""
    return spec if is_remote(spec) else local_root(spec)


def local_root(spec: str, configured_cache_dir: str = "", splits=("train",)) -> str:
    """The local shard-set directory (holds ``manifest.json``) to open the index of ``spec`` from.

    A local spec: the directory of its manifest (``pipeline.data.manifest.manifest_dir``),
    or ``spec`` itself when it has none. A URI: :meth:`RemoteSet.localize` on this node (the
    manifest and the ``splits``' indexes; shards come with :meth:`RemoteSet.fetch`).
    """
    if not is_remote(spec):
        from pipeline.data.manifest import manifest_dir

        return str(manifest_dir(spec.removeprefix("file://")) or spec.removeprefix("file://"))
    return str(RemoteSet(spec, configured_cache_dir).localize(splits))
