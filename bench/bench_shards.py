"""Shard conversion speed with and without resize, against plain decode+encode; and what
the stream then pays per epoch to decode what was stored.

    python bench/bench_shards.py [--images 300] [--src-size 250] [--target 112] [--reps 3]

Writes ``--images`` JPEGs of ``--src-size`` squared (the synthetic look-alike faces,
CASIA-WebFace/LFW originals are 250x250) as an image-folder tree, then, on one process
(``workers=1``) so the figures compare with a one-core loop:
  * ``loop``: PIL open + full decode + JPEG encode (quality 95) of each file: the limit a
    converter that re-encodes every image cannot beat;
  * ``keep``: ``write_shards(image_size=0)`` (decode to validate, copy the bytes);
  * ``resize``: ``write_shards(image_size=target)`` (draft decode, resize, encode);
  * ``read_full`` / ``read_small``: the stream's ``decode_images(..., target)`` on the
    stored bytes of ``keep`` (decode 250x250 + resize, every epoch) and of ``resize``
    (decode target-size, no resize).
Best of ``--reps`` interleaved repetitions. Prints a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _tree(root: Path, n: int, size: int) -> list[Path]:
    from pipeline.data.layouts import synthetic_classes

    per = 10
    classes = synthetic_classes(max(2, -(-n // per)), per, image_size=size, seed=0)
    files = []
    for c in classes:
        for key, data in zip(c.keys, c.images):
            if len(files) == n:
                return files
            p = root / c.name / f"{key}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            files.append(p)
    return files


def _loop(files: list[Path]) -> float:
    from PIL import Image

    t = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im.load()
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=95)
    return time.perf_counter() - t


def _shards(src: Path, out: Path, size: int) -> tuple[float, list[bytes]]:
    from pipeline.data.layouts import scan_imagefolder
    from pipeline.data.shards import write_shards

    classes, _ = scan_imagefolder(src)
    t = time.perf_counter()
    # Fresh output each time (no resume); the process pool's start is part of the cost.
    write_shards(classes, out, holdout_fraction=0.0, shard_size=10_000, workers=1, progress=False, image_size=size)
    dt = time.perf_counter() - t
    jpgs = []
    for tar_path in sorted(out.rglob("*.tar")):
        if "exemplars" in tar_path.parts:
            continue
        with tarfile.open(tar_path) as tar:
            jpgs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return dt, jpgs


def _read(jpgs: list[bytes], size: int) -> float:
    from pipeline.data.decode import decode_images

    t = time.perf_counter()
    for i in range(0, len(jpgs), 64):
        decode_images(jpgs[i : i + 64], size)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--src-size", type=int, default=250)
    p.add_argument("--target", type=int, default=112)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    best: dict[str, float] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _tree(tmp / "src", args.images, args.src_size)
        n = len(files)
        for rep in range(args.reps):
            timings = {"loop": _loop(files)}
            timings["keep"], kept = _shards(tmp / "src", tmp / f"keep{rep}", 0)
            timings["resize"], small = _shards(tmp / "src", tmp / f"resize{rep}", args.target)
            timings["read_full"] = _read(kept, args.target)
            timings["read_small"] = _read(small, args.target)
            sizes = {"keep": sum(map(len, kept)), "resize": sum(map(len, small))}
            for k, v in timings.items():
                best[k] = min(best.get(k, float("inf")), v)
    rate = {k: n / v for k, v in best.items()}
    result = {
        "images": n, "src_size": args.src_size, "target": args.target, "reps": args.reps,
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "convert_keep_over_loop": round(rate["keep"] / rate["loop"], 2),
        "convert_resize_over_loop": round(rate["resize"] / rate["loop"], 2),
        "read_small_over_full": round(rate["read_small"] / rate["read_full"], 2),
        "bytes_per_image": {k: round(v / n) for k, v in sizes.items()},
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    print(f"{n} JPEGs of {args.src_size}x{args.src_size}, target {args.target}, best of {args.reps}, one process")
    for k in ("loop", "keep", "resize", "read_full", "read_small"):
        print(f"  {k:11s} {rate[k]:8.1f} images/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
