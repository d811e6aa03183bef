"""pipelines.submit against a local KFP API double.

The double is a real HTTP server implementing the handful of v2beta1
endpoints kfp.Client calls (healthz, pipelines, upload, versions,
experiments, runs, recurring runs), keeping state between calls and
recording every request, so the tests see exactly what a KFP server would.
"""

import email.parser
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kfp import compiler, dsl

from pipelines import submit

pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")

# ------------------------------------------------------------ a tiny pipeline


# No `from __future__ import annotations` here: KFP reads the real annotation types.
@dsl.component(base_image="python:3.11-slim")
def _train(data_uri: str, epochs: int, learning_rate: float, augment: bool) -> str:
    return f"{data_uri} {epochs} {learning_rate} {augment}"


@dsl.pipeline(name="tiny-chest-ct", description="A stand-in for the real pipeline.")
def _tiny(data_uri: str = "s3://data/ct", epochs: int = 10, learning_rate: float = 0.001, augment: bool = True):
    _train(data_uri=data_uri, epochs=epochs, learning_rate=learning_rate, augment=augment)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "tiny.yaml"
    compiler.Compiler().compile(_tiny, str(path))
    return path


# ----------------------------------------------------------- the KFP double


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
        for part in message.get_payload():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                return part.get_payload(decode=True)
        raise AssertionError("no uploadfile part")


@dataclass
class FakeKfp:
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def handle(self, request: Request) -> tuple[int, dict]:
        self.requests.append(request)
        route = (request.method, request.path)
        q = {k: v[0] for k, v in request.query.items()}
        if route == ("GET", "/apis/v2beta1/healthz"):
            return 200, {"multi_user": False}
        if route == ("GET", "/apis/v2beta1/pipelines"):
            return 200, {"pipelines": _filtered(self.pipelines.values(), q.get("filter"))}
        if route == ("POST", "/apis/v2beta1/pipelines/upload"):
            pipeline = {"pipeline_id": self.new_id("pipeline"), "display_name": q["name"],
                        "description": q.get("description", "")}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], q["name"], request.upload_file())
            return 200, pipeline
        if route == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            version = self._add_version(q["pipelineid"], q["name"], request.upload_file())
            return 200, version
        if request.method == "GET" and request.path.startswith("/apis/v2beta1/pipelines/") and request.path.endswith(
                "/versions"):
            pipeline_id = request.path.split("/")[4]
            newest = sorted(self.versions.get(pipeline_id, []), key=lambda v: v["created_at"], reverse=True)
            return 200, {"pipeline_versions": newest[: int(q.get("page_size", 10))]}
        if route == ("GET", "/apis/v2beta1/experiments"):
            return 200, {"experiments": _filtered(self.experiments.values(), q.get("filter"))}
        if route == ("POST", "/apis/v2beta1/experiments"):
            experiment = {**request.json(), "experiment_id": self.new_id("experiment")}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if route == ("POST", "/apis/v2beta1/runs"):
            run = {**request.json(), "run_id": self.new_id("run"), "state": "PENDING",
                   "created_at": f"2030-01-01T00:00:{len(self.runs):02d}Z"}
            self.runs.append(run)
            return 200, run
        if route == ("GET", "/apis/v2beta1/runs"):
            runs = [r for r in self.runs if r.get("experiment_id") == q.get("experiment_id")]
            runs.sort(key=lambda r: r["created_at"], reverse=q.get("sort_by") == "created_at desc")
            return 200, {"runs": runs[: int(q.get("page_size", 10))], "total_size": len(runs)}
        if route == ("POST", "/apis/v2beta1/recurringruns"):
            recurring = {**request.json(), "recurring_run_id": self.new_id("recurring")}
            self.recurring.append(recurring)
            return 200, recurring
        return 404, {"error": f"no route {route}", "code": 5}

    def _add_version(self, pipeline_id: str, name: str, content: bytes) -> dict:
        import yaml

        versions = self.versions.setdefault(pipeline_id, [])
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": self.new_id("version"), "display_name": name,
                   "created_at": f"2030-01-01T00:{len(versions):02d}:00Z",
                   "pipeline_spec": next(yaml.safe_load_all(content))}
        versions.append(version)
        return version

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _filtered(items, filter_json: str | None) -> list[dict]:
    items = list(items)
    if not filter_json:
        return items
    for predicate in json.loads(filter_json)["predicates"]:
        # Protobuf JSON allows the enum's name or number; kfp.Client sends 1.
        assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1)
        items = [i for i in items if i["display_name"] == predicate["stringValue"]]
    return items


