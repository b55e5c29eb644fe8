"""`make run`'s demo, end to end: control plane, CRDs, operator, the sample RembgService Ready on
the real node (its pod runs our image), and one real photo's background removed through the
Service's ClusterIP. A host that cannot run a real node fails here with the demo's own line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from rembg_devcluster import host_state

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_fleet_and_cuts_out_a_photo(tmp_path: Path) -> None:
    if os.environ.get("REMBG_E2E_KUBECONFIG"):
        pytest.skip("the demo starts its own local control plane")
    state = tmp_path / "demo-cluster"
    cli = [sys.executable, "-m", "rembg_devcluster", "--dir", str(state)]
    host_before = host_state.take_snapshot()
    try:
        demo = subprocess.run(
            [*cli, "demo"], cwd=REPO, capture_output=True, text=True, timeout=540, check=False
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "is Ready; its pods run our image on the real node" in demo.stdout, demo.stdout
        assert "the Service at http://10.0." in demo.stdout
        status = json.loads(
            subprocess.run(
                [*cli, "status"], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        )
        assert {"operator", "kubelet", "containerd", "kube-apiserver"} <= set(status["processes"])
        assert "rembg-server" not in status["processes"]
    finally:
        down = subprocess.run(
            [*cli, "down"], capture_output=True, text=True, timeout=400, check=False
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert host_state.differences(host_before, host_state.take_snapshot()) == []
    cutout = Image.open(io.BytesIO((state / "astronaut-cutout.png").read_bytes()))
    assert cutout.mode == "RGBA"
    alpha = np.asarray(cutout)[..., 3]
    # A real cutout: the background is gone and the astronaut is kept (u2netp's mask is soft).
    assert (alpha <= 8).mean() > 0.2
    assert (alpha >= 128).mean() > 0.3
    assert alpha[:60, :60].mean() < 16  # top-left corner: studio backdrop
    assert alpha[100:200, 180:300].mean() > 128  # her face
    after = json.loads((state / "state.json").read_text())
    for record in after["processes"]:
        if psutil.pid_exists(record["pid"]):
            proc = psutil.Process(record["pid"])
            same = abs(proc.create_time() - record["create_time"]) < 1
            assert not same or proc.status() == psutil.STATUS_ZOMBIE, record["name"]
