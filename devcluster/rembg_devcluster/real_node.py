"""The real node: containerd + runc + the CNI bridge + kubelet + kube-proxy, beside the KWOK nodes.

Pods scheduled on it run our real images (imported from `make images`' archives, no registry).
Starting it changes the host (a bridge, iptables rules, mounts, cgroups, sysctls); everything it
changes is recorded first, in the cluster's state, and `teardown_host` puts it back:

    require_host(binaries, images)          # one clear line when this host cannot run a node
    before = host_state.take_snapshot()
    create_network(network)                 # before the API server, which listens on the bridge
    ... control plane ...
    start_node(cluster, ...)                # containerd, images, kubelet (Ready), kube-proxy
    drain_node(cluster); stop processes; teardown_host(state)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import yaml
from pydantic import BaseModel

from rembg_devcluster import host_state, node_config
from rembg_devcluster.errors import DevClusterError
from rembg_devcluster.images import ImageIndex
from rembg_devcluster.node_config import NodeNetwork, NodePaths, NodePorts

NODE_PROCESSES = ("containerd", "kubelet", "kube-proxy")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables")
NODE_READY_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 90.0
CTR_TIMEOUT_SECONDS = 300.0
WORKLOAD_KINDS = "deployments,replicasets,statefulsets,daemonsets,jobs"


# Which cluster's state dir owns the host's real node: a run killed before its teardown (a
# session ending mid-test) is found and torn down from its recorded state by the next start.
OWNER_FILE = Path("/run/rembg-devcluster-real-node")


class NodeOwner(BaseModel):
    """The cluster (state dir) that owns the host's real node, and the process that made it."""

    path: Path
    pid: int
    create_time: float

    def alive(self) -> bool:
        """The starting process still runs (a cluster still booting has no other process)."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.create_time) < 1.0
        except psutil.NoSuchProcess:
            return False


def record_owner(state_dir: Path) -> None:
    """Claims the host's real node for state_dir; refused when another cluster holds it."""
    me = psutil.Process()
    owner = NodeOwner(path=state_dir, pid=me.pid, create_time=me.create_time())
    try:
        with OWNER_FILE.open("x") as out:  # atomic: two starts never both get here
            out.write(owner.model_dump_json())
    except FileExistsError:
        holder = recorded_owner()
        raise RealNodeUnavailableError(
            f"a real node already runs on this host (cluster {holder.path if holder else '?'})"
        ) from None


def recorded_owner() -> NodeOwner | None:
    try:
        return NodeOwner.model_validate_json(OWNER_FILE.read_text())
    except (FileNotFoundError, ValueError):
        return None


def forget_owner(state_dir: Path) -> None:
    if (owner := recorded_owner()) is not None and owner.path == state_dir:
        OWNER_FILE.unlink(missing_ok=True)


def attempt(problems: list[str], what: str, step: Callable[[], object]) -> None:
    """Runs one teardown step; a failure is recorded and the teardown goes on."""
    try:
        step()
    except (DevClusterError, OSError, subprocess.SubprocessError) as error:
        problems.append(f"{what}: {error}")


def bridge_exists() -> bool:
    return Path("/sys/class/net", node_config.BRIDGE).exists()


class RealNodeUnavailableError(DevClusterError):
    """This host cannot run a real node; the message says why and what to install."""


class RealNodeState(BaseModel):
    """What `stop` needs to undo the node, also from another process (state.json)."""

    bridge: str
    pod_cidr: str
    root: Path
    ports: dict[str, int]
    before: host_state.HostSnapshot
    images: dict[str, str] = {}
    # Set once the host is back as `before` recorded it: a second stop changes nothing.
    torn_down: bool = False


def missing_host_parts(binaries: Sequence[Path], images: ImageIndex | None) -> list[str]:
    """What this host lacks to run a node (empty: it can)."""
    missing = []
    if platform.system() != "Linux":
        return [f"a Linux host (this is {platform.system()})"]
    if os.geteuid() != 0:
        missing.append("root (kubelet and containerd manage cgroups, mounts and iptables)")
    missing += [f"`{tool}` on PATH" for tool in HOST_TOOLS if shutil.which(tool) is None]
    missing += [
        f"CNI plugin {node_config.CNI_BIN_DIR / plugin}"
        for plugin in node_config.CNI_PLUGINS
        if not (node_config.CNI_BIN_DIR / plugin).exists()
    ]
    missing += [f"{path} (`make binaries`)" for path in binaries if not os.access(path, os.X_OK)]
    if images is None:
        missing.append("the images (`make images`)")
    else:
        missing += [f"image archive {a} (`make images`)" for a in images.missing_archives()]
    return missing


