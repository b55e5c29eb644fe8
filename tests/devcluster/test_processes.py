"""Starting and stopping real processes: clear errors, nothing left behind."""

import shutil
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from rembg_devcluster import ClusterConfig, DevCluster
from rembg_devcluster.binaries import Binaries
from rembg_devcluster.errors import ComponentDiedError, DevClusterError, PortInUseError
from rembg_devcluster.ports import (
    LISTEN_RANGE_LOW,
    ensure_ports_free,
    ephemeral_range,
    free_port,
    port_is_free,
)
from rembg_devcluster.process import log_tail, raise_if_dead, spawn, stop


@pytest.fixture
def listening_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_free_port_is_free() -> None:
    assert port_is_free(free_port())


def test_free_ports_are_below_the_ephemeral_range_and_never_repeat() -> None:
    low, _ = ephemeral_range()
    picked = [free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    assert all(LISTEN_RANGE_LOW <= port < low for port in picked)


def test_the_ephemeral_range_is_read_from_the_kernel_format() -> None:
    assert ephemeral_range("32768\t60999\n") == (32768, 60999)
    assert ephemeral_range("not a range") == (32768, 60999)


def test_taken_port_is_reported_with_its_name_and_holder(listening_socket) -> None:
    port = listening_socket.getsockname()[1]
    with pytest.raises(
        PortInUseError, match=rf"kube-apiserver port {port} on 127.0.0.1 is taken by pid"
    ):
        ensure_ports_free({"kube-apiserver": port, "etcd client": free_port()})


def _fake_binaries(tmp_path: Path, etcd: str) -> Binaries:
    true = Path(shutil.which("true") or "/bin/true")
    return Binaries(
        etcd=Path(etcd),
        kube_apiserver=true,
        kube_controller_manager=true,
        kube_scheduler=true,
        kubectl=true,
        kwok=true,
        helm=true,
        monitoring_crds_dir=tmp_path,
        kubelet=true,
        kube_proxy=true,
    )


def test_cluster_start_refuses_a_taken_apiserver_port(tmp_path: Path, listening_socket) -> None:
    port = listening_socket.getsockname()[1]
    config = ClusterConfig(
        state_dir=tmp_path / "c",
        monitoring_crds=False,
        apiserver_port=port,
        binaries=_fake_binaries(tmp_path, "/bin/true"),
    )
    with pytest.raises(PortInUseError, match=str(port)):
        DevCluster.start(config)


def test_a_component_dying_at_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    script = tmp_path / "fake-etcd"
    script.write_text("#!/bin/sh\necho 'etcd: cannot open data dir: disk on fire' >&2\nexit 3\n")
    script.chmod(0o755)
    config = ClusterConfig(
        state_dir=tmp_path / "c",
        monitoring_crds=False,
        start_timeout_seconds=30,
        binaries=_fake_binaries(tmp_path, str(script)),
    )
    with pytest.raises(ComponentDiedError, match=r"(?s)etcd died \(exit code 3\).*disk on fire"):
        DevCluster.start(config)


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and has a child: stop() must still leave nothing behind.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    popen, record = spawn("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log")
    deadline = time.monotonic() + 20
    while "started" not in log_tail(record.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    members = [record.pid, *(c.pid for c in psutil.Process(record.pid).children(recursive=True))]
    assert len(members) == 2
    stop(record, popen, grace_seconds=0.5)
    assert not record.alive()
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in members
    )


def test_dead_process_error_carries_exit_code_and_log_tail(tmp_path: Path) -> None:
    popen, record = spawn(
        "boom",
        [sys.executable, "-c", "print('last words'); raise SystemExit(7)"],
        tmp_path / "b.log",
    )
    popen.wait(timeout=20)
    with pytest.raises(ComponentDiedError, match=r"(?s)boom died \(exit code 7\).*last words"):
        raise_if_dead(record, popen)


def test_a_foreign_non_empty_directory_is_never_wiped(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    config = ClusterConfig(
        state_dir=precious, monitoring_crds=False, binaries=_fake_binaries(tmp_path, "/bin/true")
    )
    with pytest.raises(DevClusterError, match="not empty and holds no cluster state"):
        DevCluster.start(config)
    assert (precious / "thesis.tex").read_text() == "years of work"
