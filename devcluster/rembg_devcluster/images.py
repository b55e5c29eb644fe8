"""The images `make images` built (build/images.json): what a real node imports."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

REPO_ROOT = Path(__file__).resolve().parents[2]
INDEX_FILE = REPO_ROOT / "build" / "images.json"
SANDBOX_IMAGE = "pause"
# What every real node imports at start; others (the monitoring test's) only when asked for.
NODE_IMAGES = (SANDBOX_IMAGE, "server", "operator")
MONITORING_IMAGES = (
    "prometheus-operator",
    "prometheus",
    "prometheus-config-reloader",
    "kube-state-metrics",
)
KEDA_IMAGES = ("keda", "keda-metrics-apiserver")
BROKEN_MODEL_IMAGE = "server-broken-model"


class BuiltImage(BaseModel):
    ref: str
    archive: Path
    key: str = ""
    size_bytes: int = 0
    build_seconds: float = 0.0
    cached: bool = False


class ImageIndex(BaseModel):
    images: dict[str, BuiltImage]

    def missing_archives(self) -> list[Path]:
        return [image.archive for image in self.images.values() if not image.archive.exists()]

    def ref(self, name: str) -> str:
        return self.images[name].ref

    def absent(self, names: tuple[str, ...]) -> list[str]:
        """The names this index does not list (an older `make images` built fewer)."""
        return [name for name in names if name not in self.images]

    def subset(self, names: tuple[str, ...]) -> ImageIndex:
        """The named images only (every name must be listed: check absent() first)."""
        return ImageIndex(images={name: self.images[name] for name in names})


def load_image_index(path: Path = INDEX_FILE) -> ImageIndex | None:
    """The index of the last `make images`, or None when it never ran here."""
    try:
        return ImageIndex.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
