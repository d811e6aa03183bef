"""kserve's gRPC server with a servicer that admits, times and versions requests like the REST routes.

kserve 0.21's servicer converts every ModelInfer tensor into Python lists before
the model sees it (a 32 MiB message of FP32 values becomes 8 million float
objects), ignores the gRPC deadline, drops the model's response headers,
ignores the ``version`` of ModelReady / ModelMetadata and echoes model names of
any length into errors. ``ChestCtServicer`` overrides those four methods;
``ChestCtGRPCServer`` is kserve's GRPCServer serving it, with a cap on
concurrent calls (beyond it gRPC itself answers RESOURCE_EXHAUSTED before the
server reads the message).
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

from grpc import aio
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput, to_http_parameters
from kserve.utils.utils import to_headers

from serving.context import loggable
from serving.errors import Overloaded, clip, unexpected

#: Typed ``contents`` field of each v2 datatype (kserve.protocol.infer_type.get_content, without the copy).
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_MAX_TENSORS, _MAX_RANK = 8, 8
#: Errors that are answers in their own right (kserve's interceptor maps them); anything else is a bug.
ANSWERS = (InvalidInput, ModelNotFound, ModelNotReady, GrpcException, NotImplementedError)


def request_from_grpc(request: pb.ModelInferRequest) -> InferRequest:
    """An InferRequest whose tensor data are the message's own repeated fields (read once, by the model)."""
    if len(request.inputs) > _MAX_TENSORS or len(request.outputs) > _MAX_TENSORS:
        raise InvalidInput(
            f"the request has {len(request.inputs)} inputs and {len(request.outputs)} outputs; "
            f"this model takes one input and returns at most {_MAX_TENSORS} outputs"
        )
    inputs = []
    for tensor in request.inputs:
        if len(tensor.shape) > _MAX_RANK:
            raise InvalidInput(f"input {clip(tensor.name)}: shape has {len(tensor.shape)} dimensions")
        field = _CONTENTS.get(tensor.datatype)
        inputs.append(
            InferInput(
                name=tensor.name,
                shape=list(tensor.shape),
                datatype=tensor.datatype,
                data=getattr(tensor.contents, field) if field else [],
                parameters=to_http_parameters(tensor.parameters) if tensor.parameters else None,
            )
        )
    outputs = [_requested(out) for out in request.outputs]
    return InferRequest(
        model_name=request.model_name,
        infer_inputs=inputs,
        request_id=request.id,
        raw_inputs=request.raw_input_contents,
        from_grpc=True,
        parameters=request.parameters,
        request_outputs=outputs or None,
        model_version=request.model_version,
    )


def _requested(out: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    return RequestedOutput(name=out.name, parameters=to_http_parameters(out.parameters) if out.parameters else None)


class ChestCtServicer(InferenceServicer):
    @classmethod
    def validate_grpc_request(cls, request: pb.ModelInferRequest) -> None:
        raw = len(request.raw_input_contents)
        if raw and raw != len(request.inputs):
            raise InvalidInput(
                f"the number of inputs ({len(request.inputs)}) does not match the number of raw input contents ({raw})"
            )
        for tensor in request.inputs if raw else ():
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {clip(tensor.name)}: 'contents' must be empty when raw_input_contents are used"
                )

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        self._data_plane.check_version(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._data_plane.model_ready(request.name))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        meta = await self._data_plane.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta.get("versions", []),
            platform=meta["platform"],
            inputs=meta["inputs"],
            outputs=meta["outputs"],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        headers = to_headers(context)
        self.validate_grpc_request(request)
        model = self._data_plane.get_model_from_registry(request.model_name)
        try:
            with model.request_scope(headers, request.ByteSize(), context.time_remaining()):
                response, response_headers = await self._data_plane.infer(
                    model_name=request.model_name, request=request_from_grpc(request), headers=loggable(headers)
                )
        except Overloaded as exc:  # kserve's interceptor aborts with UNAVAILABLE; these trailers go with it
            context.set_trailing_metadata(
                (("retry-after", str(exc.retry_after_s)), ("grpc-retry-pushback-ms", str(exc.retry_after_s * 1000)))
            )
            raise
        except ANSWERS:
            raise
        except Exception as exc:  # a bug: INTERNAL with an id that finds it in the log, not with its text
            raise unexpected(exc, headers.get("x-request-id") or request.id) from exc
        if response_headers:
            await context.send_initial_metadata(tuple((k.lower(), str(v)) for k, v in response_headers.items()))
        return response.to_grpc()


class ChestCtGRPCServer(GRPCServer):
    """kserve's GRPCServer (same interceptors and message limits) serving ChestCtServicer."""

    def __init__(self, *args: Any, max_concurrent_rpcs: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_concurrent_rpcs = max_concurrent_rpcs

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            ChestCtServicer(self._data_plane, self._model_repository_extension), self._server
        )
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()
