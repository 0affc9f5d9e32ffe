"""POST /v1/images/generations: the OpenAI Images API over the same queue and batcher.

Clients that already speak OpenAI's API (its SDKs among them) call it unchanged. The prompt of
a class-conditional model names the class: its index, its name from the model card, or an
English number word ("seven"); an unconditional model's prompt is not read. `model` picks one of
the served models. cmserve's own fields (`seed`, `steps`, `class_label`,
`timeout_s`) ride along as extra body fields (the SDK's `extra_body`). Errors keep the
`{"error": {...}}` shape; invalid values are 400 here, as OpenAI answers them.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from server.deps import ApiError, ServerState
from server.errors import request_id_of
from server.generate import json_response, parse_body, read_json, ready_engine, serve, served_model, validate
from server.schemas import MAX_SEED, TIMEOUT_HELP, JsonInt, Seconds

log = logging.getLogger("cmserve.openai")

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip


class ImagesRequest(BaseModel):
    """OpenAI's `images.generate` body, as far as a class-conditional few-step model can honour
    it, plus cmserve's own fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "seven", "n": 2}, {"prompt": "3", "steps": 4}]},
    )

    prompt: str = Field(
        ..., min_length=1, max_length=1000, description="The class: index, name or number word."
    )
    model: str | None = Field(
        None, max_length=128, description="A served model's id (GET /v1/models); omitted = the default model."
    )
    n: JsonInt = Field(1, ge=1, description="Number of images.")
    size: str | None = Field(None, description="WIDTHxHEIGHT; only the model's own size.")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="b64_json; url needs a server that keeps images and is refused."
    )
    user: str | None = Field(None, max_length=256, description="End-user id, logged with the request id.")
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        None,
        description="OpenAI's quality words on cmserve's tiers: low = fast; medium, standard, auto = "
        "standard; high, hd = high.",
    )
    # cmserve's fields
    seed: Annotated[JsonInt, Field(ge=0, le=MAX_SEED)] | None = None
    steps: JsonInt | None = Field(None, ge=1, le=64)
    class_label: Annotated[JsonInt, Field(ge=0)] | None = Field(
        None, description="The class by index; when given, the prompt is not read."
    )
    timeout_s: Seconds | None = Field(None, description=TIMEOUT_HELP)


# OpenAI's quality words (gpt-image-1's low/medium/high/auto, dall-e-3's standard/hd) -> tiers
OPENAI_QUALITY = {"low": "fast", "medium": "standard", "auto": "standard", "standard": "standard",
                  "high": "high", "hd": "high"}  # fmt: skip


def accepted_prompts(class_names: tuple[str, ...]) -> list[str]:
    """Every prompt form `resolve_class` accepts (case and surrounding spaces aside)."""
    forms = [*class_names, *map(str, range(len(class_names))), *NUMBER_WORDS[: len(class_names)]]
    return list(dict.fromkeys(forms))


def resolve_class(prompt: str, class_names: tuple[str, ...]) -> int:
    """A prompt naming a class -> its index; 400 listing what is accepted otherwise."""
    p = prompt.strip().lower()
    names = [c.lower() for c in class_names]
    if p in names:
        return names.index(p)
    if p.isdigit() and int(p) < len(names):
        return int(p)
    if p in NUMBER_WORDS and NUMBER_WORDS.index(p) < len(names):
        return NUMBER_WORDS.index(p)
    shown = ", ".join(repr(n) for n in class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    words = f"'{NUMBER_WORDS[0]}'..'{NUMBER_WORDS[min(len(names), len(NUMBER_WORDS)) - 1]}'"
    raise ApiError(
        400,
        f"prompt {prompt[:60]!r} names no class of this model; accepted: an index 0..{len(names) - 1}, "
        f"a class name ({shown}) or an English number word ({words})",
        param="prompt",
        code="unknown_class",
    )


async def images_generations(request: Request, st: ServerState) -> Any:
    """The OpenAI Images API: the prompt names the class; cmserve's fields ride along."""
    t_arrive = time.monotonic()
    engine = ready_engine(st)
    obj = await read_json(request)
    oreq = parse_body(ImagesRequest, obj, status=400)
    if oreq.response_format == "url":
        raise ApiError(
            400,
            "response_format 'url' needs a server that keeps images; this one returns them inline: "
            "use 'b64_json'",
            param="response_format",
            code="unsupported_value",
        )
    card = served_model(engine, oreq.model).card
    own_size = f"{card.image_size}x{card.image_size}"
    if oreq.size is not None and oreq.size != own_size:
        raise ApiError(
            400, f"size must be {own_size!r}, the model's own", param="size", code="unsupported_value"
        )
    label = oreq.class_label
    if label is None and card.class_names:  # an unconditional model takes any prompt, unread
        label = resolve_class(oreq.prompt, card.class_names)
    fields = {
        "model": card.name,
        "class_label": label,
        "n": oreq.n,
        "seed": oreq.seed,
        "steps": oreq.steps,
        "timeout_s": oreq.timeout_s,
        "quality": OPENAI_QUALITY[oreq.quality] if oreq.quality else None,
        "prompt": oreq.prompt if card.conditioning_text else None,  # a prompted model reads it whole
    }
    try:
        req, _ = validate({k: v for k, v in fields.items() if v is not None}, st, engine)
        if oreq.user:
            log.info("images.generations request %s for user %r", request_id_of(request.scope), oreq.user)
        served = await serve(request, st, req, t_arrive)  # 422 there: a bad x-request-timeout
    except ApiError as e:
        if e.status != 422:
            raise
        raise ApiError(400, e.message, param=e.param, code=e.code, headers=e.headers) from None
    if isinstance(served, Response):
        return served
    revised = card.class_names[label] if label is not None and label < card.num_classes else ""
    data = [
        {"b64_json": base64.b64encode(png).decode(), "revised_prompt": revised, "seed": d.seed}
        for png, d in zip(served.pngs, served.drawn, strict=True)
    ]
    body = {"created": int(time.time()), "data": data, "model": card.name, "steps": served.steps}
    return json_response(body)
