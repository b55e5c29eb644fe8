"""GitOps for real: Argo CD installs the operator from our chart and syncs a RembgService from Git,
judging its health with our health.lua in Argo CD's own Lua engine.

One cluster for the module: the local control plane with the real node; Argo CD v3 (its
application controller and repo server, built from the Go module, with Debian's Redis) beside it
as processes (rembg_devcluster.argocd); a bare Git repository on disk served as file://, holding
the working tree's charts/ and examples/ as a user's fork would (REPO_URL_PLACEHOLDER replaced,
branch main). argocd-cm carries examples/argocd/argocd-cm-health.yaml's keys verbatim. The test
applies examples/argocd/root-application.yaml only: everything else (the chart's Application, the
CRD, the operator's Deployment, the RembgService Application, the RembgService, its pods) comes
from Git through Argo CD.

One change to the fork, committed before Argo CD reads it: examples/minimal.yaml's CPU pool gets
requests of half a CPU and 1 GiB (the default, 1 CPU, leaves the 2-core node too little room
beside the operator and the system pods; examples/minimal.yaml itself is unchanged).

Bounds (a loaded 2-core machine): Argo CD re-reads Git every RECONCILIATION (timeout.reconciliation,
also the repo server's revision cache); a change shows within two of those plus a sync and the
operator's reconcile, so the Git-driven waits allow GIT_BOUND. Pods (operator image, inference
server warming its model) get POD_BOUND.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from rembg_devcluster import DevCluster
from rembg_devcluster.argocd import NAMESPACE, ArgoCdStack, GitRepo, argocd_binaries
from rembg_devcluster.errors import BinaryMissingError

from e2e.argocd_support import Sample, Timeline
from e2e.operator_support import condition, eventually, get
from e2e.real_node_support import describe_pods, start_real_node_cluster

REPO = Path(__file__).resolve().parents[1]
ROOT_APP = "rembg-fleet"
OPERATOR_APP = "rembg-operator"
FLEET_APP = "rembg-fleet-minimal"
SYSTEM = "rembg-system"
FLEET = "rembg"
SERVICE = "demo"
CRD = "rembgservices.rembg.io"
MINIMAL = "examples/minimal.yaml"
FLEET_APP_FILE = "examples/argocd/application-rembgservice.yaml"
RECONCILIATION = "10s"
GIT_BOUND = 180.0
POD_BOUND = 360.0
# After the repair, how long Argo CD must stay Synced with no new sync operation.
QUIET_WINDOW = 30.0
SMALL = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
INVALID = {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}
INVALID_MESSAGE = "cpu request 4 is above its limit 2"

pytestmark = pytest.mark.timeout(900)


@dataclass
class GitOps:
    cluster: DevCluster
    repo: GitRepo
    argocd: ArgoCdStack
    timeline: Timeline
    applied: float  # when the root Application was applied


def _minimal(resources: Mapping[str, object]) -> str:
    """examples/minimal.yaml with the CPU pool's resources set."""
    text = (REPO / MINIMAL).read_text()
    manifest = yaml.safe_load(text)
    manifest["spec"]["cpu"]["resources"] = dict(resources)
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    return header + yaml.safe_dump(manifest, sort_keys=False)


def _snippet() -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load(
        (REPO / "examples" / "argocd" / "argocd-cm-health.yaml").read_text()
    )
    return loaded


@pytest.fixture(scope="module")
def gitops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitOps]:
    try:
        argocd_binaries()
    except BinaryMissingError as error:
        pytest.fail(str(error), pytrace=False)
    workdir = tmp_path_factory.mktemp("argocd")
    cluster = start_real_node_cluster(workdir / "cluster")
    timeline: Timeline | None = None
    try:
        repo = GitRepo.create(workdir / "git", REPO)
        repo.commit(MINIMAL, _minimal(SMALL), "minimal: half a CPU, to fit the 2-core node")
        started = time.monotonic()
        argocd = ArgoCdStack.start(
            cluster, workdir / "argocd", _snippet(), reconciliation=RECONCILIATION
        )
        print(f"\nArgo CD {argocd.binaries.version} up in {time.monotonic() - started:.0f}s")
        timeline = Timeline(cluster, FLEET, SERVICE)
        timeline.start()
        applied = time.monotonic()
        argocd.apply_application(repo.read("examples/argocd/root-application.yaml"))
        yield GitOps(cluster, repo, argocd, timeline, applied)
    finally:
        if timeline is not None:
            timeline.stop()
        cluster.stop()
    assert cluster.state.teardown_problems == []


def _describe(gitops: GitOps) -> str:
    return (
        gitops.argocd.describe(ROOT_APP, OPERATOR_APP, FLEET_APP)
        + f"\n--- {SYSTEM} ---\n{describe_pods(gitops.cluster, SYSTEM)}"
        + f"\n--- {FLEET} ---\n{describe_pods(gitops.cluster, FLEET)}"
    )


