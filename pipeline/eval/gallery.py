"""Embed images with a logged model (Ray Data batch inference) into a gallery file: one Parquet row per image.

Sources: an image folder (``DIR/<label>/<image>`` gives each image its label; images
directly in ``DIR`` have none) or a WebDataset shard set (labels are the class names of
its ``manifest.json``, else the class ids). Models: an MLflow model URI
(``runs:/<run id>/model``, ``models:/NAME/VERSION``) or a local MLflow model folder, as
``pipeline.tracking.log_inference_model`` wrote it (uint8 images -> unit-norm embeddings).

Gallery file (Parquet): ``key`` (the path relative to the folder, or the WebDataset key),
``label`` (string, null when unknown), ``source`` (the image file, or the shard holding the
sample: where ``pipeline.eval.search`` finds the pixels for its pictures), ``embedding``
(float32 x d); the schema's metadata holds ``model_uri``, ``image_size`` and ``dim``.
Size: 4 x d bytes per image plus the key: ~0.3 GB at d = 128 for CASIA-WebFace (0.5M
images), ~24 GB for WebFace42M (42M), which is then better written as one file per shard
(not done here: one file, gathered on the driver).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Files of an image folder that are embedded (case-insensitive)."""


def load_model(uri: str, tracking_uri: str = ""):
    """Load the torch module of an MLflow model (``runs:/``, ``models:/``, a local folder) in eval mode.

    Raises FileNotFoundError for a local path that does not exist and LookupError when MLflow
    cannot resolve the URI (the message names it); ValueError for a model that is not an
    image embedder of this project (no ``image_size``).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    if "://" not in uri and ":/" not in uri and not Path(uri).exists():
        raise FileNotFoundError(f"--model '{uri}' is neither an MLflow URI (runs:/..., models:/...) nor a folder")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.resolve_uri(tracking_uri))
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as e:
        raise LookupError(f"cannot load model '{uri}': {str(getattr(e, 'message', e)).splitlines()[0]}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    if not hasattr(model, "image_size"):
        raise ValueError(f"model '{uri}' is not an image embedding model of this project (no image_size); "
                         "log one with a training run (runs:/<run id>/model)")
    return model.eval()


def list_images(root: str | Path) -> list[str]:
    """Image files below ``root`` (recursively), sorted. Raises FileNotFoundError when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) below '{root}'")
    return files


def folder_key_label(path: str, root: str) -> tuple[str, str | None]:
    """``(key, label)`` of an image of an image folder: its relative path, and its folder's name when it is one below ``root``."""
    rel = Path(os.path.relpath(path, root))
    return rel.as_posix(), (rel.parts[0] if len(rel.parts) == 2 else None)


def decode_any(data: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """JPEG (torchvision, as the evaluation decodes) or other formats (Pillow) -> uint8 (n, size, size, 3) and an ok mask."""
    from pipeline.data.decode import decode_into

    out = np.zeros((len(data), size, size, 3), dtype=np.uint8)
    ok = decode_into(data, out)
    for i in np.flatnonzero(~ok):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(bytes(data[i]))) as im:
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
            ok[i] = True
        except Exception:  # noqa: BLE001 -- any undecodable file is skipped and counted
            continue
    return out[ok], ok


class GalleryEmbedder:
    """Ray Data UDF (actor): image bytes -> ``{key, label, source, embedding}`` with the model loaded once per actor."""

    def __init__(self, model_ref: list, use_gpu: bool = False, root: str = "", names: dict | None = None) -> None:
        import ray
        import torch

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = ray.get(model_ref[0]).to(self.device).eval()
        self.root, self.names = root, names or {}

    def __call__(self, batch: dict) -> dict:
        import torch

        if "bytes" in batch:  # an image folder (read_binary_files)
            data, sources = list(batch["bytes"]), [str(p) for p in batch["path"]]
            kl = [folder_key_label(p, self.root) for p in sources]
        else:  # shards (read_webdataset)
            data = list(batch["jpg"])
            sources = [u if "://" in u else os.path.abspath(u) for u in map(str, batch["__url__"])]
            ids = [bytes(c).decode().strip() for c in batch["cls"]]
            kl = [(str(k), self.names.get(i, i)) for k, i in zip(batch["__key__"], ids)]
        images, ok = decode_any(data, self.model.image_size)
        emb = np.zeros((0, self.model.embedding_dim), dtype=np.float32)
        if len(images):
            with torch.inference_mode():
                emb = self.model(torch.from_numpy(images).to(self.device)).float().cpu().numpy()
        keep = np.flatnonzero(ok)
        return {"key": np.asarray([kl[i][0] for i in keep], dtype=object),
                "label": np.asarray([kl[i][1] for i in keep], dtype=object),
                "source": np.asarray([sources[i] for i in keep], dtype=object),
                "embedding": emb.astype(np.float32)}


