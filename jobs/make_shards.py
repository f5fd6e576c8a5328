"""Write class-grouped WebDataset shards from a data-set tree (or a synthetic set).

    python -m jobs.make_shards --layout imagefolder --src DIR --out OUT [--holdout-fraction 0.5]
    python -m jobs.make_shards --layout webface --src CASIA-WebFace --out OUT [--image-size 112]
    python -m jobs.make_shards --layout vehicleid --src VehicleID_V1.0 --out OUT [--image-size 224]
    python -m jobs.make_shards --layout lfw --src lfw --out OUT [--image-size 112]
    python -m jobs.make_shards --layout synthetic --num-classes 200 --images-per-class 20 --out OUT
    python -m jobs.make_shards --layout synthetic_shapes --num-classes 600 --images-per-class 30-60 --out OUT
    python -m jobs.make_shards --reindex OUT

synthetic: blobs in families of 4 look-alike classes (the quickstart's data). synthetic_shapes: textured
  shapes in families of 4, every odd class the mirror image of the one before it (a harder, mirror-asymmetric
  set: pipeline.data.synthetic_shapes); --images-per-class LO-HI draws each class's count in that range.
imagefolder/synthetic*: a random --holdout-fraction of identities held out (default 0.5; the
  job says how many; --holdout-fraction 0 trains on all of them).
--val-fraction F (any layout, default 0): a random fraction F of the identities not held out go to
  OUT/val instead of OUT/train: a validation split for eval.data, on which the run picks its best
  checkpoint, so that the figures reported on OUT/holdout are not chosen on them.
webface: ROOT/<identity>/<nnn>.jpg, a random --holdout-fraction of identities held out (default 0.02).
vehicleid: train_list.txt -> OUT/train; the union of the test lists -> OUT/holdout (the lists are
  copied to OUT/); per-sample vehicle model and colour labels (-1 = unknown).
lfw: every person -> OUT/holdout; pairs.txt (in ROOT or beside it) copied to OUT/pairs.txt.
--image-size resizes at conversion (default 112 faces, 224 vehicles; 0 keeps the source size).
Augmentation is chosen at training time (data.augment: none, flip, crop, flip_crop), not here, but
it depends on the data written here: flip (mirror left-right) only where a mirror image shows the
same class, e.g. faces and most vehicles (handed details such as text on them are few). Never where
the mirror image is another class or none: text, digits, signs, handed objects, synthetic_shapes
(its odd classes are mirror images of its even ones). The default, none, is always safe.
Classes fill shards in a random order drawn from --seed. Every run also writes the per-sample
index (OUT/index-<split>.json + .bin, pipeline.data.index); --reindex OUT adds it to a shard
set written without one, reading the shards and rewriting nothing else.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Per layout: default --image-size (synthetic: side of the generated images; others: resize
# target, 0 = keep) and default --holdout-fraction (None = the layout fixes the held-out split).
IMAGE_SIZE = {"synthetic": 64, "synthetic_shapes": 64, "imagefolder": 0, "webface": 112, "lfw": 112, "vehicleid": 224}
HOLDOUT = {"synthetic": 0.5, "synthetic_shapes": 0.5, "imagefolder": 0.5, "webface": 0.02, "lfw": None, "vehicleid": None}


def _count_range(text: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``LO-HI`` -> (LO, HI). Raises ArgumentTypeError (argparse names the option)."""
    try:
        lo, _, hi = text.partition("-")
        out = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI (e.g. 20 or 30-60), got {text!r}") from None
    if not 1 <= out[0] <= out[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=list(IMAGE_SIZE), help="source layout (required unless --reindex)")
    p.add_argument("--reindex", metavar="OUT",
                   help="write the per-sample index of the existing shard set OUT (no re-encoding) and stop")
    p.add_argument("--src", help="source tree (imagefolder/webface/lfw: ROOT/<identity>/<image>.jpg; vehicleid: ROOT "
                                 "with image/, train_test_split/, attribute/)")
    p.add_argument("--out", help="output directory (train/, holdout/, exemplars/, manifest.json, index-*); "
                                 "required unless --reindex")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="fraction of classes held out for evaluation (default 0.5; webface 0.02; "
                        "fixed by vehicleid and lfw)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of the classes not held out written to OUT/val instead of OUT/train: a validation "
                        "split for eval.data (default 0: none)")
    p.add_argument("--shard-size", type=int, default=1000, help="max images per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="parallel shard writers (0 = number of cores)")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic: identities (default 200; synthetic_shapes 600)")
    p.add_argument("--images-per-class", type=_count_range, default=None, metavar="N|LO-HI",
                   help="synthetic: images per identity (default 20); synthetic_shapes: N or a range LO-HI drawn "
                        "per class (default 30-60)")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic: image side (default 64); others: resize to this square side at conversion "
                        "(default webface/lfw 112, vehicleid 224, imagefolder 0 = keep)")
    p.add_argument("--exemplars-per-class", type=int, default=2,
                   help="first images of each train class copied to OUT/exemplars/ for the miner's refresh (0 = none)")
    args = p.parse_args(argv)
    if args.reindex is None and (args.layout is None or args.out is None):
        p.error("--layout and --out are required (or --reindex OUT for an existing shard set)")
    shapes = args.layout == "synthetic_shapes"
    if args.num_classes is None:
        args.num_classes = 600 if shapes else 200
    if args.images_per_class is None:
        args.images_per_class = (30, 60) if shapes else (20, 20)
    if args.layout == "synthetic" and args.images_per_class[0] != args.images_per_class[1]:
        p.error("--images-per-class LO-HI is for --layout synthetic_shapes; --layout synthetic takes one N")
    return args


