"""``name=value`` pipeline parameters, typed by what the pipeline declares.

One parser for every place a person types parameters: ``make run``
(``pipelines.run_local``) and the cluster CLI (``pipelines.submit``), so a
value means the same thing locally and on Kubeflow. Types are KFP's IR names
(``STRING``, ``NUMBER_INTEGER``, ``NUMBER_DOUBLE``, ``BOOLEAN``, ``LIST``,
``STRUCT``), read from a compiled pipeline spec or from the pipeline function.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Spellings accepted for BOOLEAN parameters (case-insensitive).
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})


class ParameterError(ValueError):
    """A ``name=value`` pair is malformed, unknown to the pipeline, or of the wrong type."""


def declared_inputs(pipeline: Any) -> dict[str, str]:
    """Parameter name -> IR type of a ``@dsl.pipeline`` function (artifact inputs are not parameters)."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    names = pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name
    declared = pipeline.pipeline_spec.root.input_definitions.parameters
    return {name: names(definition.parameter_type) for name, definition in declared.items()}


def spec_inputs(spec: Mapping[str, Any]) -> dict[str, str]:
    """Parameter name -> IR type of a compiled PipelineSpec (or the API's ``{"pipeline_spec": ...}`` wrapper)."""
    if "root" not in spec and isinstance(spec.get("pipeline_spec"), Mapping):
        spec = spec["pipeline_spec"]
    declared = ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
    return {name: definition.get("parameterType", "STRING") for name, definition in declared.items()}


def parse_params(pairs: Sequence[str], declared: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn ``name=value`` strings into typed pipeline arguments.

    With the pipeline's declared inputs, each value is converted to its type
    and unknown names are refused here, before anything runs (a KFP server
    would only report them once the run is queued). Without them (a server
    that did not return the spec), JSON-looking values are decoded and the
    rest stay strings.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        name, equals, raw = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ParameterError(f"parameter {pair!r}: expected name=value")
        if name in params:
            raise ParameterError(f"parameter {name!r}: given more than once")
        if declared is None:
            params[name] = _guess(raw)
            continue
        if name not in declared:
            raise ParameterError(
                f"parameter {name!r}: unknown; the pipeline takes {', '.join(sorted(declared)) or 'no parameters'}"
            )
        params[name] = convert(name, raw, declared[name])
    return params


def convert(name: str, raw: str, parameter_type: str) -> Any:
    """``raw`` as the Python value of IR type ``parameter_type``."""

    def bad(expected: str) -> ParameterError:
        return ParameterError(f"parameter {name}={raw!r}: expected {expected}")

    if parameter_type == "STRING":
        return raw
    if parameter_type == "NUMBER_INTEGER":
        try:
            return int(raw)
        except ValueError:
            raise bad("integer") from None
    if parameter_type == "NUMBER_DOUBLE":
        try:
            return float(raw)
        except ValueError:
            raise bad("number") from None
    if parameter_type == "BOOLEAN":
        word = raw.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise bad("true or false")
        return word in TRUE_WORDS
    expected_type, label = {"LIST": (list, "a JSON list"), "STRUCT": (dict, "a JSON object")}.get(
        parameter_type, (object, "JSON")
    )
    try:
        value = json.loads(raw)
    except ValueError:
        raise bad(label) from None
    if not isinstance(value, expected_type):
        raise bad(label)
    return value


def _guess(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, (bool, int, float, list, dict)) else raw
