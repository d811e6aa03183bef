"""The browser fixture's contract: skip with the reason locally, fail under CI, where browser tests must run."""

import pytest
from PIL import Image

from tests import browser as browser_tools


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [
        ("true", pytest.fail.Exception),
        ("1", pytest.fail.Exception),
        ("", pytest.skip.Exception),
        ("false", pytest.skip.Exception),
    ],
)
def test_a_missing_browser_skips_locally_and_fails_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no chromium on PATH"):
        browser_tools.unavailable("no chromium on PATH")


def test_the_browser_renders_a_page(browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><title>t</title><h1 id='x'>hello</h1><div style='height:3000px'></div>")
    browser.get(page.as_uri())
    assert browser.find_element(By.ID, "x").text == "hello"
    shot = Image.open(browser_tools.screenshot(browser, tmp_path / "page.png"))
    assert shot.size[1] >= 3000, "the whole page, beyond the window"
