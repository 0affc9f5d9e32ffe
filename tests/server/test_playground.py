"""The playground page in a real browser: the distribution's Chromium driven by Playwright
(nothing downloaded at run time). Skipped, saying why, where either is missing."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.procs import serve_process

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    if CHROMIUM is None:
        pytest.skip(
            "no Chromium on this machine (CI installs the distribution's package: deploy/install-tools.sh)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package (test extra) is missing"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_playground_generates_and_explains_errors(browser, tiny_ckpt: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # PLAYGROUND_SCREENSHOT=docs/playground.png: the docs' screenshot, of the shipped model
    shot = os.environ.get("PLAYGROUND_SCREENSHOT")
    ckpt = [] if shot else ["--checkpoint", str(tiny_ckpt)]
    with serve_process(*ckpt, "--buckets", "1,4", tmp=tmp_path) as sp:
        page = browser.new_page()
        page.goto(sp.url + "/")
        page.wait_for_selector("#class_label option", state="attached")
        page.select_option("#class_label", "3")
        page.fill("#seed", "5")
        page.fill("#n", "2")
        page.click("#go")
        page.wait_for_selector("#images img >> nth=1")
        srcs = page.eval_on_selector_all("#images img", "els => els.map(e => e.src)")
        seeds = page.eval_on_selector_all("#images img", "els => els.map(e => e.dataset.seed)")
        want = httpx.post(sp.url + "/v1/generate", json={"class_label": 3, "n": 2, "seed": 5}).json()["data"]
        assert [s.split(",", 1)[1] for s in srcs] == [d["b64_json"] for d in want]
        assert seeds == ["5", "6"]
        assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert "compute" in page.inner_text("#timings")
        page.screenshot(path=shot or str(tmp_path / "playground.png"), full_page=True)
        # a seed the server refuses: its 422 is shown in words, with the field
        page.fill("#seed", "-1")
        page.click("#go")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        err = page.inner_text("#error")
        assert "seed" in err and "request id" in err, err


def test_playground_can_be_switched_off(tiny_ckpt: Path, tmp_path: Path) -> None:
    with serve_process(
        "--checkpoint", str(tiny_ckpt), "--buckets", "1", "--no-playground", tmp=tmp_path
    ) as sp:
        assert httpx.get(sp.url + "/").status_code == 404
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1", tmp=tmp_path) as sp:
        page = httpx.get(sp.url + "/")
        assert page.status_code == 200 and "cmserve playground" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_api_docs_render_offline_with_authorize(browser, tiny_ckpt: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """/docs (Swagger UI) in a browser that may reach nothing but this server: every operation
    is listed, and Authorize with a key makes "Try it out" requests that pass the key check."""
    env = {"CMSERVE_API_KEYS": "k1"}
    with serve_process("--checkpoint", str(tiny_ckpt), "--buckets", "1", tmp=tmp_path, env=env) as sp:
        page = browser.new_page()
        elsewhere: list[str] = []

        def only_here(route) -> None:  # type: ignore[no-untyped-def]
            if route.request.url.startswith(sp.url):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        page.route("**/*", only_here)
        page.goto(sp.url + "/docs")
        page.wait_for_selector(".opblock-summary-path")
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
        assert {"/v1/generate", "/v1/images/edits", "/v1/models", "/healthz"} <= set(paths), paths
        assert elsewhere == []
        page.click("button.authorize")
        page.fill(".auth-container input", "k1")
        page.click(".auth-btn-wrapper button.authorize")
        page.click("button.btn-done")
        # "Try it out" on GET /v1/models: the browser sends the key and gets the model list
        page.click("#operations-default-models_v1_models_get .opblock-summary")
        page.click("#operations-default-models_v1_models_get .try-out__btn")
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as answer:
            page.click("#operations-default-models_v1_models_get .execute")
        assert answer.value.status == 200 and answer.value.request.headers["authorization"] == "Bearer k1"
        assert answer.value.json()["data"][0]["id"]
