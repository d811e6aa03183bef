"""kserve's DataPlane, told the truth about this server: readiness, metadata, versions, extensions.

kserve 0.21's DataPlane, which both its REST endpoints and its gRPC servicer
call, falls short here in ways a client or Kubernetes can see:

- ``ready()`` (``/v2/health/ready``, gRPC ServerReady, the pod's readinessProbe)
  is always true; here it is true only while every model is healthy, so the
  model-call watchdog takes the pod out of the Service;
- ``get_model()`` calls ``model.load()`` on a model that is not ready (a full
  SavedModel reload on the event loop); here it answers 503 / UNAVAILABLE;
- server metadata advertises ``model_repository_extension`` (whose calls this
  server refuses) and not the binary tensor data extension it does support;
- model metadata has ``platform: ""`` and no ``versions``, and nothing checks
  a requested version;
- unknown model names are echoed into errors and logs at any length.
"""

from __future__ import annotations

from typing import Any

from kserve.errors import ModelNotFound
from kserve.model import BaseKServeModel
from kserve.protocol.dataplane import DataPlane

from serving.errors import NotReady, clip

PLATFORM = "tensorflow_savedmodel"
#: v2 protocol extensions this server implements (the REST binary tensor data extension).
EXTENSIONS = ["binary_tensor_data"]


class ChestCtDataPlane(DataPlane):
    def metadata(self) -> dict:
        return {**super().metadata(), "extensions": list(EXTENSIONS)}

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models())
        return bool(models) and all([await self.model_registry.is_model_ready(name) for name in models])

    def get_model_from_registry(self, name: str) -> BaseKServeModel:
        model = self.model_registry.get_model(name)
        if model is None:
            raise ModelNotFound(clip(name))
        return model

    async def get_model(self, name: str) -> BaseKServeModel:
        model = self.get_model_from_registry(name)
        if not await self.model_registry.is_model_ready(name):
            raise NotReady(
                name, "It is loading, or a model call has run past --model_call_timeout_s; retry on another replica"
            )
        return model

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        self.get_model_from_registry(model_name)
        return await self.model_registry.is_model_ready(model_name)

    def check_version(self, model_name: str, model_version: str | None) -> None:
        """ModelNotFound (404 / NOT_FOUND) unless the model exists and serves ``model_version`` (empty: any)."""
        model = self.get_model_from_registry(model_name)
        check = getattr(model, "check_version", None)
        if model_version and check is not None and model.ready:
            check(model_version)

    async def model_metadata(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        """v2 model metadata plus ``versions``, ``platform`` and, when the model has them, ``parameters``."""
        self.check_version(model_name, model_version)
        result = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        result["platform"] = PLATFORM
        version = getattr(model, "version", "") if model.ready else ""
        if version:
            result["versions"] = [version]
        parameters = getattr(model, "metadata_parameters", None)
        if parameters is not None and model.ready:
            result["parameters"] = parameters()
        return result