@pytest.fixture
def kfp_api():
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                              {k.lower(): v for k, v in self.headers.items()},
                              self.rfile.read(length) if length else b"")
            code, payload = fake.handle(request)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def cli(kfp_api, monkeypatch):
    """Run ``python -m pipelines.submit`` in-process against the double."""
    fake, url = kfp_api
    monkeypatch.setenv("KFP_HOST", url)
    monkeypatch.setenv("KFP_TOKEN", "s3cret-token")
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)

    def run(*argv: str) -> int:
        return submit.main(list(argv))

    return fake, run


# -------------------------------------------------------------------- upload


def test_upload_creates_the_pipeline_then_adds_versions(cli, package):
    fake, run = cli

    assert run("upload", str(package)) == 0
    assert run("upload", str(package), "--version", "v2") == 0

    [create] = fake.sent("POST", "/apis/v2beta1/pipelines/upload")
    assert create.query["name"] == ["tiny-chest-ct"]
    assert create.query["description"] == ["A stand-in for the real pipeline."]
    assert create.upload_file() == package.read_bytes()
    [version] = fake.sent("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version.query["name"] == ["v2"]
    assert version.query["pipelineid"] == [next(iter(fake.pipelines))]
    assert version.upload_file() == package.read_bytes()
    assert all(r.headers["authorization"] == "Bearer s3cret-token" for r in fake.requests)


def test_upload_default_version_name_is_unique_per_upload(kfp_api, package):
    fake, url = kfp_api
    client = submit.connect(url)
    submit.upload(client, package, name="chest-ct")
    result = submit.upload(client, package, name="chest-ct")

    assert not result.new_pipeline
    [version] = fake.sent("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version.query["name"][0].startswith("chest-ct-20")
    assert result.version_id == fake.versions[result.pipeline_id][-1]["pipeline_version_id"]


def test_upload_of_a_missing_package_says_to_compile(cli, tmp_path, capsys):
    fake, run = cli
    assert run("upload", str(tmp_path / "nope.yaml")) == 2
    assert "make compile" in capsys.readouterr().err
    assert not fake.sent("POST", "/apis/v2beta1/pipelines/upload")


# ----------------------------------------------------------------------- run


def test_run_sends_typed_parameters_into_a_created_experiment(cli, package):
    fake, run = cli

    assert run("run", "--experiment", "chest-ct-dev", "--package", str(package), "--run-name", "smoke",
               "--param", "epochs=3", "--param", "learning_rate=1e-4", "--param", "augment=false",
               "--param", "data_uri=s3://data/ct-2024") == 0

    [experiment] = fake.sent("POST", "/apis/v2beta1/experiments")
    assert experiment.json()["display_name"] == "chest-ct-dev"
    [run_request] = fake.sent("POST", "/apis/v2beta1/runs")
    body = run_request.json()
    assert body["experiment_id"] == next(iter(fake.experiments))
    assert body["display_name"] == "smoke"
    assert body["runtime_config"]["parameters"] == {
        "epochs": 3, "learning_rate": 0.0001, "augment": False, "data_uri": "s3://data/ct-2024"}
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-chest-ct"


def test_run_reuses_an_existing_experiment(cli, package):
    fake, run = cli
    fake.experiments["experiment-42"] = {"experiment_id": "experiment-42", "display_name": "chest-ct"}

    assert run("run", "--package", str(package)) == 0

    assert not fake.sent("POST", "/apis/v2beta1/experiments")
    [run_request] = fake.sent("POST", "/apis/v2beta1/runs")
    assert run_request.json()["experiment_id"] == "experiment-42"
    assert run_request.json()["runtime_config"].get("parameters", {}) == {}


def test_run_of_the_newest_uploaded_version(cli, package):
    fake, run = cli
    assert run("upload", str(package), "--name", "chest-ct") == 0
    assert run("upload", str(package), "--name", "chest-ct", "--version", "newest") == 0

    assert run("run", "--pipeline", "chest-ct", "--param", "epochs=2", "--service-account", "chest-ct-runner") == 0

    body = fake.sent("POST", "/apis/v2beta1/runs")[0].json()
    pipeline_id = next(iter(fake.pipelines))
    newest = [v for v in fake.versions[pipeline_id] if v["display_name"] == "newest"][0]
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                  "pipeline_version_id": newest["pipeline_version_id"]}
    assert "pipeline_spec" not in body
    assert body["runtime_config"]["parameters"] == {"epochs": 2}  # typed from the server's copy of the spec
    assert body["service_account"] == "chest-ct-runner"


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epoch=3", "--param epoch: the pipeline has no such input"),
        ("epochs=three", "--param epochs: expected an integer, got 'three'"),
        ("augment=yes", "--param augment: expected true or false"),
        ("epochs", "--param: expected name=value"),
    ],
)
def test_run_rejects_bad_parameters_before_starting_anything(cli, package, capsys, param, message):
    fake, run = cli
    assert run("run", "--package", str(package), "--param", param) == 2
    assert message in capsys.readouterr().err
    assert not fake.sent("POST", "/apis/v2beta1/runs")


