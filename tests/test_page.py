"""The search page driven in Debian's chromium by Playwright against a real `lookalike serve`: preview, errors, busy
indicator, drag-and-drop and paste, full labels, score columns, re-rankers and clicking a result."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import index_config
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.serve import build_index, load_index
from test_serve import server  # noqa: F401  (server: the real `lookalike serve` over this module's index_dir)

CHROMIUM = Path("/usr/bin/chromium")
RERANK = "rerank=[{icfrr: {kg: 10, kq: 10}}, kreciprocal]"
ICFRR = "icfrr(kg=10, kq=10)"
# the <img>s the user can see that failed: a broken one (or one without a source) is complete with naturalWidth 0
BROKEN_IMAGES = """() => [...document.images]
    .filter((img) => img.getClientRects().length && getComputedStyle(img).visibility !== 'hidden')
    .filter((img) => img.complete && img.naturalWidth === 0).map((img) => img.id || img.src)"""
# the query preview canvas, once visible: how many of its pixels are dark (the drawing's strokes), and a fingerprint
QUERY_DRAWING = """async () => {
    const canvas = document.getElementById('query-image');
    while (canvas.hidden || !canvas.getClientRects().length) await new Promise((done) => setTimeout(done, 50));
    const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    let dark = 0, hash = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] < 128) { dark += 1; hash = (hash * 31 + i) % 1000000007; }
    return [dark, hash];
}"""
# a real drop / paste event carrying a File made from the given bytes
SEND_FILE = """([how, data, name, type]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type }));
    const target = how === 'drop' ? document.getElementById('drop') : document.body;
    const options = { bubbles: true, cancelable: true };
    if (how === 'drop') {
        target.dispatchEvent(new DragEvent('dragenter', { ...options, dataTransfer: transfer }));
        const highlighted = document.getElementById('drop').classList.contains('dragging');
        target.dispatchEvent(new DragEvent('drop', { ...options, dataTransfer: transfer }));
        return highlighted;
    }
    return !target.dispatchEvent(new ClipboardEvent('paste', { ...options, clipboardData: transfer }));
}"""


@pytest.fixture(scope="module")
def index_dir(table_csv) -> Path:
    """A gallery of 80 Omniglot drawings labelled "Balinese/characterNN", served with ICFRR and k-reciprocal."""
    cfg = index_config(table_csv, table_csv.parent / "index", RERANK)
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


def chromium() -> Path:
    """Debian's chromium, installed with apt when missing (as the CI machine starts without it)."""
    root = [] if os.geteuid() == 0 else ["sudo", "-n"] if shutil.which("sudo") else None
    if not CHROMIUM.exists() and shutil.which("apt-get") and root is not None:
        install = [*root, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, capture_output=True, check=False, env=env).returncode != 0:
            subprocess.run([*root, "apt-get", "update", "-q"], capture_output=True, check=False, env=env)
            subprocess.run(install, capture_output=True, check=False, env=env)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing and apt-get could not install Debian's chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium()))
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):  # noqa: F811
    """A fresh page on the served search page, its re-rankers listed."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    expect(page.locator("input.reranker")).to_have_count(2)
    yield page
    page.close()


def broken_images(page) -> list[str]:
    """The visible images that did not load, once the page's requests have settled."""
    page.wait_for_load_state("networkidle")
    return page.evaluate(BROKEN_IMAGES)


def query_drawing(page) -> tuple[int, int]:
    """The visible query preview's count of dark pixels and a fingerprint of where they are."""
    return tuple(page.evaluate(QUERY_DRAWING))


def send_file(page, how: str, path: str | Path, name: str = "query.png", type_: str = "image/png") -> bool:
    """Drop or paste a file on the page as a real DragEvent / ClipboardEvent; whether the page took it."""
    return page.evaluate(SEND_FILE, [how, base64.b64encode(Path(path).read_bytes()).decode(), name, type_])


def test_no_broken_query_image_before_or_after_a_rejected_upload(page, index_dir):
    from playwright.sync_api import expect

    expect(page.locator("#query-image")).to_be_hidden()
    assert broken_images(page) == []
    page.set_input_files("#upload", load_index(index_dir).paths[0])
    expect(page.locator('[data-column="original"] .result')).to_have_count(10)
    expect(page.locator("#query-image")).to_be_visible()
    assert query_drawing(page)[0] > 50 and broken_images(page) == []  # the upload is drawn: strokes on white

    page.set_input_files(
        "#upload", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"just some text, not a picture\n"}
    )
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("not an image")
    expect(page.locator(".result")).to_have_count(0)  # the old results are gone
    expect(page.locator("#query")).to_be_hidden()
    expect(page.locator("#query-image")).to_be_hidden()
    assert broken_images(page) == []


