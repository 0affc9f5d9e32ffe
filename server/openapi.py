"""The served OpenAPI document and its Swagger UI page.

FastAPI derives the routes and bodies; this adds what it cannot see: the request bodies read by
hand (`openai_extra` references), this server's own limits (max n, max deadline, the models'
classes and step counts), the errors each route can answer, the headers read and set, the
API-key scheme. (The /docs and /redoc pages load their scripts from this server, as
`fastapi-offline` serves them: they work on a host without internet access.)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server import edits, openai_images
from server.deps import ServerState
from server.schemas import ErrorResponse, GenerateRequest
from server.tiers import TIERS

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# What each route can answer besides 200 (401 only where keys are checked, added below).
ROUTE_ERRORS: dict[str, dict[int, str]] = {
    "/v1/generate": {
        400: "body is not a JSON object",
        404: "model not served here",
        406: "Accept names neither application/json nor image/png, or image/png with n > 1",
        413: "body larger than max_body_bytes",
        415: "content-type is not application/json",
        422: "a field is invalid (all listed in error.errors)",
        429: "queue full, this key over its rate or queue share, or a prompted model's text table full",
        500: "generation failed",
        503: "loading or shutting down",
        504: "deadline passed",
    },
    "/v1/images/generations": {
        400: "invalid body or field (OpenAI answers these with 400)",
        404: "model not served here",
        413: "body larger than max_body_bytes",
        415: "content-type is not application/json",
        429: "queue full, this key over its rate or queue share, or a prompted model's text table full",
        500: "generation failed",
        503: "loading or shutting down",
        504: "deadline passed",
    },
    "/v1/images/edits": {
        400: "malformed JSON or multipart body",
        404: "model not served here",
        413: "body larger than max_body_bytes",
        415: "content-type is neither multipart/form-data nor application/json",
        422: "a field or an image is invalid",
        429: "queue full, or this key over its rate or queue share",
        500: "generation failed",
        503: "loading or shutting down",
        504: "deadline passed",
    },
    "/v1/images/interpolations": {
        400: "body is not a JSON object",
        404: "model not served here",
        413: "body larger than max_body_bytes",
        415: "content-type is not application/json",
        422: "a field is invalid",
        429: "queue full, or this key over its rate or queue share",
        500: "generation failed",
        503: "loading or shutting down",
        504: "deadline passed",
    },
    "/v1/models": {503: "loading"},
    "/healthz": {},
    "/readyz": {},  # its 503 is a HealthResponse, declared on the route
    "/metrics": {},
}
OPS_ROUTES = ("/healthz", "/readyz", "/metrics")
HEADER = {"schema": {"type": "string"}}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", **HEADER}}
REQUEST_ID = {
    "x-request-id": {"description": "This request's id (the client's, or one made here).", **HEADER}
}
PNG_HEADERS = {
    "x-seed": "The image's seed (reproduces it with the same model, steps and class).",
    "x-model": "The model that drew it.",
    "x-steps": "Sampler steps run.",
    "x-class-label": "The class drawn, or null.",
    "server-timing": "queue, compute, encode and total milliseconds.",
}


def _read_headers(max_timeout_s: float) -> list[dict[str, Any]]:
    """The headers a POST route reads besides Authorization and Content-Type."""
    return [
        {
            "name": "x-request-id",
            "in": "header",
            "required": False,
            "description": "Your id for this request (1-64 of A-Z a-z 0-9 . _ -), echoed back and logged.",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        },
        {
            "name": "x-request-timeout",
            "in": "header",
            "required": False,
            "description": "Deadline in seconds when the body sets no timeout_s.",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_timeout_s},
        },
    ]


# request bodies the routes read by hand, named in their `openapi_extra`
BODIES: tuple[type[BaseModel], ...] = (
    GenerateRequest, openai_images.ImagesRequest, edits.EditRequest, edits.InterpolationRequest
)  # fmt: skip
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def build(base: dict[str, Any], st: ServerState) -> dict[str, Any]:
    """FastAPI's document `base` completed for this server (see the module docstring)."""
    s = st.settings
    schemas = base.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for body in BODIES:
        req = body.model_json_schema(ref_template="#/components/schemas/{model}")
        _limit_schema(req, st)
        schemas.update(req.pop("$defs", {}))
        schemas[body.__name__] = req
    keyed = bool(s.api_keys or s.api_keys_file)
    if keyed:
        base["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "One of the server's API keys."}
        }
    for path, ops in base["paths"].items():
        for method, op in ops.items():
            errors = dict(ROUTE_ERRORS.get(path, {}))
            if keyed and (path not in OPS_ROUTES or s.protect_ops_endpoints):
                op["security"] = [{"apiKey": []}]
                errors[401] = "missing or invalid API key"
            responses = op.setdefault("responses", {})
            for code in [c for c in responses if c.isdigit() and c[0] in "45" and int(c) not in errors]:
                if "HealthResponse" not in str(responses[code]):
                    del responses[code]  # FastAPI's default 422 where a route has no validated body
            for code, why in errors.items():
                headers = RETRY_AFTER if code in (429, 503) else {}
                responses[str(code)] = {
                    "description": why,
                    "content": {"application/json": {"schema": ERROR_REF}},
                    "headers": {**REQUEST_ID, **headers},
                }
            ok = responses.get("200", {})
            ok.setdefault("headers", {}).update(REQUEST_ID)
            if method == "post":
                op.setdefault("parameters", []).extend(_read_headers(s.max_timeout_s))
            if path == "/v1/generate":
                ok["content"]["image/png"] = {"schema": {"type": "string", "format": "binary"}}
                ok["headers"].update({k: {"description": v, **HEADER} for k, v in PNG_HEADERS.items()})
    return base


