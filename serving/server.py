"""kserve's ModelServer, assembled with this server's DataPlane, REST routes, gRPC servicer and repository policy."""

from __future__ import annotations

from typing import Any

import kserve.model_server as kserve_server
from kserve.model_server import ModelServer

from serving import rest
from serving.config import ServerConfig
from serving.dataplane import ChestCtDataPlane
from serving.grpc_server import ChestCtGRPCServer
from serving.repository import FixedModelRepository


class ChestCtModelServer(ModelServer):
    """Takes kserve's ModelServer arguments; replaces its DataPlane and gRPC server, adds the REST routes."""

    def __init__(self, config: ServerConfig, *, enable_grpc: bool = True, **kwargs: Any):
        super().__init__(enable_grpc=False, **kwargs)  # kserve's gRPC server is replaced below
        self.dataplane = ChestCtDataPlane(self.registered_models)
        self.model_repository_extension = FixedModelRepository(self.registered_models)
        rest.install(kserve_server.app, self.dataplane, config.max_request_bytes)
        # Concurrent gRPC calls: every request admission can hold (queued and running) plus as many being
        # refused at once; beyond it gRPC answers RESOURCE_EXHAUSTED without reading the message.
        max_rpcs = 2 * (config.max_queued_images + config.max_batch_size) + 16
        self._chest_grpc = (
            ChestCtGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=vars(kserve_server.args),
                grace_period=self.grace_period,
                max_concurrent_rpcs=max_rpcs,
            )
            if enable_grpc
            else None
        )

    def start(self, models: list) -> None:
        if self._chest_grpc is not None:
            self._grpc_server = self._chest_grpc  # ModelServer.stop() stops it under this name
            self.servers.append(self._chest_grpc.start(self.max_threads))
        super().start(models)
