"""The KServe model: v2 inference requests in, adenocarcinoma probability and label out.

``ChestCtModel`` is what ``kserve.ModelServer`` serves over REST and gRPC. Its
``predict`` parses the request (``serving.inputs``, ``serving.outputs``), asks
admission for room (``serving.admission``), checks image files with Pillow
(``serving.images``) or reads DICOM files into Hounsfield units with pydicom
(``serving.dicom``), runs the SavedModel through the batching engine
(``serving.batching``) within the request's deadline, records what it saw for
drift monitoring (``serving.drift``) and builds the response. An image the
SavedModel's out-of-distribution guard rejects is labelled ``unsupported-input``.
A request that names the opt-in output ``heatmap`` runs the explain signature of
its input kind instead of the predict one (a separate batch kind, same budgets).

(Over 300 lines: kserve calls load, readiness, metadata and predict on this one ``Model`` object; each
is a thin layer over the modules above, and the request path reads as one sequence.)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger
from kserve.protocol.infer_type import InferRequest, InferResponse, to_http_parameters

from serving import context, drift, metrics
from serving.admission import Admission
from serving.batching import IMAGES, BatchingEngine, explaining, hu_kind, pixels_kind
from serving.config import ServerConfig
from serving.dicom import DicomError, DicomSlice, read_header, to_hu
from serving.errors import DeadlineExceeded, clip, new_id, safe_id
from serving.images import image_pixels, verify_image
from serving.inputs import INPUTS, DicomBatch, ImageBatch, parse_inputs
from serving.model_dir import ModelInfo, check_model_dir, read_model_info
from serving.outputs import (
    DEFAULT_OUTPUTS,
    HEATMAP,
    OUTPUTS,
    UNSUPPORTED_INPUT,
    Prediction,
    build_response,
    parse_outputs,
)
from serving.precision import PrecisionState, cpu_bf16, settle_precision
from serving.runner import HEATMAP_KEY, ModelInputError, SavedModelRunner
from serving.warm_up import warm_up

#: Requests larger than this are parsed in the one parser thread, so at most one large body at a time is
#: expanded into Python objects and numpy arrays; smaller ones are parsed on the event loop (sub-millisecond).
INLINE_PARSE_BYTES = 1024 * 1024


class VersionNotFound(ModelNotFound):
    """A request for a model version this server does not serve (404 / NOT_FOUND via kserve's handlers)."""

    def __init__(self, name: str, served: str, requested: str):
        super().__init__(clip(name))
        self.reason = (
            f"model {clip(name)} has no version {clip(requested)}; it serves version {served!r}"
            if served
            else f"model {clip(name)} is unversioned; leave the version out of the request"
        )


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
        #: (h, w) of the ``heatmap`` output; None when the model has no explain signatures.
        self.heatmap_grid: tuple[int, int] | None = None
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
        self.precision = settle_precision(
            runner,
            info.golden,
            info.golden_problem,
            info.threshold,
            cfg.precision,
            cfg.precision_tolerance,
            cpu_bf16(),
            runner.gpus(),
        )
        (logger.warning if self.precision.fell_back else logger.info)(
            "Precision %s: %s", self.precision.precision, self.precision.reason
        )
        warm = warm_up(runner, info)
        seconds_per_image = warm.seconds_per_image
        self.info, self.heatmap_grid = info, warm.heatmap_grid
        self.engine = BatchingEngine(
            runner,
            model_name=self.name,
            max_batch_size=cfg.max_batch_size,
            max_call_pixels=cfg.max_call_pixels,
            max_wait_s=cfg.max_batch_wait_s,
            call_timeout_s=cfg.model_call_timeout_s,
            seconds_per_image=seconds_per_image,
            explain_seconds_per_image=warm.explain_seconds_per_image,
        )
        self.admission = Admission(cfg, self.engine, self.name)
        drift.create_series(self.name, info.ood_threshold)
        self.ready = True
        if runner.tf_threads:
            logger.info("TensorFlow thread pools sized to the container's CPU limit: %d", runner.tf_threads)
        heatmap = (
            f"heatmap {warm.heatmap_grid[0]}x{warm.heatmap_grid[1]} (opt-in), "
            f"{1000 * (warm.explain_seconds_per_image or 0):.0f} ms per image with it"
            if warm.heatmap_grid
            else "no heatmap (the model has no explain signatures)"
        )
        logger.info(
            "Loaded %s (version %r, image size %d, threshold %.4f, ood threshold %.4f, %s, %.0f ms per image; %s)",
            path,
            info.version or "unversioned",
            info.image_size,
            info.threshold,
            info.ood_threshold,
            runner.precision,
            1000 * seconds_per_image,
            heatmap,
        )
        return self.ready

    async def healthy(self) -> bool:
        """Loaded, and no model call has run past ``--model_call_timeout_s`` (the watchdog)."""
        return self.ready and self.engine is not None and self.engine.stalled_for() == 0

    def request_scope(
        self, headers: dict[str, str] | None, body_bytes: int, time_remaining: float | None = None
    ) -> AbstractContextManager[context.RequestScope]:
        """See ``serving.context.request_scope``: opened by the transport when a request arrives."""
        return context.request_scope(self._running()[1], headers, body_bytes, time_remaining)

    # --- metadata ---------------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        return [spec.metadata() for spec in INPUTS]

    def get_output_types(self) -> list[dict]:
        """The outputs, ``heatmap`` (opt-in) with its grid and only when the model has the explain signatures."""
        types = []
        for spec in OUTPUTS:
            meta = spec.metadata()
            if spec.name == HEATMAP:
                if self.heatmap_grid is None:
                    continue
                meta["shape"] = [-1, *self.heatmap_grid]
            types.append(meta)
        return types

    def metadata_parameters(self) -> dict[str, Any]:
        """Model facts and server limits for the REST metadata endpoint (v2 parameters: scalar values only)."""
        info, cfg = self._info(), self.config
        params: dict[str, Any] = {
            "class_names": ",".join(info.class_names),
            "positive_class": info.positive_class,
            "negative_class": info.negative_class,
            "threshold": info.threshold,
            "threshold_source": info.threshold_source,
            "image_size": info.image_size,
            "pixels_datatypes": "UINT8,FP32",
            "image_formats": "PNG,JPEG",
            "dicom": "DICOM Part 10 CT slices, one frame, one size per request",
            "ood_threshold": info.ood_threshold,
            "unsupported_label": UNSUPPORTED_INPUT,
            "window_level": info.window[0],
            "window_width": info.window[1],
            "max_images": cfg.max_images,
            "max_image_pixels": cfg.max_image_pixels,
            "max_request_bytes": cfg.max_request_bytes,
            "deadline_ms": cfg.deadline_ms,
            "default_outputs": ",".join(DEFAULT_OUTPUTS),
        }
        if self.heatmap_grid is not None:  # opt-in: the protocol's default ("all outputs") leaves it out
            found = info.extra.get("heatmap")
            heatmap: dict[str, Any] = found if isinstance(found, dict) else {}
            params.update(
                {
                    "opt_in_outputs": HEATMAP,
                    "heatmap_grid_height": self.heatmap_grid[0],
                    "heatmap_grid_width": self.heatmap_grid[1],
                }
            )
            for key in ("layer", "method"):
                if isinstance(heatmap.get(key), str):
                    params[f"heatmap_{key}"] = heatmap[key]
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

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(
                f"model {clip(self.name)} speaks the v2 inference protocol: "
                f"POST /v2/models/{self.name}/infer (or gRPC ModelInfer)"
            )
        scope = context.current()
        with self.request_scope(headers, 0) if scope is None else nullcontext(scope) as scope:
            response_id = payload.id or scope.header_id or new_id()
            if response_headers is not None:
                response_headers["x-request-id"] = response_id
            return await self._predict(payload, scope, response_id, safe_id(response_id) or new_id())

    async def _predict(
        self, request: InferRequest, scope: context.RequestScope, response_id: str, log_id: str
    ) -> InferResponse:
        info, cfg = self._info(), self.config
        engine, admission = self._running()
        self.check_version(request.model_version)
        scope.shorten(context.client_timeout_s(_parameters(request)))
        outputs = parse_outputs(request, heatmap_available=self.heatmap_grid is not None)
        admission.hold(scope.ticket)  # a place in the queue while it is parsed (REST holds one already)
        loop = asyncio.get_running_loop()
        if scope.ticket.bytes > INLINE_PARSE_BYTES:
            batch = await loop.run_in_executor(self.parser, parse_inputs, request, cfg)
        else:
            batch = parse_inputs(request, cfg)
        payload: Any
        slices: list[DicomSlice] = []
        if isinstance(batch, ImageBatch):
            encoded = batch.encoded
            name, kind, payload = "image", IMAGES, encoded
            pixels = [image_pixels(b, i, cfg.max_image_pixels) for i, b in enumerate(encoded)]
        elif isinstance(batch, DicomBatch):  # headers parsed off the event loop: pydicom reads the whole file
            slices = await loop.run_in_executor(None, _dicom_headers, batch.encoded, cfg.max_image_pixels)
            name, kind, payload = "dicom", hu_kind(slices[0].rows, slices[0].columns), None
            pixels = [s.pixels for s in slices]
        else:
            n, height, width, _ = batch.pixels.shape
            name, kind, payload, pixels = "pixels", pixels_kind(height, width), batch.pixels, [height * width] * n
        if outputs.explain:
            kind = explaining(kind)
        if scope.time_left() <= 0:
            metrics.DROPPED.labels(model_name=self.name, reason="deadline_exceeded").inc()
            raise DeadlineExceeded(scope.budget_s, "before the request was admitted")
        first_chunk = admission.admit(
            scope.ticket,
            len(pixels),
            engine.chunk_bounds(pixels)[0][1],
            sum(pixels),
            scope.time_left(),
            explain=outputs.explain,
        )
        if isinstance(batch, ImageBatch):
            await loop.run_in_executor(None, _verify_all, batch.encoded)
        elif slices:
            payload = await loop.run_in_executor(None, _hu_all, slices)
            del slices
        admission.queued(scope.ticket)
        try:
            result = await engine.run(
                kind, payload, pixels, request_id=log_id, deadline=scope.deadline, first_chunk=first_chunk
            )
        except TimeoutError:
            raise DeadlineExceeded(scope.budget_s, "while the request waited for or ran in the model") from None
        except ModelInputError as exc:
            raise InvalidInput(f"input '{name}': {exc}") from exc
        prediction = self._prediction(result)
        drift.observe(self.name, prediction.probability, prediction.ood_score, prediction.in_distribution)
        # gRPC parameters carry only bool/int/string, so thresholds travel as text there.
        threshold: float | str = info.threshold
        ood_threshold: float | str = info.ood_threshold
        if request.from_grpc:
            threshold, ood_threshold = str(threshold), str(ood_threshold)
        return build_response(
            request,
            outputs,
            prediction,
            model_name=self.name,
            model_version=info.version,
            response_id=response_id,
            parameters={"threshold": threshold, "positive_class": info.positive_class, "ood_threshold": ood_threshold},
        )

    def _prediction(self, result: np.ndarray) -> Prediction:
        """The engine's records as outputs; an image outside the training distribution is ``unsupported-input``."""
        info = self._info()
        probs = np.asarray(result["probability"], dtype=np.float32).reshape(-1)
        inside = np.asarray(result["in_distribution"], dtype=np.bool_).reshape(-1)
        labels = [info.label_for(float(p)) if ok else UNSUPPORTED_INPUT for p, ok in zip(probs, inside, strict=True)]
        heatmap = (
            np.asarray(result[HEATMAP_KEY], dtype=np.float32) if HEATMAP_KEY in (result.dtype.names or ()) else None
        )
        return Prediction(probs, labels, np.asarray(result["ood_score"], dtype=np.float32).reshape(-1), inside, heatmap)


def _verify_all(encoded: list[bytes]) -> None:
    for i, data in enumerate(encoded):
        verify_image(data, i)


def _dicom_headers(encoded: list[bytes], max_pixels: int) -> list[DicomSlice]:
    """Every file's checked header; all slices of a request must share one size (one model input tensor)."""
    slices = []
    for i, data in enumerate(encoded):
        try:
            slices.append(read_header(data, max_pixels))
        except DicomError as exc:
            raise InvalidInput(f"input 'dicom' element {i}: {exc.reason}") from None
        first = slices[0]
        if (slices[-1].rows, slices[-1].columns) != (first.rows, first.columns):
            raise InvalidInput(
                f"input 'dicom' element {i} is {slices[-1].columns}x{slices[-1].rows} but element 0 "
                f"is {first.columns}x{first.rows}; send slices of one size per request"
            )
    return slices


def _hu_all(slices: list[DicomSlice]) -> np.ndarray:
    """Every slice in Hounsfield units, float32 ``[N, H, W]``."""
    out = np.empty((len(slices), slices[0].rows, slices[0].columns), np.float32)
    for i, dicom in enumerate(slices):
        try:
            out[i] = to_hu(dicom)
        except DicomError as exc:
            raise InvalidInput(f"input 'dicom' element {i}: {exc.reason}") from None
    return out


def _parameters(request: InferRequest) -> dict[str, Any]:
    return to_http_parameters(request.parameters) if request.parameters else {}