def _json_schema_bounds(node: Any) -> None:
    """pydantic leaves constraints that follow a before-validator as raw ge/le/gt/lt keys;
    rename them to the JSON Schema keywords clients understand."""
    if isinstance(node, dict):
        for k in [k for k in node if k in _BOUNDS]:
            node[_BOUNDS[k]] = node.pop(k)
        for v in node.values():
            _json_schema_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _json_schema_bounds(v)


def _limit_schema(req: dict[str, Any], st: ServerState) -> None:
    """Write the limits of this server and its models into a request schema, so clients (and
    schemathesis) see exactly what is accepted: n up to max_images_per_request, deadlines up to
    max_timeout_s, the models' classes and step counts."""
    _json_schema_bounds(req)
    props = req["properties"]
    props["n" if "n" in props else "frames"]["maximum"] = st.settings.max_images_per_request
    for alt in props["timeout_s"]["anyOf"]:  # [{number or integer, > 0}, null]
        if "exclusiveMinimum" in alt:
            alt["maximum"] = st.settings.max_timeout_s
    if "max_attempts" in props:
        props["max_attempts"]["anyOf"][0]["maximum"] = st.settings.max_attempts
    if "quality" in props and "steps" in props:  # one or the other
        req["not"] = {
            "required": ["quality", "steps"],
            "properties": {"quality": {"type": "string"}, "steps": {"type": "integer"}},
        }
    if st.engine is None:
        return
    # with several models, what any of them accepts (the route checks the named one)
    served = list(st.engine.models.values())
    cards = [m.card for m in served]
    quality = props.get("quality", {}).get("anyOf", [{}])[0].get("enum", [])
    if quality and set(quality) <= set(TIERS):  # cmserve's tiers, not the OpenAI body's words
        tiers = sorted({t.name for m in served for t in m.tiers}, key=TIERS.index)
        offered = [{"type": "string", "enum": tiers}, {"type": "null"}]
        props["quality"] = {**props["quality"], "anyOf": offered}
    for alt in props["class_label"].get("anyOf", []):
        if alt.get("type") == "integer":
            alt["maximum"] = max(c.num_classes for c in cards) - 1
    props["steps"].pop("maximum", None)
    props["steps"].pop("minimum", None)
    props["steps"]["enum"] = sorted({s for c in cards for s in c.steps})
    props["model"] = {"anyOf": [{"type": "string", "enum": [c.name for c in cards]}, {"type": "null"}]}
    if "size" not in props and not any(c.conditioning_text for c in cards):
        for field in [f for f in ("prompt", "guidance_scale") if f in props]:  # prompted models only
            props[field] = {"type": "null", "description": props[field].get("description", "")}
    if "size" in props and all(c.class_names for c in cards):
        # the OpenAI body: only a prompt some model accepts is schema-valid
        prompts = [p for c in cards for p in openai_images.accepted_prompts(c.class_names)]
        props["prompt"] = {**props["prompt"], "enum": list(dict.fromkeys(prompts))}
        props["prompt"].pop("minLength", None)
        props["prompt"].pop("maxLength", None)
    if "size" in props:
        sizes = list(dict.fromkeys(f"{c.image_size}x{c.image_size}" for c in cards))
        for key, only in (("size", sizes), ("response_format", ["b64_json"])):
            props[key] = {"anyOf": [{"type": "string", "enum": only}, {"type": "null"}]}