def reindex(out: str, workers: int | None) -> int:
    """``--reindex OUT``: write the index of every split, print one line per file and a JSON summary."""
    from pipeline.data.index import build_index
    from pipeline.data.manifest import ShardError

    try:
        written = build_index(out, workers=workers)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(f"[make_shards] wrote {w['header']} (+ .bin): {w['rows']} samples of {w['shards']} shards, "
              f"{w['bytes']} bytes" + (f", {w['skipped']} samples skipped (listed in it)" if w["skipped"] else ""))
    print(json.dumps({"reindexed": out, "index": {w["split"]: {k: w[k] for k in ("rows", "shards", "bytes", "skipped")}
                                                  for w in written}}))
    return 0


def holdout_note(manifest: dict, defaulted: bool) -> str:
    """The line saying how many identities a random holdout took, and how to change it."""
    n_hold = manifest["splits"]["holdout"]["classes"]
    n_all = n_hold + manifest["splits"]["train"]["classes"]
    frac = manifest["holdout_fraction"]
    how = "the default" if defaulted else "as asked"
    return (f"[make_shards] held out {n_hold} of {n_all} identities for evaluation (--holdout-fraction {frac:g}, "
            f"{how}); --holdout-fraction 0 trains on all of them")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reindex is not None:
        return reindex(args.reindex, args.workers or None)
    from pipeline.data.layouts import (
        LayoutError,
        Scan,
        scan_imagefolder,
        scan_lfw,
        scan_vehicleid,
        scan_webface,
        synthetic_classes,
    )
    from pipeline.data.shards import write_shards

    size = IMAGE_SIZE[args.layout] if args.image_size is None else args.image_size
    try:
        if HOLDOUT[args.layout] is None and args.holdout_fraction is not None:
            raise LayoutError(f"--holdout-fraction does not apply to --layout {args.layout}: its held-out split is fixed")
        if args.layout == "synthetic":
            scan = Scan(synthetic_classes(args.num_classes, args.images_per_class[0], size, args.seed))
        elif args.layout == "synthetic_shapes":
            from pipeline.data.synthetic_shapes import synthetic_shape_classes

            scan = Scan(synthetic_shape_classes(args.num_classes, args.images_per_class, size, args.seed))
        elif not args.src:
            raise LayoutError(f"--src is required for --layout {args.layout}")
        elif args.layout == "imagefolder":
            scan = Scan(*scan_imagefolder(args.src))
        else:
            scan = {"webface": scan_webface, "lfw": scan_lfw, "vehicleid": scan_vehicleid}[args.layout](args.src)
        for q in scan.problems:
            print(f"[make_shards] warning: {q}", file=sys.stderr)
        holdout = args.holdout_fraction if args.holdout_fraction is not None else (HOLDOUT[args.layout] or 0.0)
        manifest = write_shards(scan.classes, args.out, holdout_fraction=holdout, shard_size=args.shard_size,
                                seed=args.seed, workers=args.workers or None, layout=args.layout,
                                problems=scan.problems, exemplars=args.exemplars_per_class,
                                holdout_classes=scan.holdout, image_size=size, val_fraction=args.val_fraction)
    except (LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, src in scan.copy_files.items():  # evaluation files travel with the shards
        shutil.copyfile(src, Path(args.out) / name)
    for q in manifest["problems"][len(scan.problems):]:
        print(f"[make_shards] warning: {q}", file=sys.stderr)
    if scan.holdout is None and HOLDOUT[args.layout] is not None:  # a random fraction, not a fixed list
        print(holdout_note(manifest, args.holdout_fraction is None), file=sys.stderr)
    if "val" in manifest["splits"]:
        val = manifest["splits"]["val"]
        classes = f"{val['classes']} class{'es' if val['classes'] != 1 else ''}"
        print(f"[make_shards] validation split: {classes}, {val['images']} images in {args.out}/val "
              f"(--val-fraction {args.val_fraction:g}); pick checkpoints on it with eval.data={args.out}/val",
              file=sys.stderr)
    indexed = [f"{s} {manifest['splits'][s]['images']}" for s in ("train", "holdout", "val", "exemplars")
               if (Path(args.out) / f"index-{s}.json").is_file()]
    print(f"[make_shards] per-sample index (samples): {', '.join(indexed)} in {args.out}/index-<split>.json + .bin")
    summary = {"out": args.out, "splits": manifest["splits"], "problems": len(manifest["problems"])}
    if scan.copy_files:
        summary["copied"] = sorted(scan.copy_files)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