def require_host(binaries: Sequence[Path], images: ImageIndex | None) -> None:
    if missing := missing_host_parts(binaries, images):
        raise RealNodeUnavailableError(
            "this host cannot run a real node: it needs "
            + "; ".join(missing)
            + " (`make setup images` installs them)"
        )
    if bridge_exists():
        raise RealNodeUnavailableError(
            f"a real node already runs on this host (bridge {node_config.BRIDGE} exists); stop "
            "it with `python -m rembg_devcluster down` (--dir of its cluster)"
        )


def _run(argv: Sequence[str], timeout: float = 60.0, check: bool = True) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise DevClusterError(
            f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def create_network(network: NodeNetwork) -> None:
    """The bridge with the gateway address, and forwarding on (pod -> Service -> pod)."""
    _run(["ip", "link", "add", network.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{network.gateway}/{network.prefix_length}", "dev", network.bridge])
    _run(["ip", "link", "set", network.bridge, "up"])
    host_state.write_sysctl("net.ipv4.ip_forward", "1")


def write_node_files(
    paths: NodePaths,
    network: NodeNetwork,
    ports: NodePorts,
    sandbox_image: str,
    pki: NodePki,
) -> None:
    for directory in (paths.cni_conf_dir, paths.ipam_dir, paths.kubelet_root, paths.pod_logs):
        directory.mkdir(parents=True, exist_ok=True)
    paths.containerd_config.parent.mkdir(parents=True, exist_ok=True)
    paths.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.containerd_config.write_text(node_config.build_containerd_config(paths, sandbox_image))
    cni = node_config.build_cni_config(network, paths)
    (paths.cni_conf_dir / "10-rembg.conflist").write_text(json.dumps(cni, indent=2))
    # No cluster DNS here: pods get an empty resolver config rather than the host's.
    paths.resolv_conf.write_text("")
    kubelet = node_config.build_kubelet_config(
        network, paths, ports, pki.ca, (pki.kubelet_serving_cert, pki.kubelet_serving_key)
    )
    paths.kubelet_config.write_text(yaml.safe_dump(kubelet, sort_keys=False))
    proxy = node_config.build_kube_proxy_config(network, ports, pki.kube_proxy_kubeconfig)
    paths.proxy_config.write_text(yaml.safe_dump(proxy, sort_keys=False))


class NodePki(BaseModel):
    """The files the node's daemons authenticate with (written by the cluster's PKI step)."""

    ca: Path
    kubelet_kubeconfig: Path
    kube_proxy_kubeconfig: Path
    kubelet_serving_cert: Path
    kubelet_serving_key: Path


def ctr(paths: NodePaths, *args: str, timeout: float = CTR_TIMEOUT_SECONDS) -> str:
    return _run(
        ["ctr", f"--address={paths.containerd_socket}", "--namespace=k8s.io", *args],
        timeout=timeout,
    )


def containerd_up(paths: NodePaths) -> bool:
    try:
        ctr(paths, "version", timeout=5)
    except (DevClusterError, subprocess.TimeoutExpired):
        return False
    return True


def import_images(paths: NodePaths, images: ImageIndex) -> None:
    """Imports every image archive into the node's containerd (unpacked for its snapshotter)."""
    for image in images.images.values():
        ctr(paths, "images", "import", "--no-unpack=false", str(image.archive))


# ---- teardown --------------------------------------------------------------------------------


def drain_node(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Deletes every workload, then the node's pods with a short grace period, so kubelet stops
    each sandbox through the CRI (CNI DEL runs, no shim is left) before the node goes away."""
    kubectl("delete", WORKLOAD_KINDS, "--all", "-A", "--wait=false", check=False, timeout=60)
    selector = f"--field-selector=spec.nodeName={node_config.NODE_NAME}"
    kubectl(
        "delete",
        "pods",
        "--all",
        "-A",
        selector,
        "--grace-period=1",
        "--wait=false",
        check=False,
        timeout=60,
    )
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        listed = kubectl("get", "pods", "-A", selector, "-o", "name", check=False, timeout=30)
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)


def remove_leftover_containers(paths: NodePaths) -> None:
    """Whatever kubelet did not stop (it died, or the API server was gone): kill and remove."""
    if not containerd_up(paths):
        return
    for line in ctr(paths, "tasks", "ls", "-q", timeout=30).split():
        with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
            ctr(paths, "tasks", "kill", "--signal=SIGKILL", line, timeout=30)
    time.sleep(0.5)
    for line in ctr(paths, "containers", "ls", "-q", timeout=30).split():
        with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
            ctr(paths, "tasks", "delete", "--force", line, timeout=30)
        with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
            ctr(paths, "containers", "rm", line, timeout=30)


def kill_shims(paths: NodePaths) -> list[int]:
    """The runc shims of our containerd (found by its socket on their command line)."""
    socket = str(paths.containerd_socket)
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if socket in " ".join(proc.info["cmdline"] or ()):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
    return killed


def teardown_host(state: RealNodeState, kube_proxy: Path) -> list[str]:
    """Puts the host back as `state.before` recorded it; returns what could not be restored."""
    problems: list[str] = []
    paths = NodePaths(state.root)
    _kill_pod_processes(state.before)
    _run([str(kube_proxy), "--cleanup"], check=False, timeout=60)
    problems += _remove_new_chains(state.before)
    problems += _unmount_under(state.root)
    problems += _unmount_under(paths.kubelet_root)
    _delete_links(state.bridge)
    for path, existed in state.before.paths.items():
        if not existed and not host_state.mounts_under(Path(path)):
            if Path(path).is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
    problems += host_state.remove_cgroups(host_state.new_cgroups(state.before, "kubepods"))
    for name, value in state.before.sysctls.items():
        if value is not None and host_state.read_sysctl(name) != value:
            try:
                host_state.write_sysctl(name, value)
            except OSError as error:
                problems.append(f"sysctl {name}: {error}")
    shutil.rmtree(paths.ipam_dir, ignore_errors=True)
    for directory in paths.host_dirs:
        if not host_state.mounts_under(directory):  # never delete through a mount left in place
            shutil.rmtree(directory, ignore_errors=True)
    return problems


def _new_chains(before: list[str], now: list[str]) -> dict[str, list[str]]:
    """table -> chains (KUBE-* and CNI-*) that exist now and did not before."""

    def chains(lines: list[str]) -> set[tuple[str, str]]:
        found, table = set(), ""
        for line in lines:
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                found.add((table, line[1:].split()[0]))
        return found

    added: dict[str, list[str]] = {}
    for table, chain in sorted(chains(now) - chains(before)):
        if chain.startswith(("KUBE-", "CNI-")):
            added.setdefault(table, []).append(chain)
    return added


def kube_chains(snapshot: host_state.HostSnapshot) -> list[str]:
    """KUBE-* chains already on the host (another kubelet or kube-proxy)."""
    return sorted(
        {
            line[1:].split()[0]
            for lines in snapshot.iptables.values()
            for line in lines
            if line.startswith(":KUBE-")
        }
    )


def _remove_new_chains(before: host_state.HostSnapshot) -> list[str]:
    """Rules jumping to chains kubelet or kube-proxy made, then those chains (flushed)."""
    problems = []
    for family in host_state.IPTABLES_FAMILIES:
        if shutil.which(family) is None:
            continue
        now = host_state.normalise_iptables_save(_run([f"{family}-save"], check=False))
        for table, chains in _new_chains(before.iptables.get(family, []), now).items():
            targets = set(chains)
            for line in now:
                parts = shlex.split(line)  # kube-proxy's rules carry quoted comments
                if parts[:1] == ["-A"] and ("-j" in parts or "-g" in parts):
                    jump = parts[parts.index("-j" if "-j" in parts else "-g") + 1]
                    if jump in targets and parts[1] not in targets:
                        _run([family, "-t", table, "-D", *parts[1:]], check=False)
            for chain in chains:
                _run([family, "-t", table, "-F", chain], check=False)
            for chain in chains:
                result = subprocess.run(
                    [family, "-t", table, "-X", chain], capture_output=True, text=True, check=False
                )
                if result.returncode != 0:
                    problems.append(f"{family} -t {table} -X {chain}: {result.stderr.strip()}")
    return problems


def _unmount_under(root: Path) -> list[str]:
    """Unmounts everything mounted at or below root, deepest first."""
    for _ in range(3):
        points = host_state.mounts_under(root)
        if not points:
            return []
        for point in sorted(set(points), key=len, reverse=True):
            result = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return [f"still mounted: {p}" for p in host_state.mounts_under(root)]


def _delete_links(bridge: str) -> None:
    """The pods' host-side veths left on our bridge, then the bridge itself."""
    masters = Path("/sys/class/net")
    for link in masters.iterdir() if masters.is_dir() else []:
        master = link / "master"
        if master.exists() and master.resolve().name == bridge:
            _run(["ip", "link", "delete", link.name], check=False)
    if (masters / bridge).exists():
        _run(["ip", "link", "delete", bridge], check=False)


def _kill_pod_processes(before: host_state.HostSnapshot) -> None:
    """Container processes outlive their killed shims: whatever still runs in the cgroups the
    node made (kubepods) is one of its pods' processes, and is SIGKILLed."""
    for top in host_state.new_cgroups(before, "kubepods"):
        for procs in Path(top).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
