"""Shared helpers for the operator's unit tests (pure: no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from rembg_operator.builders import ServiceRef
from rembg_operator.models import RembgServiceSpec


def make_spec(**raw: Any) -> RembgServiceSpec:
    return RembgServiceSpec.model_validate(raw)


@pytest.fixture
def ref() -> ServiceRef:
    return ServiceRef(name="demo", namespace="team-a")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # kopf and the operator run on asyncio
