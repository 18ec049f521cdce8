"""What a following scheduler serves on the API port while another one leads.

Every call is refused with UNAVAILABLE, naming the leader's address in the message
and in the trailing metadata (`avatarfarm-leader`), so a client that reached a
follower can go to the leader. Health answers NOT_SERVING for the process (""): a
health check says this replica does not serve the API, and SERVING for
`REPLICA_HEALTH`: the replica does its part. Nothing is read or changed here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from avatarfarm.client import LEADER_METADATA
from avatarfarm.serving import bind
from avatarfarm.v1 import admin_pb2, avatars_pb2, sessions_pb2, workers_pb2
from scheduler.state.store import Lease

# The health of a replica doing its part, leading or following (health "" is SERVING on
# the leader alone): what a Kubernetes probe of every replica asks.
REPLICA_HEALTH = "avatarfarm.replica"
# The leader's services, each method of which a follower refuses.
SERVICES = tuple(module.DESCRIPTOR.services_by_name[name] for module, name in (
    (admin_pb2, "AdminService"), (sessions_pb2, "SessionService"),
    (workers_pb2, "WorkerService"), (avatars_pb2, "AvatarService")))


class FollowerServer:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port
        self.leader: Lease | None = None

    @classmethod
    async def start(cls, address: str, credentials: grpc.ServerCredentials | None,
                    options: list[tuple[str, Any]], leader: Lease | None = None) -> FollowerServer:
        """`leader`: the lease as last read, so the first call is told where to go."""
        server = grpc.aio.server(options=options)
        follower = cls(server, 0)
        follower.leader = leader
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        # One streaming handler for every method: it refuses before reading anything, so
        # unary and streaming calls alike get the refusal at once.
        refuse = grpc.stream_stream_rpc_method_handler(follower.refuse)
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(d.full_name, {m.name: refuse for m in d.methods})
            for d in SERVICES])
        follower.port = bind(server, address, credentials)
        await server.start()
        await checks.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await checks.set(REPLICA_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        return follower

    def follow(self, lease: Lease | None) -> None:
        self.leader = lease

    async def refuse(self, requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        lease = self.leader
        if lease is not None and lease.held and lease.address:
            context.set_trailing_metadata(((LEADER_METADATA, lease.address),))
            why = f"this scheduler follows; the leader is at {lease.address}"
        else:
            why = "this scheduler follows, and no scheduler leads at the moment: retry shortly"
        await context.abort(grpc.StatusCode.UNAVAILABLE, why)
        yield b""  # never reached: makes this an async generator

    async def stop(self) -> None:
        await self.server.stop(0)
