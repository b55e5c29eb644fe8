"""Pure image work: header probe, decode, cutout composition, encode. No I/O, no state."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a photo API needs; everything else is refused before any decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
EXIF_ORIENTATION = 0x0112


class ImageRejectedError(Exception):
    """An input the server refuses; `status` is the HTTP code that says why."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedImageError(ImageRejectedError):
    status = 415


class CorruptImageError(ImageRejectedError):
    status = 400


class TooManyPixelsError(ImageRejectedError):
    status = 413


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def megapixels(self) -> float:
        return self.pixels / 1e6


def disable_pillow_pixel_guard() -> None:
    """Turn off Pillow's process-wide decompression-bomb guard; the server's entry point
    (create_app) calls it once. probe() and decode() check every header against
    REMBG_MAX_PIXELS before any pixel is decoded (Image.open reads the header only), but
    Pillow's guard runs inside Image.open, before them: it would warn above its limit, refuse
    above twice that, and quote its own threshold instead of ours."""
    Image.MAX_IMAGE_PIXELS = None


def probe(data: bytes, max_pixels: int) -> ImageHeader:
    """Read only the header: format and size, and refuse pixel bombs before any decoding."""
    if not data:
        raise CorruptImageError("empty body: send the image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            header = ImageHeader(str(image.format), image.width, image.height)
    except Image.DecompressionBombError as error:  # Pillow's guard on: still our 413
        raise TooManyPixelsError(
            f"image exceeds the limit of {max_pixels} pixels (REMBG_MAX_PIXELS)"
        ) from error
    except UnidentifiedImageError as error:
        raise UnsupportedImageError(
            f"not a supported image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"unreadable image header: {error}") from error
    if header.width <= 0 or header.height <= 0:
        raise CorruptImageError(f"image header declares {header.width}x{header.height} pixels")
    check_pixels(header.width, header.height, max_pixels)
    return header


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels (REMBG_MAX_PIXELS)"
        )


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode (first frame), apply EXIF orientation like rembg does, keep alpha if any.

    The header is checked again before load(): this check, not Pillow's, bounds the memory.
    """
    # No `with`: closing an image frees its pixels, so the decoded frame would have to be
    # copied out first (a full-size copy per request). The source is an in-memory buffer.
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        check_pixels(image.width, image.height, max_pixels)
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        wanted = "RGBA" if _has_alpha(image) else "RGB"
        return image.convert(wanted) if image.mode != wanted else image
    except Image.DecompressionBombError as error:  # Pillow's guard on: still our 413
        raise TooManyPixelsError(
            f"image exceeds the limit of {max_pixels} pixels (REMBG_MAX_PIXELS)"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"corrupt or truncated image: {error}") from error


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info


@dataclass(frozen=True)
class Composition:
    only_mask: bool = False
    post_process_mask: bool = False
    bgcolor: tuple[int, int, int, int] | None = None
    alpha_matting: bool = False
    alpha_matting_foreground_threshold: int = 240
    alpha_matting_background_threshold: int = 10
    alpha_matting_erode_size: int = 10


def compose(image: Image.Image, mask: Image.Image, how: Composition) -> Image.Image:
    """rembg.remove()'s single-mask branch: optional mask clean-up, cutout, background fill.

    rembg.bg is imported only for the optional CPU-heavy paths: importing it loads numba,
    scipy and scikit-image (~160 MB of RSS) that plain cutouts never use.
    """
    if how.post_process_mask:
        from rembg.bg import post_process  # noqa: PLC0415

        mask = Image.fromarray(post_process(np.asarray(mask)))
    if how.only_mask:
        return mask
    if how.alpha_matting:
        from rembg.bg import alpha_matting_cutout  # noqa: PLC0415

        cutout: Image.Image
        try:
            cutout = alpha_matting_cutout(
                image,
                mask,
                how.alpha_matting_foreground_threshold,
                how.alpha_matting_background_threshold,
                how.alpha_matting_erode_size,
            )
        except ValueError:  # rembg falls back the same way when the trimap is degenerate
            cutout = naive_cutout(image, mask)
    else:
        cutout = naive_cutout(image, mask)
    if how.bgcolor is not None:
        cutout = apply_background_color(cutout, how.bgcolor)
    return cutout


def naive_cutout(image: Image.Image, mask: Image.Image) -> Image.Image:
    """rembg.bg.naive_cutout: colour scaled by the mask (premultiplied look), alpha = mask.

    The same pixels as its Image.composite(image, transparent, mask), which copies the
    transparent canvas before pasting onto the copy; pasting onto the canvas itself saves
    that full-size copy."""
    cutout = Image.new("RGBA", image.size, 0)
    cutout.paste(image, None, mask)
    return cutout


def apply_background_color(image: Image.Image, color: tuple[int, int, int, int]) -> Image.Image:
    """rembg.bg.apply_background_color: the cutout over a solid colour."""
    return Image.alpha_composite(Image.new("RGBA", image.size, color), image)


def encode(
    image: Image.Image, fmt: Literal["png", "webp"], png_level: int, webp_quality: int
) -> bytes:
    if fmt == "png":
        return encode_png(image, png_level)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=webp_quality, method=0)
    return buffer.getvalue()


_PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
_PNG_FILTER_SUB = 1


def encode_png(image: Image.Image, level: int) -> bytes:
    """A standard 8-bit PNG: the Sub filter in numpy, deflate by ISA-L at `level` (0-3).

    This is where rembg spends ~60% of its CPU: Pillow tries five filters per row and zlib
    level 6 compresses slowly. One fixed filter and ISA-L give files within a few percent of
    Pillow's level 1 at ~1/6 of its CPU (see the README's benchmark notes).
    """
    if image.mode not in _PNG_COLOR_TYPES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * channels)
    scanlines = np.empty((height, width * channels + 1), dtype=np.uint8)
    scanlines[:, 0] = _PNG_FILTER_SUB
    scanlines[:, 1 : channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=scanlines[:, channels + 1 :])
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[image.mode], 0, 0, 0)
    # A flat view of the scanlines, not .tobytes(): no full-size copy before deflate.
    compressed = isal_zlib.compress(
        scanlines.data.cast("B"), min(level, isal_zlib.ISAL_BEST_COMPRESSION)
    )
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", compressed),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}
