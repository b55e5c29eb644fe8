"""Loopback port helpers: pick free ports, and say clearly who holds a taken one."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

import psutil

from rembg_devcluster.errors import PortInUseError

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below the kernel's ephemeral range, where no outgoing connection takes its source port.
LISTEN_RANGE_LOW = 10000
_handed_out: set[int] = set()


def ephemeral_range(text: str | None = None) -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (32768-60999 by default)."""
    try:
        raw = text if text is not None else EPHEMERAL_RANGE_FILE.read_text()
        low, high = (int(part) for part in raw.split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A free port for a component to listen on later, never handed out twice by this process.

    Picked below the ephemeral range: a port bind(0) returns comes from that range, where any
    outgoing connection (kubectl, a probe) may take it as its source port before the component
    binds it ("address already in use"). Only another listener can still race us here.
    """
    low, _ = ephemeral_range()
    candidates = list(range(LISTEN_RANGE_LOW, low))
    random.shuffle(candidates)
    for port in candidates:
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))  # nothing free below the range: take the kernel's pick
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _holder(port: int) -> str:
    """'pid 123 (etcd)' for whoever listens on the port, when the OS lets us see it."""
    with contextlib.suppress(Exception):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "another process"
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    return "another process"


def ensure_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Raises PortInUseError listing every taken port and its holder, before anything starts."""
    taken = [
        f"{name} port {port} on {host} is taken by {_holder(port)}"
        for name, port in ports.items()
        if not port_is_free(port, host)
    ]
    if taken:
        raise PortInUseError(
            "; ".join(taken)
            + " (stop that process, `python -m rembg_devcluster down`, or pick other ports)"
        )
