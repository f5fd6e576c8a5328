"""Compare training runs in MLflow: differing params, final metrics and plots.

    python -m jobs.compare [--experiment NAME] [--runs ID ...]
                           [--filter "params.loss.name = 'npair_mc'"] --out DIR [--tracking-uri URI]

Prints the table, writes DIR/comparison.{md,csv} and PNG plots (loss curves, Recall@K per
run, mining metrics over steps), logs them all to a new comparison run, and prints a final
JSON line {"comparison_run_id": ..., "runs": [...], "out": DIR}.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="dml", help="MLflow experiment (default: dml)")
    p.add_argument("--runs", nargs="*", default=None, help="run ids (default: all runs of the experiment)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.loss.name = 'npair_mc'\"")
    p.add_argument("--out", required=True, help="directory for the table and plots")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = p.parse_args(argv)
    from pipeline.eval.compare import compare_runs, to_markdown
    from pipeline.tracking import resolve_uri

    try:
        res = compare_runs(resolve_uri(args.tracking_uri), args.out, args.experiment, args.runs, args.filter)
    except (LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(res["columns"], res["rows"]))
    print(json.dumps({"comparison_run_id": res["comparison_run_id"], "runs": res["runs"], "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
