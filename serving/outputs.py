"""The model's outputs: what metadata advertises, which ones a request asked for, and the v2 response.

Each output is an ``OutputSpec``: name, datatype, shape and how to read it off a
``Prediction`` (what the model said about N images). Outputs marked ``opt_in``
(``heatmap``, which costs the explain signature's backward pass) are returned
only when a request names them; the others are returned when a request names
none, so a request that names no outputs gets, and pays for, exactly what it did
before the heatmap existed. Adding an output is one spec plus, if the model
computes something new, one field of Prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, RequestedOutput, to_http_parameters

from serving.errors import clip

#: The label of an image the out-of-distribution guard rejected, whatever its probability.
UNSUPPORTED_INPUT = "unsupported-input"
#: The opt-in output computed by the model's explain signatures.
HEATMAP = "heatmap"


@dataclass(frozen=True)
class Prediction:
    """What the model says about N images."""

    probability: np.ndarray  # float32 [N]: probability of the positive class
    label: list[str]  # the class at the model's threshold, or UNSUPPORTED_INPUT where the guard rejected the image
    ood_score: np.ndarray  # float32 [N]: the guard's distance from the training images
    in_distribution: np.ndarray  # bool [N]: ood_score <= the model's ood_threshold
    heatmap: np.ndarray | None = None  # float32 [N, h, w] in 0..1 (Grad-CAM), when asked for


@dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the first dimension is N)
    help: str
    value: Callable[[Prediction], Any]
    opt_in: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("probability", "FP32", (-1,), "probability of adenocarcinoma", lambda p: p.probability),
    OutputSpec("label", "BYTES", (-1,), f"class at the model's threshold, or '{UNSUPPORTED_INPUT}'", lambda p: p.label),
    OutputSpec("ood_score", "FP32", (-1,), "out-of-distribution score", lambda p: p.ood_score),
    OutputSpec("in_distribution", "BOOL", (-1,), "false: the guard rejected the image", lambda p: p.in_distribution),
    OutputSpec(
        HEATMAP,
        "FP32",
        (-1, -1, -1),
        "Grad-CAM map of the adenocarcinoma score over the model's grid, 0-1; opt-in: returned only when named",
        lambda p: p.heatmap,
        opt_in=True,
    ),
)
_SPECS = {spec.name: spec for spec in OUTPUTS}
_OUTPUTS_HELP = ", ".join(f"'{s.name}' ({s.datatype} {list(s.shape)}: {s.help})" for s in OUTPUTS)
#: What a request that names no outputs gets.
DEFAULT_OUTPUTS = tuple(spec.name for spec in OUTPUTS if not spec.opt_in)


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs to return and, for REST, whether each goes in the binary tensor extension."""

    names: tuple[str, ...]
    binary: dict[str, bool]

    @property
    def explain(self) -> bool:
        """The heatmap was asked for: the model's explain signature must run."""
        return HEATMAP in self.names


def parse_outputs(request: InferRequest, heatmap_available: bool = True) -> OutputRequest:
    """Requested outputs (all but the opt-in ones when none are named) and their binary_data flags.

    ``heatmap_available``: whether the model has the explain signatures; naming ``heatmap`` without them is a 400.
    """
    params = _params(request.parameters)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidInput(f"request parameter 'binary_data_output' must be true or false, got {clip(default_binary)}")
    requested = list(request.request_outputs or [])
    if not requested:
        return OutputRequest(DEFAULT_OUTPUTS, {n: default_binary for n in DEFAULT_OUTPUTS})
    chosen: list[str] = []
    binary: dict[str, bool] = {}
    for out in requested:
        if out.name not in _SPECS:
            raise InvalidInput(f"unknown output {clip(out.name)}; this model returns {_OUTPUTS_HELP}")
        if out.name in chosen:
            raise InvalidInput(f"output {clip(out.name)} is requested more than once")
        if out.name == HEATMAP and not heatmap_available:
            raise InvalidInput(
                f"output '{HEATMAP}' is not available from this model: it was exported without the "
                "explain signatures (explain_images, explain_pixels, explain_hu) that compute it; "
                f"re-export it with chest_ct, or leave '{HEATMAP}' out of 'outputs'"
            )
        flag = _params(out.parameters).get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise InvalidInput(
                f"output {clip(out.name)}: parameter 'binary_data' must be true or false, got {clip(flag)}"
            )
        chosen.append(out.name)
        binary[out.name] = flag
    return OutputRequest(tuple(chosen), binary)


def build_response(
    request: InferRequest,
    outputs: OutputRequest,
    prediction: Prediction,
    *,
    model_name: str,
    model_version: str,
    response_id: str,
    parameters: dict[str, Any],
) -> InferResponse:
    """The v2 response with the requested outputs, as REST (numpy) or gRPC (lists) wants them."""
    as_list = bool(request.from_grpc)  # kserve's to_grpc() only accepts lists safely; to_rest() takes numpy
    infer_outputs = []
    for name in outputs.names:
        spec = _SPECS[name]
        value = spec.value(prediction)
        if value is None:
            raise RuntimeError(f"output {name!r} was requested but the model call did not compute it")
        if isinstance(value, np.ndarray):  # gRPC contents are flat; the shape carries the dimensions
            shape, data = list(value.shape), (value.reshape(-1).tolist() if as_list else value)
        else:
            shape, data = [len(value)], (list(value) if as_list else np.array(value, dtype=np.object_))
        infer_outputs.append(InferOutput(name=name, shape=shape, datatype=spec.datatype, data=data))
    requested = [RequestedOutput(name, {"binary_data": outputs.binary[name]}) for name in outputs.names]
    return InferResponse(
        response_id=response_id,
        model_name=model_name,
        model_version=model_version or None,
        infer_outputs=infer_outputs,
        parameters=parameters,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=None if request.from_grpc else requested,
    )


def _params(parameters: Any) -> dict:
    """Request/output parameters as a plain dict (gRPC gives a map of InferParameter messages)."""
    return to_http_parameters(parameters) if parameters else {}
