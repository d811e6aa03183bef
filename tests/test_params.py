"""pipelines.params: the one name=value parser behind `make run` and the submit CLI."""

import pytest

from pipelines import params, run_local, submit
from pipelines.pipeline import chest_ct_pipeline

DECLARED = {"s": "STRING", "i": "NUMBER_INTEGER", "f": "NUMBER_DOUBLE", "b": "BOOLEAN", "l": "LIST", "d": "STRUCT"}


def test_values_are_converted_by_declared_type():
    assert params.parse_params(["s=007", "i=7", "f=0.5", "b=True", "l=[1, 2]", 'd={"a": 1}'], DECLARED) == {
        "s": "007",
        "i": 7,
        "f": 0.5,
        "b": True,
        "l": [1, 2],
        "d": {"a": 1},
    }


@pytest.mark.parametrize(
    ("word", "value"), [("true", True), ("YES", True), ("1", True), ("false", False), ("No", False), ("0", False)]
)
def test_booleans_accept_the_same_words_everywhere(word, value):
    assert params.parse_params([f"b={word}"], DECLARED) == {"b": value}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (['l={"a": 1}'], "parameter l='{\"a\": 1}': expected a JSON list"),
        (["i=1", "i=2"], "parameter 'i': given more than once"),
        (["x=1"], "parameter 'x': unknown; the pipeline takes b, d, f, i, l, s"),
        (["i=1.5"], "parameter i='1.5': expected integer"),
        (["b=maybe"], "parameter b='maybe': expected true or false"),
        (["=3"], "expected name=value"),
    ],
)
def test_bad_pairs_are_named(pairs, message):
    with pytest.raises(params.ParameterError) as raised:
        params.parse_params(pairs, DECLARED)
    assert message in str(raised.value)


def test_without_declared_types_json_values_are_decoded_and_the_rest_stays_text():
    assert params.parse_params(["a=3", "b=true", "c=s3://x", "d=", "e=[1]"]) == {
        "a": 3,
        "b": True,
        "c": "s3://x",
        "d": "",
        "e": [1],
    }


def test_the_pipeline_function_and_its_compiled_spec_declare_the_same_types(tmp_path):
    from kfp import compiler

    from pipelines.kfp_client import load_pipeline_spec

    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(chest_ct_pipeline, str(path))
    from_function = params.declared_inputs(chest_ct_pipeline)
    assert from_function == params.spec_inputs(load_pipeline_spec(path))
    assert from_function["deploy_model"] == "BOOLEAN" and from_function["epochs"] == "NUMBER_INTEGER"


def test_make_run_and_submit_share_the_parser():
    """Same input, same value: the local and the cluster path cannot drift apart again."""
    declared = params.declared_inputs(chest_ct_pipeline)
    pairs = ["deploy_model=yes", "epochs=3", "learning_rate=1e-4"]
    assert run_local.parse_params(pairs, declared) == params.parse_params(pairs, declared)
    assert submit.parse_params is params.parse_params
    with pytest.raises(SystemExit, match="parameter deploy_model='perhaps': expected true or false"):
        run_local.parse_params(["deploy_model=perhaps"], declared)
