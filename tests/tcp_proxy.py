"""A TCP relay between a process and a server, which a test can cut like a network
partition: the connections stay open and nothing more gets through either way (no
reset, no close: what a host cut off by the network sees)."""

from __future__ import annotations

import socket
import threading


class CuttableLink:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.cut = threading.Event()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="link-accept").start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                self._sockets.append(client)  # accepted, never answered
                continue
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.cut.is_set():
                continue  # swallowed: the peer hears nothing
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for s in self._sockets:
            s.close()
