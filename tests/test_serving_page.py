"""The web page at ``GET /`` of the real ``python -m serving`` process: HTTP contract, then a real Chromium.

HTTP: browsers get the page with its Content-Security-Policy, every other client
kserve's liveness answer; the page's HTML has no inline script or style and its
assets are the only files served. Browser (``tests/browser.py``: skipped with the
reason without Chromium, failed under ``CI=true``): the page reached through a
path prefix without its trailing slash (a proxy that rewrites like KServe's
ingress, refusing anything outside the prefix) shows the model's version and data
fingerprint, classifies a real CT image exactly as the v2 API does and draws the
heatmap overlay whose opacity the slider sets, with no CSP violation; a text file
shows the server's 400; a DICOM file is sent as ``dicom``; a full queue shows the server's 503; a file over the
server's request limit is refused with that limit; a model without explain
signatures is served without a heatmap. Screenshots go to each test's tmp dir.
"""

from __future__ import annotations

import http.client
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from serving.page import ASSETS, CONTENT_SECURITY_POLICY, STATIC
from tests.browser import screenshot
from tests.serving_helpers import (
    GATE,
    MODEL_NAME,
    REPO,
    RUN_ID,
    ServerProcess,
    b64,
    ct_like,
    encode,
    exported_model,
    lung_window,
    marked_png,
    metric,
    steerable_model,
    steerable_probability,
    wait_for,
)

SIZE = 64  # a 4 x 4 heatmap grid
PREFIX = "/serving/chest-ct-ns/chest-ct"  # KServe's ingress pathTemplate /serving/{namespace}/{name}
REAL_IMAGES = REPO.parent / "shared" / "data" / "chest-ct" / "valid" / "adenocarcinoma"
HTML = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
# Injected before the page's own scripts (DevTools bypasses the CSP): records every violation of it.
RECORD_CSP = (
    "window.__csp = []; document.addEventListener('securitypolicyviolation', "
    "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = exported_model(str(tmp_path_factory.getbasetemp() / "serving"), SIZE)
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("serving-page-log") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# --- HTTP ---------------------------------------------------------------------------------------


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_browsers_get_the_page_with_its_csp_other_clients_kserves_liveness(server):
    page = requests.get(f"{server.url}/", headers=HTML, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    csp = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert csp["default-src"] == csp["script-src"] == csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' data: blob:" and csp["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    for accept in ("", "*/*", "application/json"):  # probes, curl, the kserve SDK
        resp = requests.get(f"{server.url}/", headers={"accept": accept}, timeout=10)
        assert resp.status_code == 200 and resp.json() == {"status": "alive"}


def test_the_page_has_no_inline_script_or_style_and_loads_only_its_own_assets(server):
    parser = Tags()
    parser.feed(requests.get(f"{server.url}/", headers=HTML, timeout=10).text)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(attrs.get("src") for attrs in scripts)
    assert not [(tag, a) for tag, attrs in parser.tags for a in attrs if a == "style" or a.startswith("on")]
    urls = [attrs.get("src") or attrs.get("href") for tag, attrs in parser.tags if tag in ("script", "link")]
    assert all(u.startswith("?asset=") or u.startswith("data:") for u in urls), urls  # relative: any prefix works
    for url in urls:
        if url.startswith("?asset="):
            resp = requests.get(f"{server.url}/{url}", timeout=10)
            assert resp.status_code == 200 and resp.content == (STATIC / url[7:]).read_bytes()
            assert resp.headers["content-type"] == ASSETS[url[7:]]
    for name in ("index.html", "../page.py", "missing.js"):
        resp = requests.get(f"{server.url}/", params={"asset": name}, timeout=10)
        assert resp.status_code == 404 and "app.js, style.css" in resp.json()["error"]
    for file in STATIC.iterdir():  # nothing from elsewhere: no absolute URL outside comments
        code = re.sub(r"^\s*//.*$|/\*.*?\*/|<!--.*?-->", "", file.read_text(), flags=re.M | re.S)
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", code, re.I), file.name
    assert sum(f.stat().st_size for f in STATIC.iterdir()) < 40_000, "keep the page small"


def test_the_serving_image_ships_the_page():
    dockerfile = (REPO / "Dockerfile.serve").read_text()
    assert re.search(r"^COPY serving/static/ \./serving/static/$", dockerfile, re.M)


# --- a proxy that routes a path prefix like KServe's ingress --------------------------------------


class PrefixProxy:
    """``PREFIX`` and ``PREFIX/...`` rewritten to ``/...`` on the server (as KServe's Istio VirtualService does
    for a pathTemplate); anything else is a 404 and recorded in ``outside``."""

    def __init__(self, upstream: str):
        self.outside: list[str] = []
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                path, _, query = self.path.partition("?")
                if path != PREFIX and not path.startswith(PREFIX + "/"):
                    proxy.outside.append(self.path)
                    self.send_error(404, f"{path} is outside {PREFIX}")
                    return
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(
                    self.command,
                    "/" + path[len(PREFIX) + 1 :] + ("?" + query if query else ""),
                    body=body or None,
                    headers=headers,
                )
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def proxy(server):
    p = PrefixProxy(server.url)
    yield p
    p.close()


# --- in the browser -----------------------------------------------------------------------------


def open_page(browser, url: str):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_CSP})
    browser.get(url)
    WebDriverWait(browser, 60).until(
        lambda d: (
            d.find_element("id", "files").is_enabled()
            or d.find_element("id", "model-status").get_attribute("class") == "error"
        )
    )
    assert browser.find_element("id", "files").is_enabled(), browser.find_element("id", "model-status").text


