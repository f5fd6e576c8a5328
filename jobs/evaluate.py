"""Evaluate a training run's checkpoint on held-out classes and log the metrics to the run.

    python -m jobs.evaluate --run-id ID [--data SHARDS] [--tracking-uri URI]

Prints one final JSON line: {"run_id": ..., "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True)
    p.add_argument("--data", default="", help="shards to evaluate (default: the run's data.eval)")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = p.parse_args(argv)
    from pipeline.data.shards import ShardError
    from pipeline.eval.evaluate import evaluate_run

    try:
        out = evaluate_run(args.run_id, args.data, args.tracking_uri)
    except (LookupError, FileNotFoundError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
