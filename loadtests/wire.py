"""The load test on the wire: the avatarfarm.v1 enum values for the trace's plain strings
(tiers, drive modes, session states), a trace room as a ``SessionSpec``, and the gRPC
channels that both simulated sides (the tenant client and the workers) open.

Kept apart from both sides because each must read what the other writes: a worker tells
the client's own EndSession from a preemption by ``END_REASON``.
"""

from __future__ import annotations

import grpc

from avatarfarm import client
from avatarfarm.v1 import types_pb2
from loadtests.trace import Room

TIER_PB = {"premium": types_pb2.TIER_PREMIUM, "standard": types_pb2.TIER_STANDARD,
           "best_effort": types_pb2.TIER_BEST_EFFORT}
TIER_NAME = {v: k for k, v in TIER_PB.items()}
DRIVE_PB = {"text": types_pb2.DRIVE_MODE_TEXT, "voice": types_pb2.DRIVE_MODE_VOICE,
            "mocap": types_pb2.DRIVE_MODE_MOCAP}
DRIVE_NAME = {v: k for k, v in DRIVE_PB.items()}
LIVE = (types_pb2.SESSION_STATE_PENDING, types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING)
STATE_NAME = {types_pb2.SESSION_STATE_PENDING: "pending", types_pb2.SESSION_STATE_PLACED: "placed",
              types_pb2.SESSION_STATE_RUNNING: "running", types_pb2.SESSION_STATE_ENDED: "ended",
              types_pb2.SESSION_STATE_FAILED: "failed"}
END_REASON = "ended by load generator"


def spec_pb(room: Room, room_id: str | None = None) -> types_pb2.SessionSpec:
    rid = room_id or room.room_id
    w, h, fps = room.quality
    return client.spec(room.tenant, rid, drive=DRIVE_PB[room.drive], tier=TIER_PB[room.tier],
                       width=w, height=h, fps=fps, avatar=room.avatar,
                       rtmp_url=f"rtmp://ingest.example.com/live/{room.tenant}-{rid}")


def channel(address: str) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own TCP connection.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
