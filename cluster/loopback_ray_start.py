"""`ray start` for a multi-node cluster that lives on loopback only (used by ``cluster/local.sh``).

    python cluster/loopback_ray_start.py start --node-ip-address=127.0.0.1 ...

Why not plain ``ray start`` (Ray 2.60, seen here):

1. ``ray start --node-ip-address=127.0.0.1`` replaces a loopback address with the machine's
   outward IP (``services.resolve_ip_for_localhost``): the log says "Local node IP:
   192.0.2.2", and a node whose address is not loopback binds its GCS, raylet, object
   manager and dashboard-agent gRPC/metrics ports on all interfaces (``ss -ltn`` shows
   ``*:<gcs port>``, ``0.0.0.0:<metrics port>``). A node that keeps 127.0.0.1 binds every
   server to 127.0.0.1.
2. Every ``ray.init(address="127.0.0.1:<port>")`` makes the same swap, so with the GCS on
   loopback only, the job agent's and the job drivers' connections go to 192.0.2.2 and time
   out ("Failed to connect to GCS at address 192.0.2.2:<port>"; ``ray job submit`` then
   fails with HTTP 504 after 5 minutes). Ray swaps 127.0.0.1 for 127.0.0.1 when
   ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (``services.get_node_ip_address`` then returns
   the loopback address), so this sets it for the node and every process the node starts.
3. With that variable, though, ``ray start --address=...`` refuses to add a worker node
   ("Multi-node Ray clusters are not supported on Windows and OSX"), so this process (the
   CLI only) turns the check back off.

Everything else is the stock ``ray`` command line.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Run Ray's CLI (``sys.argv[1:]``, e.g. ``start ...``) with loopback addresses kept.

    Returns the CLI's exit status.
    """
    # A node outlives whoever ran `local.sh up`: don't keep the caller's sockets and pipes
    # open for the node's lifetime (stdin/stdout/stderr are already redirected by local.sh).
    os.closerange(3, 65536)
    # Before Ray is imported: the nodes' processes (GCS, raylet, dashboard, agents, workers,
    # job drivers) inherit it and resolve 127.0.0.1 to 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # this CLI only: allow `ray start --address`
    services.resolve_ip_for_localhost = lambda host: host  # keep --node-ip-address as given
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
