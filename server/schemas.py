"""Request and response bodies of the REST API (OpenAI images API naming where it fits).

Types are strict: "n": "4", "n": true or "seed": 1.5 are rejected, not coerced (4.0 is an
integer, as in JSON Schema), and unknown fields are
errors. Limits that depend on the loaded model or the settings (class range, supported steps,
max n) are checked in the route, before anything is queued.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt


def _json_int(v: Any) -> Any:
    """JSON Schema's integer: 7 and 7.0 are integers; "7", true and 7.5 are not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("must be an integer")
        return int(v)
    return v


JsonInt = Annotated[StrictInt, BeforeValidator(_json_int)]
MAX_SEED = 2**62  # seed + i stays well inside int64 for any n
# A deadline in seconds; its upper bound is the server's `max_timeout_s` (checked in the route and
# written into the served OpenAPI schema), so it is not fixed here.
Seconds = Annotated[StrictFloat | StrictInt, Field(gt=0)]
TIMEOUT_HELP = "Deadline in seconds, at most the server's max_timeout_s; 504 when it passes."


class GenerateRequest(BaseModel):
    model: str | None = Field(
        None, max_length=128, description="Served model's id (GET /v1/models); omitted = the default model."
    )
    class_label: Annotated[JsonInt, Field(ge=0)] | None = Field(
        None,
        description="Class to draw (see GET /v1/models); null = unconditional, where the model has an "
        "unconditional mode (`unconditional` in /v1/models).",
    )
    prompt: str | None = Field(
        None,
        max_length=4000,
        description="What to draw, for a prompted model (`conditioning: text` in /v1/models); longer "
        "than its tokenizer's window it is truncated, and `prompt_truncated` says so.",
    )
    guidance_scale: Annotated[StrictFloat | StrictInt, Field(ge=0, le=50)] | None = Field(
        None, description="A prompted model's guidance scale w (LCM embeds it); omitted = 8.5."
    )
    n: JsonInt = Field(1, ge=1, description="Number of images (at most the server's max_images_per_request).")
    seed: Annotated[JsonInt, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="Image i uses seed + i; omitted = random, returned per image."
    )
    steps: JsonInt | None = Field(
        None,
        ge=1,
        le=64,
        description="Sampler steps: one of the model's supported counts; omitted = the model's default "
        "(`default_steps` in /v1/models).",
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="Only base64 PNGs in JSON for now.")
    timeout_s: Seconds | None = Field(None, description=TIMEOUT_HELP)
    quality: Literal["fast", "standard", "high", "reference"] | None = Field(
        None,
        description="Quality tier: fast / standard / high = the model's fewest, default and most steps; "
        "reference = its slower reference model (`tiers` in /v1/models). Omitted = standard, or the "
        "tier `steps` gives; not together with `steps`.",
    )
    on_reject: Literal["return", "resample", "escalate"] | None = Field(
        None,
        description="For an image its accept check rejects: return it marked, resample it with a new "
        "seed, or escalate it to the next tier up. Omitted = the server's on_reject.",
    )
    max_attempts: JsonInt | None = Field(
        None, ge=1, description="Most draws per image, the first included (at most the server's)."
    )
    accept_threshold: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] | None = Field(
        None, description="Score an image needs to be accepted; omitted = the server's."
    )
    allow_degrade: StrictBool | None = Field(
        None,
        description="Whether, when the server predicts its latency objective missed, this request may "
        "run one tier lower; omitted = the server's allow_degrade.",
    )
    priority: Literal["interactive", "batch"] = Field(
        "interactive",
        description="batch: runs only while no interactive request waits, and is refused (429) first.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"class_label": 7, "n": 4, "steps": 2},
                {"class_label": 3, "seed": 1234, "timeout_s": 5},
                {"class_label": 5, "n": 2, "quality": "fast", "on_reject": "escalate"},
            ]
        },
    )


class ImageData(BaseModel):
    b64_json: str
    seed: int = Field(description="The seed that drew this image (with `model`, `steps`, `class_label`).")
    class_label: int | None
    model: str = Field(description="The model that drew it (the reference tier's may differ).")
    steps: int
    tier: str | None = Field(description="Quality tier that drew it; null for steps outside the tiers.")
    score: float | None = Field(description="Its accept-check score in [0, 1]; null without a scorer.")
    accepted: bool | None = Field(description="score >= the threshold; null without a scorer.")
    attempts: int = Field(description="Draws it took (re-rolls included).")


class Timings(BaseModel):
    queue: float
    compute: float
    encode: float
    total: float


class GenerateResponse(BaseModel):
    model: str
    steps: int
    tier: str | None = Field(description="The tier the request ran at first.")
    requested_tier: str | None
    degraded: bool = Field(description="Run one tier below the one asked, to meet the latency objective.")
    prompt_truncated: bool | None = Field(
        None, description="A prompted model: whether the prompt was cut to its tokenizer's window."
    )
    created: int
    data: list[ImageData]
    timings_ms: Timings


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str


class ModelCardResponse(BaseModel):
    id: str
    object: Literal["model"] = "model"
    family: str
    kind: str
    default: bool
    placeholder: bool
    image_size: int
    channels: int
    classes: list[str]
    unconditional: bool
    time: str
    conditioning: str = Field(description="class (class_label), text (prompt) or none")
    supported_steps: list[int]
    default_steps: int
    tiers: dict[str, dict[str, Any]] = Field(description="quality tier -> the model and steps that draw it")
    accept_check: bool = Field(description="Whether its images are scored (accepted / score per image).")
    schedules: dict[str, list[float]]
    provenance: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCardResponse]


class HealthResponse(BaseModel):
    status: str
