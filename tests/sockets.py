"""Which TCP ports a set of processes listens on, read from /proc (what ``ss -ltnp`` shows).

Used by the tests that check that Ray instances this project starts listen on loopback only
(``tests/e2e/test_quickstart.py`` for a local ``jobs.train``, ``tests/cluster/`` for
``cluster/local.sh up``). No psutil: it is not a dependency of the project.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path


def listening() -> list[tuple[str, int, int]]:
    """``(address, port, socket inode)`` of every listening TCP socket on the machine."""
    out = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
            out.append((socket.inet_ntop(family, raw), int(hex_port, 16), int(f[9])))
    return out


def is_loopback(addr: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, session id)`` of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3])  # after "(comm)": state ppid pgrp session


def session_pids(leaders: set[int]) -> set[int]:
    """Every live process whose session is led by one of ``leaders``, or that descends from one."""
    stats = {int(d.name): _stat(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
    stats = {pid: s for pid, s in stats.items() if s is not None}
    out = {pid for pid, (_, sid) in stats.items() if sid in leaders} | (set(leaders) & set(stats))
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in out} - out
        out |= more
        grew = bool(more)
    return out


def command(pid: int) -> str:
    """The process's name (``comm``), or '?' when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def socket_inodes(pids: set[int]) -> dict[int, int]:
    """Socket inode -> pid for every socket the processes hold open."""
    inodes = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = pid
    return inodes


def listening_of(pids: set[int]) -> list[tuple[str, int, str]]:
    """``(address, port, process name)`` of every listening TCP socket held by ``pids``."""
    inodes = socket_inodes(pids)
    return [(addr, port, command(inodes[inode])) for addr, port, inode in listening() if inode in inodes]
