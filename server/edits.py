"""POST /v1/images/edits and /v1/images/interpolations: zero-shot editing over the same batcher.

Edits arrive in OpenAI's multipart shape (`image`, `mask`: a PNG whose alpha = 0 marks the
region to generate, `n`, `response_format`) or as JSON with base64 PNGs, plus cmserve's fields
(`mode`, `strength`, `class_label`, `steps`, `seed`, `model`, `timeout_s`). Every image is
checked here (a PNG, the model's size and channels, a mask of the image's size with something
to generate); edit rows then join generation rows in the same batches and graphs
(models/editing.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from starlette.requests import ClientDisconnect

from models.editing import RowEdit, patch_sizes
from models.interface import ModelInfo
from server.deps import ApiError, ServerState
from server.generate import (
    client_gone,
    json_response,
    parse_body,
    read_json,
    ready_engine,
    serve,
    served_model,
    validate,
)
from server.schemas import MAX_SEED, TIMEOUT_HELP, JsonInt, Seconds


class EditRequest(BaseModel):
    """The fields of an edit besides its images (in multipart, form fields of those names)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="JSON variant: the image, a base64 PNG.")
    mask: str | None = Field(
        None, description="JSON variant: the mask, a base64 PNG of the image's size; alpha 0 = generate."
    )
    mode: Literal["inpaint", "superres", "variation", "colorize"] = Field(
        "inpaint",
        description="inpaint: generate where the mask (or the image's alpha) is 0; superres: the image "
        "is a low-resolution version (the model's size / p) whose p×p patch means are kept; "
        "variation: start from the image re-noised to `strength`; colorize (colour models): a "
        "grayscale image whose luma is kept.",
    )
    strength: Annotated[StrictFloat | StrictInt, Field(ge=0.05, le=1.0)] = Field(
        0.5, description="variation: noise level as a fraction of pure noise (angle / (π/2))."
    )
    model: str | None = Field(None, max_length=128)
    class_label: Annotated[JsonInt, Field(ge=0)] | None = None
    n: JsonInt = Field(1, ge=1)
    seed: Annotated[JsonInt, Field(ge=0, le=MAX_SEED)] | None = None
    steps: JsonInt | None = Field(None, ge=1, le=64)
    response_format: Literal["b64_json"] = "b64_json"
    timeout_s: Seconds | None = Field(None, description=TIMEOUT_HELP)


class InterpolationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"seed": 1, "seed_b": 2, "frames": 5, "class_label": 4}]},
    )

    seed: Annotated[JsonInt, Field(ge=0, le=MAX_SEED)] = Field(..., description="The first frame's seed.")
    seed_b: Annotated[JsonInt, Field(ge=0, le=MAX_SEED)] = Field(..., description="The last frame's seed.")
    frames: JsonInt = Field(5, ge=2, description="Frames, both ends included.")
    model: str | None = Field(None, max_length=128)
    class_label: Annotated[JsonInt, Field(ge=0)] | None = None
    steps: JsonInt | None = Field(None, ge=1, le=64)
    timeout_s: Seconds | None = Field(None, description=TIMEOUT_HELP)


FORM_NUMBERS = {
    "n": int,
    "seed": int,
    "steps": int,
    "class_label": int,
    "strength": float,
    "timeout_s": float,
}