def test_busy_indicator_shows_while_a_search_runs(page, index_dir):
    from playwright.sync_api import expect

    held = []
    page.route("**/search", lambda route: held.append(route))  # hold the request until the indicator has been seen
    page.set_input_files("#upload", load_index(index_dir).paths[1])
    page.wait_for_function("document.body.classList.contains('busy')")
    expect(page.locator("#status")).to_be_visible()
    assert page.evaluate("getComputedStyle(document.body).cursor") == "progress"
    assert page.evaluate("getComputedStyle(document.getElementById('status'), '::before').animationName") == "spin"
    expect(page.locator("#columns")).to_have_attribute("aria-busy", "true")
    assert len(held) == 1
    held[0].continue_()
    expect(page.locator('[data-column="original"] .result')).to_have_count(10)
    expect(page.locator("#status")).to_be_hidden()
    expect(page.locator("#columns")).to_have_attribute("aria-busy", "false")
    assert page.evaluate("getComputedStyle(document.body).cursor") != "progress"


def test_drop_and_paste_an_image_search_with_it(page, index_dir):
    from playwright.sync_api import expect

    paths = load_index(index_dir).paths
    assert send_file(page, "drop", paths[4])  # the drop zone lit up on dragenter
    first = page.locator('[data-column="original"] .result').first
    expect(first).to_have_attribute("data-id", "4")  # an upload of a gallery image finds that image first
    expect(first.locator(".value")).to_have_text("d = 0")  # float noise (|d| < 1e-6) is not printed as -1.19e-07
    expect(page.locator("#query-label")).to_have_text("uploaded image")
    expect(page.locator("#drop")).not_to_have_class("drop dragging")
    dropped = query_drawing(page)
    assert send_file(page, "paste", paths[9])  # the page handled the paste (preventDefault)
    expect(first).to_have_attribute("data-id", "9")
    pasted = query_drawing(page)
    assert pasted[0] > 50 and pasted != dropped  # the preview shows the pasted image now
    assert broken_images(page) == []


def test_labels_are_whole_and_icfrr_shows_a_labelled_score(page, index_dir):
    from playwright.sync_api import expect

    page.set_input_files("#upload", load_index(index_dir).paths[2])
    page.check(f'input.reranker[value="{ICFRR}"]')
    icfrr = page.locator(f'[data-column="{ICFRR}"]')
    expect(icfrr.locator(".result")).to_have_count(10)
    labels = page.locator(".result .label")
    assert labels.count() == 20
    for i in range(labels.count()):
        label = labels.nth(i)
        text = label.text_content()
        assert text.startswith("Balinese/character") and label.get_attribute("title") == text
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight"), (
            text
        )  # not cut
    expect(icfrr.locator("h2 .kind")).to_have_text("score, higher = closer")
    expect(page.locator('[data-column="original"] h2 .kind')).to_have_text("distance, lower = closer")
    values = icfrr.locator(".value").all_text_contents()
    assert all(v.startswith("score = ") for v in values), values
    scores = [float(v.removeprefix("score = ")) for v in values]
    assert scores == sorted(scores, reverse=True)  # the best first: a score, not a distance
    assert all(v.startswith("d = ") for v in page.locator('[data-column="original"] .value').all_text_contents())


def test_rerank_and_click_a_result_to_search_with_it(page, index_dir, tmp_path):
    from playwright.sync_api import expect

    page.set_input_files("#upload", load_index(index_dir).paths[0])
    expect(page.locator('[data-column="original"] .result')).to_have_count(10)
    expect(page.locator("#query-label")).to_have_text("uploaded image")
    page.check('input.reranker[value="kreciprocal"]')
    expect(page.locator('[data-column="kreciprocal"] .result')).to_have_count(10)
    expect(page.locator('[data-column="kreciprocal"] .change').first).to_be_visible()
    clicked = page.locator('[data-column="original"] .result').nth(2)
    gallery_id = clicked.get_attribute("data-id")
    clicked.click()
    expect(page.locator("#query-label")).to_contain_text(f"gallery #{gallery_id}")
    expect(page.locator(f'[data-column="original"] .result[data-id="{gallery_id}"]')).to_have_count(0)  # never itself
    assert query_drawing(page)[0] > 50 and broken_images(page) == []
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_the_page_works_under_a_strict_content_security_policy(browser, server, index_dir):  # noqa: F811
    from playwright.sync_api import expect

    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'"
    )
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    violations = []
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))

    def with_policy(route) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": policy})

    page.route(f"{server}/", with_policy)  # the page itself, under the policy
    page.goto(server)
    expect(page.locator("input.reranker")).to_have_count(2)
    assert send_file(page, "drop", load_index(index_dir).paths[6])
    expect(page.locator('[data-column="original"] .result')).to_have_count(10)
    assert query_drawing(page)[0] > 50 and broken_images(page) == []  # no inline script, style or blob: image needed
    assert violations == []
    page.close()
