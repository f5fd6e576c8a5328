"""Train an embedding network on a Ray cluster (local when RAY_ADDRESS is unset), tracked in MLflow.

    python -m jobs.train --config configs/quickstart.yaml [key=value ...]
    python -m jobs.train --config configs/quickstart.yaml --print-config [key=value ...]

Prints one final JSON line: {"run_id": ..., "metrics": {...}, "model": {"model_uri": "runs:/<id>/model", ...}};
its metrics carry both names, the historical ``recall@1`` and MLflow's ``recall_at_1``. Rerun with the same
``train.run_name`` (and ``train.storage_path``) to resume a run that was killed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (differences from the defaults)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, then --config, then overrides) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    from pipeline.config import ConfigError, dump_yaml, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from pipeline.deps import MissingDependencyError, require_faiss

    try:
        require_faiss()
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.data.manifest import ShardError
    from pipeline.data.report import DataQualityError
    from pipeline.runtime import StorageError, configure_logging, shutdown_ray
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.driver import run_training

    configure_logging()

    # SIGTERM (a preempted node, `ray job stop`, a scheduler) ends the MLflow run KILLED,
    # never RUNNING. Before Ray starts, our handler raises KeyboardInterrupt; once it runs,
    # Ray's own driver handler raises SystemExit; the driver marks the run KILLED for both.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        out = run_training(cfg)
    except (ShardError, StorageError, CheckpointError, DataQualityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: the MLflow run is marked KILLED", file=sys.stderr)
        return 143
    shutdown_ray()  # Ray's exit-time log lines must not follow the final JSON line
    from pipeline.tracking import with_mlflow_names

    # "metrics": the historical names (recall@1) and, beside them, MLflow's (recall_at_1).
    print(json.dumps({"run_id": out["run_id"], "metrics": with_mlflow_names(out["metrics"]), "model": out["model"]}))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
