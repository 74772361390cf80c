"""The one way this service intercepts gRPC calls: wrap each unary handler once per method.

Streaming handlers (health Watch, reflection) pass through untouched. Subclasses say what
the wrapper does in `wrap`; the wrapped handler is cached per method, so the wrapping
costs nothing per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[..., Awaitable[Any]]


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streams (health Watch, reflection) pass through
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                self.wrap(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return wrapped

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError
