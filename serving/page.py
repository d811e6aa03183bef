"""The web page at ``GET /``: upload CT images, see the probability, the label and the Grad-CAM overlay.

The page (``serving/static/``: one HTML file, one stylesheet, one script) is a
client of this server's public v2 REST API like any other: it reads
``GET v2/models`` and ``GET v2/models/<name>`` and sends ``POST
v2/models/<name>/infer`` naming the ``heatmap`` output. It loads nothing from
elsewhere (clusters are often air-gapped) and is served with a Content-Security-
Policy that allows only this origin's script and style, no inline script, and
images from ``data:``/``blob:`` URLs (the uploads drawn on canvases).

Behind a path prefix (an InferenceService URL such as
``https://host/serving/<namespace>/<name>``, which KServe's ingress rewrites to
``/``) every URL the page uses is relative. KServe reports that URL without a
trailing slash, where ``static/app.js`` would resolve one level up (outside the
prefix), so the assets are addressed as ``?asset=<file>``: a reference made of a
query only keeps the base URL's whole path (RFC 3986, 5.2.2), with or without the
slash. The script then adds the slash to the address (``history.replaceState``)
before it calls the API, so ``v2/models/...`` resolves under the prefix.

``/`` is also kserve's liveness route (``{"status": "alive"}``): the page is
answered only to clients that accept ``text/html`` (browsers), every other client
(probes, ``curl``, the kserve SDK) still gets kserve's answer.
"""

from __future__ import annotations

from functools import cache
from http import HTTPStatus
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
#: The files ``?asset=`` serves (nothing else under ``static/`` is reachable) and their media types.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE = "index.html"
#: Only this origin's script, style and API; images also from data: and blob: URLs (uploads on canvases).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # revalidate: a new server image serves a new page at the same URL
}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def wants_html(accept: str) -> bool:
    """Whether an ``Accept`` header asks for HTML (browsers navigating); ``*/*`` alone does not."""
    return any(
        part.split(";")[0].strip().lower() in {"text/html", "application/xhtml+xml"} for part in accept.split(",")
    )


def install(app: FastAPI, live) -> None:
    """Register ``GET /`` (the page, its assets, else kserve's liveness answer ``live()``) on kserve's app."""

    async def root(request: Request) -> Response:
        asset = request.query_params.get("asset")
        if asset is not None:
            if asset not in ASSETS:
                return Response(
                    orjson.dumps(
                        {"error": f"no page asset {asset[:64]!r}; the page's assets are {', '.join(sorted(ASSETS))}"}
                    ),
                    status_code=int(HTTPStatus.NOT_FOUND),
                    media_type="application/json",
                )
            return Response(_read(asset), media_type=ASSETS[asset], headers=SECURITY_HEADERS)
        if wants_html(request.headers.get("accept", "")):
            return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)
        return Response(orjson.dumps(await live()), media_type="application/json")

    # Before kserve's "/" (first match wins); hidden from /openapi.json like the other overrides.
    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
