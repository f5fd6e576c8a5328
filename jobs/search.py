"""Search a gallery file with query images: each query's top-k, Recall@K when labels are known, and matches.png.

    python -m jobs.search --gallery FILE.parquet (--query-images DIR | --query FILE.parquet) --out DIR
                          [--k 5] [--index FILE] [--exclude-self] [--model URI] [--max-rows 20]

--query-images DIR are embedded with the model the gallery was made with (or --model URI).
--index FILE: a FAISS index read from FILE when it exists (it must hold the gallery), else
  built and written there. --exclude-self: a query never matches the gallery row with its
  own key (for queries taken from the gallery, e.g. --query the gallery file itself).
Writes DIR/results.jsonl (one line per query: query, label, matches [{key, label, score}])
and DIR/matches.png (query, then its top-k: same label framed green, another red).
Prints one final JSON line: {"out": DIR, "queries": n, "k": k, "recall_at_1": ..., "recall_at_K": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs._args import add_image_source, add_tracking_uri, job_parser


def main(argv: list[str] | None = None) -> int:
    p = job_parser("python -m jobs.search", __doc__)
    p.add_argument("--gallery", required=True, help="gallery file of jobs.embed (.parquet)")
    add_image_source(p, "--query-images", "--query", "query file of jobs.embed (.parquet)")
    p.add_argument("--k", type=int, default=5, help="matches per query (default 5)")
    p.add_argument("--out", required=True, help="directory for results.jsonl and matches.png")
    p.add_argument("--index", default="", help="FAISS index file: read when it exists, else built and written")
    p.add_argument("--exclude-self", action="store_true", help="a query never matches the gallery row with its key")
    p.add_argument("--model", default="", help="model for --query-images (default: the gallery's)")
    p.add_argument("--max-rows", type=int, default=20, help="queries drawn in matches.png (default 20)")
    add_tracking_uri(p)
    args = p.parse_args(argv)
    from pipeline.deps import MissingDependencyError, require_faiss

    try:
        require_faiss()
        out = run(args)
    except (MissingDependencyError, LookupError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def run(args: argparse.Namespace) -> dict:
    from pipeline.eval.gallery import embed_gallery, load_model, read_gallery
    from pipeline.eval.search import gallery_index, matches_picture, recall_at, results_lines, search

    gallery = read_gallery(args.gallery)
    if args.query:
        queries = read_gallery(args.query)
    else:
        from pipeline.runtime import init_ray, shutdown_ray

        uri = args.model or gallery["meta"].get("model_uri", "")
        if not uri:
            raise ValueError(f"gallery '{args.gallery}' names no model; pass --model URI to embed the query images")
        model = load_model(uri, args.tracking_uri)
        init_ray()
        queries = embed_gallery(model, images=args.query_images)
        shutdown_ray()  # Ray's exit-time log lines must not follow the final JSON line
    index = gallery_index(gallery["embedding"], args.index or None, k=args.k + 1)
    own = (queries["key"], gallery["key"]) if args.exclude_self else (None, None)
    scores, ids = search(index, queries["embedding"], args.k, *own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = results_lines(queries["key"], list(queries["label"]), gallery, scores, ids)
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = [{"key": str(k), "label": lab, "source": str(s)}
            for k, lab, s in zip(queries["key"], queries["label"], queries["source"])]
    matches_picture(out / "matches.png", rows, gallery, ids, scores, max_rows=args.max_rows)
    recalls = recall_at(list(queries["label"]), gallery["label"], ids, ks=sorted({1, args.k}))
    summary = {"out": str(out), "queries": len(lines), "k": args.k, "gallery": len(gallery["key"])}
    summary.update({f"recall_at_{k}": v for k, v in recalls.items()})
    return summary


if __name__ == "__main__":
    sys.exit(main())
