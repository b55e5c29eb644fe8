"""Request parameters, parsed once into typed models at the HTTP boundary."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from rembg_server.imaging import Composition

Color = tuple[int, int, int, int]


def parse_color(text: str) -> Color:
    """'r,g,b[,a]' (rembg's bgc form) or '#rrggbb[aa]' -> an RGBA tuple of 0..255 ints."""
    text = text.strip()
    if text.startswith("#"):
        digits = text[1:]
        if len(digits) not in (6, 8):
            raise ValueError("hex colours are #rrggbb or #rrggbbaa")
        try:
            channels = [int(digits[i : i + 2], 16) for i in range(0, len(digits), 2)]
        except ValueError as error:
            raise ValueError(f"{text!r} is not a hex colour") from error
    else:
        try:
            channels = [int(part) for part in text.split(",")]
        except ValueError as error:
            raise ValueError(f"{text!r} is not 'r,g,b[,a]' with integers 0-255") from error
    if len(channels) == 3:
        channels.append(255)
    if len(channels) != 4 or not all(0 <= channel <= 255 for channel in channels):
        raise ValueError(f"{text!r} is not 'r,g,b[,a]' with integers 0-255")
    return channels[0], channels[1], channels[2], channels[3]


def _checked_color(value: str | None) -> str | None:
    if value:
        parse_color(value)
    return value or None


# Kept as text so FastAPI reads it as one query value; checked here, converted by `rgba`.
BgColor = Annotated[str | None, AfterValidator(_checked_color)]
Threshold = Annotated[int, Field(ge=0, le=255)]


class RemoveParams(BaseModel):
    """Query parameters of POST /v1/remove."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, description="Model name; default: the first loaded")
    format: Literal["png", "webp"] = Field(default="png", description="Output image format")
    only_mask: bool = Field(default=False, description="Return the alpha mask only")
    post_process_mask: bool = Field(default=False, description="Smooth the mask edges")
    bgcolor: BgColor = Field(
        default=None, description="Fill the background: 'r,g,b[,a]' or '#rrggbb[aa]'"
    )
    alpha_matting: bool = Field(default=False, description="Alpha matting (if enabled)")
    alpha_matting_foreground_threshold: Threshold = 240
    alpha_matting_background_threshold: Threshold = 10
    alpha_matting_erode_size: Annotated[int, Field(ge=0, le=255)] = 10

    @property
    def rgba(self) -> Color | None:
        return parse_color(self.bgcolor) if self.bgcolor else None

    def composition(self) -> Composition:
        return Composition(
            only_mask=self.only_mask,
            post_process_mask=self.post_process_mask,
            bgcolor=self.rgba,
            alpha_matting=self.alpha_matting,
            alpha_matting_foreground_threshold=self.alpha_matting_foreground_threshold,
            alpha_matting_background_threshold=self.alpha_matting_background_threshold,
            alpha_matting_erode_size=self.alpha_matting_erode_size,
        )

    def options(self) -> RemoveParams:
        """Only the removal options (subclasses add submission fields)."""
        return RemoveParams.model_validate(self.model_dump(include=set(RemoveParams.model_fields)))


WebhookUrl = Annotated[
    str | None, Field(default=None, max_length=2048, description="Called when the job ends")
]


class JobParams(RemoveParams):
    """Query parameters of POST /v1/jobs with an image body: /v1/remove's, plus a webhook."""

    webhook_url: WebhookUrl = None


class BatchItem(RemoveParams):
    """One item of a batch manifest: the image and every /v1/remove option."""

    image_base64: str = Field(description="The image file, base64-encoded")
    ref: str | None = Field(default=None, max_length=256, description="Your reference, echoed back")


class BatchManifest(BaseModel):
    """POST /v1/jobs with Content-Type: application/json.

    Items stay raw here: each is parsed on its own (BatchItem), so one malformed item becomes
    one failed job instead of failing the whole manifest.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[Any] = Field(min_length=1, description="BatchItem objects")
    webhook_url: WebhookUrl = None


class RembgFormParams(BaseModel):
    """rembg's own server fields (`rembg s`, POST /api/remove), same names and defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = None
    a: bool = False
    af: Threshold = 240
    ab: Threshold = 10
    ae: Annotated[int, Field(ge=0, le=255)] = 10
    om: bool = False
    ppm: bool = False
    bgc: BgColor = None
    dc: bool = False  # rembg's decontamination and ViTMatte: refused below, not ignored
    vm: bool = False

    def unsupported(self) -> list[str]:
        return [name for name in ("dc", "vm") if getattr(self, name)]

    def as_remove_params(self) -> RemoveParams:
        return RemoveParams(
            model=self.model,
            only_mask=self.om,
            post_process_mask=self.ppm,
            bgcolor=self.bgc,
            alpha_matting=self.a,
            alpha_matting_foreground_threshold=self.af,
            alpha_matting_background_threshold=self.ab,
            alpha_matting_erode_size=self.ae,
        )


def describe_errors(error: ValidationError, whole: str) -> str:
    """'field: message; ...' for a pydantic error (`whole` names a problem with no field)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in detail['loc']) or whole}: {detail['msg']}"
        for detail in error.errors()
    )
