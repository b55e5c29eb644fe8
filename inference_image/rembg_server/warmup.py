"""Warmup: every model runs the pipeline on a few images before the server turns ready, so
the first real request does not pay for onnxruntime's first-run allocations."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from PIL import Image

from rembg_server.engine import synthetic_warmup_image
from rembg_server.imaging import Composition, ImageRejectedError, decode, probe
from rembg_server.pipeline import ImagePipeline, Timings

log = logging.getLogger("rembg_server")
WARMUP_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


async def warm_up(
    pipeline: ImagePipeline, name: str, images: list[Image.Image], runs: int, batch: int
) -> None:
    """`runs` passes over `images`, then one full batch of the first when the model batches."""
    for _ in range(runs):
        for image in images:
            await pipeline.cutout(name, image, Composition(), Timings(), deadline=None)
    if pipeline.registry[name].model.batchable and batch > 1 and runs:
        # One full batch, so the first real burst does not pay for new tensor shapes.
        await asyncio.gather(
            *(pipeline.mask(name, images[0], Timings(), None) for _ in range(batch))
        )


def warmup_images(folder: Path | None, max_pixels: int) -> list[Image.Image]:
    """The synthetic image, then each readable image in `folder` (REMBG_WARMUP_DIR)."""
    images = [synthetic_warmup_image()]
    if folder is None:
        return images
    try:
        paths = sorted(folder.iterdir())
    except OSError as error:
        fields = {"path": str(folder), "reason": str(error)}
        log.warning("warmup folder unreadable", extra={"fields": fields})
        return images
    for path in paths:
        if path.suffix.lower() not in WARMUP_SUFFIXES:
            continue
        try:
            data = path.read_bytes()
            probe(data, max_pixels)
            images.append(decode(data, max_pixels))
        except (OSError, ImageRejectedError) as error:
            log.warning(
                "warmup image skipped", extra={"fields": {"path": str(path), "reason": str(error)}}
            )
    return images
