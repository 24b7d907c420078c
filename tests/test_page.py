"""The search page: its routes through TestClient, then the page in a real browser (headless
Debian Chromium driven by Selenium) against `python -m cli serve` on loopback. The browser tests
skip, saying why, where Chromium, chromedriver or Selenium is missing (CI installs them: .ci/run)."""

from __future__ import annotations

import importlib.util
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.local import serving
from service.app import create_app
from service.pages import STATIC_DIR
from service.settings import Settings

HAVE_SELENIUM = importlib.util.find_spec("selenium") is not None
if HAVE_SELENIUM:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/page-screenshot.png")  # a copy outside pytest's tmp_path, to look at
WAIT_S = 60


def test_page_and_its_files_are_served(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(artifacts_dir=tmp_path)))  # no lifespan: no model
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    linked = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(linked) == ["/static/app.js", "/static/favicon.svg", "/static/style.css"]
    for url in linked:
        assert client.get(url).status_code == 200, url
    missing = client.get("/static/pages.py")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        "expected one of ['app.js', 'favicon.svg', 'style.css'], got 'pages.py'"
    )
    assert client.get("/static/..%2Fpages.py").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]
    for name in ("index.html", "app.js", "style.css"):  # nothing is fetched from elsewhere
        assert not re.search(r"https?://|//cdn", (STATIC_DIR / name).read_text()), name


def test_api_docs_load_nothing_from_elsewhere(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(artifacts_dir=tmp_path)))
    for page_url in ("/docs", "/redoc"):
        page = client.get(page_url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://|//cdn", page.text), page_url
        assets = re.findall(r"(?:src=|href=|url: )['\"](/[^'\"]+)['\"]", page.text)
        assert any(a.endswith(".js") for a in assets), assets
        for url in assets:
            assert client.get(url).status_code == 200, url


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return (
            f"browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, "
            f"{CHROMEDRIVER}): apt-get install -y chromium chromium-driver"
        )
    if not HAVE_SELENIUM:
        return "browser test needs selenium: pip install selenium==4.51.0"
    return None


@pytest.fixture(scope="module")
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The service over the demo artifacts (searches only read them), as a user starts it."""
    reason = missing_browser()
    if reason is not None:  # before the session's demo artifacts are built for nothing
        pytest.skip(reason)
    demo_artifacts_master: Path = request.getfixturevalue("demo_artifacts_master")
    with serving(demo_artifacts_master) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with a fresh profile; the paths are given so Selenium downloads nothing."""
    reason = missing_browser()
    if reason is not None:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, base_url: str) -> None:
    browser.get(f"{base_url}/")
    wait_until(browser, lambda d: "items indexed" in d.find_element(By.ID, "stats").text)


def wait_until(browser: Any, condition: Any) -> Any:
    return WebDriverWait(browser, WAIT_S).until(condition)


def results_done(browser: Any) -> bool:
    state = browser.find_element(By.ID, "results").get_attribute("data-state")
    return state in ("done", "error")


def hits(browser: Any) -> list[Any]:
    return list(browser.find_elements(By.CSS_SELECTOR, "#hits > li.hit"))


def mark_sent(browser: Any) -> None:
    """Forget the last search's state, so that waiting for "done" waits for the next one."""
    browser.execute_script("document.getElementById('results').dataset.state = 'sent';")


def search_text(browser: Any, text: str, *, k: int, target: str) -> None:
    query = browser.find_element(By.ID, "text-query")
    query.clear()
    query.send_keys(text)
    browser.find_element(By.CSS_SELECTOR, f"label[for='target-{target}']").click()
    k_input = browser.find_element(By.ID, "k")
    k_input.clear()
    k_input.send_keys(str(k))
    mark_sent(browser)
    browser.find_element(By.ID, "search-button").click()
    wait_until(browser, results_done)


def upload(browser: Any, path: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, "label[for='mode-image']").click()
    mark_sent(browser)
    browser.find_element(By.ID, "image-file").send_keys(str(path))  # a chosen file searches at once
    wait_until(browser, results_done)


def error_text(browser: Any) -> str:
    box = browser.find_element(By.ID, "error")
    return str(box.text) if box.is_displayed() else ""


