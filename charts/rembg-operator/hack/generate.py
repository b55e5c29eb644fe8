"""Writes the chart's generated files from their single sources of truth.

- files/rbac/rules.yaml from operator/rembg_operator/rbac.py (the verbs the operator uses);
- examples/argocd/argocd-cm-health.yaml from examples/argocd/health.lua (the RembgService's
  health) and examples/argocd/application-health.lua (an Application's, for the app of apps).

Usage: python charts/rembg-operator/hack/generate.py [--check]
(`make chart` writes them; tests/chart/test_chart_sync.py fails when they drift.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
RBAC_RULES = CHART / "files" / "rbac" / "rules.yaml"
HEALTH_LUA = REPO / "examples" / "argocd" / "health.lua"
ARGOCD_CM = REPO / "examples" / "argocd" / "argocd-cm-health.yaml"
APPLICATION_HEALTH_LUA = REPO / "examples" / "argocd" / "application-health.lua"
HEALTH_KEY = "resource.customizations.health.rembg.io_RembgService"
APPLICATION_HEALTH_KEY = "resource.customizations.health.argoproj.io_Application"
# argocd-cm's data: each key with the Lua file it carries verbatim.
ARGOCD_CM_KEYS = {HEALTH_KEY: HEALTH_LUA, APPLICATION_HEALTH_KEY: APPLICATION_HEALTH_LUA}


def operator_rules() -> dict[str, list[dict[str, Any]]]:
    """The operator's RBAC rules, split into cluster-scoped and namespaced."""
    return {
        "clusterRules": [r.as_manifest() for r in _rules() if r.cluster_scoped],
        "namespacedRules": [r.as_manifest() for r in _rules() if not r.cluster_scoped],
    }


def _rules() -> tuple[Any, ...]:
    from rembg_operator.rbac import RULES  # noqa: PLC0415  (the operator is only needed here)

    return tuple(RULES)


def build_rbac_rules() -> str:
    """rules.yaml, each rule under a comment saying why the operator needs it."""
    lines = [
        "# Generated from operator/rembg_operator/rbac.py by `make chart`; do not edit.",
        "# clusterRules: cluster-scoped by nature (always in a ClusterRole).",
        "# namespacedRules: a Role per watched namespace, or the ClusterRole for all namespaces.",
    ]
    for key, cluster_scoped in (("clusterRules", True), ("namespacedRules", False)):
        lines.append(f"{key}:")
        for rule in (r for r in _rules() if r.cluster_scoped == cluster_scoped):
            manifest = rule.as_manifest()
            if rule.why:
                lines.append(f"  # {rule.why}")
            lines.append(f"  - apiGroups: {json.dumps(manifest['apiGroups'])}")
            lines.append(f"    resources: {json.dumps(manifest['resources'])}")
            lines.append(f"    verbs: {json.dumps(manifest['verbs'])}")
    return "\n".join(lines) + "\n"


def _block(key: str, lua: str) -> str:
    indented = "".join(f"    {line}" if line.strip() else "\n" for line in lua.splitlines(True))
    return f"  {key}: |\n{indented}"


def build_argocd_cm() -> str:
    return (
        "# Generated from examples/argocd/health.lua and application-health.lua by `make chart`;\n"
        "# do not edit. Argo CD health checks for rembg.io/RembgService and, for the app of apps\n"
        "# (root-application.yaml), argoproj.io/Application. Merge into argocd-cm:\n"
        "#   kubectl -n argocd patch configmap argocd-cm --patch-file "
        "examples/argocd/argocd-cm-health.yaml\n"
        "# (argo-cd Helm chart: put the same keys under configs.cm.)\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: argocd-cm\n"
        "  namespace: argocd\n"
        "  labels:\n"
        "    app.kubernetes.io/name: argocd-cm\n"
        "    app.kubernetes.io/part-of: argocd\n"
        "data:\n" + "".join(_block(key, path.read_text()) for key, path in ARGOCD_CM_KEYS.items())
    )


GENERATED: dict[Path, Callable[[], str]] = {
    RBAC_RULES: build_rbac_rules,
    ARGOCD_CM: build_argocd_cm,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, build in GENERATED.items():
        content = build()
        if path.exists() and path.read_text() == content:
            continue
        stale.append(path.relative_to(REPO))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if stale:
        verb = "out of date (run `make chart`)" if args.check else "written"
        sys.stderr.write(f"{verb}: {', '.join(map(str, stale))}\n")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
