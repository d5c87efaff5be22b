"""The demo page in a real browser: Debian's headless Chromium driven by selenium
(chromedriver from Debian too: nothing is downloaded at run time) against a live
`recsvc serve` on 127.0.0.1. A screenshot is saved to test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.cli.test_cli_e2e import _free_port
from tests.conftest import TEST_KEY, TEST_KEYS
from tests.helpers import serve_command

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    message = "Debian's chromium and chromium-driver are needed (scripts/test installs them)"
    if os.environ.get("CI"):
        raise RuntimeError(message)  # in CI a missing browser is a failure, not a skip
    pytest.skip(message, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# The page redraws its list and panels: an element found a moment ago may be
# gone when it is read; a wait tries again (as it does for one not found yet).
REDRAWN = (StaleElementReferenceException,)


@contextmanager
def _serving(redis_url: str, model_dir: Path, data: Path, **settings: str) -> Iterator[str]:
    port = _free_port()
    argv, env = serve_command(port, redis_url, model_dir, data, **settings)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if json.loads(r.read())["checks"]["model"]:
                        break
            except OSError:
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def server(seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[str]:
    with _serving(redis_url, model_dir, tmp_path / "data") as base:
        yield base


@pytest.fixture
def keyed_server(seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[str]:
    with _serving(redis_url, model_dir, tmp_path / "data", api_keys=TEST_KEYS) as base:
        yield base


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1400,1800",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _items(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#recs li.rec")


def _ids(driver: WebDriver) -> list[str]:
    return [li.get_attribute("data-item") or "" for li in _items(driver)]


def _text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _press(driver: WebDriver, item: WebElement, kind: str) -> None:
    """Press an event button and wait for the list to be drawn again."""
    item.find_element(By.CSS_SELECTOR, f"button.{kind}").click()
    WebDriverWait(driver, 10).until(expected_conditions.staleness_of(item))
    WebDriverWait(driver, 10, ignored_exceptions=REDRAWN).until(lambda d: len(_items(d)) == 10)


def test_purchase_leaves_the_list_and_a_new_user_warms_up(
    server: str, browser: WebDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    wait = WebDriverWait(browser, 20, ignored_exceptions=REDRAWN)
    browser.get(f"{server}/?user=u1")
    wait.until(lambda d: _text(d, "strategy") == "model" and len(_items(d)) == 10)
    assert browser.find_elements(By.CSS_SELECTOR, "#recs .bar")  # explanation bars drawn
    assert _text(browser, "reason") == "–" and _text(browser, "model") != "–"

    bought = _ids(browser)[0]
    _press(browser, _items(browser)[0], "purchase")
    assert bought not in _ids(browser)  # a purchased item never comes back
    recent = [
        li.get_attribute("data-item") for li in browser.find_elements(By.CSS_SELECTOR, "#recent li")
    ]
    assert bought in recent
    wait.until(lambda d: _text(d, "rps") != "–")  # the live panel reads /metrics
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-page.png"
    assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nscreenshot of the demo page: {shot}")

    # A new user starts on the default strategy; clicks in one category warm it up.
    browser.find_element(By.ID, "new-user").click()
    wait.until(lambda d: _text(d, "reason") == "unknown_user" and len(_items(d)) == 10)
    assert _text(browser, "strategy") == "fallback"
    target = _items(browser)[0].get_attribute("data-category")
    assert target
    before = sum(li.get_attribute("data-category") == target for li in _items(browser))
    clicked: list[str] = []
    for _ in range(4):  # four different items of the category where the list has them
        same = [li for li in _items(browser) if li.get_attribute("data-category") == target]
        fresh = [li for li in same if li.get_attribute("data-item") not in clicked]
        item = (fresh or same)[0]
        clicked.append(item.get_attribute("data-item") or "")
        _press(browser, item, "click")
    assert _text(browser, "strategy") == "model"
    after = sum(li.get_attribute("data-category") == target for li in _items(browser))
    assert after > before, (before, after)
    shot = ARTIFACTS / "demo-page-new-user.png"
    assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"screenshot after clicks on {clicked} ({target}): {shot} ({before} -> {after})")


def test_with_api_keys_the_page_asks_once_for_a_key_and_keeps_it_in_the_tab(
    keyed_server: str, browser: WebDriver
) -> None:
    wait = WebDriverWait(browser, 20, ignored_exceptions=REDRAWN)
    browser.get(f"{keyed_server}/?user=u1")
    alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    assert "API key" in alert.text
    alert.send_keys(TEST_KEY)
    alert.accept()
    try:
        wait.until(lambda d: _text(d, "strategy") == "model" and len(_items(d)) == 10)
    except TimeoutException:  # say what the page showed instead (it failed once in CI)
        meta = browser.find_elements(By.ID, "meta")
        shown = meta[0].text if meta else browser.page_source[:2000]
        raise AssertionError(f"no model answer on the page: {shown!r}") from None
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent li"))  # features scope
    wait.until(lambda d: _text(d, "rps") != "–")  # admin scope: /metrics
    assert browser.execute_script("return location.href").endswith("/?user=u1")  # not in the URL