async def read_edit(request: Request) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """-> (fields, image bytes, mask bytes) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        obj = await read_json(request)
        image, mask = obj.get("image"), obj.get("mask")
        return obj, _b64(image, "image"), _b64(mask, "mask")
    try:
        form = await request.form()
    except ClientDisconnect:
        raise client_gone() from None
    except Exception as e:  # a malformed multipart body
        raise ApiError(400, f"malformed multipart body: {e}", code="invalid_multipart") from None
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = _form_number(key, value) if key in FORM_NUMBERS else value
        else:
            files[key] = await value.read()
    for key in set(files) - {"image", "mask"}:
        raise ApiError(422, f"{key}: unknown file field", param=key, code="invalid_value")
    return fields, files.get("image"), files.get("mask")


def _form_number(key: str, value: str) -> Any:
    try:
        return FORM_NUMBERS[key](value) if value != "" else None
    except ValueError:
        raise ApiError(
            422, f"{key}: must be a number, got {value[:40]!r}", param=key, code="invalid_value"
        ) from None


def _b64(v: Any, field: str) -> bytes | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ApiError(422, f"{field}: must be a base64-encoded PNG", param=field, code="invalid_value")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64", param=field, code="invalid_value") from None


def _png(data: bytes, field: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(422, f"{field}: not a readable PNG", param=field, code="invalid_image") from None
    if img.format != "PNG":
        raise ApiError(422, f"{field}: must be a PNG, got {img.format}", param=field, code="invalid_image")
    return img


def _pixels(img: Image.Image, card: ModelInfo, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (channels [H, W, C] uint8, alpha [H, W] or None) of a PNG that must have `channels`."""
    gray = {"L": "L", "LA": "LA", "I;16": "L"}
    colour = {"RGB": "RGB", "RGBA": "RGBA", "P": "RGBA"}
    accepted = gray if channels == 1 else colour if channels == 3 else {}
    if img.mode not in accepted:
        want = "grayscale (L or LA)" if channels == 1 else "RGB or RGBA"
        if channels != card.channels:  # colorize: gray in, colour out
            raise ApiError(
                422, f"image: {img.mode} PNG; colorize takes a grayscale (L) image", param="image",
                code="invalid_image",
            )  # fmt: skip
        raise ApiError(
            422,
            f"image: {img.mode} PNG, but model {card.name!r} takes {card.channels}-channel images: {want}",
            param="image",
            code="invalid_image",
        )
    a = np.asarray(img.convert(accepted[img.mode]))
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[-1] in (2, 4):
        return a[:, :, :-1], a[:, :, -1]
    return a, None


def _to_model(pixels: np.ndarray, card: ModelInfo) -> torch.Tensor:
    """uint8 [H, W, C] -> [C, H, W] in the model's data range (the inverse of `to_uint8`)."""
    lo, hi = card.value_range
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 255.0
    return lo + x * (hi - lo)


