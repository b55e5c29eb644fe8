"""Kubeconfig documents: built as plain dicts (pure), written with owner-only permissions."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import yaml

from rembg_devcluster.pki import write_private


@dataclass(frozen=True)
class TokenCredentials:
    token: str


@dataclass(frozen=True)
class CertCredentials:
    cert_pem: bytes
    key_pem: bytes


Credentials = TokenCredentials | CertCredentials


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def build_kubeconfig(
    server: str,
    ca_pem: bytes,
    user: str,
    credentials: Credentials,
    *,
    cluster: str = "rembg-devcluster",
    namespace: str | None = None,
) -> dict[str, object]:
    """A single-context kubeconfig with inline CA and credentials (self-contained, copyable)."""
    if isinstance(credentials, TokenCredentials):
        user_entry: dict[str, str] = {"token": credentials.token}
    else:
        user_entry = {
            "client-certificate-data": _b64(credentials.cert_pem),
            "client-key-data": _b64(credentials.key_pem),
        }
    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": f"{user}@{cluster}", "context": context}],
        "current-context": f"{user}@{cluster}",
        "preferences": {},
    }


def write_kubeconfig(path: Path, document: dict[str, object]) -> Path:
    """Writes a kubeconfig readable only by its owner (it holds credentials)."""
    write_private(path, yaml.safe_dump(document, sort_keys=False).encode())
    return path
