"""Evaluate a training run's checkpoint and log the metrics (and plots) to the run.

    python -m jobs.evaluate --run-id ID [--protocol retrieval|verification|vehicleid]
                            [--data SHARDS] [--pairs FILE] [--test-list FILE] [--tracking-uri URI]

retrieval (default): Recall@K, NMI, F1, MAP@R on held-out classes (the run's data.eval).
verification: LFW 10-fold accuracy, TAR@FAR, ROC plot; --pairs in LFW pairs.txt format.
vehicleid: VehicleID CMC Top-1/Top-5 and mAP over 10 gallery draws; --test-list test_list_800.txt.
Prints one final JSON line: {"run_id": ..., "protocol": ..., "metrics": {...}}; the metrics carry their
historical names (recall@1, top1) and the names the run logs them by (recall_at_1, vehicleid/top1).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.eval.evaluate import PROTOCOLS

    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, default="retrieval")
    p.add_argument("--data", default="", help="shards to evaluate (default: the run's data.eval)")
    p.add_argument("--pairs", default="", help="verification: LFW pairs.txt")
    p.add_argument("--test-list", default="", help="vehicleid: test_list_{800,1600,2400}.txt")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = p.parse_args(argv)
    from pipeline.deps import MissingDependencyError, require_faiss

    try:
        require_faiss()
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.data.manifest import ShardError
    from pipeline.eval.evaluate import evaluate_run
    from pipeline.runtime import shutdown_ray

    try:
        out = evaluate_run(args.run_id, args.data, args.tracking_uri, args.protocol, args.pairs, args.test_list)
    except (LookupError, FileNotFoundError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown_ray()  # Ray's exit-time log lines must not follow the final JSON line
    from pipeline.tracking import with_mlflow_names

    prefix = "" if out["protocol"] == "retrieval" else f"{out['protocol']}/"  # as the run logs them
    print(json.dumps({**out, "metrics": with_mlflow_names(out["metrics"], prefix)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
