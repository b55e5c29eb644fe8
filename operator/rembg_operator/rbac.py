"""Every API verb the operator uses, per resource: the one source of its RBAC.

Pure data: the Helm chart renders its ClusterRole/Role from `RULES`, and tests check the
operator works with exactly these rules (e2e runs it under a ServiceAccount bound to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rembg_operator.models import API_GROUP, PLURAL


@dataclass(frozen=True)
class Rule:
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    # Cluster-scoped resources (or cluster-wide discovery) need a ClusterRole even when the
    # operator watches one namespace.
    cluster_scoped: bool = False
    why: str = ""

    def as_manifest(self) -> dict[str, Any]:
        return {
            "apiGroups": [self.api_group],
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }


WATCH = ("get", "list", "watch")
APPLY = ("get", "list", "watch", "create", "patch", "delete")

RULES: tuple[Rule, ...] = (
    # Read only: the operator's handlers are event handlers, so kopf writes no annotation or
    # finalizer on the resource; everything the operator writes goes to the status subresource.
    Rule(API_GROUP, (PLURAL,), WATCH, why="the custom resource"),
    Rule(API_GROUP, (f"{PLURAL}/status",), ("get", "patch", "update"), why="status writes"),
    Rule(
        API_GROUP,
        (f"{PLURAL}/finalizers",),
        ("update",),
        why="blockOwnerDeletion on children (OwnerReferencesPermissionEnforcement)",
    ),
    Rule("apps", ("deployments",), APPLY, why="one Deployment per pool"),
    Rule("", ("services",), APPLY, why="the Service"),
    Rule("autoscaling", ("horizontalpodautoscalers",), APPLY, why="HPA per pool"),
    Rule("policy", ("poddisruptionbudgets",), APPLY, why="PDB per pool"),
    Rule("monitoring.coreos.com", ("servicemonitors", "prometheusrules"), APPLY, why="monitoring"),
    Rule("keda.sh", ("scaledobjects",), APPLY, why="KEDA engine"),
    Rule("", ("events",), ("create",), why="Events on the RembgService"),
    Rule("", ("pods",), ("list", "watch"), why="why the pools' pods are not ready (status)"),
    Rule("", ("nodes",), ("list",), cluster_scoped=True, why="allocatable GPU capacity"),
    Rule(
        "",
        ("namespaces",),
        ("list", "watch"),
        cluster_scoped=True,
        why="kopf observes namespaces when it watches a list of them",
    ),
    Rule(
        "apiextensions.k8s.io",
        ("customresourcedefinitions",),
        WATCH,
        cluster_scoped=True,
        why="kopf notices CRDs (monitoring, KEDA) installed after start",
    ),
)


def build_cluster_role(name: str = "rembg-operator") -> dict[str, Any]:
    """A ClusterRole with every rule (the cluster-wide install)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [rule.as_manifest() for rule in RULES],
    }


def build_namespaced_roles(name: str = "rembg-operator") -> tuple[dict[str, Any], dict[str, Any]]:
    """(Role for the watched namespace, ClusterRole for cluster-scoped reads)."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name},
        "rules": [r.as_manifest() for r in RULES if not r.cluster_scoped],
    }
    cluster_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": f"{name}-cluster"},
        "rules": [r.as_manifest() for r in RULES if r.cluster_scoped],
    }
    return role, cluster_role
