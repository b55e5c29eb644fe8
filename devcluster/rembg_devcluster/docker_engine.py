"""A Docker engine for kind: the host's own when one answers, else one we start and stop.

Ours is Debian's `dockerd` with a private data root, exec root and socket, and with every
host-wide network feature off (no iptables rules, no ip_forward, no masquerading, no default
bridge): kind's nodes only need the bridge of kind's own network, and the host reaches them on
it directly. What the engine and the kind nodes change on the host anyway (their bridge and
veths, cgroups, and the sysctls each node's kubelet writes, which are global) is recorded before
the engine starts and put back when it stops; `stop()` returns what differs still.

Docker 20.10 asks runc for every capability it knows for a `--privileged` container (kind's
nodes), and root here lacks some (CAP_SYS_RESOURCE): runc then fails with "unable to apply caps:
operation not permitted". The engine's runtime is runc behind a small wrapper
(devcluster/kind/runc-caps) that drops, from each container's and exec's spec, the capabilities
this host's bounding set does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rembg_devcluster import host_state, process
from rembg_devcluster.errors import DevClusterError

# Linux capability numbers 0..40 (capability.h), the names runc's specs use.
CAPABILITIES = (
    *("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID"),
    *("SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN"),
    *("NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE"),
    *("SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME"),
    *("SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP"),
    *("MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ"),
    *("PERFMON", "BPF", "CHECKPOINT_RESTORE"),
)
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
RUNC = "/usr/sbin/runc"

RUNC_WRAPPER = Path(__file__).resolve().parents[1] / "kind" / "runc-caps"


def missing_capabilities(status: str | None = None) -> list[str]:
    """CAP_* names (0..40) absent from this process's bounding set (/proc/self/status)."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    line = next(row for row in text.splitlines() if row.startswith("CapBnd:"))
    bounding = int(line.split()[1], 16)
    return [f"CAP_{name}" for bit, name in enumerate(CAPABILITIES) if not bounding >> bit & 1]


def build_runc_wrapper(drop: list[str], runc: str = RUNC) -> str:
    """The wrapper script's text: `drop` removed from every spec runc is handed."""
    template = RUNC_WRAPPER.read_text()
    return template.replace("@DROP@", json.dumps(drop)).replace("@RUNC@", shlex.quote(runc))


def build_dockerd_args(root: Path, data_root: Path, wrapper: Path) -> list[str]:
    """dockerd with its own roots and socket, changing no host-wide network setting."""
    return [
        "dockerd",
        f"--data-root={data_root}",
        f"--exec-root={root / 'exec'}",
        f"--host=unix://{root / 'docker.sock'}",
        f"--pidfile={root / 'dockerd.pid'}",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        f"--add-runtime=rembg-runc={wrapper}",
        "--default-runtime=rembg-runc",
    ]


