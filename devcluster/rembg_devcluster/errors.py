"""Errors the local control plane raises; each message says what to do next."""

from __future__ import annotations

import subprocess


class DevClusterError(RuntimeError):
    """Base class: something about the local control plane went wrong."""


class BinaryMissingError(DevClusterError):
    """A control-plane binary has not been built yet."""


class PortInUseError(DevClusterError):
    """A port the control plane needs is already taken by another process."""


class ComponentDiedError(DevClusterError):
    """A component exited while the cluster was starting or running."""


class ComponentTimeoutError(DevClusterError):
    """A component did not become healthy in time."""


class KubectlError(DevClusterError, subprocess.CalledProcessError):
    """kubectl exited non-zero; str() includes its stderr (the API server's message)."""

    def __init__(self, returncode: int, cmd: list[str], output: str, stderr: str) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)

    def __str__(self) -> str:
        shown = " ".join(str(part) for part in self.cmd[2:])
        return f"kubectl {shown} exited {self.returncode}: {str(self.stderr).strip()}"
