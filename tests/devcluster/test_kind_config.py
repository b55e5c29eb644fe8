"""The kind path's pure parts: the cluster config for this host, our CNI's manifests, the Docker
engine's flags and its runc wrapper (run for real against a fake runc), no cluster started."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rembg_devcluster import docker_engine, host_state
from rembg_devcluster.kind import (
    POD_SUBNET,
    SERVICE_SUBNET,
    build_cluster_config,
    build_cni_manifests,
)

TOPOLOGY = Path(__file__).resolve().parents[2] / "e2e" / "kind" / "kind-config.yaml"
# /proc/self/status of root on these hosts: every capability but CAP_SYS_RESOURCE (bit 24).
STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapBnd:\t000001fffeffffff\nCapAmb:\t0\n"


def _topology() -> dict:
    return yaml.safe_load(TOPOLOGY.read_text())


def test_on_a_cgroup_v1_host_without_cap_sys_resource_the_config_carries_both_settings() -> None:
    config = build_cluster_config(
        _topology(), own_cni=True, cgroup_v1=True, restrict_oom_score_adj=True
    )
    kubelet = [yaml.safe_load(p) for p in config["kubeadmConfigPatches"]]
    assert {"kind": "KubeletConfiguration", "failCgroupV1": False} in kubelet
    (containerd,) = config["containerdConfigPatches"]
    assert "restrict_oom_score_adj = true" in containerd
    assert config["networking"] == {
        "podSubnet": POD_SUBNET,
        "serviceSubnet": SERVICE_SUBNET,
        "disableDefaultCNI": True,
    }


def test_the_topology_is_kept_and_not_modified() -> None:
    topology = _topology()
    before = json.dumps(topology, sort_keys=True)
    config = build_cluster_config(
        topology, own_cni=False, cgroup_v1=False, restrict_oom_score_adj=False
    )
    assert json.dumps(topology, sort_keys=True) == before
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker"]
    gpu = config["nodes"][2]
    assert gpu["labels"]["nvidia.com/gpu.present"] == "true"
    assert "NoSchedule" in gpu["kubeadmConfigPatches"][0]
    # A cgroup v2 host with every capability, on kind's own image: nothing added.
    assert "kubeadmConfigPatches" not in config
    assert "containerdConfigPatches" not in config
    assert "disableDefaultCNI" not in config["networking"]


def test_the_cni_runs_on_every_node_with_read_only_access_to_nodes() -> None:
    manifests = {m["kind"]: m for m in build_cni_manifests("localhost/cni:1", "10.9.0.0/16")}
    (rule,) = manifests["ClusterRole"]["rules"]
    assert rule == {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # The control plane and the tainted GPU worker need a CNI config too.
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (container,) = pod["containers"]
    assert container["image"] == "localhost/cni:1"
    assert container["imagePullPolicy"] == "Never"  # preloaded in the node image
    assert {"name": "CLUSTER_CIDR", "value": "10.9.0.0/16"} in container["env"]
    assert container["securityContext"] == {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}
    subject = manifests["ClusterRoleBinding"]["subjects"][0]
    assert subject["name"] == pod["serviceAccountName"]


def test_missing_capabilities_reads_the_bounding_set() -> None:
    assert docker_engine.missing_capabilities(STATUS) == ["CAP_SYS_RESOURCE"]
    everything = STATUS.replace("000001fffeffffff", "000001ffffffffff")
    assert docker_engine.missing_capabilities(everything) == []


def test_our_dockerd_changes_no_host_wide_network_setting(tmp_path: Path) -> None:
    args = docker_engine.build_dockerd_args(tmp_path, tmp_path / "data", tmp_path / "runc")
    for flag in ("--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"):
        assert flag in args
    assert "--bridge=none" in args
    assert f"--host=unix://{tmp_path / 'docker.sock'}" in args
    assert "--default-runtime=rembg-runc" in args
    assert f"--add-runtime=rembg-runc={tmp_path / 'runc'}" in args


def test_the_runc_wrapper_drops_missing_capabilities_from_specs_and_execs(tmp_path: Path) -> None:
    assert shutil.which("jq"), "the runc wrapper runs jq: `make system-deps` installs it"
    fake_runc = tmp_path / "runc"
    fake_runc.write_text('#!/bin/bash\necho "runc $*"\n')
    fake_runc.chmod(0o755)
    wrapper = tmp_path / "runc-caps"
    wrapper.write_text(docker_engine.build_runc_wrapper(["CAP_SYS_RESOURCE"], str(fake_runc)))
    wrapper.chmod(0o755)
    caps = ["CAP_CHOWN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"process": {"args": ["sh"], "capabilities": {"bounding": caps, "effective": caps}}}
    (bundle / "config.json").write_text(json.dumps(spec))
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh"], "capabilities": {"permitted": caps}}))

    create = subprocess.run(
        [str(wrapper), "--root", "/x", "create", "--bundle", str(bundle), "id1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert create.stdout.strip() == f"runc --root /x create --bundle {bundle} id1"
    edited = json.loads((bundle / "config.json").read_text())["process"]
    assert edited["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    assert edited["capabilities"]["effective"] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    assert edited["args"] == ["sh"]

    subprocess.run([str(wrapper), "exec", "--process", str(process), "id1"], check=True)
    assert json.loads(process.read_text())["capabilities"]["permitted"] == [
        "CAP_CHOWN",
        "CAP_NET_ADMIN",
    ]
    # Anything without a spec passes through untouched.
    state = subprocess.run(
        [str(wrapper), "state", "id1"], capture_output=True, text=True, check=True
    )
    assert state.stdout.strip() == "runc state id1"


def test_only_new_cgroups_of_the_name_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for hierarchy in ("cpu", "memory"):
        (tmp_path / hierarchy / "user.slice").mkdir(parents=True)
    (tmp_path / "memory" / "docker").mkdir()  # someone else's, there before
    monkeypatch.setattr(host_state, "CGROUP_ROOT", tmp_path)
    before = host_state.HostSnapshot(
        sysctls={}, iptables={}, mounts=[], links=[], cgroups=host_state.take_cgroups(), paths={}
    )
    (tmp_path / "cpu" / "docker" / "abc" / "inner").mkdir(parents=True)
    (tmp_path / "cpu" / "other").mkdir()
    new = host_state.new_cgroups(before, "docker")
    assert new == [str(tmp_path / "cpu" / "docker")]
    assert host_state.remove_cgroups(new) == []
    assert not (tmp_path / "cpu" / "docker").exists()
    assert (tmp_path / "memory" / "docker").is_dir()
    assert (tmp_path / "cpu" / "other").is_dir()


def test_a_route_left_behind_is_a_difference() -> None:
    before = host_state.HostSnapshot(
        sysctls={}, iptables={}, mounts=[], links=[], cgroups=[], paths={}, routes=["default via 1"]
    )
    after = before.model_copy(update={"routes": [*before.routes, "10.96.0.0/16 via 172.18.0.2"]})
    assert host_state.differences(before, before) == []
    assert host_state.differences(before, after) == ["route added: 10.96.0.0/16 via 172.18.0.2"]
