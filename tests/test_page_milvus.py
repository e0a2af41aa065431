"""The search page over a Milvus-backed index, in Debian's chromium against a real `lookalike serve` (which holds the
Milvus Lite file: this process never opens it after building): the filter box, the API's filter field, strict CSP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import pytest

from helpers import LOOKALIKE
from test_page import browser, send_file  # noqa: F401  (browser: one headless chromium for the module)
from test_serve import server  # noqa: F401  (server: the real `lookalike serve` over this module's index_dir)

STRICT = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'"
)


@pytest.fixture(scope="module")
def index_dir(table_csv, tmp_path_factory) -> Path:
    """A Milvus-backed index of the 80 validation drawings, metadata `parity` (odd/even character number), k-reciprocal,
    written by `lookalike index` in its own process: a Milvus Lite file stays locked by the process that opened it."""
    frame = pd.read_csv(table_csv)
    frame["parity"] = ["odd" if int(label[-1]) % 2 else "even" for label in frame["label"]]
    table = table_csv.with_name("parity.csv")
    frame.to_csv(table, index=False)
    folder, db = table.parent / "milvus_page", tmp_path_factory.mktemp("milvus") / "page.db"
    settings = [f"data.table={table}", f"serve.index_dir={folder}", "serve.gallery=validation", "rerank=[kreciprocal]"]
    tiny = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=64"]
    milvus = ["index.backend=milvus", f"index.uri={db}"]
    done = subprocess.run([LOOKALIKE, "index", *settings, *tiny, *milvus], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return folder


def odd(label: str) -> bool:
    return int(label[-1]) % 2 == 1


def test_the_filter_box_narrows_the_results_under_a_strict_policy(browser, server, index_dir):  # noqa: F811
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    violations = []
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))

    def with_policy(route) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT})

    page.route(f"{server}/", with_policy)
    page.goto(server)
    expect(page.locator("#filter")).to_be_visible()  # shown for a Milvus-backed index only
    manifest = json.loads((index_dir / "manifest.json").read_text())
    paths = pd.read_csv(index_dir / "gallery.csv")["path"]  # relative to the images root
    page.fill("#filter", 'parity == "odd"')
    assert send_file(page, "drop", Path(manifest["images_root"]) / paths[0])
    results = page.locator('[data-column="original"] .result')
    expect(results).to_have_count(10)
    labels = page.locator('[data-column="original"] .result .label').all_text_contents()
    assert all(odd(label) for label in labels), labels
    page.check('input.reranker[value="kreciprocal"]')
    expect(page.locator('[data-column="kreciprocal"] .result')).to_have_count(10)
    labels = page.locator('[data-column="kreciprocal"] .result .label').all_text_contents()
    assert all(odd(label) for label in labels), labels
    page.fill("#filter", "parity === 1")
    page.dispatch_event("#filter", "change")
    expect(page.locator("#error")).to_contain_text("filter: Milvus cannot use")
    expect(page.locator(".result")).to_have_count(0)
    assert violations == []
    page.close()


def test_the_api_filters_and_bounds_the_expression(server):  # noqa: F811
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["backend"] == "milvus"
    found = httpx.post(
        f"{server}/search", data={"gallery_id": "3", "k": "20", "filter": 'parity == "even"'}, timeout=60
    )
    assert found.status_code == 200, found.text
    items = found.json()["columns"][0]["items"]
    assert len(items) == 20 and not any(odd(item["label"]) for item in items)
    too_long = httpx.post(f"{server}/search", data={"gallery_id": "3", "filter": "x" * 5000}, timeout=60)
    assert too_long.status_code == 422 and "4096" in too_long.text
