"""pipelines.submit against the KFP API stand-in (tests/platforms/kfp_server.py).

The stand-in is a real HTTP server that keeps state, records every request
and refuses what the KFP backend refuses: in multi-user mode an identity and a
namespace are required, and pipeline specs are parsed strictly.
"""

from datetime import UTC
from pathlib import Path

import pytest
from kfp import compiler, dsl

from pipelines import kfp_client, submit
from pipelines.cron import CronError, next_runs, validate_cron
from tests.platforms.kfp_server import FakeKfp, serve

pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")

PROFILE = "team-ct"
TOKEN = "s3cret-token"
IDENTITY = f"system:serviceaccount:{PROFILE}:default-editor"

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


@pytest.fixture
def kfp_api():
    fake = FakeKfp()
    with serve(fake) as url:
        yield fake, url


@pytest.fixture
def multi_user_api():
    fake = FakeKfp(
        multi_user=True, tokens={TOKEN: (IDENTITY, ("pipelines.kubeflow.org",))}, access={IDENTITY: {PROFILE}}
    )
    with serve(fake) as url:
        yield fake, url


def _cli(fake, url, monkeypatch, namespace=None):
    monkeypatch.setenv("KFP_HOST", url)
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    if namespace:
        monkeypatch.setenv("KFP_NAMESPACE", namespace)
    else:
        monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    return fake, lambda *argv: submit.main(list(argv))


@pytest.fixture
def cli(kfp_api, monkeypatch):
    """``python -m pipelines.submit`` in-process against a single-user server."""
    return _cli(*kfp_api, monkeypatch)


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
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake.requests)


def test_upload_default_version_name_is_unique_per_upload(kfp_api, package):
    fake, url = kfp_api
    connection = kfp_client.connect(url)
    kfp_client.upload(connection, package, name="chest-ct")
    result = kfp_client.upload(connection, package, name="chest-ct")

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

    assert (
        run(
            "run",
            "--experiment",
            "chest-ct-dev",
            "--package",
            str(package),
            "--run-name",
            "smoke",
            "--param",
            "epochs=3",
            "--param",
            "learning_rate=1e-4",
            "--param",
            "augment=false",
            "--param",
            "data_uri=s3://data/ct-2024",
        )
        == 0
    )

    [experiment] = fake.sent("POST", "/apis/v2beta1/experiments")
    assert experiment.json()["display_name"] == "chest-ct-dev"
    [run_request] = fake.sent("POST", "/apis/v2beta1/runs")
    body = run_request.json()
    assert body["experiment_id"] == next(iter(fake.experiments))
    assert body["display_name"] == "smoke"
    assert body["runtime_config"]["parameters"] == {
        "epochs": 3,
        "learning_rate": 0.0001,
        "augment": False,
        "data_uri": "s3://data/ct-2024",
    }
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-chest-ct"


def test_run_reuses_an_existing_experiment(cli, package):
    fake, run = cli
    fake.experiments["experiment-42"] = {"experiment_id": "experiment-42", "display_name": "chest-ct", "namespace": ""}

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
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": newest["pipeline_version_id"],
    }
    assert "pipeline_spec" not in body
    assert body["runtime_config"]["parameters"] == {"epochs": 2}  # typed from the server's copy of the spec
    assert body["service_account"] == "chest-ct-runner"


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epoch=3", "parameter 'epoch': unknown; the pipeline takes augment, data_uri, epochs, learning_rate"),
        ("epochs=three", "parameter epochs='three': expected integer"),
        ("augment=maybe", "parameter augment='maybe': expected true or false"),
        ("epochs", "parameter 'epochs': expected name=value"),
    ],
)
def test_run_rejects_bad_parameters_before_starting_anything(cli, package, capsys, param, message):
    fake, run = cli
    assert run("run", "--package", str(package), "--param", param) == 2
    assert message in capsys.readouterr().err
    assert not fake.sent("POST", "/apis/v2beta1/runs")


