"""A stand-in for the Kubernetes API server's InferenceService endpoints, with a KServe release behind it.

What it does as the real API server does (k8s.io/apiserver, 1.27+):
- authentication by bearer token and RBAC authorization (tests/platforms/rbac.py),
  403 with the server's message;
- ``fieldValidation=Strict``: an unknown field is a 400 "strict decoding error";
  without it the field is dropped and a ``Warning`` header sent; a wrong type is
  a 422;
- ``dryRun=All``: validation, admission and authorization run, nothing is stored;
- ``application/merge-patch+json`` (RFC 7386) for PATCH; ``status`` is a
  subresource, ignored on writes; ``metadata.generation`` moves on spec changes;
- KServe's validating webhook denies with 403 and its message; the controller
  then fills ``status`` as the release's would (tests/platforms/kserve.py), one
  step per GET, so a caller that does not wait sees a revision that is not Ready.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.platforms.kserve import Controller, Invalid, Release
from tests.platforms.rbac import Authorizer
from tests.platforms.rbac import Request as RbacRequest

PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"
WEBHOOK = "inferenceservice.kserve-webhook-server.validator"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    user: str | None = None


class _Failure(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass
class FakeKubeApi:
    release: Release
    controller: Controller
    authorizer: Authorizer | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> user name
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_get_with: int | None = None
    _versions: Any = field(default_factory=lambda: itertools.count(1))

    def writes(self, *, dry_run: bool | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.method in ("POST", "PATCH") and (dry_run is None or (r.query.get("dryRun") == "All") == dry_run)
        ]

    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict, list[str]]:
        record = Recorded(method, path, query, headers.get("content-type"), body)
        self.requests.append(record)
        warnings: list[str] = []
        try:
            namespace, name = self._route(path)
            self._authorize(method, headers, namespace, name)
            if method == "GET" and name:
                return 200, self._get(namespace, name), warnings
            if method == "POST" and not name:
                return 201, self._create(namespace, body, query, warnings), warnings
            if method == "PATCH" and name:
                if headers.get("content-type") != "application/merge-patch+json":
                    raise _Failure(415, "UnsupportedMediaType", str(headers.get("content-type")))
                return 200, self._patch(namespace, name, body, query, warnings), warnings
            raise _Failure(405, "MethodNotAllowed", method)
        except _Failure as failure:
            return (
                failure.code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "code": failure.code,
                    "reason": failure.reason,
                    "message": failure.message,
                },
                warnings,
            )

    # ------------------------------------------------------------ steps

    def _route(self, path: str) -> tuple[str, str]:
        if not path.startswith(PREFIX):
            raise _Failure(404, "NotFound", path)
        parts = path[len(PREFIX) :].split("/")
        if len(parts) not in (2, 3) or parts[1] != "inferenceservices":
            raise _Failure(404, "NotFound", path)
        return parts[0], parts[2] if len(parts) == 3 else ""

    def _authorize(self, method: str, headers: dict[str, str], namespace: str, name: str) -> str | None:
        if self.authorizer is None:
            return None
        token = headers.get("authorization", "").removeprefix("Bearer ")
        user = self.tokens.get(token)
        if user is None:
            raise _Failure(401, "Unauthorized", "Unauthorized")
        self.requests[-1].user = user
        verb = {"GET": "get", "POST": "create", "PATCH": "patch"}.get(method, method.lower())
        request = RbacRequest(user, verb, namespace, "serving.kserve.io", "inferenceservices", name)
        if not self.authorizer.allowed(request):
            raise _Failure(403, "Forbidden", self.authorizer.denial(request))
        return user

    def _get(self, namespace: str, name: str) -> dict:
        if self.fail_get_with:
            raise _Failure(self.fail_get_with, "InternalError", "etcdserver: request timed out")
        stored = self.objects.get((namespace, name))
        if stored is None:
            raise _Failure(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
        self.controller.reconcile((namespace, name), stored, tick=True)
        return copy.deepcopy(stored)

    def _validate(self, obj: dict, query: dict[str, str], warnings: list[str]) -> dict:
        name = obj.get("metadata", {}).get("name", "")
        try:
            unknown = self.release.unknown_fields(obj)
        except Invalid as err:
            raise _Failure(
                422, "Invalid", f'InferenceService.serving.kserve.io "{name}" is invalid: {err.message}'
            ) from None
        if unknown and query.get("fieldValidation") == "Strict":
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise _Failure(
                400,
                "BadRequest",
                'InferenceService in version "v1beta1" cannot be handled as a '
                f"InferenceService: strict decoding error: {fields}",
            )
        warnings += [f'unknown field "{u}"' for u in unknown]
        return self.release.prune(obj, unknown)

    def _admit(self, new: dict, old: dict | None) -> None:
        try:
            self.release.admit(new, old)
        except Invalid as err:
            raise _Failure(
                403, "Forbidden", f'admission webhook "{WEBHOOK}" denied the request: {err.message}'
            ) from None

    def _create(self, namespace: str, body: Any, query: dict[str, str], warnings: list[str]) -> dict:
        if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
            raise _Failure(422, "Invalid", "metadata.name: Required value")
        if body["metadata"].get("namespace", namespace) != namespace:
            raise _Failure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        key = (namespace, body["metadata"]["name"])
        if key in self.objects:
            raise _Failure(409, "AlreadyExists", f'inferenceservices.serving.kserve.io "{key[1]}" already exists')
        obj = self._validate({k: v for k, v in body.items() if k != "status"}, query, warnings)
        obj["metadata"].update(
            namespace=namespace, generation=1, resourceVersion=str(next(self._versions)), uid=f"uid-{key[1]}"
        )
        self._admit(obj, None)
        if query.get("dryRun") == "All":
            return obj
        self.objects[key] = obj
        self.controller.reconcile(key, obj)
        return copy.deepcopy(obj)

    def _patch(self, namespace: str, name: str, body: Any, query: dict[str, str], warnings: list[str]) -> dict:
        key = (namespace, name)
        old = self.objects.get(key)
        if old is None:
            raise _Failure(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
        patch = {k: v for k, v in body.items() if k != "status"}
        new = merge_patch({k: v for k, v in old.items() if k != "status"}, patch)
        new = self._validate(new, query, warnings)
        new["status"] = copy.deepcopy(old.get("status") or {})
        self._admit(new, old)
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        new["metadata"]["resourceVersion"] = str(next(self._versions))
        if query.get("dryRun") == "All":
            return new
        self.objects[key] = new
        self.controller.reconcile(key, new)
        return copy.deepcopy(new)


@contextmanager
def serve(api: FakeKubeApi) -> Iterator[str]:
    """Run ``api`` on a loopback port; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            code, payload, warnings = api.handle(
                self.command,
                url.path,
                query,
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            for warning in warnings:
                self.send_header("Warning", f'299 - "{warning}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
