"""Loopback port helpers: pick free ports, and say clearly who holds a taken one."""

from __future__ import annotations

import contextlib
import socket

import psutil

from rembg_devcluster.errors import PortInUseError


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just reported free (another process may still race us for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
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
