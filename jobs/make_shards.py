"""Write class-grouped WebDataset shards from a data-set tree (or a synthetic set).

    python -m jobs.make_shards --layout imagefolder --src DIR --out OUT [--holdout-fraction 0.5]
    python -m jobs.make_shards --layout synthetic --num-classes 200 --images-per-class 20 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["imagefolder", "synthetic"], required=True)
    p.add_argument("--src", help="source tree (imagefolder: ROOT/<identity>/<image>.jpg)")
    p.add_argument("--out", required=True, help="output directory (train/, holdout/, exemplars/, manifest.json)")
    p.add_argument("--holdout-fraction", type=float, default=0.5, help="fraction of classes held out for evaluation")
    p.add_argument("--shard-size", type=int, default=1000, help="max images per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="parallel shard writers (0 = number of cores)")
    p.add_argument("--num-classes", type=int, default=200, help="synthetic: identities")
    p.add_argument("--images-per-class", type=int, default=20, help="synthetic: images per identity")
    p.add_argument("--image-size", type=int, default=64, help="synthetic: image side in pixels")
    p.add_argument("--exemplars-per-class", type=int, default=2,
                   help="first images of each train class copied to OUT/exemplars/ for the miner's refresh (0 = none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.data.layouts import LayoutError, scan_imagefolder, synthetic_classes
    from pipeline.data.shards import write_shards

    try:
        if args.layout == "synthetic":
            classes, problems = synthetic_classes(args.num_classes, args.images_per_class, args.image_size, args.seed), []
        else:
            if not args.src:
                raise LayoutError("--src is required for --layout imagefolder")
            classes, problems = scan_imagefolder(args.src)
        for q in problems:
            print(f"[make_shards] warning: {q}", file=sys.stderr)
        manifest = write_shards(classes, args.out, holdout_fraction=args.holdout_fraction, shard_size=args.shard_size,
                                seed=args.seed, workers=args.workers or None, layout=args.layout, problems=problems,
                                exemplars=args.exemplars_per_class)
    except (LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for q in manifest["problems"][len(problems):]:
        print(f"[make_shards] warning: {q}", file=sys.stderr)
    print(json.dumps({"out": args.out, "splits": manifest["splits"], "problems": len(manifest["problems"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
