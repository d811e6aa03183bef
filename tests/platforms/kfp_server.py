"""A stand-in for the Kubeflow Pipelines v2beta1 REST API, with the backend's own refusals.

A real HTTP server (kfp.Client talks to it unchanged) that keeps state and
records every request. Rules ported from kubeflow/pipelines 2.15.0
(backend/src/apiserver/server/*.go, resource/resource_manager.go, auth/):

- multi-user mode (``multi_user=True``, what Kubeflow profiles run): every call
  but healthz needs an identity, a ``kubeflow-userid`` header or a bearer token
  the TokenReview accepts for audience ``pipelines.kubeflow.org`` (401
  otherwise), and the identity must be allowed in the namespace (403, the
  SubjectAccessReview); experiments and recurring runs need a namespace
  ("An experiment cannot have an empty namespace in multi-user mode"), runs an
  experiment ("Experiment id can not be empty in multi-user mode"), and a run
  lives in its experiment's namespace. Pipelines uploaded without a namespace
  are shared.
- single-user mode replaces every namespace with "" (``ReplaceNamespace``).
- uploaded and inline pipeline specs are parsed strictly with the protos of
  ``backend_version`` (template/v2_template.go), schemaVersion must be 2.1.0.
"""

from __future__ import annotations

import email.parser
import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN_AUDIENCE = "pipelines.kubeflow.org"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def upload_file(self) -> bytes:
        """The 'uploadfile' part of a multipart/form-data body."""
        raw = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode() + self.body
        message = email.parser.BytesParser().parsebytes(raw)
        for part in message.get_payload():  # type: ignore[union-attr]
            if part.get_param("name", header="content-disposition") == "uploadfile":
                return part.get_payload(decode=True)
        raise AssertionError("no uploadfile part")


class ApiError(Exception):
    def __init__(self, http_status: int, grpc_code: int, message: str):
        super().__init__(message)
        self.http_status, self.grpc_code, self.message = http_status, grpc_code, message


def _invalid(message: str) -> ApiError:
    return ApiError(400, 3, f"Invalid input error: {message}")


