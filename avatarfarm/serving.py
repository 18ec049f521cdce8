"""What both server processes share: binding the gRPC port (plain or TLS), adding
services with strict request decoding and an optional gate, and the Prometheus
/metrics endpoint (with read-only pages next to it, where a process has any).

grpc answers a request it cannot decode with INTERNAL ("Exception deserializing
request"), which blames the server for the caller's bytes. `add_service` builds
each service's handlers from its descriptor (the generated code stays as it is)
with a deserializer that never raises: undecodable bytes become a `Malformed`
marker, which the handler turns into INVALID_ARGUMENT before the servicer sees it,
for single requests and for each message of a request stream alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, make_wsgi_app

from avatarfarm.domain import Unavailable

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Runs before a call reaches its servicer (method is "/package.Service/Method"), with
# the request where the call has one message (None for a request stream); it aborts
# the call to refuse it, and returns when the caller's credential expires (Unix
# seconds; None: it does not), which ends a response stream then.
Gate = Callable[[str, grpc.aio.ServicerContext, Any], Awaitable[float | None]]
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
    """A larger message is refused with RESOURCE_EXHAUSTED and the server goes on.
    Clients may ping as often as `KEEPALIVE` does (by default a server takes a ping
    more often than every 5 minutes on a quiet stream as abuse, and hangs up)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1)]


# A long-lived stream's client pings its server every 2 s and gives up on it after 2 s
# more without an answer: a server that froze (a paused process, a partitioned host)
# holds its TCP connections open, and only a ping that goes unanswered shows it.
KEEPALIVE = (("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))


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


async def _until(responses: AsyncIterator[Any], until: float | None,
                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """`responses` until the credential's expiry (`until`, Unix seconds), then
    UNAUTHENTICATED: a stream does not outlive the token that opened it."""
    if until is None:
        async for r in responses:
            yield r
        return
    it = aiter(responses)

    async def step() -> tuple[bool, Any]:
        try:
            return True, await anext(it)
        except StopAsyncIteration:
            return False, None

    nxt: asyncio.Future[tuple[bool, Any]] | None = None
    try:
        while True:
            left = until - time.time()
            if left <= 0:
                break
            # The next response in a task of its own (it inherits the call's context), so
            # that waiting for it can end at the expiry.
            nxt = asyncio.ensure_future(step())
            done, _ = await asyncio.wait({nxt}, timeout=left)
            if not done:
                break
            more, response = nxt.result()
            nxt = None
            if not more:
                return
            yield response
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "the credential this stream was opened with expired: open it "
                            "again with a renewed one")
    finally:
        if nxt is not None:
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        closing = getattr(it, "aclose", None)
        if closing is not None:
            with contextlib.suppress(BaseException):
                await closing()


def _handler(method: str, desc: MethodDescriptor, impl: Callable[..., Any], gate: Gate | None,
             check: StreamCheck | None) -> grpc.RpcMethodHandler:
    request_cls = message_factory.GetMessageClass(desc.input_type)
    response_cls = message_factory.GetMessageClass(desc.output_type)
    decode, encode = _lenient(request_cls), response_cls.SerializeToString

    async def enter(context: grpc.aio.ServicerContext, request: Any = None) -> float | None:
        return await gate(method, context, request) if gate is not None else None

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
            await enter(context, None if isinstance(request, Malformed) else request)
            await _refuse_malformed(request, context)
            try:
                return await impl(request, context)
            except Unavailable as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)

    if not desc.client_streaming:
        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            until = await enter(context)
            await _refuse_malformed(request, context)
            try:
                if inspect.isasyncgenfunction(impl):
                    async for response in _until(impl(request, context), until, context):
                        yield response
                else:  # a servicer that writes with context.write()
                    await impl(request, context)
            except Unavailable as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)

    if not desc.server_streaming:
        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            try:
                return await impl(checked(requests, context), context)
            except Unavailable as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        until = await enter(context)
        try:
            if inspect.isasyncgenfunction(impl):
                async for response in _until(impl(checked(requests, context), context), until,
                                             context):
                    yield response
            else:
                await impl(checked(requests, context), context)
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
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


@dataclass(frozen=True, slots=True)
class Service:
    """One gRPC service of a process: its servicer, the gate before each call and the
    check on each message of a request stream."""

    descriptor: ServiceDescriptor
    servicer: object
    gate: Gate | None = None
    check: StreamCheck | None = None


