"""Embed images with a trained model into a gallery file (Ray Data batch inference; GPU actors when the cluster has GPUs).

    python -m jobs.embed --model URI (--images DIR | --data SHARDS) --out FILE.parquet [--tracking-uri URI]

--model: runs:/<run id>/model, models:/NAME/VERSION, or a local MLflow model folder.
--images DIR: every .jpg/.jpeg/.png below DIR; DIR/<label>/<image> gives the image its label.
--data SHARDS: a shard set of jobs.make_shards (labels: the manifest's class names).
One row per image: key (relative path or WebDataset key), label (or null), source, embedding
(unit norm). Prints one final JSON line: {"out": ..., "images": n, "dim": d, "skipped": ..., "model": URI}.
"""

from __future__ import annotations

import json
import sys

from jobs._args import add_image_source, add_tracking_uri, job_parser


def main(argv: list[str] | None = None) -> int:
    p = job_parser("python -m jobs.embed", __doc__)
    p.add_argument("--model", required=True, help="runs:/<run id>/model, models:/NAME/VERSION or a local model folder")
    add_image_source(p, "--images", "--data", "WebDataset shard set (a directory, glob or URI)")
    p.add_argument("--out", required=True, help="gallery file to write (.parquet)")
    p.add_argument("--batch-size", type=int, default=64)
    add_tracking_uri(p)
    args = p.parse_args(argv)
    from pipeline.data.manifest import ShardError
    from pipeline.eval.gallery import embed_gallery, load_model, write_gallery
    from pipeline.runtime import init_ray, shutdown_ray

    try:
        model = load_model(args.model, args.tracking_uri)
        init_ray()
        rows = embed_gallery(model, images=args.images, shards=args.data, batch_size=args.batch_size)
        write_gallery(args.out, rows, args.model, model.image_size)
    except (LookupError, FileNotFoundError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown_ray()
    print(json.dumps({"out": args.out, "images": len(rows["key"]), "dim": int(rows["embedding"].shape[1]),
                      "skipped": int(rows["skipped"]), "model": args.model}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
