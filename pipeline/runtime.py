"""Starting, joining and stopping Ray, and the checks a cluster job needs before it trains.

A local instance (``RAY_ADDRESS`` unset) keeps every server and worker on loopback:
GCS, raylet, object manager, dashboard agent, runtime-env agent, the driver's core worker
and every task/actor worker listen on 127.0.0.1 only (checked with ``ss -ltnp`` /
``psutil`` by ``tests/test_runtime.py``), and Ray 2.60's token auth is on. Why this needs
more than ``ray.init(_node_ip_address="127.0.0.1")`` (seen here with Ray 2.60): Ray swaps a
loopback address for the machine's outward IP (``services.resolve_ip_for_localhost`` ->
``node_ip_address_from_perspective``), and a node whose address is not loopback binds its
servers on all interfaces: the dashboard agent on ``0.0.0.0`` and the eth0 address, workers
on ``*``. Ray keeps 127.0.0.1 when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its "single
machine" mode, the default on macOS and Windows), so :func:`init_ray` sets that for this
process and for every process the local node starts (they inherit the environment).
``cluster/loopback_ray_start.py`` does the same for ``ray start``.

With ``RAY_ADDRESS`` set the job joins that cluster as it is (its nodes were started by
``ray start`` / ``cluster/local.sh`` / KubeRay, which decide where they listen).
"""

from __future__ import annotations

import logging
import os
import uuid

log = logging.getLogger("pipeline.runtime")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for single-machine mode: ``0`` keeps a node's address on loopback."""


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``pipeline.*`` loggers to stderr as ``[pipeline.<part>] message`` (the jobs call this once).

    Only this project's loggers: Ray's, MLflow's and alembic's keep their own settings.
    """
    root = logging.getLogger("pipeline")
    if not any(getattr(h, "_dml", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler._dml = True
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class StorageError(RuntimeError):
    """``train.storage_path`` cannot hold the run's checkpoints on this cluster."""


def init_ray(num_cpus: int = 0, dashboard: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local instance on loopback only.

    ``num_cpus`` is the number of logical CPUs a local instance declares; 0 = max(16, 8 x
    cores). On a small machine, declare more logical CPUs than cores: training workers each
    hold ``scaling.cpus_per_worker`` and Ray Data's fetch/decode tasks need CPUs of their
    own, or the stream never starts and the job hangs silently. ``dashboard`` starts the
    dashboard on 127.0.0.1 (local instances only). Does nothing when Ray is already up.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_data()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    from ray._private import ray_constants

    # Read by Ray at call time in this process and at import time in the node's processes.
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    cores = os.cpu_count() or 1
    ray.init(num_cpus=num_cpus or max(16, 8 * cores), include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", configure_logging=True, logging_level="WARNING",
             runtime_env=None if dashboard else {"worker_process_setup_hook": _quiet_state_api_users})


PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def _quiet_state_api_users() -> None:
    """Ray worker setup hook of a local instance started without the dashboard.

    Ray Train's placement-group cleaner asks the State API (served by the dashboard) every
    second whether the train controller lives, and without a dashboard it logs a warning at
    each try: ~60 lines a minute. Its job (free the placement group of a controller that died
    while the cluster lives on) does not arise here: a local instance ends with the driver.
    """
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def shutdown_ray() -> None:
    """Stop this process's Ray connection (a local instance with it) if one is open."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def quiet_ray_data() -> None:
    """Switch off Ray Data's progress tables in this process.

    They flood a terminal every few seconds; the trainer prints its own progress (steps,
    images/s, data wait).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def is_uri(path: str) -> bool:
    """True for a pyarrow filesystem URI (``s3://``, ``gs://``, ...), False for a local path or ``file://``."""
    return "://" in path and not path.startswith("file://")


def storage_path(path: str) -> str:
    """``train.storage_path`` (default ``./runs``) with a local path made absolute; URIs as given."""
    path = path or "runs"
    if is_uri(path):
        return path
    return os.path.abspath(path.removeprefix("file://"))


def check_storage(storage_path: str, timeout_s: float = 60.0) -> None:
    """On a multi-node cluster, make sure every alive node sees the local ``storage_path``.

    Ray Train's workers and controller write checkpoints from whichever node they run on,
    and a restarted worker group reads them back from another: a directory that is not
    shared would lose checkpoints silently. The driver writes a marker file with a random
    token, and a zero-CPU task pinned to each alive node
    (``NodeAffinitySchedulingStrategy(soft=False)``) reads it back. URIs (``s3://``,
    ``gs://``, ...) and single-node clusters are not checked.

    Raises StorageError for a relative path (on more than one node), or naming the nodes
    that do not see the marker. Nodes that do not answer within ``timeout_s`` get a warning.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if is_uri(storage_path) or len(nodes) < 2:
        return
    path = storage_path.removeprefix("file://")
    if not os.path.isabs(path):
        raise StorageError(f"train.storage_path '{storage_path}' is a relative path on a {len(nodes)}-node cluster: "
                           f"give an absolute path on a file system all nodes share (NFS), or an s3:// / gs:// URI")
    token = uuid.uuid4().hex
    marker = os.path.join(path, f".dml-shared-check-{token}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
    except OSError as e:
        raise StorageError(f"train.storage_path '{path}': the driver cannot write there ({e})") from None
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")":
                read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
                for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        missing, silent = [], []
        for node, ref in refs.items():
            if ref not in ready:
                silent.append(node)
            elif ray.get(ref) != token:
                missing.append(node)
    finally:
        try:
            os.remove(marker)
        except OSError:
            pass
    if silent:
        log.warning("node(s) %s did not answer the storage check within %.0fs; train.storage_path '%s' must be "
                    "shared with them too", ", ".join(silent), timeout_s, path)
    if missing:
        raise StorageError(
            f"train.storage_path '{path}' is not shared by all nodes: {', '.join(missing)} cannot see the file "
            f"the driver wrote there ({os.path.basename(marker)}). Checkpoints written on one node would be missing "
            f"on another. Use a shared file system mounted at the same path on every node, or an s3:// / gs:// URI")


def _read_marker(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
