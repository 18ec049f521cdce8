"""What both server processes share: binding the gRPC port (plain or TLS), adding
services with strict request decoding and an optional gate, and the Prometheus
/metrics endpoint.

grpc answers a request it cannot decode with INTERNAL ("Exception deserializing
request"), which blames the server for the caller's bytes. `add_service` builds
each service's handlers from its descriptor (the generated code stays as it is)
with a deserializer that never raises: undecodable bytes become a `Malformed`
marker, which the handler turns into INVALID_ARGUMENT before the servicer sees it,
for single requests and for each message of a request stream alike.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from prometheus_client import CollectorRegistry, start_http_server

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Runs before a call reaches its servicer (method is "/package.Service/Method"); it
# aborts the call to refuse it.
Gate = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]
# Runs on each message of a request stream before the servicer gets it; aborts to refuse.
StreamCheck = Callable[[str, Any, grpc.aio.ServicerContext], Awaitable[None]]


def bind(server: grpc.aio.Server, address: str,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds ``address`` (port 0: any free port), with TLS when given credentials, and
    returns the port; a failed bind, which grpc reports as RuntimeError, becomes the
    OSError it is."""
    try:
        if credentials is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, credentials))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: the address is in use or invalid") from e


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """A larger message is refused with RESOURCE_EXHAUSTED and the server goes on."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes are not a valid message of the method's request type."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name}: {self.reason}"


def _lenient(cls: type[message.Message]) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def decode(data: bytes) -> message.Message | Malformed:
        try:
            return cls.FromString(data)
        except message.DecodeError as e:
            reason = str(e).partition(": ")[2] or "it does not parse"
            return Malformed(name, reason)
    return decode


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _handler(method: str, desc: MethodDescriptor, impl: Callable[..., Any], gate: Gate | None,
             check: StreamCheck | None) -> grpc.RpcMethodHandler:
    request_cls = message_factory.GetMessageClass(desc.input_type)
    response_cls = message_factory.GetMessageClass(desc.output_type)
    decode, encode = _lenient(request_cls), response_cls.SerializeToString

    async def enter(context: grpc.aio.ServicerContext) -> None:
        if gate is not None:
            await gate(method, context)

    def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            async for request in requests:
                await _refuse_malformed(request, context)
                if check is not None:
                    await check(method, request, context)
                yield request
        return gen()

    if not desc.client_streaming and not desc.server_streaming:
        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            await _refuse_malformed(request, context)
            return await impl(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)

    if not desc.client_streaming:
        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await enter(context)
            await _refuse_malformed(request, context)
            if inspect.isasyncgenfunction(impl):
                async for response in impl(request, context):
                    yield response
            else:  # a servicer that writes with context.write()
                await impl(request, context)
        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)

    if not desc.server_streaming:
        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            return await impl(checked(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await enter(context)
        if inspect.isasyncgenfunction(impl):
            async for response in impl(checked(requests, context), context):
                yield response
        else:
            await impl(checked(requests, context), context)
    return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, *,
                gate: Gate | None = None, check: StreamCheck | None = None) -> None:
    """Adds `servicer` for every method of `service`, as the generated ``add_..._to_server``
    does, with strict decoding, the `gate` before each call and `check` on each message
    of a request stream."""
    handlers = {
        desc.name: _handler(f"/{service.full_name}/{desc.name}", desc, getattr(servicer, desc.name),
                            gate, check)
        for desc in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


@dataclass
class MetricsEndpoint:
    port: int
    _server: Any = None
    _thread: threading.Thread | None = None

    @staticmethod
    def start(port: int, host: str, registry: CollectorRegistry) -> MetricsEndpoint:
        """Port 0 serves nothing; -1 picks any free port."""
        if port == 0:
            return MetricsEndpoint(0)
        server, thread = start_http_server(max(port, 0), addr=host, registry=registry)
        return MetricsEndpoint(server.server_port, server, thread)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(2)