def test_run_of_an_unknown_pipeline_says_to_upload(cli, capsys):
    fake, run = cli
    assert run("run", "--pipeline", "chest-ct") == 2
    assert "run `upload` first" in capsys.readouterr().err
    assert not fake.sent("POST", "/apis/v2beta1/runs")


# ------------------------------------------------------------------ schedule


def test_schedule_creates_a_recurring_run_on_a_six_field_cron(cli, package):
    fake, run = cli

    assert run("schedule", "--package", str(package), "--cron", "0  0 3 * * MON-FRI", "--name", "nightly",
               "--param", "epochs=20") == 0

    [request] = fake.sent("POST", "/apis/v2beta1/recurringruns")
    body = request.json()
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * MON-FRI"
    assert body["display_name"] == "nightly"
    assert body["mode"] == "ENABLE"
    assert body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 1
    assert body["experiment_id"] == next(iter(fake.experiments))
    assert body["runtime_config"]["parameters"] == {"epochs": 20}


def test_schedule_refuses_a_five_field_cron_and_shows_the_fix(cli, package, capsys):
    fake, run = cli
    assert run("schedule", "--package", str(package), "--cron", "0 3 * * *") == 2
    err = capsys.readouterr().err
    assert "seconds first" in err and "'0 0 3 * * *'" in err
    assert fake.requests == []  # refused before connecting


@pytest.mark.parametrize(
    "expression",
    ["0 0 3 * * *", "*/30 * * * * ?", "0 15 2 1,15 * ?", "0 0 */6 ? JAN-MAR SUN", "0 0 0 1 1 0"],
)
def test_validate_cron_accepts_kfp_expressions(expression):
    assert submit.validate_cron(expression) == " ".join(expression.split())


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "expected 6"),
        ("@daily", "expected 6"),
        ("0 0 0 3 * * * 2030", "expected 6"),
        ("60 0 3 * * *", "seconds field '60': 60 is outside 0-59"),
        ("0 0 24 * * *", "hours field '24'"),
        ("0 0 3 0 * *", "day of month field '0'"),
        ("0 0 3 * 13 *", "month field '13'"),
        ("0 0 3 * * 7", "day of week field '7'"),
        ("0 0 3 * * FUN", "'FUN' is not a number or one of SUN"),
        ("0 */0 3 * * *", "step '0' must be a positive integer"),
        ("0 0 5-3 * * *", "range 5-3 runs backwards"),
        ("? 0 3 * * *", "'?' is only allowed"),
        ("0 0 3 L * *", "'L' is not a number"),
    ],
)
def test_validate_cron_names_the_bad_field(expression, message):
    with pytest.raises(ValueError, match="^cron: ") as raised:
        submit.validate_cron(expression)
    assert message in str(raised.value)