@dataclass
class DockerEngine:
    """The engine kind talks to: `env()` points the docker CLI (and kind) at it. `before` is
    the host as it was when we started using it."""

    host: str | None
    before: host_state.HostSnapshot
    ours: bool = False
    root: Path | None = None
    data_root: Path | None = None
    record: process.ProcessRecord | None = None
    popen: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.host:
            env["DOCKER_HOST"] = self.host
        return env

    def docker(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise DevClusterError(f"docker {' '.join(args)}: {result.stderr.strip()[-600:]}")
        return result

    def answers(self) -> bool:
        try:
            probe = self.docker("info", "--format", "{{.ServerVersion}}", timeout=15, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return probe.returncode == 0

    def stop(self) -> list[str]:
        """Ours: every container, volume and network removed, dockerd stopped by its PID, the
        host put back. The host's engine is left running; the global sysctls kind's kubelets
        wrote are put back all the same. Returns what still differs."""
        if not self.ours or self.record is None:
            return restore_sysctls(self.before) + [
                line
                for line in host_state.differences(self.before, host_state.take_snapshot())
                if line.startswith("sysctl ")
            ]
        bridges = self._remove_everything()
        process.stop(self.record, self.popen, grace_seconds=STOP_TIMEOUT_SECONDS)
        self.record = self.popen = None
        return restore_host(self.before, bridges, self.root, self.data_root)

    def _remove_everything(self) -> list[str]:
        """Removes our containers, networks and volumes; returns the networks' bridge names."""
        bridges: list[str] = []
        with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
            networks = self.docker("network", "ls", "-q", "--no-trunc", "--filter", "type=custom")
            bridges = [f"br-{network[:12]}" for network in networks.stdout.split()]
        for listing, remove in (
            (("ps", "-aq"), ("rm", "-f", "-v")),
            (("network", "ls", "-q", "--filter", "type=custom"), ("network", "rm")),
            (("volume", "ls", "-q"), ("volume", "rm", "-f")),
        ):
            with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
                if ids := self.docker(*listing, timeout=60).stdout.split():
                    self.docker(*remove, *ids, timeout=180, check=False)
        return bridges


def existing_engine() -> DockerEngine | None:
    """The engine DOCKER_HOST (or the default socket) names, when one answers."""
    if shutil.which("docker") is None:
        return None
    engine = DockerEngine(host=os.environ.get("DOCKER_HOST"), before=host_state.take_snapshot())
    return engine if engine.answers() else None


def start_private_engine(root: Path, data_root: Path, log: Path) -> DockerEngine:
    """Starts Debian's dockerd under `root` (socket, exec root; removed when it stops), images
    in `data_root` (kept: a node image is loaded once), its output in `log`."""
    for tool in ("dockerd", "docker", "jq", "runc"):
        if shutil.which(tool) is None:
            raise DevClusterError(f"no {tool} on PATH: `make system-deps` installs docker.io")
    if os.geteuid() != 0:
        raise DevClusterError("starting a Docker engine needs root")
    root.mkdir(parents=True, exist_ok=True)
    data_root.mkdir(parents=True, exist_ok=True)
    wrapper = root / "runc-caps"
    wrapper.write_text(build_runc_wrapper(missing_capabilities(), shutil.which("runc") or RUNC))
    wrapper.chmod(0o755)
    before = host_state.take_snapshot()
    popen, record = process.spawn("dockerd", build_dockerd_args(root, data_root, wrapper), log)
    engine = DockerEngine(
        host=f"unix://{root / 'docker.sock'}",
        before=before,
        ours=True,
        root=root,
        data_root=data_root,
        record=record,
        popen=popen,
    )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not engine.answers():
        if popen.poll() is not None or time.monotonic() > deadline:
            tail = process.log_tail(log)
            engine.stop()
            raise DevClusterError(f"dockerd did not come up (exit {popen.returncode}):\n{tail}")
        time.sleep(0.5)
    return engine


def restore_sysctls(before: host_state.HostSnapshot) -> list[str]:
    """kubelet writes a few global sysctls (vm.overcommit_memory, kernel.panic, ...), even in a
    kind node: each goes back to its value before."""
    problems = []
    for name, value in before.sysctls.items():
        if value is not None and host_state.read_sysctl(name) != value:
            try:
                host_state.write_sysctl(name, value)
            except OSError as error:
                problems.append(f"sysctl {name}: {error}")
    return problems


def restore_host(
    before: host_state.HostSnapshot,
    bridges: list[str],
    exec_root: Path | None,
    data_root: Path | None,
) -> list[str]:
    """Puts back what our engine and its nodes changed: mounts left under its roots, its
    networks' bridges and their veths (if dockerd left them), its `docker` cgroups, the sysctls;
    removes its exec root. Returns what still differs from `before`."""
    for root in (r for r in (exec_root, data_root) if r is not None):
        for point in sorted(host_state.mounts_under(root), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    problems = restore_sysctls(before)
    links = Path("/sys/class/net")
    for link in sorted(links.iterdir()) if links.is_dir() else []:
        master = link / "master"
        on_ours = master.exists() and master.resolve().name in bridges
        if link.name not in before.links and (link.name in bridges or on_ours):
            subprocess.run(["ip", "link", "delete", link.name], capture_output=True, check=False)
    problems += host_state.remove_cgroups(host_state.new_cgroups(before, "docker"))
    if exec_root is not None and not host_state.mounts_under(exec_root):  # never through a mount
        shutil.rmtree(exec_root, ignore_errors=True)
    return problems + host_state.differences(before, host_state.take_snapshot())
