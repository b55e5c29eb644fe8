"""imaging.py's decode and cutout against the Pillow calls they replace."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from rembg_server.imaging import (
    EXIF_ORIENTATION,
    TooManyPixelsError,
    decode,
    naive_cutout,
    probe,
)

from tests.server.conftest import PHOTOS


def test_decode_applies_the_exif_orientation_like_rembg() -> None:
    photo = Image.fromarray(PHOTOS["chelsea"]())  # 451 wide, 300 high
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways: turn 90 degrees clockwise to view
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95, exif=exif)
    decoded = decode(buffer.getvalue(), 10**7)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    assert decoded.size == (300, 451)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected.convert("RGB")))


def test_decode_keeps_alpha_and_converts_palettes() -> None:
    rgba = Image.fromarray(PHOTOS["astronaut"]()).convert("RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    assert decode(buffer.getvalue(), 10**7).mode == "RGBA"
    buffer = io.BytesIO()
    Image.fromarray(PHOTOS["coffee"]()).convert("P").save(buffer, "GIF")
    assert decode(buffer.getvalue(), 10**7).mode == "RGB"


def test_naive_cutout_has_the_pixels_of_rembgs_composite() -> None:
    rng = np.random.default_rng(7)
    for mode in ("RGB", "RGBA"):
        image = Image.fromarray(PHOTOS["coffee"]()).convert(mode)
        mask = Image.fromarray(rng.integers(0, 256, image.size[::-1], np.uint8), "L")
        theirs = Image.composite(image, Image.new("RGBA", image.size, 0), mask)
        assert np.array_equal(np.asarray(naive_cutout(image, mask)), np.asarray(theirs))


def test_a_pixel_bomb_is_our_413_even_with_pillows_own_guard_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside create_app (tools, benchmarks) Pillow's guard may be on; it fires inside
    Image.open, before our check, and must still come out as our refusal."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buffer, "PNG")  # 40000 px: over twice Pillow's limit
    for read in (probe, decode):
        with pytest.raises(TooManyPixelsError, match="REMBG_MAX_PIXELS"):
            read(buffer.getvalue(), 10**7)