@dataclass
class FakeKfp:
    multi_user: bool = False
    backend_version: str | None = None  # None: skip the proto check (tests without .venv-platforms)
    #: bearer token -> (identity, audiences) as a TokenReview would answer
    tokens: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    #: identity -> namespaces it may use (what the SubjectAccessReview would allow)
    access: dict[str, set[str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # ------------------------------------------------------------ rules

    def _namespace(self, namespace: str | None) -> str:
        return (namespace or "") if self.multi_user else ""

    def _identity(self, request: Request) -> str:
        if "kubeflow-userid" in request.headers:
            return request.headers["kubeflow-userid"]
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, 16, "Request header error: there is no user identity header.")
        identity, audiences = self.tokens.get(auth.removeprefix("Bearer "), (None, ()))
        if identity is None or TOKEN_AUDIENCE not in audiences:
            raise ApiError(401, 16, "Authentication failure: Failed to authenticate token review")
        return identity

    def _authorize(self, request: Request, namespace: str) -> None:
        if not self.multi_user or not namespace:
            return
        identity = self._identity(request)
        if namespace not in self.access.get(identity, set()):
            raise ApiError(403, 7, f"User '{identity}' is not authorized with reason: (namespace {namespace})")

    def _check_spec(self, documents: list[dict]) -> None:
        [pipeline] = [d for d in documents if "root" in d or "pipelineInfo" in d]
        if pipeline.get("schemaVersion") != "2.1.0":
            raise _invalid(
                f"KFP only supports schema version 2.1.0, but the pipeline spec has version "
                f"{pipeline.get('schemaVersion')}"
            )
        if self.backend_version is None:
            return
        from google.protobuf.json_format import ParseError

        from tests.platforms.kfp_protos import backend

        platform = next((d for d in documents if "platforms" in d), None)
        try:
            backend(self.backend_version).check_pipeline(pipeline, platform)
        except ParseError as err:
            raise _invalid(f"invalid v2 pipeline spec: {err}") from None

    # ---------------------------------------------------------- routes

    def handle(self, request: Request) -> tuple[int, dict]:
        self.requests.append(request)
        try:
            return 200, self._route(request)
        except ApiError as err:
            return err.http_status, {"error": err.message, "code": err.grpc_code, "message": err.message}

    def _route(self, request: Request) -> dict:
        route = (request.method, request.path)
        q = {k: v[0] for k, v in request.query.items()}
        if route == ("GET", "/apis/v2beta1/healthz"):
            return {"multi_user": self.multi_user}
        if self.multi_user:
            self._identity(request)
        if route == ("GET", "/apis/v2beta1/pipelines"):
            namespace = self._namespace(q.get("namespace"))
            self._authorize(request, namespace)
            visible = [p for p in self.pipelines.values() if p["namespace"] == namespace]  # "" lists shared ones
            return {"pipelines": [_public(p) for p in _filtered(visible, q.get("filter"))]}
        if route == ("POST", "/apis/v2beta1/pipelines/upload"):
            namespace = self._namespace(q.get("namespace"))
            self._authorize(request, namespace)
            content = request.upload_file()
            self._check_spec([d for d in yaml.safe_load_all(content) if d])
            pipeline = {
                "pipeline_id": self.new_id("pipeline"),
                "display_name": q["name"],
                "description": q.get("description", ""),
                "namespace": namespace,
            }
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], q["name"], content)
            return _public(pipeline)
        if route == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            pipeline = self.pipelines[q["pipelineid"]]
            self._authorize(request, pipeline["namespace"])
            content = request.upload_file()
            self._check_spec([d for d in yaml.safe_load_all(content) if d])
            return self._add_version(q["pipelineid"], q["name"], content)
        if (
            request.method == "GET"
            and request.path.startswith("/apis/v2beta1/pipelines/")
            and request.path.endswith("/versions")
        ):
            pipeline_id = request.path.split("/")[4]
            self._authorize(request, self.pipelines[pipeline_id]["namespace"])
            newest = sorted(self.versions.get(pipeline_id, []), key=lambda v: v["created_at"], reverse=True)
            return {"pipeline_versions": newest[: int(q.get("page_size", 10))]}
        if route == ("GET", "/apis/v2beta1/experiments"):
            namespace = self._namespace(q.get("namespace"))
            if self.multi_user and not namespace:
                raise _invalid("An experiment cannot have an empty namespace in multi-user mode")
            self._authorize(request, namespace)
            mine = [e for e in self.experiments.values() if e["namespace"] == namespace]
            return {"experiments": _filtered(mine, q.get("filter"))}
        if route == ("POST", "/apis/v2beta1/experiments"):
            body = request.json()
            namespace = self._namespace(body.get("namespace"))
            if self.multi_user and not namespace:
                raise _invalid("An experiment cannot have an empty namespace in multi-user mode")
            self._authorize(request, namespace)
            experiment = {**body, "namespace": namespace, "experiment_id": self.new_id("experiment")}
            self.experiments[experiment["experiment_id"]] = experiment
            return experiment
        if route == ("POST", "/apis/v2beta1/runs"):
            body = request.json()
            namespace = self._experiment_namespace(body.get("experiment_id"), "A run")
            self._authorize(request, namespace)
            if "pipeline_spec" in body:  # inline spec; kfp.Client wraps it when there is a platform spec
                spec = body["pipeline_spec"]
                self._check_spec([spec["pipeline_spec"], spec["platform_spec"]] if "platform_spec" in spec else [spec])
            run = {
                **body,
                "run_id": self.new_id("run"),
                "state": "PENDING",
                "namespace": namespace,
                "created_at": f"2030-01-01T00:00:{len(self.runs):02d}Z",
            }
            self.runs.append(run)
            return run
        if route == ("GET", "/apis/v2beta1/runs"):
            experiment = self.experiments.get(q.get("experiment_id", ""))
            namespace = experiment["namespace"] if experiment else self._namespace(q.get("namespace"))
            if self.multi_user and not namespace:
                raise _invalid("ListRuns must filter by resource reference in multi-user mode")
            self._authorize(request, namespace)
            runs = [r for r in self.runs if r.get("experiment_id") == q.get("experiment_id")]
            runs.sort(key=lambda r: r["created_at"], reverse=q.get("sort_by") == "created_at desc")
            return {"runs": runs[: int(q.get("page_size", 10))], "total_size": len(runs)}
        if route == ("POST", "/apis/v2beta1/recurringruns"):
            body = request.json()
            namespace = self._experiment_namespace(body.get("experiment_id"), "A recurring run")
            self._authorize(request, namespace)
            recurring = {**body, "namespace": namespace, "recurring_run_id": self.new_id("recurring")}
            self.recurring.append(recurring)
            return recurring
        raise ApiError(404, 5, f"no route {route}")

    def _experiment_namespace(self, experiment_id: str | None, what: str) -> str:
        if self.multi_user and not experiment_id:
            raise _invalid("Experiment id can not be empty in multi-user mode")
        experiment = self.experiments.get(experiment_id or "")
        if experiment_id and experiment is None:
            raise ApiError(404, 5, f"Experiment {experiment_id} not found")
        namespace = experiment["namespace"] if experiment else ""
        if self.multi_user and not namespace:
            raise _invalid(f"{what} cannot have an empty namespace in multi-user mode")
        return namespace

    def _add_version(self, pipeline_id: str, name: str, content: bytes) -> dict:
        versions = self.versions.setdefault(pipeline_id, [])
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self.new_id("version"),
            "display_name": name,
            "created_at": f"2030-01-01T00:{len(versions):02d}:00Z",
            "pipeline_spec": next(yaml.safe_load_all(content)),
        }
        versions.append(version)
        return version


def _public(pipeline: dict) -> dict:
    return {k: v for k, v in pipeline.items() if k != "namespace" or v}


def _filtered(items: list[dict], filter_json: str | None) -> list[dict]:
    if not filter_json:
        return items
    for predicate in json.loads(filter_json)["predicates"]:
        # Protobuf JSON allows the enum's name or number; kfp.Client sends 1.
        assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1)
        items = [i for i in items if i["display_name"] == predicate["stringValue"]]
    return items


@contextmanager
def serve(fake: FakeKfp) -> Iterator[str]:
    """Run ``fake`` on a loopback port; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(
                self.command,
                url.path,
                parse_qs(url.query, keep_blank_values=True),
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length) if length else b"",
            )
            code, payload = fake.handle(request)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