def build_edit(req: EditRequest, card: ModelInfo, image: bytes | None, mask: bytes | None) -> RowEdit:
    """The checked images of one edit request -> the RowEdit each of its images gets."""
    if card.kind != "consistency":
        raise ApiError(
            422, f"model {card.name!r} is a {card.kind} model; editing needs a consistency model",
            param="model", code="unsupported_model",
        )  # fmt: skip
    if image is None:
        raise ApiError(422, "image: required", param="image", code="missing_image")
    img = _png(image, "image")
    if req.mode == "colorize" and card.channels != 3:
        raise ApiError(
            422, f"mode: colorize needs a colour model; {card.name!r} has {card.channels} channel(s)",
            param="mode", code="invalid_value",
        )  # fmt: skip
    pixels, alpha = _pixels(img, card, 1 if req.mode == "colorize" else card.channels)
    size = card.image_size
    h, w = pixels.shape[:2]
    if req.mode == "superres":
        if mask is not None:
            raise ApiError(422, "mask: not used by superres", param="mask", code="invalid_value")
        sizes = [size // p for p in patch_sizes(size)]
        if h != w or h not in sizes:
            raise ApiError(
                422, f"image: {w}x{h}; superres takes a square low-resolution image of side {sizes} "
                f"(the model's {size} / p)", param="image", code="invalid_size",
            )  # fmt: skip
        p = size // h
        up = np.repeat(np.repeat(pixels, p, axis=0), p, axis=1)  # its patch means are the input
        return RowEdit("superres", ref=_to_model(up, card), patch=p)
    if (h, w) != (size, size):
        raise ApiError(
            422, f"image: {w}x{h}, the model takes {size}x{size}", param="image", code="invalid_size"
        )
    ref = _to_model(pixels, card)
    if req.mode in ("variation", "colorize") and mask is not None:
        raise ApiError(422, f"mask: not used by {req.mode}", param="mask", code="invalid_value")
    if req.mode == "variation":
        return RowEdit("variation", ref=ref, strength=float(req.strength))
    if req.mode == "colorize":  # the gray level in every channel: its luma is the gray level
        return RowEdit("colorize", ref=ref.expand(3, -1, -1).clone())
    if mask is not None:
        m = _png(mask, "mask")
        if m.size != img.size:
            raise ApiError(
                422, f"mask: {m.size[0]}x{m.size[1]}, the image is {w}x{h}: they must match",
                param="mask", code="invalid_size",
            )  # fmt: skip
        if "A" not in m.getbands() and not (m.mode == "P" and "transparency" in m.info):
            raise ApiError(
                422, "mask: needs an alpha channel (alpha 0 marks the region to generate)",
                param="mask", code="invalid_image",
            )  # fmt: skip
        alpha = np.asarray(m.convert("RGBA"))[:, :, 3]
    elif alpha is None:
        raise ApiError(
            422, "mask: required for inpaint (or an image with alpha 0 where to generate)",
            param="mask", code="missing_mask",
        )  # fmt: skip
    generate = alpha == 0
    if not generate.any():
        raise ApiError(
            422, "mask: nothing to generate (no pixel has alpha 0)", param="mask", code="empty_mask"
        )
    keep = torch.from_numpy((~generate).astype(np.float32))[None].expand(card.channels, -1, -1).clone()
    return RowEdit("inpaint", ref=ref, keep=keep)


def pixel_model(engine: Any, name: str | None) -> None:
    """422 for a prompted latent model: edits constrain pixels of a class-conditional image."""
    card = served_model(engine, name).card
    if card.conditioning_text:
        raise ApiError(
            422, f"model {card.name!r} is a prompted latent model; edits and interpolations need a "
            "class-conditional or unconditional one", param="model", code="unsupported_model",
        )  # fmt: skip


async def images_edits(request: Request, st: ServerState) -> Any:
    """Zero-shot editing (inpaint, superres, variation): OpenAI's multipart shape (`image`,
    `mask` files) or JSON with base64 PNGs."""
    t_arrive = time.monotonic()
    engine = ready_engine(st)
    fields, image, mask = await read_edit(request)
    ereq = parse_body(EditRequest, fields)
    pixel_model(engine, ereq.model)
    gen = {k: getattr(ereq, k) for k in ("model", "class_label", "n", "seed", "steps", "timeout_s")}
    req, sm = validate({k: v for k, v in gen.items() if v is not None}, st, engine)
    edit = build_edit(ereq, sm.card, image, mask)
    served = await serve(request, st, req, t_arrive, [edit] * req.n)
    if isinstance(served, Response):
        return served
    data = [
        {"b64_json": base64.b64encode(p).decode(), "seed": d.seed, "class_label": req.class_label}
        for p, d in zip(served.pngs, served.drawn, strict=True)
    ]
    st.metrics.edits.labels(sm.name, ereq.mode).inc(req.n)
    body = {"created": int(time.time()), "model": sm.name, "mode": ereq.mode, "steps": served.steps,
            "data": data, "timings_ms": served.timings.model_dump()}  # fmt: skip
    return json_response(body)


async def images_interpolations(request: Request, st: ServerState) -> Any:
    """Frames between two seeds' images (slerp of their noises), both ends included."""
    t_arrive = time.monotonic()
    engine = ready_engine(st)
    ireq = parse_body(InterpolationRequest, await read_json(request))
    pixel_model(engine, ireq.model)
    gen = {"model": ireq.model, "class_label": ireq.class_label, "n": ireq.frames, "seed": ireq.seed,
           "steps": ireq.steps, "timeout_s": ireq.timeout_s}  # fmt: skip
    try:
        req, sm = validate({k: v for k, v in gen.items() if v is not None}, st, engine)
    except ApiError as e:
        if e.param == "n":  # the frames are the images
            raise ApiError(
                e.status, "frames" + e.message.removeprefix("n"), param="frames", code=e.code
            ) from None
        raise
    alphas = [f / (ireq.frames - 1) for f in range(ireq.frames)]
    edits: list[RowEdit | None] = [RowEdit("interpolate", seed_b=ireq.seed_b, alpha=a) for a in alphas]
    # every frame draws from seed and seed_b, so the Job's per-image seeds are all `seed`
    served = await serve(request, st, req, t_arrive, edits, same_seed=True)
    if isinstance(served, Response):
        return served
    data = [{"b64_json": base64.b64encode(p).decode(), "alpha": a} for p, a in zip(served.pngs, alphas)]
    st.metrics.edits.labels(sm.name, "interpolate").inc(req.n)
    return json_response({"created": int(time.time()), "model": sm.name, "steps": served.steps,
                  "seed": ireq.seed, "seed_b": ireq.seed_b, "data": data,
                  "timings_ms": served.timings.model_dump()})  # fmt: skip
