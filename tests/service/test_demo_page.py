"""The demo page at / in headless Chromium against a real server on 127.0.0.1.

Needs Debian's ``chromium`` at /usr/bin/chromium and the ``playwright`` Python
package (its own browser downloads are not used). With the CIFAR-10 shards
present the gallery is real photos; set ``DCL_DEMO_SCREENSHOT`` to a path to
keep a screenshot of the page with its results.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.data_paths import CIFAR10_DIR, extract_cifar10_subset
from tests.service.conftest import LiveServer, encode, random_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RESULTS = 8


def gallery_images(tmp_path: Path) -> list[tuple[str, Path, dict]]:
    """Return (id, file, metadata) for CIFAR-10 test images, or synthetic ones."""
    if (CIFAR10_DIR / "test-00000-of-00001.tar.gz").is_file():
        root = extract_cifar10_subset(tmp_path / "cifar", "test", per_class=5)
        return [
            (f"{path.parent.name}/{path.stem}", path, {"label": path.parent.name})
            for path in sorted(root.glob("*/*.jpg"))
        ]
    images = []
    for seed in range(30):
        path = tmp_path / f"synthetic-{seed}.png"
        path.write_bytes(encode(random_image(seed, size=(48, 48))))
        images.append((f"synthetic-{seed}", path, {"seed": seed}))
    return images


@pytest.fixture
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} not found; install Debian's chromium "
            "(apt-get install chromium) to run the demo page test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed; install dev extra"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


def test_demo_page_shows_neighbours(
    browser, live_server: LiveServer, tmp_path: Path
) -> None:
    gallery = gallery_images(tmp_path)
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for item_id, path, metadata in gallery:
            response = client.post(
                "/v1/items",
                data={"id": item_id, "metadata": json.dumps(metadata)},
                files={"image": (path.name, path.read_bytes(), "image/jpeg")},
            )
            assert response.status_code == 201, response.text
    query_id, query_path, _ = gallery[7]

    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Only the server under test may be contacted.
    outside: list[str] = []
    page.on(
        "request",
        lambda request: (
            None
            if request.url.startswith(live_server.url)
            or request.url.startswith("blob:")
            else outside.append(request.url)
        ),
    )
    page.goto(live_server.url + "/")
    page.wait_for_function(
        "document.getElementById('index-info').textContent.includes('items')"
    )
    assert f"Index: {len(gallery)} items" in page.inner_text("#index-info")
    assert "tiny-test-cnn" in page.inner_text("#model-info")
    assert "CPUExecutionProvider" in page.inner_text("#model-info")

    page.fill("#k-input", str(RESULTS))
    page.set_input_files("#file-input", str(query_path))
    page.wait_for_selector("#results li.result img")
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )

    items = page.query_selector_all("#results li.result")
    assert len(items) == RESULTS
    assert len(page.query_selector_all("#results li.result img")) == RESULTS
    # The query image is itself in the gallery, so it comes first with score ~1.
    assert items[0].query_selector(".item-id").inner_text() == query_id
    assert items[0].query_selector(".score").inner_text() == "score 1.000"
    for item in items:
        assert item.query_selector(".score").inner_text().startswith("score ")
        assert item.query_selector(".metadata").inner_text().startswith("{")
    assert f"{RESULTS} results" in page.inner_text("#status")
    assert errors == []
    assert outside == []

    shot = tmp_path / "demo-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    keep = os.environ.get("DCL_DEMO_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_demo_page_reports_errors(browser, live_server: LiveServer, tmp_path: Path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"not an image at all")
    page = browser.new_page()
    page.goto(live_server.url + "/")
    page.set_input_files("#file-input", str(not_an_image))
    page.wait_for_selector("#status.error")
    status = page.inner_text("#status")
    assert status.startswith("Search failed: 400")
    assert "could not be decoded" in status
