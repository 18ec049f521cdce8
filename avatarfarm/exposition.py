"""The Prometheus /metrics endpoint both processes serve."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


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