def test_run_takes_the_same_boolean_words_as_make_run(cli, package):
    fake, run = cli
    assert run("run", "--package", str(package), "--param", "augment=no") == 0
    assert fake.sent("POST", "/apis/v2beta1/runs")[0].json()["runtime_config"]["parameters"] == {"augment": False}


def test_run_of_an_unknown_pipeline_says_to_upload(cli, capsys):
    fake, run = cli
    assert run("run", "--pipeline", "chest-ct") == 2
    assert "run `upload` first" in capsys.readouterr().err
    assert not fake.sent("POST", "/apis/v2beta1/runs")


# --------------------------------------------------------------- multi-user


def test_multi_user_server_without_a_namespace_is_refused_before_anything_is_created(
    multi_user_api, package, monkeypatch, capsys
):
    fake, run = _cli(*multi_user_api, monkeypatch)
    assert run("run", "--package", str(package)) == 2
    assert "namespace: this KFP server runs in multi-user mode" in capsys.readouterr().err
    assert [r.path for r in fake.requests] == ["/apis/v2beta1/healthz"] * len(fake.requests)


def test_the_stand_in_refuses_what_multi_user_kfp_refuses(multi_user_api, package):
    """Without the CLI's check, kfp.Client would send these, and a real server answers 400/401."""
    import kfp

    fake, url = multi_user_api
    client = kfp.Client(host=url, existing_token=TOKEN)
    with pytest.raises(Exception, match="An experiment cannot have an empty namespace in multi-user mode"):
        client.create_experiment("chest-ct")
    anonymous = kfp.Client(host=url)
    with pytest.raises(Exception, match="there is no user identity header"):
        anonymous.create_experiment("chest-ct", namespace=PROFILE)
    with pytest.raises(Exception, match="not authorized"):
        client.create_experiment("chest-ct", namespace="someone-else")
    assert not fake.experiments


def test_multi_user_run_and_schedule_land_in_the_profile(multi_user_api, package, monkeypatch, capsys):
    fake, run = _cli(*multi_user_api, monkeypatch, namespace=PROFILE)

    assert run("upload", str(package), "--name", "chest-ct") == 0
    assert run("run", "--pipeline", "chest-ct", "--param", "epochs=2") == 0
    assert run("schedule", "--pipeline", "chest-ct", "--cron", "0 0 3 * * *") == 0
    assert run("list") == 0

    [pipeline] = fake.pipelines.values()
    assert pipeline["namespace"] == PROFILE  # private to the profile, not shared with every user
    [experiment] = fake.experiments.values()
    assert experiment["namespace"] == PROFILE
    assert [r["namespace"] for r in fake.runs] == [PROFILE]
    assert [r["namespace"] for r in fake.recurring] == [PROFILE]
    assert "scheduled recurring run" in capsys.readouterr().out


# ------------------------------------------------------------------ schedule


def test_schedule_creates_a_recurring_run_on_a_six_field_cron(cli, package, capsys):
    fake, run = cli

    assert (
        run(
            "schedule",
            "--package",
            str(package),
            "--cron",
            "0  0 3 * * MON-FRI",
            "--name",
            "nightly",
            "--param",
            "epochs=20",
        )
        == 0
    )

    [request] = fake.sent("POST", "/apis/v2beta1/recurringruns")
    body = request.json()
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * MON-FRI"
    assert body["display_name"] == "nightly"
    assert body["mode"] == "ENABLE"
    assert body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 1
    assert body["experiment_id"] == next(iter(fake.experiments))
    assert body["runtime_config"]["parameters"] == {"epochs": 20}
    assert "03:00:00" in capsys.readouterr().out.split("next, UTC:")[1]


def test_schedule_refuses_a_five_field_cron_and_shows_the_fix(cli, package, capsys):
    fake, run = cli
    assert run("schedule", "--package", str(package), "--cron", "0 3 * * *") == 2
    err = capsys.readouterr().err
    assert "seconds first" in err and "'0 0 3 * * *'" in err and "every hour" in err
    assert fake.requests == []  # refused before connecting


