"""What a worker may say of itself: the pure checks, and refusals on a real stream."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from avatarfarm.domain import InvalidRequest
from avatarfarm.v1 import workers_pb2
from scheduler.api.registration import check_endpoint, check_register, endpoint_parts, peer_address
from tests.scheduler.api.test_service import ProtocolWorker, run, scheduler


def good() -> workers_pb2.Register:
    return workers_pb2.Register(
        worker_id="gpu-0", input_endpoint="10.0.0.7:50061", avatars=["presenter"],
        face_families=["wav2lip", "ultralight/wenet"], voices=["en_US-joe-medium", "shop.voice+1"],
        device=workers_pb2.Device(provider="CUDAExecutionProvider", device_type="h200",
                                  cpu_cores=16, memory_bytes=140 * 2**30, latency_budget_seconds=0.5),
        profiles=[workers_pb2.LatencyProfile(stage=workers_pb2.STAGE_RENDER, width=512, height=512,
                                             latencies=[workers_pb2.BatchLatency(batch_size=8,
                                                                                 seconds=0.02)])])


def latency(seconds: float = 0.02, batch: int = 8) -> Callable[[workers_pb2.Register], None]:
    def set_(r: workers_pb2.Register) -> None:
        r.profiles[0].latencies[0].batch_size = batch
        r.profiles[0].latencies[0].seconds = seconds
    return set_


IMPOSSIBLE: dict[str, Callable[[workers_pb2.Register], Any]] = {
    "no id": lambda r: setattr(r, "worker_id", ""),
    "id with a slash": lambda r: setattr(r, "worker_id", "a/b"),
    "device type as a metric label injection": lambda r: setattr(r.device, "device_type", 'x"}'),
    "provider with spaces": lambda r: setattr(r.device, "provider", "CUDA Provider; rm"),
    "NaN latency": latency(math.nan),
    "endless latency": latency(math.inf),
    "free call": latency(0.0),
    "negative call": latency(-1.0),
    "an hour per call": latency(3600.0),
    "batch of zero": latency(batch=0),
    "batch of a million": latency(batch=1_000_000),
    "NaN budget": lambda r: setattr(r.device, "latency_budget_seconds", math.nan),
    "NaN memory per pixel": lambda r: setattr(r.memory, "room_bytes_per_pixel", math.nan),
    "bad avatar id": lambda r: r.avatars.append("../x"),
    "face family with a label injection": lambda r: r.face_families.append('wav2lip"}'),
    "face family with two variants": lambda r: r.face_families.append("ultralight/wenet/x"),
    "a thousand face families": lambda r: r.face_families.extend(f"f{i}" for i in range(1000)),
    "a voice with a label injection": lambda r: r.voices.append('joe"}'),
    "an empty voice name": lambda r: r.voices.append(""),
    "two thousand voices": lambda r: r.voices.extend(f"v{i}" for i in range(2000)),
    "endpoint without port": lambda r: setattr(r, "input_endpoint", "10.0.0.7"),
    "endpoint port 0": lambda r: setattr(r, "input_endpoint", "10.0.0.7:0"),
    "endpoint with a path": lambda r: setattr(r, "input_endpoint", "evil.example/x:1"),
    "endpoint with user info": lambda r: setattr(r, "input_endpoint", "u@evil.example:1"),
}


def test_a_plausible_registration_passes() -> None:
    check_register(good())


@pytest.mark.parametrize("change", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_registrations_are_refused(change: Callable[[workers_pb2.Register], Any]) -> None:
    reg = good()
    change(reg)
    with pytest.raises(InvalidRequest):
        check_register(reg)


@pytest.mark.parametrize("endpoint,parts", [("10.0.0.7:50061", ("10.0.0.7", 50061)),
                                            ("[fd00::7]:1", ("fd00::7", 1)),
                                            ("worker-0.pool.svc:50061", ("worker-0.pool.svc", 50061))])
def test_endpoints_are_taken_apart(endpoint: str, parts: tuple[str, int]) -> None:
    assert endpoint_parts(endpoint) == parts


def test_the_peer_address_is_read_from_grpc() -> None:
    assert peer_address("ipv4:10.0.0.7:43122") == ipaddress.ip_address("10.0.0.7")
    assert peer_address("ipv6:[fd00::7]:43122") == ipaddress.ip_address("fd00::7")
    # As grpc itself writes an IPv6 peer (percent-encoded brackets).
    assert peer_address("ipv6:%5B::1%5D:34978") == ipaddress.ip_address("::1")
    assert peer_address("unix:/run/x.sock") is None
    with pytest.raises(InvalidRequest):
        peer_address("ipv4:not-an-address:1")


@pytest.mark.parametrize("endpoint,peer,ok", [
    ("10.0.0.7:50061", "ipv4:10.0.0.7:40000", True),
    ("10.0.0.8:50061", "ipv4:10.0.0.7:40000", False),  # another machine's address
    ("127.0.0.1:50061", "ipv4:10.0.0.7:40000", False),
    ("localhost:50061", "ipv6:[::1]:40000", True),  # loopback for a loopback peer
    ("worker-0.example:50061", "ipv4:10.0.0.7:40000", True),  # a name that resolves to it
    ("victim.example:50061", "ipv4:10.0.0.7:40000", False),  # a name that does not
    ("10.0.0.7:50061", "ipv6:[::ffff:10.0.0.7]:40000", True),
    ("[fd00::8]:50061", "ipv6:%5Bfd00::7%5D:40000", False),  # grpc's own form, another address
    ("[fd00::7]:50061", "ipv6:%5Bfd00::7%5D:40000", True),
    ("10.0.0.8:50061", "unix:/run/s.sock", True),  # no address to compare
])
def test_the_endpoint_must_be_an_address_of_the_connection(endpoint: str, peer: str, ok: bool) -> None:
    import asyncio

    names = {"worker-0.example": ["10.0.0.7"], "victim.example": ["203.0.113.9"],
             "localhost": ["127.0.0.1", "::1"]}

    async def resolve(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address(a) for a in names[host]]

    async def check() -> None:
        await check_endpoint(endpoint, peer, resolve)

    if ok:
        asyncio.run(check())
    else:
        with pytest.raises(InvalidRequest):
            asyncio.run(check())


def test_the_scheduler_refuses_them_on_the_stream_and_keeps_no_such_worker(
        tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (running, _stub, ch):
            for wid, change in (("w-far", lambda r: setattr(r, "input_endpoint", "203.0.113.9:50061")),
                                ("w-nan", latency(math.nan)),
                                ("w-free", latency(0.0, batch=1))):
                w = ProtocolWorker(ch, wid, tweak=change)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await w._reader
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "registration refused" in (err.value.details() or "")
                await w.close()
                assert wid not in running.core.workers
            ok = ProtocolWorker(ch, "w-ok")
            await ok.next("registered")
            assert "w-ok" in running.core.workers
            await ok.close()

    run(body)
