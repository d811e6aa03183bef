"""The KServe model: v2 inference requests in, adenocarcinoma probability and label out.

``ChestCtModel`` is what ``kserve.ModelServer`` serves over REST and gRPC. It
validates the request (``serving.validation``), runs the SavedModel through
the batching engine (``serving.batching``) and builds the v2 response,
honouring the protocol options real clients use: ``outputs`` selection,
binary output data (REST) or raw output contents (gRPC), and the request id.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, RequestedOutput
from PIL import Image

from serving.batching import BatchingEngine
from serving.model_dir import ModelInfo, ModelLoadError, check_model_dir, read_model_info
from serving.runner import ModelInputError, SavedModelRunner
from serving.settings import ServingSettings
from serving.validation import (IMAGE_INPUT, LABEL_OUTPUT, PIXEL_DATATYPES, PIXELS_INPUT, PROBABILITY_OUTPUT,
                                ImageBatch, OutputRequest, check_image, parse_inputs, parse_outputs)


class VersionNotFound(ModelNotFound):
    """A request for a model version this server does not serve (404 / NOT_FOUND via kserve's handlers)."""

    def __init__(self, name: str, served: str, requested: str):
        super().__init__(name)
        self.reason = (f"model '{name}' has no version {requested!r}; it serves version {served!r}" if served else
                       f"model '{name}' is unversioned; leave the version out of the request")


class ChestCtModel(Model):
    """Serves one exported chest-ct SavedModel under ``name``."""

    def __init__(self, name: str, model_dir: str | Path, settings: ServingSettings | None = None):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.settings = settings or ServingSettings()
        self.info: ModelInfo | None = None
        self._engine: BatchingEngine | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the model, check its metadata and answer one warm-up call before reporting ready.

        Raises ModelLoadError with a readable message when the directory cannot be served.
        """
        path = check_model_dir(self.model_dir)
        info = read_model_info(path)
        runner = SavedModelRunner(path, max_batch_size=self.settings.max_batch_size)
        self._warm_up(runner, info)
        self.info = info
        self._engine = BatchingEngine(runner, self.settings.max_batch_size,
                                      self.settings.max_batch_wait_ms / 1000.0)
        self.ready = True
        if runner.tf_threads:
            logger.info("TensorFlow thread pools sized to the container's CPU limit: %d", runner.tf_threads)
        logger.info("Loaded %s (version %r, image size %d, threshold %.4f)", path, info.version or "unversioned",
                    info.image_size, info.threshold)
        return self.ready

    @staticmethod
    def _warm_up(runner: SavedModelRunner, info: ModelInfo) -> None:
        """Run both signatures once: traces/initialises them and proves the model answers sensibly."""
        rgb = np.linspace(0, 255, info.image_size * info.image_size * 3).reshape(info.image_size, info.image_size, 3)
        buffer = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buffer, "PNG")
        for name, probs in (("serving_default", runner.predict_images([buffer.getvalue()])),
                            ("serve_pixels", runner.predict_pixels(rgb[None].astype(np.float32)))):
            if probs.shape != (1,) or not np.all(np.isfinite(probs)) or not 0.0 <= float(probs[0]) <= 1.0:
                raise ModelLoadError(f"warm-up call of signature '{name}' returned {probs!r}; expected one "
                                     "probability in [0, 1]")

    # --- metadata ---------------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        return [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, -1, -1, 3]},
        ]

    def get_output_types(self) -> list[dict]:
        return [
            {"name": PROBABILITY_OUTPUT, "datatype": "FP32", "shape": [-1]},
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        ]

    def metadata_parameters(self) -> dict[str, Any]:
        """Model facts for the REST metadata endpoint (v2 parameters: scalar values only)."""
        info = self._info()
        params: dict[str, Any] = {
            "model_version": info.version,
            "mlflow_run_id": info.mlflow_run_id,
            "class_names": ",".join(info.class_names),
            "positive_class": info.positive_class,
            "negative_class": info.negative_class,
            "threshold": info.threshold,
            "threshold_source": info.threshold_source,
            "image_size": info.image_size,
            "pixels_datatypes": ",".join(PIXEL_DATATYPES),
            "image_formats": "PNG,JPEG",
            "max_images": self.settings.limits.max_images,
            "max_image_pixels": self.settings.limits.max_image_pixels,
            "max_request_bytes": self.settings.max_request_bytes,
        }
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

    # --- inference --------------------------------------------------------------------------

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"model '{self.name}' speaks the v2 inference protocol: "
                               f"POST /v2/models/{self.name}/infer (or gRPC ModelInfer)")
        info = self._info()
        self.check_version(payload.model_version)
        outputs = parse_outputs(payload)
        # Off the event loop: turning a large JSON tensor into numpy takes a while.
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(None, parse_inputs, payload, self.settings.limits)
        try:
            if isinstance(batch, ImageBatch):
                await self._check_images(batch.encoded)
                probs = await self._engine.images(batch.encoded)
            else:
                probs = await self._engine.pixels(batch.pixels)
        except ModelInputError as exc:
            name = IMAGE_INPUT if isinstance(batch, ImageBatch) else PIXELS_INPUT
            raise InvalidInput(f"input '{name}': {exc}") from exc
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        labels = [info.label_for(float(p)) for p in probs]
        return self._response(payload, outputs, probs, labels)

    async def _check_images(self, encoded: list[bytes]) -> None:
        """Pillow checks, off the event loop: decoding large images takes milliseconds each."""
        loop = asyncio.get_running_loop()
        limits = self.settings.limits
        await loop.run_in_executor(None, lambda: [check_image(b, i, limits) for i, b in enumerate(encoded)])

    def _response(self, request: InferRequest, outputs: OutputRequest, probs: np.ndarray,
                  labels: list[str]) -> InferResponse:
        info = self._info()
        n = len(probs)
        # kserve's to_grpc() only accepts lists safely; to_rest() takes numpy and honours binary_data.
        as_list = bool(request.from_grpc)
        values = {
            PROBABILITY_OUTPUT: ("FP32", probs.tolist() if as_list else probs),
            LABEL_OUTPUT: ("BYTES", labels if as_list else np.array(labels, dtype=np.object_)),
        }
        infer_outputs = [InferOutput(name=name, shape=[n], datatype=values[name][0], data=values[name][1])
                         for name in outputs.names]
        requested = [RequestedOutput(name, {"binary_data": outputs.binary[name]}) for name in outputs.names]
        # gRPC parameters carry only bool/int/string, so the threshold travels as text there.
        threshold = str(info.threshold) if request.from_grpc else info.threshold
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=info.version or None,
            infer_outputs=infer_outputs,
            parameters={"threshold": threshold, "positive_class": info.positive_class},
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=None if request.from_grpc else requested,
        )
