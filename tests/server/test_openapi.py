"""The served OpenAPI document says what the server does: its limits, the errors each route can
answer, the headers it reads and sets, the key scheme; and /docs works without the internet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from server.settings import Settings
from tests.server.helpers import app_client

AUTH = {"authorization": "Bearer k"}


def _settings(ckpt: Path, **kw: object) -> Settings:
    return Settings(
        checkpoint=str(ckpt),
        buckets=[1, 2, 4],
        max_batch_size=4,
        max_timeout_s=20,
        default_timeout_s=10,
        **kw,
    )


def _errors(doc: dict[str, Any], path: str, method: str) -> set[int]:
    return {int(c) for c in doc["paths"][path][method]["responses"] if c[0] in "45"}


async def test_security_scheme_and_401_only_where_keys_are_checked(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt, api_keys=["k"])) as (c, _):
        doc = (await c.get("/openapi.json")).json()
        assert doc["components"]["securitySchemes"]["apiKey"] == {
            "type": "http", "scheme": "bearer", "description": "One of the server's API keys."
        }  # fmt: skip
        for path in ("/v1/generate", "/v1/images/edits", "/v1/models"):
            op = next(iter(doc["paths"][path].values()))
            assert op["security"] == [{"apiKey": []}] and 401 in _errors(
                doc, path, next(iter(doc["paths"][path]))
            )
        # the probes are open (protect_ops_endpoints is off): no key asked, no 401 listed
        assert "security" not in doc["paths"]["/healthz"]["get"] and not _errors(doc, "/healthz", "get")
        # and what the document says is what the server does
        assert (await c.post("/v1/generate", json={"class_label": 1})).status_code == 401
        assert (await c.get("/healthz")).status_code == 200
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        doc = (await c.get("/openapi.json")).json()
        assert "securitySchemes" not in doc["components"]
        assert (
            401 not in _errors(doc, "/v1/generate", "post")
            and "security" not in doc["paths"]["/v1/generate"]["post"]
        )


async def test_each_route_lists_only_errors_it_can_answer(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        doc = (await c.get("/openapi.json")).json()
        assert _errors(doc, "/v1/generate", "post") == {400, 404, 406, 413, 415, 422, 429, 500, 503, 504}
        assert 422 not in _errors(doc, "/v1/images/generations", "post")  # OpenAI's 400 instead
        assert _errors(doc, "/v1/models", "get") == {503}
        assert _errors(doc, "/readyz", "get") == {503}
        assert _errors(doc, "/metrics", "get") == set()
        # the OpenAI route really answers a bad x-request-timeout with 400, as it lists
        r = await c.post(
            "/v1/images/generations", json={"prompt": "3"}, headers={"x-request-timeout": "soon"}
        )  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-timeout"
        for resp in doc["paths"]["/v1/generate"]["post"]["responses"].values():
            assert "x-request-id" in resp["headers"]
        assert "Retry-After" in doc["paths"]["/v1/generate"]["post"]["responses"]["429"]["headers"]


async def test_timeout_limit_is_the_servers_in_schema_and_behaviour(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        doc = (await c.get("/openapi.json")).json()
        for name in ("GenerateRequest", "ImagesRequest", "EditRequest", "InterpolationRequest"):
            alts = doc["components"]["schemas"][name]["properties"]["timeout_s"]["anyOf"]
            assert [a.get("maximum") for a in alts if "exclusiveMinimum" in a] == [20], name
        header = next(
            p for p in doc["paths"]["/v1/generate"]["post"]["parameters"] if p["name"] == "x-request-timeout"
        )
        assert header["in"] == "header" and header["schema"]["maximum"] == 20
        ok = await c.post("/v1/generate", json={"class_label": 1, "timeout_s": 20})
        over = await c.post("/v1/generate", json={"class_label": 1, "timeout_s": 20.5})
        over_h = await c.post("/v1/generate", json={"class_label": 1}, headers={"x-request-timeout": "21"})
        assert ok.status_code == 200
        for r, param in ((over, "timeout_s"), (over_h, "x-request-timeout")):
            err = r.json()["error"]
            assert r.status_code == 422 and err["param"] == param and err["code"] == "invalid_value"
            assert err["message"] == f"{param}: Input should be less than or equal to 20"


async def test_examples_are_accepted_and_png_headers_are_documented(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        doc = (await c.get("/openapi.json")).json()
        schemas = doc["components"]["schemas"]
        for ex in schemas["GenerateRequest"]["examples"]:
            assert (await c.post("/v1/generate", json=ex)).status_code == 200, ex
        for ex in schemas["ImagesRequest"]["examples"]:
            assert (await c.post("/v1/images/generations", json=ex)).status_code == 200, ex
        for ex in schemas["InterpolationRequest"]["examples"]:
            assert (await c.post("/v1/images/interpolations", json=ex)).status_code == 200, ex
        ok = doc["paths"]["/v1/generate"]["post"]["responses"]["200"]
        assert ok["content"]["image/png"]["schema"]["format"] == "binary"
        r = await c.post("/v1/generate", json={"class_label": 2}, headers={"accept": "image/png"})
        assert r.headers["content-type"] == "image/png"
        assert set(ok["headers"]) <= set(r.headers), set(ok["headers"]) - set(r.headers)
        names = {p["name"] for p in doc["paths"]["/v1/images/edits"]["post"]["parameters"]}
        assert names == {"x-request-id", "x-request-timeout"}


async def test_docs_page_loads_its_assets_from_this_server(tiny_ckpt: Path) -> None:
    async with app_client(_settings(tiny_ckpt)) as (c, _):
        page = await c.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r'(?:href|src)="([^"]+)"', page.text)
        assert urls and all(u.startswith("/docs/assets/") for u in urls), urls  # no CDN
        for u in urls:
            r = await c.get(u)
            assert r.status_code == 200 and len(r.content) > 100, u
        assert "'/openapi.json'" in page.text
        redoc = await c.get("/redoc")
        urls = re.findall(r'(?:href|src)="([^"]+)"', redoc.text)
        assert urls and all(u.startswith("/docs/assets/") for u in urls), urls