# ---------------------------------------------------------------------- list


def test_list_prints_the_newest_runs_of_the_experiment(cli, package, capsys):
    fake, run = cli
    for name in ("first", "second"):
        assert run("run", "--package", str(package), "--run-name", name) == 0
    capsys.readouterr()

    assert run("list", "--limit", "5") == 0

    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[-1] for line in lines] == ["second", "first"]
    assert all("PENDING" in line for line in lines)
    [listing] = fake.sent("GET", "/apis/v2beta1/runs")
    assert listing.query["experiment_id"] == [next(iter(fake.experiments))]
    assert listing.query["page_size"] == ["5"]


def test_list_of_a_missing_experiment_is_empty(cli, capsys):
    fake, run = cli
    assert run("list", "--experiment", "nobody") == 0
    assert capsys.readouterr().out == ""
    assert not fake.sent("GET", "/apis/v2beta1/runs")


# ---------------------------------------------------------------- parameters


def test_parse_params_converts_by_declared_type():
    declared = {"s": "STRING", "i": "NUMBER_INTEGER", "f": "NUMBER_DOUBLE", "b": "BOOLEAN", "l": "LIST",
                "d": "STRUCT"}
    assert submit.parse_params(["s=007", "i=7", "f=0.5", "b=True", "l=[1, 2]", 'd={"a": 1}', ], declared) == {
        "s": "007", "i": 7, "f": 0.5, "b": True, "l": [1, 2], "d": {"a": 1}}
    with pytest.raises(ValueError, match="--param l: expected a JSON list"):
        submit.parse_params(['l={"a": 1}'], declared)
    with pytest.raises(ValueError, match="--param i: given more than once"):
        submit.parse_params(["i=1", "i=2"], declared)


def test_parse_params_without_a_spec_decodes_json_values_only():
    assert submit.parse_params(["a=3", "b=true", "c=s3://x", "d=", "e=[1]"]) == {
        "a": 3, "b": True, "c": "s3://x", "d": "", "e": [1]}


def test_pipeline_parameters_reads_the_compiled_inputs(package):
    assert submit.pipeline_parameters(submit.load_pipeline_spec(package)) == {
        "data_uri": "STRING", "epochs": "NUMBER_INTEGER", "learning_rate": "NUMBER_DOUBLE", "augment": "BOOLEAN"}


# ------------------------------------------------------------------ connect


@pytest.mark.parametrize(("host", "message"), [(None, "host: required"), ("", "host: required"),
                                               ("kfp.example.com", "host: expected an http")])
def test_connect_needs_an_http_host(host, message):
    with pytest.raises(ValueError, match=message):
        submit.connect(host)


def test_cli_without_host_fails_with_the_fix(monkeypatch, capsys, package):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert submit.main(["run", "--package", str(package)]) == 2
    assert "KFP_HOST" in capsys.readouterr().err


def test_connection_options_follow_the_subcommand(kfp_api, monkeypatch, capsys):
    fake, url = kfp_api
    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    assert submit.main(["list", "--host", url, "--experiment", "chest-ct"]) == 0
    assert fake.sent("GET", "/apis/v2beta1/experiments")
    assert all("authorization" not in r.headers for r in fake.requests)  # no token, no header
