"""What both server processes share: binding the gRPC port and the Prometheus
/metrics endpoint."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server


def bind(server: grpc.aio.Server, address: str) -> int:
    """Binds ``address`` (port 0: any free port) and returns the port; a failed bind,
    which grpc reports as RuntimeError, becomes the OSError it is."""
    try:
        return int(server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: the address is in use or invalid") from e


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
