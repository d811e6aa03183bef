"""A real headless browser for tests: Debian's ``chromium`` driven by ``chromium-driver`` through selenium.

``.ci/run`` installs the two packages when missing, and with ``CI=true`` a
missing browser fails the tests that need one instead of skipping them: a
browser test that silently skips in CI has never run. Elsewhere they skip with
the reason and the command that fixes it.

Use the ``browser`` fixture (imported by ``tests/conftest.py``) for a WebDriver,
and :func:`screenshot` for a full-page PNG.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
WINDOW = (1280, 900)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail under CI, where browser tests must run."""
    if in_ci():
        pytest.fail(f"CI=true and the browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _find(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """A headless Chromium WebDriver (selenium), shared by the session's browser tests."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -r requirements-test.lock)")
    binary, driver_path = _find(BROWSERS), _find(DRIVERS)
    if not binary or not driver_path:
        unavailable(f"no {'chromium' if not binary else 'chromedriver'} on PATH ({INSTALL})")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except WebDriverException as exc:
        unavailable(f"{binary} with {driver_path} did not start: {exc.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, path: Path) -> Path:
    """Save the whole page, beyond the window, as a PNG (Chrome DevTools' captureBeyondViewport)."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    Path(path).write_bytes(base64.b64decode(shot["data"]))
    return Path(path)
