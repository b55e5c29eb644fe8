"""Every endpoint against a real app: real onnxruntime, real u2netp weights, real photos."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from rembg import new_session, remove
from rembg_server.imaging import TooManyPixelsError, decode

TOLERANCE = 1 / 255
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def rembg_session() -> Any:
    return new_session("u2netp", providers=["CPUExecutionProvider"])


def rembg_mask(session: Any, data: bytes, **options: Any) -> Image.Image:
    result = remove(data, session=session, only_mask=True, **options)
    return Image.open(io.BytesIO(result))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height over a few bytes of data (a pixel bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --- happy paths ---------------------------------------------------------------------------


async def test_v1_remove_returns_a_cutout_with_model_and_timing_headers(
    client: httpx.AsyncClient, photos: dict[str, bytes], png: Callable[[bytes], Image.Image]
) -> None:
    response = await client.post(
        "/v1/remove", content=photos["astronaut"], headers={"X-Request-ID": "req-42"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model"] == "u2netp"
    assert response.headers["x-request-id"] == "req-42"
    stages = {part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")}
    assert stages == {
        "decode",
        "preprocess",
        "queue",
        "inference",
        "postprocess",
        "compose",
        "encode",
    }
    image = png(response.content)
    assert (image.mode, image.size) == ("RGBA", (512, 512))
    alpha = np.asarray(image)[:, :, 3]
    assert alpha.min() == 0
    assert alpha.max() == 255  # a person on a background: both ends of the mask occur


async def test_each_cpu_stage_of_a_request_is_counted_under_its_own_name(
    client: httpx.AsyncClient, photos: dict[str, bytes]
) -> None:
    """Compose is its own stage (not `encode`), and so are the model's pre- and
    postprocessing (not `decode`): the stage CPU counter names each one."""

    def stage_cpu(text: str) -> dict[str, float]:
        found = {}
        for line in text.splitlines():
            if line.startswith("rembg_stage_cpu_seconds_total{"):
                stage = line.split('stage="')[1].split('"')[0]
                found[stage] = float(line.rsplit(" ", 1)[1])
        return found

    before = stage_cpu((await client.get("/metrics")).text)
    response = await client.post("/v1/remove", content=photos["chelsea"])
    assert response.status_code == 200, response.text
    after = stage_cpu((await client.get("/metrics")).text)
    spent = {stage: after[stage] - before.get(stage, 0.0) for stage in after}
    assert set(spent) == {"decode", "preprocess", "postprocess", "compose", "encode"}
    assert all(seconds > 0 for seconds in spent.values()), spent
    timing = dict(
        part.strip().split(";dur=") for part in response.headers["server-timing"].split(",")
    )
    assert float(timing["compose"]) > 0
    assert float(timing["preprocess"]) > 0


async def test_v1_remove_accepts_multipart_and_webp_output(
    client: httpx.AsyncClient, photos: dict[str, bytes]
) -> None:
    response = await client.post(
        "/v1/remove",
        params={"format": "webp"},
        files={"file": ("coffee.jpg", photos["coffee"], "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.size) == ("WEBP", (600, 400))


async def test_bgcolor_fills_the_background_opaquely(
    client: httpx.AsyncClient, photos: dict[str, bytes], png: Callable[[bytes], Image.Image]
) -> None:
    response = await client.post(
        "/v1/remove", params={"bgcolor": "#0000ff"}, content=photos["astronaut"]
    )
    assert response.status_code == 200, response.text
    pixels = np.asarray(png(response.content))
    assert (pixels[:, :, 3] == 255).all()
    assert tuple(pixels[0, -1]) == (0, 0, 255, 255)  # top-right corner is background


def photo_at(photos: dict[str, bytes], name: str) -> bytes:
    """A photo as it is, or "name@WxH": upscaled to a camera-sized JPEG."""
    base, _, size = name.partition("@")
    if not size:
        return photos[base]
    width, height = (int(side) for side in size.split("x"))
    image = Image.open(io.BytesIO(photos[base])).convert("RGB")
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# Camera sizes are where a shortcut in the 320x320 resize showed: 9/255 off rembg's masks.
@pytest.mark.parametrize(
    "name",
    ["astronaut", "coffee", "chelsea", "chelsea@1920x1080", "immunohistochemistry@3000x2000"],
)
async def test_v1_mask_matches_rembg_remove(
    client: httpx.AsyncClient,
    photos: dict[str, bytes],
    rembg_session: Any,
    name: str,
    png: Callable[[bytes], Image.Image],
    alpha_diff: Callable[[Image.Image, Image.Image], float],
) -> None:
    image = photo_at(photos, name)
    response = await client.post("/v1/remove", params={"only_mask": "true"}, content=image)
    assert response.status_code == 200, response.text
    ours = png(response.content)
    theirs = rembg_mask(rembg_session, image)
    assert ours.mode == "L"
    assert ours.size == theirs.size
    assert alpha_diff(ours, theirs) <= TOLERANCE


async def test_cutout_alpha_and_colour_match_rembg_remove(
    client: httpx.AsyncClient,
    photos: dict[str, bytes],
    rembg_session: Any,
    png: Callable[[bytes], Image.Image],
    alpha_diff: Callable[[Image.Image, Image.Image], float],
) -> None:
    response = await client.post("/v1/remove", content=photos["chelsea"])
    ours = png(response.content)
    theirs = Image.open(io.BytesIO(remove(photos["chelsea"], session=rembg_session)))
    assert alpha_diff(ours.getchannel("A"), theirs.getchannel("A")) <= TOLERANCE
    assert alpha_diff(ours, theirs) <= TOLERANCE  # all four channels, premultiplied like rembg


async def test_api_remove_is_a_drop_in_for_rembg_s(
    client: httpx.AsyncClient,
    photos: dict[str, bytes],
    rembg_session: Any,
    png: Callable[[bytes], Image.Image],
    alpha_diff: Callable[[Image.Image, Image.Image], float],
) -> None:
    files = {"file": ("cat.jpg", photos["chelsea"], "image/jpeg")}
    response = await client.post(
        "/api/remove", files=files, data={"model": "u2netp", "om": "true", "ppm": "true"}
    )
    assert response.status_code == 200, response.text
    theirs = rembg_mask(rembg_session, photos["chelsea"], post_process_mask=True)
    # post-processing thresholds the mask to 0/255, so a few flipped edge pixels dominate
    assert alpha_diff(png(response.content), theirs) <= 4 * TOLERANCE


async def test_api_remove_takes_bgc_from_the_query_like_rembg(
    client: httpx.AsyncClient, photos: dict[str, bytes], png: Callable[[bytes], Image.Image]
) -> None:
    files = {"file": ("a.jpg", photos["astronaut"], "image/jpeg")}
    response = await client.post("/api/remove", files=files, params={"bgc": "255,0,0,255"})
    assert response.status_code == 200, response.text
    assert tuple(np.asarray(png(response.content))[0, -1]) == (255, 0, 0, 255)


# --- bad inputs: the right 4xx, and the server healthy after --------------------------------


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def truncated_jpeg(photos: dict[str, bytes]) -> bytes:
    whole = photos["astronaut"]
    return whole[: len(whole) // 2]


BAD_INPUTS: dict[str, tuple[int, Callable[[dict[str, bytes]], dict[str, Any]]]] = {
    "body over the limit (Content-Length)": (
        413,
        lambda p: {"content": b"\xff" * (21 * 1024 * 1024)},
    ),
    "body over the limit (chunked, no Content-Length)": (
        413,
        lambda p: {"content": chunked(b"\xff" * (21 * 1024 * 1024))},
    ),
    "pixel bomb 100000x100000": (413, lambda p: {"content": png_header_only(100_000, 100_000)}),
    "header over REMBG_MAX_PIXELS": (413, lambda p: {"content": png_header_only(8000, 8000)}),
    "truncated jpeg": (400, lambda p: {"content": truncated_jpeg(p)}),
    "text file": (415, lambda p: {"content": b"hello, I am not an image\n" * 10}),
    "empty body": (400, lambda p: {"content": b""}),
    "unknown model": (400, lambda p: {"content": p["coffee"], "params": {"model": "u2net"}}),
    "bad bgcolor": (422, lambda p: {"content": p["coffee"], "params": {"bgcolor": "red"}}),
    "bgcolor out of range": (
        422,
        lambda p: {"content": p["coffee"], "params": {"bgcolor": "0,0,300"}},
    ),
    "unknown parameter": (422, lambda p: {"content": p["coffee"], "params": {"colour": "1"}}),
    "alpha matting disabled": (
        400,
        lambda p: {"content": p["coffee"], "params": {"alpha_matting": "true"}},
    ),
    "multipart without a file": (400, lambda p: {"files": {"image": ("a.jpg", p["coffee"])}}),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_input_gets_the_right_4xx_and_server_stays_healthy(
    client: httpx.AsyncClient, photos: dict[str, bytes], case: str
) -> None:
    status, request = BAD_INPUTS[case]
    response = await client.post("/v1/remove", **request(photos))
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert (await client.get("/livez")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize(
    ("width", "height"),
    [(8000, 8000), (100_000, 100_000)],
    ids=["over our limit", "over Pillow's own threshold too"],
)
async def test_a_pixel_bomb_is_refused_quoting_our_limit_and_its_pixel_count(
    client: httpx.AsyncClient, width: int, height: int
) -> None:
    response = await client.post("/v1/remove", content=png_header_only(width, height))
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert f"{width}x{height} = {width * height} pixels" in detail
    assert "limit of 40000000 pixels (REMBG_MAX_PIXELS)" in detail
    assert "80000000" not in detail  # Pillow's internal threshold (twice its own limit)


def test_decode_refuses_a_header_over_the_limit_before_decoding_it() -> None:
    with pytest.raises(TooManyPixelsError, match=r"64x64 = 4096 pixels .* limit of 4000 pixels"):
        decode(png_header_only(64, 64), max_pixels=4000)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ({"model": "isnet-anime"}, 400),
        ({"af": "999"}, 422),
        ({"bgc": "1,2"}, 422),
        ({"dc": "true"}, 400),
    ],
)
async def test_api_remove_rejects_bad_fields(
    client: httpx.AsyncClient, photos: dict[str, bytes], data: dict[str, str], status: int
) -> None:
    files = {"file": ("a.jpg", photos["coffee"], "image/jpeg")}
    assert (await client.post("/api/remove", files=files, data=data)).status_code == status


async def test_server_still_serves_after_the_bad_inputs(
    client: httpx.AsyncClient, photos: dict[str, bytes]
) -> None:
    response = await client.post("/v1/remove", content=photos["coffee"], params={"only_mask": "1"})
    assert response.status_code == 200


# --- probes, docs, metrics -------------------------------------------------------------------


async def test_probes_and_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/livez")).json() == {"alive": True, "reasons": []}
    assert (await client.get("/readyz")).json() == {"ready": True, "reasons": []}
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/remove", "/api/remove", "/livez", "/readyz", "/metrics"} <= set(paths)
    assert (await client.get("/docs")).status_code == 200


CONTRACT_METRICS = [
    "rembg_requests_total",
    "rembg_request_duration_seconds_count",
    "rembg_queue_duration_seconds_count",
    "rembg_inference_duration_seconds_count",
    "rembg_pending_requests",
    "rembg_pending_megapixels",
    "rembg_queue_limit_requests",
    "rembg_batch_size_count",
    "rembg_warmup_seconds",
    "rembg_model_info",
    "rembg_ready",
]


async def test_metrics_are_present_and_move(
    client: httpx.AsyncClient, photos: dict[str, bytes], metric: Callable[..., Awaitable[float]]
) -> None:
    text = (await client.get("/metrics")).text
    samples = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }
    assert set(CONTRACT_METRICS) <= samples
    labels = {"model": "u2netp", "device": "cpu"}
    before = {
        name: await metric(client, name, **labels)
        for name in [
            "rembg_request_duration_seconds_count",
            "rembg_inference_duration_seconds_count",
            "rembg_queue_duration_seconds_count",
            "rembg_batch_size_count",
        ]
    }
    ok_before = await metric(client, "rembg_requests_total", code="200", **labels)
    rejected_before = await metric(client, "rembg_requests_total", code="415", **labels)
    assert (await client.post("/v1/remove", content=photos["chelsea"])).status_code == 200
    assert (await client.post("/v1/remove", content=b"not an image")).status_code == 415
    assert await metric(client, "rembg_requests_total", code="200", **labels) == ok_before + 1
    assert await metric(client, "rembg_requests_total", code="415", **labels) == rejected_before + 1
    assert await metric(client, "rembg_request_duration_seconds_count", **labels) == (
        before["rembg_request_duration_seconds_count"] + 2
    )
    for name in before.keys() - {"rembg_request_duration_seconds_count"}:
        assert await metric(client, name, **labels) == before[name] + 1, name
    assert await metric(client, "rembg_warmup_seconds", **labels) > 0
    assert await metric(client, "rembg_ready", **labels) == 1
    assert await metric(client, "rembg_model_info", provider="CPUExecutionProvider", **labels) == 1
    assert await metric(client, "rembg_pending_requests", **labels) == 0
    assert await metric(client, "rembg_pending_megapixels", **labels) == pytest.approx(0, abs=1e-9)
    service = client.app.state.service  # type: ignore[attr-defined]
    limit = service.settings.resolved_queue_max_requests()
    assert await metric(client, "rembg_queue_limit_requests") == limit > 0
