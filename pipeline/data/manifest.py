"""Finding a shard set (its tars, its ``manifest.json``) and what a training job checks in it before it starts.

``jobs.make_shards`` writes ``OUT/manifest.json`` beside ``OUT/train``, ``OUT/holdout`` and
``OUT/exemplars`` (``pipeline.data.shards``). The guards here run on the driver before Ray
or an MLflow run starts, so a mistake costs an error message, not a run:

* a ``data.train`` / ``data.eval`` that would take in another split's shards (``data.train=OUT``
  globs every ``*.tar`` below OUT: held-out and exemplar shards too) is refused, naming the
  right path;
* ``data.image_size`` 0 (the default) becomes the size the shards were written at; an
  explicit size that differs is allowed (every image is then resized at every read) and
  announced once.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
"""The shard set's description, ``OUT/manifest.json`` (``pipeline.data.shards.write_shards``)."""

class ShardError(ValueError):
    """A shard set cannot be found or read (names the path)."""


def list_shards(spec: str) -> tuple[list[str], object | None]:
    """Resolve ``data.train`` / ``data.eval`` into tar paths and a pyarrow filesystem.

    ``spec`` is a local directory (all ``*.tar`` below it), a glob, a single tar, or a URI
    (``s3://bucket/prefix``) understood by ``pyarrow.fs``. Returns ``(paths, filesystem)``
    where filesystem is None for local paths. Raises :class:`ShardError` when nothing matches.
    """
    if not spec:
        raise ShardError("no shard location given (set data.train / data.eval)")
    if "://" in spec:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            paths = [root]
        else:
            sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
            paths = sorted(i.path for i in fs.get_file_info(sel) if i.path.endswith(".tar"))
        if not paths:
            raise ShardError(f"no .tar shards found at '{spec}'")
        return paths, fs
    p = Path(spec)
    if p.is_dir():
        paths = sorted(str(x) for x in p.rglob("*.tar"))
    elif p.is_file():
        paths = [str(p)]
    else:
        paths = sorted(globlib.glob(spec))
    if not paths:
        raise ShardError(f"no .tar shards found at '{spec}' (run `python -m jobs.make_shards` first)")
    return paths, None


def find_manifest(spec: str) -> dict | None:
    """Return the manifest of the shard set that ``spec`` points into (its dir or a parent, local or a URI), or None."""
    from pipeline.runtime import is_uri

    if is_uri(spec):
        found = find_remote_manifest(spec)
        return json.loads(found[0]) if found is not None else None
    root = manifest_dir(spec.removeprefix("file://"))
    return json.loads((root / MANIFEST).read_text()) if root is not None else None


def find_remote_manifest(spec: str) -> tuple[bytes, str, str] | None:
    """For a URI ``spec`` (``s3://bucket/OUT/train``): ``(manifest bytes, OUT's path on its filesystem,
    spec's path relative to OUT)`` when ``spec`` or its parent holds a ``manifest.json``; else None."""
    import posixpath

    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(spec)
        path = path.rstrip("/")
        for root in (path, posixpath.dirname(path)):
            where = posixpath.join(root, MANIFEST)
            if fs.get_file_info(where).type == pafs.FileType.File:
                with fs.open_input_stream(where) as f:
                    return f.read(), root, posixpath.relpath(path, root)
    except (OSError, ValueError) as e:
        shown = spec.split("?", 1)[0].split("://", 1)
        shown = f"{shown[0]}://{shown[1].rsplit('@', 1)[-1]}"  # no credentials in messages
        raise ShardError(f"cannot read the shard set at {shown}: {e}") from e
    return None


FALLBACK_IMAGE_SIZE = 64
"""``data.image_size`` when it is 0 and the shards keep their source sizes (or have no manifest)."""

SPLIT_OF_KEY = {"data.train": ("train",), "data.eval": ("holdout",), "eval.data": ("val", "holdout")}
"""The splits each config key must stay within (the first is the one to use)."""


def iter_labelled(paths: list[str], fs=None):
    """``(key, class id, JPEG bytes)`` of every sample of the shards ``paths`` (from :func:`list_shards`),
    in order; ``(key, None, None)`` for a sample without a readable ``.jpg`` and ``.cls`` (the caller counts or skips it)."""
    from pipeline.data.reader import iter_samples

    for path in paths:
        with (fs.open_input_stream(path) if fs is not None else open(path, "rb")) as f:
            for key, parts in iter_samples(f, path):
                if parts is None or "jpg" not in parts or "cls" not in parts:
                    yield key, None, None
                else:
                    yield key, int(parts["cls"].decode()), parts["jpg"]


def absolute_spec(spec: str) -> str:
    """``spec`` with a local path (directory, file or glob) made absolute; URIs and "" as given.

    What the driver hands to Ray workers, whose working directory is not the job's."""
    if not spec or "://" in spec:
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def manifest_dir(spec: str) -> Path | None:
    """The directory holding the ``manifest.json`` of the shard set ``spec`` points into, or None.

    Looks at ``spec`` (up to its first ``*``) and its two parents; URIs have none here.
    """
    if not spec or "://" in spec:
        return None
    p = Path(spec.split("*")[0])
    for d in [p, *p.parents][:3]:
        if (d / MANIFEST).is_file():
            return d
    return None