def embed_gallery(model, images: str = "", shards: str = "", batch_size: int = 64, concurrency: int = 0,
                  use_gpu: bool | None = None) -> dict:
    """Embed every image of an image folder (``images``) or a shard set (``shards``) with ``model``.

    Returns ``{"key", "label", "source", "embedding" (n, d) float32, "skipped"}`` in the
    order Ray Data delivers them; undecodable images are left out and counted in
    ``skipped``. ``use_gpu`` None = GPU actors when the cluster has GPUs. Raises
    FileNotFoundError / ShardError when the source holds no images.
    """
    import ray
    import ray.data

    from pipeline.data.manifest import find_manifest, list_shards

    if bool(images) == bool(shards):
        raise ValueError("give exactly one of --images DIR and --data SHARDS")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    kwargs = {"model_ref": [ray.put(model)], "use_gpu": use_gpu}
    if images:
        images = str(Path(images).resolve())
        files = list_images(images)
        ds = ray.data.read_binary_files(files, include_paths=True)
        kwargs["root"] = str(images)
        n_in = len(files)
    else:
        paths, fs = list_shards(shards)
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, suffixes=["jpg", "cls"], include_paths=True)
        manifest = find_manifest(shards) or {}
        kwargs["names"] = {str(c["id"]): c["name"] for c in manifest.get("classes", [])}
        n_in = None
    size = concurrency or max(1, min(4, os.cpu_count() or 1))
    ds = ds.map_batches(GalleryEmbedder, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=1 if use_gpu else size),
                        num_gpus=1 if use_gpu else 0, num_cpus=1)
    cols: dict[str, list] = {"key": [], "label": [], "source": [], "embedding": []}
    n_rows = 0
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for c in cols:
            cols[c].append(b[c])
        n_rows += len(b["key"])
    if not n_rows:
        raise ValueError(f"no decodable images in '{images or shards}'")
    out = {c: np.concatenate(v) for c, v in cols.items()}
    out["skipped"] = (n_in - n_rows) if n_in is not None else 0
    return out


def write_gallery(path: str | Path, rows: dict, model_uri: str, image_size: int) -> Path:
    """Write ``rows`` (as :func:`embed_gallery` returns them) to the Parquet file ``path``; returns it."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.ascontiguousarray(rows["embedding"], dtype=np.float32)
    d = emb.shape[1]
    table = pa.table({
        "key": pa.array([str(k) for k in rows["key"]], pa.string()),
        "label": pa.array([None if v is None else str(v) for v in rows["label"]], pa.string()),
        "source": pa.array([str(s) for s in rows["source"]], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
    })
    meta = {"model_uri": model_uri, "image_size": str(image_size), "dim": str(d)}
    table = table.replace_schema_metadata({"dml": json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_gallery(path: str | Path) -> dict:
    """Read a gallery file: ``{"key", "label" (None when unknown), "source", "embedding" (n, d) float32, "meta"}``.

    Raises FileNotFoundError for a missing file and ValueError for a Parquet file without
    the gallery columns (naming the file and what is missing).
    """
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gallery file '{path}' does not exist")
    table = pq.read_table(path)
    missing = {"key", "label", "source", "embedding"} - set(table.column_names)
    if missing:
        raise ValueError(f"'{path}' is not a gallery file of jobs.embed: no column {', '.join(sorted(missing))}")
    meta = json.loads((table.schema.metadata or {}).get(b"dml", b"{}"))
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return {"key": np.asarray(table.column("key").to_pylist(), dtype=object),
            "label": np.asarray(table.column("label").to_pylist(), dtype=object),
            "source": np.asarray(table.column("source").to_pylist(), dtype=object),
            "embedding": col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d),
            "meta": meta}
