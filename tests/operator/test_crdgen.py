"""The checked-in CRD equals what the models generate, and it is a sound structural schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from rembg_operator import crdgen


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.build_crd()


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("path", crdgen.CRD_PATHS, ids=lambda p: str(p.parent.name))
def test_checked_in_crd_matches_the_models(path: object) -> None:
    assert crdgen.main(["--check"]) == 0, "crds/ is stale: run `make crds`"
    assert path is not None


def test_both_copies_are_identical_bytes() -> None:
    first, second = (p.read_bytes() for p in crdgen.CRD_PATHS)
    assert first == second


def test_rendering_is_deterministic() -> None:
    assert crdgen.render_crd() == crdgen.render_crd()
    assert yaml.safe_load(crdgen.render_crd()) == crdgen.build_crd()


def test_names_group_and_short_name(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "rembgservices.rembg.io"
    names = crd["spec"]["names"]
    assert names["kind"] == "RembgService"
    assert names["plural"] == "rembgservices"
    assert names["shortNames"] == ["rbs"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    for name in ("Ready", "Model", "GPU", "CPU", "Age"):
        assert name in columns
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"]["type"] == "date"


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in _walk(_schema(crd)):
        assert "$ref" not in node, path
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        assert "title" not in node, path


def test_every_spec_field_is_described(crd: dict[str, Any]) -> None:
    spec = _schema(crd)["properties"]["spec"]
    undocumented = [
        path
        for path, node in _walk(spec, "spec")
        if path and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert undocumented == []


def test_only_scalar_defaults(crd: dict[str, Any]) -> None:
    for path, node in _walk(_schema(crd)):
        if "default" in node:
            assert isinstance(node["default"], bool | int | float | str), path


def test_cel_rules_for_cross_field_constraints(crd: dict[str, Any]) -> None:
    schema = _schema(crd)
    spec = schema["properties"]["spec"]
    rules = {r["rule"] for r in spec["x-kubernetes-validations"]}
    assert "has(self.gpu) || has(self.cpu)" in rules
    for pool in ("gpu", "cpu"):
        pool_rules = {r["rule"] for r in spec["properties"][pool]["x-kubernetes-validations"]}
        assert "self.minReplicas <= self.maxReplicas" in pool_rules
    availability = spec["properties"]["availability"]["x-kubernetes-validations"]
    assert "minAvailable" in availability[0]["rule"]
    assert any("metadata.name" in r["rule"] for r in schema["x-kubernetes-validations"])


def test_quantities_are_int_or_string(crd: dict[str, Any]) -> None:
    limits = _schema(crd)["properties"]["spec"]["properties"]["cpu"]["properties"]["resources"][
        "properties"
    ]["limits"]["additionalProperties"]
    assert limits["x-kubernetes-int-or-string"] is True
    assert "pattern" in limits


def test_affinity_preserves_unknown_fields(crd: dict[str, Any]) -> None:
    affinity = _schema(crd)["properties"]["spec"]["properties"]["gpu"]["properties"]["affinity"]
    assert affinity["x-kubernetes-preserve-unknown-fields"] is True
    assert affinity["type"] == "object"


def test_status_conditions_are_a_map_list(crd: dict[str, Any]) -> None:
    conditions = _schema(crd)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_check_reports_stale_files(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    monkeypatch.setattr(crdgen, "CRD_PATHS", (stale,))
    assert crdgen.main(["--check"]) == 1
    assert crdgen.main(["--write"]) == 0
    assert crdgen.main(["--check"]) == 0
    assert stale.read_text() == crdgen.render_crd()


def test_jobs_schema_requires_a_secret_when_enabled(crd: dict[str, Any]) -> None:
    jobs = _schema(crd)["properties"]["spec"]["properties"]["jobs"]
    (rule,) = jobs["x-kubernetes-validations"]
    assert "self.enabled" in rule["rule"]
    assert "self.redis.secretName" in rule["rule"]
    assert "secretName is required" in rule["message"]
    # Off unless asked for; the contract's camelCase (resultTTLSeconds) survives generation.
    assert jobs["properties"]["enabled"]["default"] is False
    assert jobs["properties"]["resultTTLSeconds"]["default"] == 86400
    assert "default" not in jobs["properties"]["redis"]["properties"]["secretName"]
