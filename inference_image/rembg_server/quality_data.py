"""The two image sets behind the int8 quality gate: golden photos and calibration scenes.

Both are deterministic and built offline from scikit-image's wheel (installed with the
package, never downloaded at run or build time beyond the wheel itself). They are disjoint
by construction:

- the *golden set* is the 20 real photographs scikit-image ships in ``skimage/data`` (people,
  animals, objects, vehicles, microscopy, astronomy, documents and three textures), converted
  to RGB and upscaled so the long side is at least 640 px, a realistic upload size. They are
  used only to compare the int8 masks against the fp32 ones, never for calibration;
- the *calibration set* is synthetic: scenes composed from scikit-image's LFW subset (200
  real 25x25 face crops, a different source from every golden photo), upscaled and tinted,
  pasted with coloured ellipses and rectangles onto smooth or noisy backgrounds, from a
  seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GOLDEN_MIN_LONG_SIDE = 640
CALIBRATION_SEED = 20240601
CALIBRATION_SIZES = ((640, 480), (480, 640), (800, 600), (512, 512))


@dataclass(frozen=True)
class GoldenPhoto:
    name: str
    image: Image.Image


def _rgb(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(pixels)
    return image.convert("RGB")


def _realistic_size(image: Image.Image) -> Image.Image:
    long_side = max(image.size)
    if long_side >= GOLDEN_MIN_LONG_SIDE:
        return image
    scale = GOLDEN_MIN_LONG_SIDE / long_side
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def _golden_sources() -> dict[str, Callable[[], np.ndarray]]:
    # Imported here: scikit-image is a build-time dependency only (~0.5 s to import).
    from skimage import data  # noqa: PLC0415

    def motorcycle(index: int) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(data.stereo_motorcycle()[index])  # type: ignore[no-untyped-call]

    return {
        "astronaut": data.astronaut,
        "brick": data.brick,
        "camera": data.camera,
        "cell": data.cell,
        "chelsea": data.chelsea,
        "clock_motion": data.clock,
        "coffee": data.coffee,
        "coins": data.coins,
        "grass": data.grass,
        "gravel": data.gravel,
        "hubble_deep_field": data.hubble_deep_field,
        "ihc": data.immunohistochemistry,
        "microaneurysms": data.microaneurysms,
        "moon": data.moon,
        "motorcycle_left": motorcycle(0),
        "motorcycle_right": motorcycle(1),
        "page": data.page,
        "retina": data.retina,
        "rocket": data.rocket,
        "text": data.text,
    }


def golden_photos() -> list[GoldenPhoto]:
    """The 20 golden photos, in a fixed order, as RGB images of realistic size."""
    return [
        GoldenPhoto(name, _realistic_size(_rgb(load()))) for name, load in _golden_sources().items()
    ]


def _lfw_faces() -> np.ndarray:
    import skimage  # noqa: PLC0415

    path = Path(skimage.__file__).parent / "data" / "lfw_subset.npy"
    faces: np.ndarray = np.load(path)
    return faces


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    kind = rng.integers(3)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    if kind >= 1:  # a blurred noise texture over the gradient, coarse or fine
        coarse = rng.normal(0, 40, (height // 16 + 1, width // 16 + 1, 3))
        noise = np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
                size, Image.Resampling.BICUBIC
            ),
            np.float64,
        )
        pixels += noise - 128
    if kind == 2:
        pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _paste_face(rng: np.random.Generator, canvas: Image.Image, face: np.ndarray) -> None:
    side = int(rng.integers(min(canvas.size) // 4, min(canvas.size) * 3 // 4))
    gray = Image.fromarray((face * 255).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    tint = rng.uniform(0.6, 1.0, 3)
    rgb = np.asarray(gray, np.float64)[:, :, None] * tint[None, None, :]
    patch = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse((side * 0.08, 0, side * 0.92, side), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 40))
    x = int(rng.integers(0, canvas.width - side))
    y = int(rng.integers(0, canvas.height - side))
    canvas.paste(patch, (x, y), mask)


def _draw_shapes(rng: np.random.Generator, canvas: Image.Image) -> None:
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):
        x0, x1 = sorted(rng.integers(0, canvas.width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, canvas.height, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, max(x1, x0 + 8), max(y1, y0 + 8))
        if rng.integers(2):
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)


def calibration_images(count: int = 64, seed: int = CALIBRATION_SEED) -> list[Image.Image]:
    """`count` synthetic scenes: 1-2 upscaled LFW faces and some shapes on a background."""
    rng = np.random.default_rng(seed)
    faces = _lfw_faces()
    images = []
    for index in range(count):
        size = CALIBRATION_SIZES[index % len(CALIBRATION_SIZES)]
        canvas = _background(rng, size)
        _draw_shapes(rng, canvas)
        for _ in range(int(rng.integers(1, 3))):
            _paste_face(rng, canvas, faces[int(rng.integers(len(faces)))])
        images.append(canvas)
    return images