@dataclass(slots=True)
class GrpcServer:
    """A process's gRPC server, bound and started with its services and the standard
    health service (`start`); the process says when it is serving (`serving`)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: tuple[str, ...]

    @classmethod
    async def start(cls, address: str, credentials: grpc.ServerCredentials | None,
                    services: Iterable[Service], options: Iterable[tuple[str, Any]]) -> GrpcServer:
        """Raises OSError when the address cannot be bound (nothing is left running)."""
        server = grpc.aio.server(options=list(options))
        names = []
        for s in services:
            add_service(server, s.descriptor, s.servicer, gate=s.gate, check=s.check)
            names.append(s.descriptor.full_name)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = bind(server, address, credentials)
        await server.start()
        return cls(server, port, health_servicer, tuple(names))

    async def serving(self, on: bool = True, *, each_service: bool = True) -> None:
        """Health for the process ("") and, unless `each_service` is False, each service
        (a worker leaving stops taking rooms while its live inputs keep serving)."""
        status = health_pb2.HealthCheckResponse.SERVING if on else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *(self.services if each_service else ())):
            await self.health.set(name, status)


@dataclass(frozen=True, slots=True)
class Page:
    """One answer of a page served next to /metrics."""

    body: bytes
    content_type: str
    status: str = "200 OK"
    headers: tuple[tuple[str, str], ...] = ()


# Builds a page's answer per request, on the HTTP server's thread: it must not touch
# state that belongs to an event loop.
PageHandler = Callable[[], Page]
# Decides, before any page is built, whether a request may see the pages: given its
# headers (names in lower case), a refusal to answer with, or None to serve. /metrics
# is not guarded (scrapers send no credentials; it shows counters, not rooms).
PageGuard = Callable[[Mapping[str, str]], Page | None]

# WSGI's two callables, as the standard library leaves them untyped.
_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]

_READ_ONLY = ("GET", "HEAD")
# Every page: never cached (it shows live state) nor sniffed as another type.
_PAGE_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


def _headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """A WSGI request's headers by lower-case name (Host included)."""
    out = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items()
           if k.startswith("HTTP_")}
    for k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(k):
            out[k.replace("_", "-").lower()] = str(environ[k])
    return out


def _site(metrics: _App, pages: Mapping[str, PageHandler], guard: PageGuard | None = None) -> _App:
    """/metrics as Prometheus serves it, the read-only pages by exact path (each request
    past `guard` first), 404 else."""
    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        handler = pages.get(path)
        refused = guard(_headers(environ)) if handler is not None and guard is not None else None
        if refused is not None:
            page = refused
        elif handler is None:
            if path == "/metrics":
                return metrics(environ, start_response)
            known = ", ".join(sorted({"/metrics", *pages}))
            page = Page(f"nothing at {path}; this port serves {known}\n".encode(),
                        "text/plain; charset=utf-8", "404 Not Found")
        elif environ["REQUEST_METHOD"] not in _READ_ONLY:
            page = Page(b"read-only: use GET or HEAD\n", "text/plain; charset=utf-8",
                        "405 Method Not Allowed", (("Allow", ", ".join(_READ_ONLY)),))
        else:
            try:
                page = handler()
            except Exception:  # one broken page must not take the port down
                log.exception("page %s failed", path)
                page = Page(b"this page failed; the server's log says why\n",
                            "text/plain; charset=utf-8", "500 Internal Server Error")
        start_response(page.status, [("Content-Type", page.content_type),
                                     ("Content-Length", str(len(page.body))),
                                     *_PAGE_HEADERS, *page.headers])
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else page.body]
    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes arrive every few seconds: no line per request."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    # A slow client holds its own thread, not the scrape behind it; daemon threads
    # are not gathered for joining, so they cost nothing once answered.
    daemon_threads = True


def _serve(app: _App, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    # The address family follows the host, so an IPv6 metrics_host binds too.
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server_class: type[_ThreadingServer] = type("_Server", (_ThreadingServer,),
                                                {"address_family": family})
    server = make_server(str(sockaddr[0]), port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


@dataclass
class MetricsEndpoint:
    """The Prometheus endpoint of a process, on its own thread. Without pages every
    path answers with the metrics, as Prometheus's own server does; with pages,
    /metrics does, each page answers GET and HEAD (405 otherwise) at its exact path,
    and any other path is 404."""

    port: int
    _server: Any = None
    _thread: threading.Thread | None = None

    @staticmethod
    def start(port: int, host: str, registry: CollectorRegistry,
              pages: Mapping[str, PageHandler] | None = None,
              guard: PageGuard | None = None) -> MetricsEndpoint:
        """Port 0 serves nothing; -1 picks any free port. `guard` sees every page request
        first (see PageGuard)."""
        if port == 0:
            return MetricsEndpoint(0)
        metrics: _App = make_wsgi_app(registry)
        app = _site(metrics, dict(pages), guard) if pages else metrics
        server, thread = _serve(app, host, max(port, 0))
        return MetricsEndpoint(server.server_port, server, thread)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(2)
