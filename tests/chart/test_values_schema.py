"""values.yaml and values.schema.json agree, every value is commented, and the schema closes
every object (additionalProperties: false), so a misspelt value fails `helm install`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "rembg-operator"
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# Kubernetes API types passed through verbatim; the API server validates them.
PASS_THROUGH = frozenset(
    {"affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity"}
)


def object_schemas(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if schema.get("type") == "object":
        yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from object_schemas(child, f"{path}.{name}".lstrip("."))
    for key in ("anyOf", "oneOf", "allOf"):
        for child in schema.get(key, []):
            yield from object_schemas(child, path)
    items = schema.get("items")
    if isinstance(items, dict):
        yield from object_schemas(items, f"{path}[]")


def test_every_object_in_the_schema_is_closed() -> None:
    for path, schema in object_schemas(SCHEMA):
        if path in PASS_THROUGH:
            continue
        closed = schema.get("additionalProperties")
        # false for fixed shapes; a typed schema for maps (labels, env, resources lists).
        assert closed is False or isinstance(closed, dict), f"{path or '<root>'} is open"
        if closed is False:
            assert schema.get("properties"), f"{path}: closed object without properties"


# Values given as whole Kubernetes objects (or label maps): the schema types their fields, and
# values.yaml documents the key with one comment; both count as one leaf here.
WHOLE_OBJECT_VALUES = frozenset(
    {"podSecurityContext", "securityContext", "resources", "labels", "affinity"}
)


def value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in WHOLE_OBJECT_VALUES:
            paths |= value_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, child in schema.get("properties", {}).items():
        if child.get("additionalProperties") is False and key not in WHOLE_OBJECT_VALUES:
            paths |= schema_paths(child, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_values_and_schema_describe_the_same_keys() -> None:
    assert value_paths(VALUES) == schema_paths(SCHEMA)


KEY_LINE = re.compile(r"^( *)([A-Za-z][\w-]*):")


def ancestors(lines: list[str], index: int) -> list[str]:
    """The keys enclosing line `index` of a YAML block mapping, innermost first."""
    found: list[str] = []
    indent = len(lines[index]) - len(lines[index].lstrip())
    for previous in range(index - 1, -1, -1):
        match = KEY_LINE.match(lines[previous])
        if match and len(match.group(1)) < indent:
            found.append(match.group(2))
            indent = len(match.group(1))
    return found


def test_every_value_has_a_comment() -> None:
    lines = VALUES_TEXT.splitlines()
    uncommented = []
    for index, line in enumerate(lines):
        if not KEY_LINE.match(line):
            continue
        if lines[index - 1].strip().startswith("#"):
            continue
        if WHOLE_OBJECT_VALUES & set(ancestors(lines, index)):
            continue
        uncommented.append(line.strip())
    assert not uncommented, f"values without a comment: {uncommented}"


def test_schema_covers_the_defaults() -> None:
    """The defaults validate against the schema (helm lint checks this too; here without helm)."""
    for path, schema in object_schemas(SCHEMA):
        if path in PASS_THROUGH or not path or "[]" in path:
            continue
        node: Any = VALUES
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and schema.get("additionalProperties") is False:
            assert set(node) <= set(schema["properties"]), path
