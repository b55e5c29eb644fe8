"""What a real node changes on the host, recorded before it starts and compared after it stops.

A snapshot holds the sysctls kubelet, kube-proxy and we may set, the iptables rulesets (IPv4
and IPv6, counters dropped), mount points, network links and IPv4 routes, the top-level cgroups
of every hierarchy, and the fixed paths containerd and kubelet write outside their configured
roots.
`differences(before, after)` lists, in words, what is not as it was.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

# kubelet's setupKernelTunables, our ip_forward, and what kube-proxy could set if misconfigured.
WATCHED_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.netfilter.nf_conntrack_max",
)
# Written by containerd 1.6, the CNI library and kubelet whatever their configured roots.
FIXED_PATHS = (
    "/run/containerd",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/run/rembg-devcluster-real-node",  # real_node.OWNER_FILE
)
# The real node's own short directories outside its state dir (node_config.NodePaths).
NODE_DIR_GLOBS = ("/run/rembg-node-*", "/var/lib/rembg-node-*")
CGROUP_ROOT = Path("/sys/fs/cgroup")
IPTABLES_FAMILIES = ("iptables", "ip6tables")
_COUNTERS = re.compile(r"\s*\[\d+:\d+\]")


class HostSnapshot(BaseModel):
    sysctls: dict[str, str | None]
    iptables: dict[str, list[str]]
    mounts: list[str]
    links: list[str]
    cgroups: list[str]
    paths: dict[str, bool]
    node_dirs: list[str] = []
    routes: list[str] = []


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    sysctl_path(name).write_text(value + "\n")


def normalise_iptables_save(text: str) -> list[str]:
    """iptables-save output without comments and packet counters, so two dumps compare.

    A table with no rule, no chain of its own and every policy ACCEPT filters nothing: it is
    dropped, as if never loaded (iptables-save shows a table once anything has listed it).
    """
    lines: list[str] = []
    table: list[str] = []
    for raw in text.splitlines():
        if not raw or raw.startswith("#"):
            continue
        line = _COUNTERS.sub("", raw)
        table.append(line)
        if line == "COMMIT":
            if not _is_empty_table(table):
                lines += table
            table = []
    return lines + table


def _is_empty_table(block: list[str]) -> bool:
    body = block[1:-1]
    return all(line.startswith(":") and line.split()[1] == "ACCEPT" for line in body)


def _iptables_rules(family: str) -> list[str]:
    save = shutil.which(f"{family}-save")
    if save is None:
        return []
    result = subprocess.run([save], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        # An empty ruleset here would hide every rule from the comparison.
        raise OSError(f"{save} exited {result.returncode}: {result.stderr.strip()}")
    return normalise_iptables_save(result.stdout)


def mount_points(mountinfo: str) -> list[str]:
    """The mount points (5th field) of /proc/self/mountinfo text, in order."""
    return [line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, as this process sees them now."""
    prefix = str(root.resolve())
    return [
        p
        for p in mount_points(Path("/proc/self/mountinfo").read_text())
        if p == prefix or p.startswith(prefix + "/")
    ]


def take_cgroups() -> list[str]:
    found = []
    for hierarchy in sorted(CGROUP_ROOT.iterdir()) if CGROUP_ROOT.is_dir() else []:
        if hierarchy.is_dir():
            found += [str(child) for child in sorted(hierarchy.iterdir()) if child.is_dir()]
    return found


def new_cgroups(before: HostSnapshot, name: str) -> list[str]:
    """Top-level cgroups called `name` (kubelet's `kubepods`, dockerd's `docker`), one per
    hierarchy, that were not there before; nothing else is touched, whoever made it."""
    existed = set(before.cgroups)
    return [top for top in take_cgroups() if top not in existed and Path(top).name == name]


def remove_cgroups(tops: list[str]) -> list[str]:
    """Removes each cgroup tree, deepest first; returns the ones that would not go."""
    problems = []
    for top in tops:
        for directory in sorted(
            (p for p in Path(top).rglob("*") if p.is_dir()),
            key=lambda p: len(p.parts),
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        try:
            Path(top).rmdir()
        except OSError as error:
            problems.append(f"cgroup {top}: {error}")
    return problems


def take_snapshot() -> HostSnapshot:
    return HostSnapshot(
        sysctls={name: read_sysctl(name) for name in WATCHED_SYSCTLS},
        iptables={family: _iptables_rules(family) for family in IPTABLES_FAMILIES},
        mounts=mount_points(Path("/proc/self/mountinfo").read_text()),
        links=sorted(p.name for p in Path("/sys/class/net").iterdir()),
        cgroups=take_cgroups(),
        paths={path: Path(path).exists() for path in FIXED_PATHS},
        node_dirs=sorted(str(p) for pattern in NODE_DIR_GLOBS for p in Path("/").glob(pattern[1:])),
        routes=_routes(),
    )


def _routes() -> list[str]:
    """The main IPv4 routing table (a route to a kind cluster's Services, for one)."""
    result = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=False, timeout=30
    )
    return sorted(line.strip() for line in result.stdout.splitlines() if line.strip())


def _list_changes(what: str, before: list[str], after: list[str]) -> list[str]:
    """Counted, not just compared as sets: a second copy of a rule or a mount stacked on a
    mount point is a change too."""
    was, now = Counter(before), Counter(after)
    added = [x for x in after if now[x] > was[x]]
    removed = [x for x in before if was[x] > now[x]]
    return [f"{what} added: {x}" for x in dict.fromkeys(added)] + [
        f"{what} removed: {x}" for x in dict.fromkeys(removed)
    ]


def differences(before: HostSnapshot, after: HostSnapshot) -> list[str]:
    """Every way `after` differs from `before`, one sentence each (empty: the host is as it was)."""
    found = [
        f"sysctl {name} was {before.sysctls.get(name)} and is {value}"
        for name, value in after.sysctls.items()
        if before.sysctls.get(name) != value
    ]
    for family in IPTABLES_FAMILIES:
        found += _list_changes(
            f"{family} rule", before.iptables.get(family, []), after.iptables.get(family, [])
        )
    found += _list_changes("mount", before.mounts, after.mounts)
    found += _list_changes("link", before.links, after.links)
    found += _list_changes("cgroup", before.cgroups, after.cgroups)
    found += _list_changes("node directory", before.node_dirs, after.node_dirs)
    found += _list_changes("route", before.routes, after.routes)
    found += [
        f"path {path} {'appeared' if exists else 'disappeared'}"
        for path, exists in after.paths.items()
        if before.paths.get(path) != exists
    ]
    return found
