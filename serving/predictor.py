"""The KServe model: v2 inference requests in, adenocarcinoma probability and label out.

``ChestCtModel`` is what ``kserve.ModelServer`` serves over REST and gRPC. Its
``predict`` parses the request (``serving.inputs``, ``serving.outputs``), asks
admission for room (``serving.admission``), checks image files with Pillow
(``serving.images``), runs the SavedModel through the batching engine
(``serving.batching``) within the request's deadline and builds the response.
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger
from kserve.protocol.infer_type import InferRequest, InferResponse, to_http_parameters
from PIL import Image

from serving import context, metrics
from serving.admission import Admission
from serving.batching import IMAGES, BatchingEngine, pixels_kind
from serving.config import ServerConfig
from serving.errors import DeadlineExceeded, clip, new_id, safe_id
from serving.images import image_pixels, verify_image
from serving.inputs import INPUTS, ImageBatch, parse_inputs
from serving.model_dir import ModelInfo, ModelLoadError, check_model_dir, read_model_info
from serving.outputs import OUTPUTS, Prediction, build_response, parse_outputs
from serving.precision import PrecisionState, cpu_bf16, settle_precision
from serving.runner import ModelInputError, SavedModelRunner

#: Requests larger than this are parsed in the one parser thread, so at most one large body at a time is
#: expanded into Python objects and numpy arrays; smaller ones are parsed on the event loop (sub-millisecond).
INLINE_PARSE_BYTES = 1024 * 1024


class VersionNotFound(ModelNotFound):
    """A request for a model version this server does not serve (404 / NOT_FOUND via kserve's handlers)."""

    def __init__(self, name: str, served: str, requested: str):
        super().__init__(clip(name))
        self.reason = (f"model {clip(name)} has no version {clip(requested)}; it serves version {served!r}" if served
                       else f"model {clip(name)} is unversioned; leave the version out of the request")


class ChestCtModel(Model):
    """Serves one exported chest-ct SavedModel under ``name``."""

    def __init__(self, name: str, model_dir: str | Path, config: ServerConfig | None = None):
        super().__init__(name, return_response_headers=True)
        self.model_dir = Path(model_dir)
        self.config = config or ServerConfig()
        self.info: ModelInfo | None = None
        self.engine: BatchingEngine | None = None
        self.admission: Admission | None = None
        self.precision: PrecisionState | None = None
        self.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parser")

    # --- lifecycle --------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the model, settle its precision, answer warm-up calls, then report ready.

        Reduced precision is used only when the model's golden set agrees (``serving.precision``).
        Raises ModelLoadError with a readable message when the directory cannot be served.
        """
        path = check_model_dir(self.model_dir)
        info = read_model_info(path)
        cfg = self.config
        runner = SavedModelRunner(path)
        self.precision = settle_precision(runner, info.golden, info.golden_problem, info.threshold, cfg.precision,
                                          cfg.precision_tolerance, cpu_bf16(), runner.gpus())
        (logger.warning if self.precision.fell_back else logger.info)("Precision %s: %s", self.precision.precision,
                                                                       self.precision.reason)
        seconds_per_image = self._warm_up(runner, info)
        self.info = info
        self.engine = BatchingEngine(runner, model_name=self.name, max_batch_size=cfg.max_batch_size,
                                     max_call_pixels=cfg.max_call_pixels, max_wait_s=cfg.max_batch_wait_s,
                                     call_timeout_s=cfg.model_call_timeout_s, seconds_per_image=seconds_per_image)
        self.admission = Admission(cfg, self.engine, self.name)
        self.ready = True
        if runner.tf_threads:
            logger.info("TensorFlow thread pools sized to the container's CPU limit: %d", runner.tf_threads)
        logger.info("Loaded %s (version %r, image size %d, threshold %.4f, %s, %.0f ms per image)", path,
                    info.version or "unversioned", info.image_size, info.threshold, runner.precision,
                    1000 * seconds_per_image)
        return self.ready

    @staticmethod
    def _warm_up(runner: SavedModelRunner, info: ModelInfo) -> float:
        """Run both signatures (traces them, proves the model answers sensibly); return seconds per image."""
        rgb = np.linspace(0, 255, info.image_size * info.image_size * 3).reshape(info.image_size, info.image_size, 3)
        buffer = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buffer, "PNG")
        for name, probs in (("serving_default", runner.predict_images([buffer.getvalue()])),
                            ("serve_pixels", runner.predict_pixels(rgb[None].astype(np.float32)))):
            if probs.shape != (1,) or not np.all(np.isfinite(probs)) or not 0.0 <= float(probs[0]) <= 1.0:
                raise ModelLoadError(f"warm-up call of signature '{name}' returned {probs!r}; expected one "
                                     "probability in [0, 1]")
        started = time.monotonic()
        runner.predict_images([buffer.getvalue()])
        return max(1e-4, time.monotonic() - started)

    async def healthy(self) -> bool:
        """Loaded, and no model call has run past ``--model_call_timeout_s`` (the watchdog)."""
        return self.ready and self.engine is not None and self.engine.stalled_for() == 0

    def request_scope(self, headers: dict[str, str] | None, body_bytes: int,
                      time_remaining: float | None = None) -> AbstractContextManager[context.RequestScope]:
        """See ``serving.context.request_scope``: opened by the transport when a request arrives."""
        return context.request_scope(self._running()[1], headers, body_bytes, time_remaining)

    # --- metadata ---------------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        return [spec.metadata() for spec in INPUTS]

    def get_output_types(self) -> list[dict]:
        return [spec.metadata() for spec in OUTPUTS]

    def metadata_parameters(self) -> dict[str, Any]:
        """Model facts and server limits for the REST metadata endpoint (v2 parameters: scalar values only)."""
        info, cfg = self._info(), self.config
        params: dict[str, Any] = {
            "class_names": ",".join(info.class_names), "positive_class": info.positive_class,
            "negative_class": info.negative_class, "threshold": info.threshold,
            "threshold_source": info.threshold_source, "image_size": info.image_size,
            "pixels_datatypes": "UINT8,FP32", "image_formats": "PNG,JPEG",
            "max_images": cfg.max_images, "max_image_pixels": cfg.max_image_pixels,
            "max_request_bytes": cfg.max_request_bytes, "deadline_ms": cfg.deadline_ms,
        }
        if self.precision is not None:
            params.update(self.precision.parameters())
        if info.version:
            params["model_version"] = params["mlflow_run_id"] = info.version
        for key in ("dataset_fingerprint", "exported_at", "format_version"):
            value = info.extra.get(key)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                params[key] = value
        return params

    @property
    def version(self) -> str:
        return self._info().version

    def check_version(self, requested: str | None) -> None:
        """Raise VersionNotFound unless ``requested`` is empty or the served version."""
        if requested and requested != self.version:
            raise VersionNotFound(self.name, self.version, requested)

    def _info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError("model is not loaded")
        return self.info

    def loaded_admission(self) -> Admission:
        return self._running()[1]

    def _running(self) -> tuple[BatchingEngine, Admission]:
        if self.engine is None or self.admission is None:
            raise RuntimeError("model is not loaded")
        return self.engine, self.admission

    # --- inference --------------------------------------------------------------------------

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"model {clip(self.name)} speaks the v2 inference protocol: "
                               f"POST /v2/models/{self.name}/infer (or gRPC ModelInfer)")
        scope = context.current()
        with self.request_scope(headers, 0) if scope is None else nullcontext(scope) as scope:
            response_id = payload.id or scope.header_id or new_id()
            if response_headers is not None:
                response_headers["x-request-id"] = response_id
            return await self._predict(payload, scope, response_id, safe_id(response_id) or new_id())

    async def _predict(self, request: InferRequest, scope: context.RequestScope, response_id: str,
                       log_id: str) -> InferResponse:
        info, cfg = self._info(), self.config
        engine, admission = self._running()
        self.check_version(request.model_version)
        scope.shorten(context.client_timeout_s(_parameters(request)))
        outputs = parse_outputs(request)
        admission.hold(scope.ticket)  # a place in the queue while it is parsed (REST holds one already)
        loop = asyncio.get_running_loop()
        if scope.ticket.bytes > INLINE_PARSE_BYTES:
            batch = await loop.run_in_executor(self.parser, parse_inputs, request, cfg)
        else:
            batch = parse_inputs(request, cfg)
        payload: Any
        if isinstance(batch, ImageBatch):
            encoded = batch.encoded
            name, kind, payload = "image", IMAGES, encoded
            pixels = [image_pixels(b, i, cfg.max_image_pixels) for i, b in enumerate(encoded)]
        else:
            n, height, width, _ = batch.pixels.shape
            name, kind, payload, pixels = "pixels", pixels_kind(height, width), batch.pixels, [height * width] * n
        if scope.time_left() <= 0:
            metrics.DROPPED.labels(model_name=self.name, reason="deadline_exceeded").inc()
            raise DeadlineExceeded(scope.budget_s, "before the request was admitted")
        first_chunk = admission.admit(scope.ticket, len(pixels), engine.chunk_bounds(pixels)[0][1], sum(pixels),
                                      scope.time_left())
        if isinstance(batch, ImageBatch):
            await loop.run_in_executor(None, _verify_all, batch.encoded)
        admission.queued(scope.ticket)
        try:
            probs = await engine.run(kind, payload, pixels, request_id=log_id, deadline=scope.deadline,
                                     first_chunk=first_chunk)
        except TimeoutError:
            raise DeadlineExceeded(scope.budget_s, "while the request waited for or ran in the model") from None
        except ModelInputError as exc:
            raise InvalidInput(f"input '{name}': {exc}") from exc
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        prediction = Prediction(probs, [info.label_for(float(p)) for p in probs])
        # gRPC parameters carry only bool/int/string, so the threshold travels as text there.
        threshold = str(info.threshold) if request.from_grpc else info.threshold
        return build_response(request, outputs, prediction, model_name=self.name, model_version=info.version,
                              response_id=response_id,
                              parameters={"threshold": threshold, "positive_class": info.positive_class})


def _verify_all(encoded: list[bytes]) -> None:
    for i, data in enumerate(encoded):
        verify_image(data, i)


def _parameters(request: InferRequest) -> dict[str, Any]:
    return to_http_parameters(request.parameters) if request.parameters else {}
