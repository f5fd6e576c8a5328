"""The DDP process group's rendezvous store on loopback when the workers are on loopback.

Ray Train sets ``MASTER_ADDR``/``MASTER_PORT`` to rank 0's node address and a free port, and
every worker calls ``init_process_group("env://")``; rank 0 then hosts torch's TCPStore,
which binds the wildcard address (seen here, torch 2.14: ``ss -ltnp`` shows
``*:<MASTER_PORT>`` for ``ray::RayTrainWorker`` while every Ray process of a local instance
is on 127.0.0.1; ``tests/e2e/test_quickstart.py`` found it). torch offers no bind address,
but it takes a socket that is already listening (``TCPStore(master_listen_fd=...)``), and a
multi-tenant store is reused by the ``init_process_group`` that follows in the same process
(same port). So, when rank 0's node address is loopback, :class:`LoopbackTorchConfig` first
has rank 0 open that store on a socket bound to 127.0.0.1 and hands its port to Ray Train's
own set-up. Gloo's and NCCL's own listeners follow the node address (127.0.0.1 there).
On a cluster whose nodes have routable addresses nothing changes.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
from unittest import mock

import ray.train.torch.config as ray_torch_config
from ray.train.torch import TorchConfig

_STORE = None  # rank 0's loopback TCPStore: lives as long as the worker process
_PATCH_LOCK = threading.Lock()


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def serve_store_on_loopback(world_size: int, timeout_s: float) -> tuple[str, int]:
    """Start this process's TCPStore server on a 127.0.0.1 socket; returns ``("127.0.0.1", port)``.

    Meant for rank 0 of a worker group, before ``init_process_group("env://")`` with that
    port (which then reuses this server: ``multi_tenant``).
    """
    global _STORE
    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _STORE = TCPStore("127.0.0.1", port, world_size=world_size, is_master=True, multi_tenant=True,
                      master_listen_fd=sock.detach(), wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=timeout_s))
    return "127.0.0.1", port


class _LoopbackTorchBackend(ray_torch_config._TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        addr, _ = worker_group.execute_single(0, ray_torch_config.get_address_and_port)
        if not _is_loopback(addr):
            return super().on_start(worker_group, backend_config)
        fixed = worker_group.execute_single(0, serve_store_on_loopback, world_size=len(worker_group),
                                            timeout_s=float(backend_config.timeout_s))
        # Ray's on_start asks rank 0 for (address, free port): answer with the store's.
        with _PATCH_LOCK, mock.patch.object(ray_torch_config, "get_address_and_port", lambda: fixed):
            return super().on_start(worker_group, backend_config)


class LoopbackTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig`` whose rendezvous store stays on loopback when the workers are (module docstring)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
