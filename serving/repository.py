"""Refuse the v2 model repository extension's load/unload calls.

kserve serves ``POST /v2/repository/models/{name}/unload`` (and the gRPC
``RepositoryModelUnload``) to anyone who can reach the predictor. For this
single-model server, an unload would leave the pod alive but permanently
unable to serve (liveness passes, so Kubernetes never restarts it), and load
cannot bring the model back. Model changes go through a new InferenceService
revision instead, so both calls are refused; listing the repository still works.
"""

from __future__ import annotations

from kserve.protocol.model_repository_extension import ModelRepositoryExtension


class RepositoryChangesDisabled(NotImplementedError):
    """Answered as 501 (REST) / UNIMPLEMENTED (gRPC) by kserve's error handlers."""

    def __init__(self, action: str, model_name: str):
        self.reason = (
            f"{action} of model '{model_name}' is disabled: this server serves one fixed model; "
            "deploy a new InferenceService revision to change it"
        )
        super().__init__(self.reason)


class FixedModelRepository(ModelRepositoryExtension):
    async def load(self, model_name: str) -> None:
        raise RepositoryChangesDisabled("load", model_name)

    async def unload(self, model_name: str) -> None:
        raise RepositoryChangesDisabled("unload", model_name)