# What github.com/robfig/cron v1.2.0 `cron.Parse` (KFP's parser) accepts, with the times it fires.
@pytest.mark.parametrize(
    ("expression", "first", "second"),
    [
        ("0 0 3 * * *", "2030-01-01 03:00:00", "2030-01-02 03:00:00"),
        ("*/30 * * * * ?", "2030-01-01 00:00:30", "2030-01-01 00:01:00"),
        ("0 15 2 1,15 * ?", "2030-01-01 02:15:00", "2030-01-15 02:15:00"),
        ("0 0 */6 ? JAN-MAR SUN", "2030-01-06 00:00:00", "2030-01-06 06:00:00"),
        ("0 0 3 * * fri", "2030-01-04 03:00:00", "2030-01-11 03:00:00"),  # names in any case
        ("5/15 * * * * *", "2030-01-01 00:00:05", "2030-01-01 00:00:20"),  # N/step is N-max/step
        ("? 0 3 * * *", "2030-01-01 03:00:00", "2030-01-01 03:00:01"),  # robfig reads '?' as '*' anywhere
        ("@daily", "2030-01-02 00:00:00", "2030-01-03 00:00:00"),
        ("@every 1h30m", "2030-01-01 01:30:00", "2030-01-01 03:00:00"),
    ],
)
def test_validate_cron_accepts_what_kfp_accepts_and_fires_when_kfp_would(expression, first, second):
    from datetime import datetime

    assert validate_cron(expression) == " ".join(expression.split())
    start = datetime(2030, 1, 1, tzinfo=UTC)
    assert [f"{t:%Y-%m-%d %H:%M:%S}" for t in next_runs(expression, 2, after=start)] == [first, second]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "expected 6"),
        ("0 0 0 3 * * * 2030", "expected 6"),  # croniter takes a year field, robfig does not
        ("60 0 3 * * *", "seconds field '60': 60 is outside 0-59"),
        ("0 0 24 * * *", "hours field '24'"),
        ("0 0 3 0 * *", "day of month field '0'"),
        ("0 0 3 * 13 *", "month field '13'"),
        ("0 0 3 * * 7", "day of week field '7': 7 is outside 0-6"),  # croniter takes 7 for Sunday
        ("0 0 3 * * FUN", "'FUN' is not a number or one of SUN"),
        ("0 */0 3 * * *", "step '0' must be a positive integer"),
        ("0 0 5-3 * * *", "range 5-3 runs backwards"),  # croniter wraps it around
        ("0 0 3 L * *", "'L' is not a number"),  # croniter extension
        ("0 0 3 * * MON#2", "is not a number"),  # croniter extension
        ("0 0 3 15W * *", "is not a number"),  # croniter extension
        ("@reboot", "unknown descriptor"),
        ("@every 1d", "expected a duration"),  # Go durations stop at hours
        ("0 0 3 31 2 *", "never fires"),
    ],
)
def test_validate_cron_refuses_what_kfp_refuses_or_would_misread(expression, message):
    with pytest.raises(CronError, match="^cron: ") as raised:
        validate_cron(expression)
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


# ------------------------------------------------------------------ connect


@pytest.mark.parametrize(
    ("host", "message"),
    [(None, "host: required"), ("", "host: required"), ("kfp.example.com", "host: expected an http")],
)
def test_connect_needs_an_http_host(host, message):
    with pytest.raises(ValueError, match=message):
        kfp_client.connect(host)


def test_cli_without_host_fails_with_the_fix(monkeypatch, capsys, package):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert submit.main(["run", "--package", str(package)]) == 2
    assert "KFP_HOST" in capsys.readouterr().err


def test_connection_options_follow_the_subcommand(kfp_api, monkeypatch):
    fake, url = kfp_api
    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    assert submit.main(["list", "--host", url, "--experiment", "chest-ct"]) == 0
    assert fake.sent("GET", "/apis/v2beta1/experiments")
    assert all("authorization" not in r.headers for r in fake.requests)  # no token, no header