def check_split(spec: str, key: str) -> None:
    """Refuse a shard spec for config ``key`` that holds shards of another split of its shard set.

    ``key`` is ``data.train`` (must hold only ``train`` shards), ``data.eval`` (only
    ``holdout`` shards) or ``eval.data`` (``val`` or ``holdout`` shards, not a mix: the
    validation split of ``make_shards --val-fraction``, or the held-out set itself).
    Shards the manifest does not list are not judged. Raises ShardError
    naming the splits it found and the path to use instead; returns quietly for an empty
    spec, a URI or a shard set without a manifest.
    """
    root = manifest_dir(spec)
    if root is None:
        return
    manifest = find_manifest(str(root))
    allowed = SPLIT_OF_KEY[key]
    found = splits_in(spec, root, manifest)
    wrong = {split: n for split, n in found.items() if split not in allowed}
    if wrong or len(found) > 1:
        shown = wrong or found
        what = ", ".join(f"{n} {split} shard{'s' if n > 1 else ''}" for split, n in sorted(shown.items()))
        use = next((s for s in allowed if any(e["split"] == s for e in manifest.get("shards", []))), allowed[0])
        raise ShardError(f"{key}='{spec}' takes in {what} of the shard set in '{root}'; training and evaluation "
                         f"must not mix splits: use {key}='{root / use}'")


def splits_in(spec: str, root: Path, manifest: dict) -> dict[str, int]:
    """Split name -> how many of the shards ``spec`` lists belong to it, by the ``manifest`` of
    the shard set at ``root`` (``exemplars`` for its exemplar shards; unlisted shards are not counted)."""
    split_of = {s["path"]: s["split"] for s in manifest.get("shards", [])}
    split_of.update({s["path"]: "exemplars" for s in manifest.get("exemplar_shards", [])})
    paths, _ = list_shards(spec)
    found: dict[str, int] = {}
    for p in paths:
        split = split_of.get(os.path.relpath(p, root).replace(os.sep, "/"))
        if split is not None:
            found[split] = found.get(split, 0) + 1
    return found


def spec_split(spec: str, manifest: dict | None = None) -> str | None:
    """The one split of its shard set's manifest (read unless given) that shard spec ``spec``
    holds, or None (no manifest, a URI, unlisted shards or a mix)."""
    root = manifest_dir(spec)
    manifest = manifest if manifest is not None or root is None else find_manifest(str(root))
    if root is None or manifest is None:
        return None
    found = splits_in(spec, root, manifest)
    return next(iter(found)) if len(found) == 1 else None


def resolve_image_size(cfg) -> int:
    """The side ``data.image_size`` means for ``cfg``, announcing a mismatch with the shards once.

    0 -> the ``image_size`` the training shards' manifest records, or
    :data:`FALLBACK_IMAGE_SIZE` when the shards keep their source sizes. An explicit size
    that differs from the recorded one is kept (images are resized at every read) and
    printed. Returns the size.
    """
    manifest = find_manifest(cfg.data.train) if cfg.data.train else None
    written = int((manifest or {}).get("image_size", 0))
    asked = cfg.data.image_size
    if asked == 0:
        if not written:
            print(f"[train] data.image_size: the shards at '{cfg.data.train}' keep their source sizes; images are "
                  f"resized to {FALLBACK_IMAGE_SIZE}x{FALLBACK_IMAGE_SIZE} at read time (set data.image_size to "
                  f"choose)", flush=True)
        return written or FALLBACK_IMAGE_SIZE
    if written and asked != written:
        print(f"[train] note: data.image_size={asked} but the shards at '{cfg.data.train}' were written at "
              f"{written}x{written}: every image is resized at every read (leave data.image_size at 0 to train at "
              f"{written})", flush=True)
    return asked


def prepare_data(cfg) -> None:
    """The data guards of a training job, before anything starts: split checks for
    ``data.train`` / ``data.eval`` and ``data.image_size`` resolved in ``cfg`` (in place).

    Raises ShardError (see :func:`check_split`).
    """
    check_split(cfg.data.train, "data.train")
    if cfg.data.eval:
        check_split(cfg.data.eval, "data.eval")
    if cfg.eval.data:
        check_split(cfg.eval.data, "eval.data")
    cfg.data.image_size = resolve_image_size(cfg)


def class_models(cfg) -> dict[int, int] | None:
    """Class id -> vehicle model id (-1 unknown) from the shards' manifest, for the Mixed Difference Network.

    The model is an attribute of the vehicle, so the model branch's labels follow from the
    batch's class labels. Returns None unless ``model.arch`` is ``mixed_diff``; raises
    ShardError when the manifest or its ``model`` labels are missing. Size: one int pair
    per class (VehicleID: 26k classes, ~0.5 MB as a Python dict).
    """
    if cfg.model.arch != "mixed_diff":
        return None
    manifest = find_manifest(cfg.data.train)
    if manifest is None or "model" not in manifest.get("extra_fields", []):
        raise ShardError(f"model.arch=mixed_diff needs shards with vehicle model labels and their manifest.json "
                         f"(python -m jobs.make_shards --layout vehicleid); none found for data.train='{cfg.data.train}'")
    out = {}
    for c in manifest["classes"]:
        m = (c.get("extras") or {}).get("model")
        out[int(c["id"])] = -1 if m is None else int(m)
    return out