def upload(browser, path: Path, state: str = "done", count: int = 1):
    """Choose ``path`` in the page's file input; return the newest result card once it is in ``state``."""
    browser.find_element("id", "files").send_keys(str(path))
    return newest(browser, state, count)


def newest(browser, state: str, count: int):
    """The newest of ``count`` result cards, once answered; it must be in ``state``."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 90).until(
        lambda d: (
            len(d.find_elements("css selector", ".result")) >= count
            and d.find_elements("css selector", ".result")[0].get_attribute("data-state") not in ("waiting", None)
        )
    )
    card = browser.find_elements("css selector", ".result")[0]
    assert card.get_attribute("data-state") == state, card.text
    return card


def canvas_pixels(browser, card) -> np.ndarray:
    data = browser.execute_script(
        "const c = arguments[0].querySelector('canvas'); "
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        card,
    )
    return np.asarray(data, np.int16)


def set_opacity(browser, percent: int) -> None:
    browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));",
        percent,
    )


def ct_image(tmp_path: Path) -> Path:
    """A real CT slice from the shared data when present, else a generated CT-like PNG."""
    real = sorted(REAL_IMAGES.glob("*.png")) if REAL_IMAGES.is_dir() else []
    if real:
        return real[0]
    path = tmp_path / "ct-like slice.png"
    path.write_bytes(encode(lung_window(ct_like(5, size=160, nodule=True))))
    return path


def served(server, data: bytes) -> dict:
    """What the v2 API answers for one file (the page must show exactly this)."""
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}],
        "outputs": [{"name": n} for n in ("probability", "label", "ood_score", "in_distribution", "heatmap")],
    }
    return requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=120).json()


def test_page_behind_a_path_prefix_classifies_a_ct_image_with_its_overlay(browser, server, proxy, tmp_path):
    open_page(browser, proxy.url + PREFIX)  # no trailing slash: how KServe reports an InferenceService URL
    assert urlsplit(browser.current_url).path == PREFIX + "/"
    notice = browser.find_element("id", "notice")
    assert notice.is_displayed() and "Research software, not a medical device" in notice.text
    assert browser.find_element("id", "fact-version").text == RUN_ID
    assert browser.find_element("id", "fact-fingerprint").text == "sha256:test"
    assert "4 x 4" in browser.find_element("id", "fact-heatmap").text

    image = ct_image(tmp_path)
    card = upload(browser, image)
    want = {o["name"]: o["data"] for o in served(server, image.read_bytes())["outputs"]}
    assert float(card.get_attribute("data-probability")) == pytest.approx(want["probability"][0], abs=1e-6)
    assert card.get_attribute("data-label") == want["label"][0] and want["label"][0] in card.text
    assert f"{100 * want['probability'][0]:.1f}%" in card.text
    canvas = card.find_element("css selector", "canvas")
    assert canvas.get_attribute("data-heatmap") == "drawn"
    width, height = Image.open(image).size
    assert abs(int(canvas.get_attribute("width")) / int(canvas.get_attribute("height")) - width / height) < 0.02
    set_opacity(browser, 0)
    plain = canvas_pixels(browser, card)
    set_opacity(browser, 100)
    full = canvas_pixels(browser, card)
    assert np.abs(full - plain).mean() > 5, "the overlay changes the picture at full opacity"
    set_opacity(browser, 50)
    half = canvas_pixels(browser, card)
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()
    assert np.any(plain[3::4] == 255) and len(set(plain[0::4].tolist())) > 20, "the image itself is drawn"

    shot = Image.open(screenshot(browser, tmp_path / "page.png"))
    assert shot.size[0] >= 1000 and shot.getextrema()[0][1] > shot.getextrema()[0][0]
    assert browser.execute_script("return window.__csp") == []
    assert proxy.outside == [], "every URL the page used stayed under the prefix"


def test_a_text_file_shows_the_servers_error(browser, server, tmp_path):
    open_page(browser, f"{server.url}/")
    text = tmp_path / "notes.txt"
    text.write_text("not an image, just some notes\n")
    card = upload(browser, text, state="error")
    error = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        timeout=60,
        json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(text.read_bytes())]}]},
    )
    assert error.status_code == 400
    assert "HTTP 400" in card.text and error.json()["error"] in card.text
    assert card.find_element("css selector", "[role=alert]").is_displayed()
    screenshot(browser, tmp_path / "error.png")
    assert browser.execute_script("return window.__csp") == []


def test_an_image_the_guard_rejects_shows_its_warning(browser, server, tmp_path):
    """A photo (scikit-image's astronaut) is not a CT slice: the card says the guard refused it, as the API does."""
    from skimage import data as samples

    open_page(browser, f"{server.url}/")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(samples.astronaut()).save(photo)
    want = {o["name"]: o["data"] for o in served(server, photo.read_bytes())["outputs"]}
    assert want["in_distribution"] == [False] and want["label"] == ["unsupported-input"]
    card = upload(browser, photo)
    assert "ood" in card.get_attribute("class").split()
    assert card.get_attribute("data-label") == "unsupported-input"
    assert "out-of-distribution guard found this image unlike the CT slices" in card.text
    assert browser.execute_script("return window.__csp") == []


def test_a_dicom_file_is_classified_and_its_heatmap_drawn_alone(browser, server, tmp_path):
    from tests.dicom_helpers import real

    open_page(browser, f"{server.url}/")
    dicom = tmp_path / "slice"  # no extension: recognised by its DICM preamble
    dicom.write_bytes(real("CT_small.dcm"))
    card = upload(browser, dicom)
    want = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        timeout=60,
        json={"inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [1], "data": [b64(dicom.read_bytes())]}]},
    ).json()
    probability = {o["name"]: o["data"] for o in want["outputs"]}["probability"][0]
    assert float(card.get_attribute("data-probability")) == pytest.approx(probability, abs=1e-6)
    assert "cannot display DICOM" in card.text
    canvas = card.find_element("css selector", "canvas")
    assert canvas.get_attribute("data-heatmap") == "drawn" and canvas.get_attribute("width") == "320"


# --- a model without explain signatures, a full queue, a file over the limit ------------------------

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def steerable_server(tmp_path_factory):
    model, gate, gate2 = steerable_model(tmp_path_factory.mktemp("page-steerable"), version="run-without-cam")
    proc = ServerProcess(
        model,
        tmp_path_factory.mktemp("page-steerable-log") / "server.log",
        "--max_batch_size",
        "1",
        "--max_queued_images",
        "1",
        "--max_request_bytes",
        str(LIMIT),
    )
    try:
        proc.wait_ready()
        yield proc, gate
    finally:
        gate.release()
        gate2.release()
        proc.stop()


def test_no_heatmap_overload_and_too_big_show_clear_messages(browser, steerable_server, tmp_path):
    server, gate = steerable_server
    open_page(browser, f"{server.url}/")
    assert "not available" in browser.find_element("id", "fact-heatmap").text
    assert browser.find_element("id", "fact-version").text == "run-without-cam"

    ordinary = tmp_path / "ordinary.png"
    ordinary.write_bytes(marked_png(None, 24, 24, seed=3))
    card = upload(browser, ordinary)
    assert float(card.get_attribute("data-probability")) == pytest.approx(
        steerable_probability(ordinary.read_bytes()), abs=1e-6
    )
    assert card.find_element("css selector", "canvas").get_attribute("data-heatmap") == "none"
    assert "returns no heatmap" in card.text

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big)
    assert big.stat().st_size > LIMIT
    card = upload(browser, big, state="error", count=2)
    assert f"at most {LIMIT} bytes" in card.text and "big.png" in card.text

    label = {"model_name": MODEL_NAME}
    calls = metric(server, "chest_ct_model_call_images_count", **label)

    def post(png: bytes) -> requests.Response:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}]}
        return requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", timeout=120, json=body)

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(post, marked_png(GATE))
        wait_for(
            lambda: metric(server, "chest_ct_model_call_images_count", **label) > calls, "the gated call", server=server
        )
        queued = pool.submit(post, marked_png(None, seed=4))
        wait_for(lambda: metric(server, "chest_ct_queue_images", **label) == 1, "the queue to fill", server=server)
        try:
            card = upload(browser, ordinary, state="error", count=3)
            assert "HTTP 503" in card.text and "--max_queued_images" in card.text and "retry after" in card.text
            screenshot(browser, tmp_path / "overloaded.png")
        finally:
            gate.release()
        assert held.result().status_code == 200 and queued.result().status_code == 200
    card.find_element("css selector", "button").click()  # "Try again": the same file, served now
    card = newest(browser, "done", 3)
    assert float(card.get_attribute("data-probability")) == pytest.approx(
        steerable_probability(ordinary.read_bytes()), abs=1e-6
    )
    assert browser.execute_script("return window.__csp") == []
