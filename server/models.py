"""The Models service: what a request's ``model`` may name, from the routing table."""

from __future__ import annotations

import time

from venna.responses.v1 import models_pb2, models_pb2_grpc
from venna.server import auth
from venna.server.routing import Router


class ModelsService(models_pb2_grpc.ModelsServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router
        # The date of models whose upstream gives none.
        self._started = int(time.time())

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: auth.Context
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            object="list",
            data=[
                models_pb2.Model(
                    id=model.id,
                    object="model",
                    created=model.created if model.created is not None else self._started,
                    owned_by=model.owned_by,
                )
                for model in await self._router.list_models()
            ],
        )
