"""examples/monitoring/alertmanager.yaml: valid for Alertmanager 0.25 (amtool), routes each
severity to its receiver, names only alerts the operator writes, and inhibits what it says it
inhibits in a real Alertmanager (Debian's prometheus-alertmanager) that delivers to a local
webhook."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rembg_devcluster.errors import BinaryMissingError
from rembg_devcluster.monitoring import (
    AlertmanagerAPI,
    WebhookSink,
    alertmanager_binary,
    build_alertmanager_args,
    route_to_sink,
)
from rembg_devcluster.ports import free_port
from rembg_operator.builders import ServiceRef, plan_pools
from rembg_operator.builders.monitoring import build_rule_groups
from rembg_operator.models import RembgServiceSpec

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "monitoring" / "alertmanager.yaml"
AMTOOL = shutil.which("amtool")
HINT = "`make system-deps` installs Debian's prometheus-alertmanager (amtool included)"

# The names other tests and users rely on (the monitoring e2e swaps only their URLs).
PAGE = "rembg-page"
TICKET = "rembg-ticket"

# A spec with every alert the operator can write: both pools, the canary, the job path.
ALL_ALERTS_SPEC = RembgServiceSpec.model_validate(
    {"cpu": {}, "gpu": {}, "jobs": {"enabled": True, "redis": {"secretName": "redis"}}}
)


def _config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return config


def _operator_alerts() -> dict[str, dict[str, str]]:
    """Alert name -> its static labels, from the rules the operator really builds."""
    ref = ServiceRef(name="demo", namespace="team-a")
    groups = build_rule_groups(ref, ALL_ALERTS_SPEC, plan_pools(ALL_ALERTS_SPEC, gpu_capacity=4))
    return {r["alert"]: r["labels"] for g in groups for r in g["rules"] if "alert" in r}


def test_receivers_keep_their_names() -> None:
    config = _config()
    assert [r["name"] for r in config["receivers"]] == [PAGE, TICKET]
    for receiver in config["receivers"]:
        (webhook,) = receiver["webhook_configs"]
        assert ".example.com/replace-me/" in webhook["url"], "placeholder URLs only"
        assert webhook["send_resolved"] is True


def test_every_operator_alert_has_a_routed_severity() -> None:
    severities = {labels["severity"] for labels in _operator_alerts().values()}
    routed = {
        m.split("=", 1)[1].strip('"') for r in _config()["route"]["routes"] for m in r["matchers"]
    }
    assert severities == routed == {"critical", "warning"}


def test_inhibition_names_only_alerts_the_operator_writes() -> None:
    alerts = set(_operator_alerts())
    named: set[str] = set()
    for rule in _config()["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            match = re.fullmatch(r'alertname=~?"([^"]+)"', matcher)
            if match:
                named |= set(match.group(1).split("|"))
    assert named, "the inhibit rules name alerts"
    assert named <= alerts, f"unknown alerts: {sorted(named - alerts)}"


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    # A host without it fails here with one line: never a silent skip.
    if AMTOOL is None:
        pytest.fail(f"amtool missing: {HINT}", pytrace=False)
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_amtool_check_config() -> None:
    result = _amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        # A critical per-pool alert pages.
        (
            "alertname=RembgHighErrorRate severity=critical namespace=team-a "
            "rembg_service=demo pool=cpu",
            PAGE,
        ),
        # A warning goes to the ticket queue.
        (
            "alertname=RembgHighLatency severity=warning namespace=team-a "
            "rembg_service=demo pool=gpu",
            TICKET,
        ),
        # The whole service down pages.
        ("alertname=RembgServiceDown severity=critical namespace=team-a rembg_service=demo", PAGE),
        # No severity at all: still a ticket, never dropped.
        ("alertname=SomethingElse namespace=team-a", TICKET),
    ],
)
def test_amtool_routes(labels: str, receiver: str) -> None:
    result = _amtool(
        "config",
        "routes",
        "test",
        f"--config.file={CONFIG}",
        f"--verify.receivers={receiver}",
        *labels.split(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


# ---- a real Alertmanager -----------------------------------------------------------------------


def firing(sink: WebhookSink) -> set[tuple[str, str, str, str]]:
    """(receiver, alertname, rembg_service, pool) of every firing alert delivered."""
    return {
        (d.receiver, d.labels["alertname"], d.labels["rembg_service"], d.labels.get("pool", ""))
        for d in sink.deliveries()
        if d.status == "firing"
    }


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, WebhookSink]]:
    try:
        binary = alertmanager_binary()
    except BinaryMissingError:
        pytest.fail(f"Alertmanager missing: {HINT}", pytrace=False)
    webhooks = WebhookSink()
    config = tmp_path / "alertmanager.yaml"  # where build_alertmanager_args points
    # What the monitoring e2e changes too: the receivers' URLs and the grouping timings.
    config.write_text(yaml.safe_dump(route_to_sink(_config(), webhooks.url)))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("wb")
    # The same command line the monitoring stack runs it with.
    argv = build_alertmanager_args(binary, tmp_path, f"127.0.0.1:{port}")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    api = AlertmanagerAPI(f"http://127.0.0.1:{port}")
    base = api.url
    try:
        deadline = time.monotonic() + 30
        while not _ready(api):
            assert process.poll() is None, (tmp_path / "alertmanager.log").read_text()
            assert time.monotonic() < deadline, "Alertmanager not ready"
            time.sleep(0.1)
        yield base, webhooks
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        webhooks.close()


def _ready(api: AlertmanagerAPI) -> bool:
    try:
        return api.ready()
    except httpx.HTTPError:
        return False


def _alert(name: str, severity: str, service: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {
            "alertname": name,
            "severity": severity,
            "namespace": "team-a",
            "rembg_service": service,
            **labels,
        },
        "annotations": {"summary": name},
    }


def test_real_alertmanager_routes_and_inhibits(alertmanager: tuple[str, WebhookSink]) -> None:
    base, webhooks = alertmanager
    alerts = [
        # demo is down: one page for the service, its causes stay, its symptoms are inhibited.
        _alert("RembgServiceDown", "critical", "demo"),
        _alert("RembgNoReadyReplicas", "critical", "demo", pool="cpu", deployment="demo-cpu"),
        _alert("RembgHighErrorRate", "critical", "demo", pool="cpu"),
        _alert("RembgHighLatency", "warning", "demo", pool="cpu"),
        _alert("RembgQueueSaturated", "warning", "demo", pool="cpu", pod="demo-cpu-1"),
        _alert("RembgCanaryFailing", "critical", "demo", pool="cpu", pod="p1", model="u2netp"),
        # other is up: its per-pool alerts go through.
        _alert("RembgNoReadyReplicas", "critical", "other", pool="gpu", deployment="other-gpu"),
        _alert("RembgHighLatency", "warning", "other", pool="cpu"),
        # A critical and a warning of the same alert and pool: the warning is inhibited; the
        # same warning on another pool is not.
        _alert("RembgQueueSaturated", "critical", "third", pool="cpu"),
        _alert("RembgQueueSaturated", "warning", "third", pool="cpu"),
        _alert("RembgQueueSaturated", "warning", "third", pool="gpu"),
    ]
    response = httpx.post(f"{base}/api/v2/alerts", json=alerts, timeout=10)
    assert response.status_code == 200, response.text
    expected = {
        (PAGE, "RembgServiceDown", "demo", ""),
        (PAGE, "RembgCanaryFailing", "demo", "cpu"),
        (PAGE, "RembgNoReadyReplicas", "other", "gpu"),
        (TICKET, "RembgHighLatency", "other", "cpu"),
        (PAGE, "RembgQueueSaturated", "third", "cpu"),
        (TICKET, "RembgQueueSaturated", "third", "gpu"),
    }
    deadline = time.monotonic() + 30
    while firing(webhooks) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    # A few more group intervals: an inhibited alert would have been delivered by now.
    time.sleep(3)
    assert firing(webhooks) == expected

    state = httpx.get(f"{base}/api/v2/alerts", timeout=10).json()
    inhibited = {
        (a["labels"]["alertname"], a["labels"]["rembg_service"], a["labels"]["severity"])
        for a in state
        if a["status"]["inhibitedBy"]
    }
    assert inhibited == {
        ("RembgNoReadyReplicas", "demo", "critical"),
        ("RembgHighErrorRate", "demo", "critical"),
        ("RembgHighLatency", "demo", "warning"),
        ("RembgQueueSaturated", "demo", "warning"),
        ("RembgQueueSaturated", "third", "warning"),
    }
