"""How the canary's shipped image and known mask were made, and the IoUs behind its threshold.

    .venv/bin/python -m tests.server.canary_reference           # measure, write nothing
    .venv/bin/python -m tests.server.canary_reference --write   # regenerate both files

The image is scikit-image's `data.coffee()` (CC0, Rachel Michetti, courtesy of Pikolo Espresso
Bar), 600x400, thumbnailed to 320x213 with LANCZOS and saved as JPEG quality 90 (~24 KB): one
clear subject (cup, saucer and spoon) covering about half the frame, so an empty mask scores 0
and an all-foreground one about 0.48.

The known mask is the consensus of the fp32 models available locally. Only u2netp is (the
server never downloads models), so the consensus is over u2netp runs on four views of the
photo: the shipped JPEG, the lossless thumbnail, the 600x400 original (mask resized to
320x213, bilinear) and the mirrored thumbnail (mask mirrored back). The soft masks are
averaged and thresholded at 0.5; the result is saved as a 1-bit PNG.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from rembg_server import canary
from rembg_server.engine import LoadRequest, MaskModel, load_model
from skimage import data

SIDE = 320
JPEG_QUALITY = 90
SOURCE = Path(canary.__file__).parent / "canary_images"


def photo() -> Image.Image:
    return Image.fromarray(data.coffee())  # type: ignore[no-untyped-call]


def thumbnail(image: Image.Image) -> Image.Image:
    small = image.copy()
    small.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return small


def shipped_jpeg() -> bytes:
    buffer = io.BytesIO()
    thumbnail(photo()).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def load(model_dir: Path, name: str = "u2netp") -> MaskModel:
    request = LoadRequest(name, model_dir, {}, "cpu", False, threads=0, batch_max_size=1)
    return load_model(request)[0]


def soft_mask(model: MaskModel, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    mask = model.predict_mask(image.convert("RGB"))
    return np.asarray(mask.resize(size, Image.Resampling.BILINEAR), np.float64) / 255


def consensus_mask(models: list[MaskModel], jpeg: bytes) -> np.ndarray:
    original = photo()
    small = thumbnail(original)
    size = small.size
    views: list[Callable[[MaskModel], np.ndarray]] = [
        lambda m: soft_mask(m, Image.open(io.BytesIO(jpeg)), size),
        lambda m: soft_mask(m, small, size),
        lambda m: soft_mask(m, original, size),
        lambda m: np.fliplr(soft_mask(m, ImageOps.mirror(small), size)),
    ]
    masks = [view(model) for model in models for view in views]
    agreed: np.ndarray = np.mean(masks, axis=0) >= 0.5
    return agreed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the shipped files")
    arguments = parser.parse_args()
    model_dir = Path(os.environ.get("U2NET_HOME", "~/.u2net")).expanduser()
    models = [load(model_dir)]
    jpeg = shipped_jpeg()
    mask = consensus_mask(models, jpeg)
    print(f"image {len(jpeg)} bytes, mask {mask.shape[1]}x{mask.shape[0]}, fg {mask.mean():.3f}")
    if arguments.write:
        (SOURCE / canary.IMAGE_NAME).write_bytes(jpeg)
        Image.fromarray(mask).convert("1").save(SOURCE / canary.MASK_NAME, optimize=True)
    reference = canary.load_reference()
    print(f"IoU consensus vs shipped mask: {canary.iou(mask, reference.mask):.4f}")
    image = Image.open(io.BytesIO(reference.image)).convert("RGB")
    for model in models:
        produced = soft_mask(model, image, image.size) >= 0.5
        print(f"IoU {model.name} on the shipped JPEG: {canary.iou(produced, reference.mask):.4f}")


if __name__ == "__main__":
    main()