def test_text_search_shows_image_results(browser: Any, base_url: str, tmp_path: Path) -> None:
    open_page(browser, base_url)
    search_text(browser, "a yellow sun at sunset", k=8, target="image")
    assert error_text(browser) == ""
    found = hits(browser)
    assert len(found) == 8 and all("hit-image" in h.get_attribute("class") for h in found)
    dists = [int(h.get_attribute("data-distance")) for h in found]
    scores = [float(h.get_attribute("data-score")) for h in found]
    assert scores == sorted(scores, reverse=True) and all(0 <= d <= 64 for d in dists)
    assert found[0].find_element(By.CSS_SELECTOR, ".distance-value").text == str(dists[0])
    # Every thumbnail really loaded from the item image endpoint (not a broken image).
    wait_until(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#hits img')]"
            ".every(i => i.complete && i.naturalWidth > 0);"
        ),
    )
    srcs = [h.find_element(By.TAG_NAME, "img").get_attribute("src") for h in found]
    assert all(s.startswith(f"{base_url}/v1/items/") and s.endswith("/image") for s in srcs)
    assert "8 images nearest to" in browser.find_element(By.ID, "results-heading").text

    png = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(png)
    SCREENSHOT_COPY.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    assert pixels.shape[1] == 1280 and pixels.shape[0] > 600  # the 1280-wide window
    assert pixels.std() > 20, f"screenshot looks blank: grey-level std {pixels.std():.1f}"
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 1000  # the thumbnails, not flat UI colours


def test_api_docs_render_offline(browser: Any, base_url: str) -> None:
    # This machine has no internet: Swagger UI renders only if its scripts come from the service.
    browser.get(f"{base_url}/docs")
    wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 5)
    summaries = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert "/v1/search/text" in summaries and "/v1/search/image" in summaries


def test_keyboard_only_search_and_unknown_words_note(browser: Any, base_url: str) -> None:
    open_page(browser, base_url)
    query = browser.find_element(By.ID, "text-query")
    mark_sent(browser)
    query.send_keys("zebra xylophone", Keys.ENTER)  # Enter submits; target and k keep defaults
    wait_until(browser, results_done)
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and "vocabulary" in notice.text
    assert "“zebra”" in notice.text and "“xylophone”" in notice.text and "Try" in notice.text
    assert hits(browser) == []  # no arbitrary items
    assert "knows none of the words" in browser.find_element(By.ID, "results-heading").text
    # Arrow keys switch the mode (real radios); Tab then reaches the file chooser.
    browser.find_element(By.ID, "mode-text").send_keys(Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "image-pane").is_displayed()
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "image-file"


def test_image_upload_shows_text_results(browser: Any, base_url: str, tmp_path: Path) -> None:
    query = tmp_path / "scene.jpg"
    query.write_bytes(httpx.get(f"{base_url}/v1/items/3/image", timeout=30).content)
    open_page(browser, base_url)
    upload(browser, query)
    assert error_text(browser) == ""
    assert browser.find_element(By.ID, "target-text").is_selected()  # image mode looks for texts
    found = hits(browser)
    assert len(found) == 12 and all("hit-text" in h.get_attribute("class") for h in found)
    captions = [h.find_element(By.CSS_SELECTOR, "p.hit-text").text for h in found]
    assert all(c.strip() for c in captions)
    assert browser.find_element(By.ID, "preview").is_displayed()


def test_bad_files_show_the_api_error(browser: Any, base_url: str, tmp_path: Path) -> None:
    open_page(browser, base_url)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image\n")
    upload(browser, not_image)
    message = error_text(browser)
    assert "(415)" in message and "expected an image/* upload, got 'text/plain'" in message
    assert hits(browser) == []
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    upload(browser, broken)
    message = error_text(browser)
    assert "(400)" in message and "could not decode image" in message


def test_try_words_and_more_results(browser: Any, base_url: str) -> None:
    """The "Try:" row offers words of the served model's vocabulary found in this collection,
    and "More results" appends the next ranks of the same ranking."""
    open_page(browser, base_url)
    wait_until(browser, lambda d: d.find_element(By.ID, "examples").is_displayed())
    chips = browser.find_elements(By.CSS_SELECTOR, "#examples .chip")
    suggested = httpx.get(f"{base_url}/v1/search/words", params={"n": 8}, timeout=30).json()
    assert [c.text for c in chips] == suggested["words"] and chips
    search_text(browser, "a red car", k=5, target="image")
    more = browser.find_element(By.ID, "more")
    assert len(hits(browser)) == 5 and more.is_displayed()
    mark_sent(browser)
    more.click()
    wait_until(browser, lambda d: results_done(d) and len(hits(d)) == 10)
    shown = [h.get_attribute("data-id") for h in hits(browser)]
    ranks = [h.find_element(By.CSS_SELECTOR, ".rank").text for h in hits(browser)]
    api = httpx.post(
        f"{base_url}/v1/search/text", json={"text": "a red car", "k": 10}, timeout=30
    ).json()
    assert shown == [str(h["id"]) for h in api["hits"]]
    assert ranks == [f"#{i}" for i in range(1, 11)]
    assert "10 images nearest to" in browser.find_element(By.ID, "results-heading").text
    mark_sent(browser)
    chips = browser.find_elements(By.CSS_SELECTOR, "#examples .chip")
    chips[0].click()
    wait_until(browser, results_done)
    assert (
        hits(browser)
        and browser.find_element(By.ID, "text-query").get_attribute("value") == chips[0].text
    )