def _print(gitops: GitOps, step: str, start: float) -> None:
    lines = gitops.timeline.transitions(start, ROOT_APP, OPERATOR_APP, FLEET_APP)
    print(f"\n{step} (seconds since the step started):\n  " + "\n  ".join(lines))


def _time(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _app_is(sample: Sample, name: str, sync: str, health: str) -> bool:
    state = sample.app(name)
    return state is not None and state.sync == sync and state.health == health


def test_the_chart_syncs_and_turns_healthy_before_the_fleet_application_exists(
    gitops: GitOps,
) -> None:
    """The root Application syncs wave -1 first: the chart's Application goes Synced+Healthy
    (CRD applied server-side with its keep policy, operator pod Ready) before the RembgService
    Application (wave 0) is created at all."""
    start, timeline = gitops.applied, gitops.timeline
    healthy = timeline.wait_for(
        "the operator Application Synced+Healthy",
        start,
        POD_BOUND,
        lambda s: _app_is(s, OPERATOR_APP, "Synced", "Healthy"),
        lambda: _describe(gitops),
    )
    created = timeline.wait_for(
        "the RembgService Application to be created",
        start,
        GIT_BOUND,
        lambda s: s.app(FLEET_APP) is not None,
        lambda: _describe(gitops),
    )
    _print(gitops, "root Application applied", start)
    # No sample before the chart was Healthy shows the fleet's Application.
    assert all(s.app(FLEET_APP) is None for s in timeline.since(start) if s.at < healthy.at)
    assert created.at >= healthy.at
    # The API server's own clock says the same: the fleet's Application was created no earlier
    # than the chart's Application turned Healthy (one-second resolution).
    operator_app = gitops.argocd.application(OPERATOR_APP) or {}
    fleet_app = gitops.argocd.application(FLEET_APP) or {}
    turned_healthy = operator_app["status"]["health"]["lastTransitionTime"]
    fleet_created = fleet_app["metadata"]["creationTimestamp"]
    print(f"chart Healthy at {turned_healthy}, fleet Application created at {fleet_created}")
    assert _time(fleet_created) >= _time(turned_healthy)
    crd = gitops.cluster.get_json("crd", CRD, "--show-managed-fields")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    managers = {(m["manager"], m["operation"]) for m in crd["metadata"]["managedFields"]}
    assert ("argocd-controller", "Apply") in managers, managers  # server-side apply
    deployment = get(gitops.cluster, SYSTEM, "deployment", OPERATOR_APP)
    assert deployment is not None
    assert condition(deployment, "Available").get("status") == "True"


def test_the_fleet_application_is_progressing_then_healthy_only_when_ready(
    gitops: GitOps,
) -> None:
    """Argo CD's Lua engine runs our health.lua: Progressing while the pool rolls out, Healthy
    only once the RembgService is Ready, with our message on the RembgService's health."""
    start, timeline = gitops.applied, gitops.timeline
    healthy = timeline.wait_for(
        "the RembgService Application Synced+Healthy",
        start,
        POD_BOUND,
        lambda s: _app_is(s, FLEET_APP, "Synced", "Healthy"),
        lambda: _describe(gitops),
    )
    _print(gitops, "root Application applied", start)
    seen = [s for s in timeline.since(start) if s.at <= healthy.at and s.app(FLEET_APP)]
    progressing = [s for s in seen if s.app(FLEET_APP).health == "Progressing"]  # type: ignore[union-attr]
    assert progressing, [s.app(FLEET_APP) for s in seen]
    # Healthy never ahead of Ready: in every sample where Argo CD said Healthy, Ready was True.
    healthy_samples = [
        s for s in timeline.since(start) if _app_is(s, FLEET_APP, "Synced", "Healthy")
    ]
    assert all(s.ready == "True" for s in healthy_samples)
    status, message = healthy.app(FLEET_APP).resource_health("RembgService", SERVICE)  # type: ignore[union-attr]
    ready = condition(healthy.service, "Ready")
    assert status == "Healthy"
    assert message == ready["message"], (message, ready)
    progressing_message = progressing[0].app(FLEET_APP).resource_health("RembgService", SERVICE)  # type: ignore[union-attr]
    print(f"health messages: Progressing {progressing_message!r}, Healthy {message!r}")


def test_an_invalid_commit_degrades_with_our_message_and_its_revert_heals(
    gitops: GitOps,
) -> None:
    repo, timeline = gitops.repo, gitops.timeline
    invalid = _minimal(INVALID)
    start = time.monotonic()
    revision = repo.commit(MINIMAL, invalid, "cpu requests above limits")

    def degraded(sample: Sample) -> bool:
        state = sample.app(FLEET_APP)
        return bool(
            state is not None
            and state.revision == revision
            and state.health == "Degraded"
            and INVALID_MESSAGE in (state.resource_health("RembgService", SERVICE)[1] or "")
        )

    seen = timeline.wait_for(
        "Degraded with the operator's message",
        start,
        GIT_BOUND,
        degraded,
        lambda: _describe(gitops),
    )
    _print(gitops, "invalid spec committed", start)
    state = seen.app(FLEET_APP)
    assert state is not None
    assert state.sync == "Synced"  # the spec was applied; the operator refused it
    print(f"Degraded message: {state.resource_health('RembgService', SERVICE)[1]!r}")
    # The last good children keep running.
    assert get(gitops.cluster, FLEET, "deployment", f"{SERVICE}-cpu") is not None

    start = time.monotonic()
    reverted = repo.revert()
    healed = timeline.wait_for(
        "Healthy again after the revert",
        start,
        GIT_BOUND,
        lambda s: (
            _app_is(s, FLEET_APP, "Synced", "Healthy") and s.app(FLEET_APP).revision == reverted  # type: ignore[union-attr]
        ),
        lambda: _describe(gitops),
    )
    _print(gitops, "revert committed", start)
    assert healed.ready == "True"


def test_a_deleted_child_is_restored_by_the_operator_without_argo_cd_fighting_it(
    gitops: GitOps,
) -> None:
    """The Deployment is the operator's child, not Argo CD's: deleting it by hand makes the
    operator recreate it, and Argo CD stays Synced with no sync operation, before and after.
    At rest (defaults the CRD and the operator fill in) the Application is Synced too."""
    cluster, timeline = gitops.cluster, gitops.timeline
    before = gitops.argocd.application(FLEET_APP)
    assert before is not None
    operation_before = (before["status"].get("operationState") or {}).get("startedAt")
    deployment = f"{SERVICE}-cpu"
    uid = (get(cluster, FLEET, "deployment", deployment) or {})["metadata"]["uid"]
    start = time.monotonic()
    cluster.kubectl("delete", "deployment", deployment, "-n", FLEET, "--wait=false")

    def replaced_and_available() -> bool:
        found = get(cluster, FLEET, "deployment", deployment) or {}
        return bool(
            found
            and found["metadata"]["uid"] != uid
            and (found.get("status") or {}).get("availableReplicas", 0) >= 1
        )

    eventually(
        replaced_and_available,
        what="the operator to recreate the Deployment, available",
        timeout=POD_BOUND,
    )
    restored = time.monotonic()
    timeline.wait_for(
        "the RembgService Ready and Healthy after the repair",
        restored,
        GIT_BOUND,
        lambda s: s.ready == "True" and _app_is(s, FLEET_APP, "Synced", "Healthy"),
        lambda: _describe(gitops),
    )
    ready_again = time.monotonic() - start
    time.sleep(QUIET_WINDOW)
    _print(gitops, f"{deployment} deleted by hand", start)
    print(
        f"recreated and available after {restored - start:.1f}s, "
        f"Ready and Healthy after {ready_again:.1f}s"
    )
    samples = [s for s in timeline.since(start) if s.app(FLEET_APP)]
    assert samples
    assert all(s.app(FLEET_APP).sync == "Synced" for s in samples), [  # type: ignore[union-attr]
        s.app(FLEET_APP) for s in samples
    ]
    after = gitops.argocd.application(FLEET_APP)
    assert after is not None
    assert (after["status"].get("operationState") or {}).get("startedAt") == operation_before


def test_removing_the_fleet_application_from_git_removes_the_fleet_and_keeps_the_operator(
    gitops: GitOps,
) -> None:
    """The GitOps way to delete an Application of an app of apps: delete its file. The root
    prunes the Application, its finalizer deletes the RembgService, owner references take the
    Deployments; the operator, its Application and the CRD stay."""
    cluster, timeline = gitops.cluster, gitops.timeline
    start = time.monotonic()
    gitops.repo.remove(FLEET_APP_FILE, "remove the minimal fleet")
    timeline.wait_for(
        "the RembgService Application and the RembgService gone",
        start,
        GIT_BOUND,
        lambda s: s.app(FLEET_APP) is None and s.service is None,
        lambda: _describe(gitops),
    )
    gone = time.monotonic() - start
    eventually(
        lambda: (
            not (get(cluster, FLEET, "deployments", "-l", f"rembg.io/service={SERVICE}") or {}).get(
                "items", [None]
            )
        ),
        what="the fleet's Deployments to be garbage-collected",
        timeout=120,
    )
    _print(gitops, "application-rembgservice.yaml removed from Git", start)
    print(f"fleet gone after {gone:.1f}s, its Deployments after {time.monotonic() - start:.1f}s")
    state = gitops.argocd.state(OPERATOR_APP)
    assert (state.sync, state.health) == ("Synced", "Healthy")
    assert gitops.cluster.exists("crd", CRD)
    deployment = get(cluster, SYSTEM, "deployment", OPERATOR_APP)
    assert condition(deployment, "Available").get("status") == "True"
    assert gitops.argocd.state(ROOT_APP).sync == "Synced"
    assert NAMESPACE == "argocd"
