"""The RTMP egress policy: built-in forbidden addresses in every spelling, the
operator's allow and forbid lists, ports, and the worker-side check of the
addresses a host name resolves to (with an injected resolver, and the system's
for localhost)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm.domain import IPAddress, Output, OutputKind
from avatarfarm.egress import EgressPolicy, ForbiddenTarget, UnresolvedTarget, check_resolved

DEFAULT = EgressPolicy()


def url(host: str, port: int | None = None) -> str:
    return f"rtmp://{host}{f':{port}' if port else ''}/live/key"


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in table:
            raise OSError(f"Name or service not known: {host}")
        return [ipaddress.ip_address(a) for a in table[host]]
    return resolve


@pytest.mark.parametrize("host", [
    "169.254.169.254", "169.254.0.1", "[fe80::1]", "[fe80::1%25eth0]", "[fd00:ec2::254]",
    "100.100.100.200", "0.0.0.0", "0", "0.0.0.1", "[::]", "224.0.0.1", "255.255.255.255", "[ff02::1]",
    # The metadata address spelled the ways the system resolver reads it.
    "2852039166", "0xa9fea9fe", "0xa9.0xfe.0xa9.0xfe", "0251.0376.0251.0376", "169.254.43518",
    "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[64:ff9b::a9fe:a9fe]", "[::a9fe:a9fe]",
    "[2002:a9fe:a9fe::1]",
    "metadata.google.internal", "METADATA.google.internal.", "metadata", "instance-data",
])
def test_metadata_link_local_and_unspecified_addresses_are_always_forbidden(host: str) -> None:
    for policy in (DEFAULT, EgressPolicy.from_config(allowed_hosts=["0.0.0.0/0", "::/0", "metadata"])):
        with pytest.raises(ForbiddenTarget):
            policy.check_url(url(host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.1.2.3", "192.168.1.10",
                                  "ingest.example.com", "a.rtmp.youtube.com", "203.0.113.7"])
def test_loopback_private_and_public_hosts_pass_by_default(host: str) -> None:
    DEFAULT.check_url(url(host))
    DEFAULT.check(Output(OutputKind.RTMP, url(host, 1935)))


def test_files_and_hls_pass_the_policy_untouched() -> None:
    strict = EgressPolicy.from_config(allowed_hosts=["ingest.example.com"])
    strict.check(Output(OutputKind.FILE, "room.mp4"))
    strict.check(Output(OutputKind.HLS, "show"))


def test_operators_forbid_private_ranges_loopback_and_names() -> None:
    p = EgressPolicy.from_config(forbidden_hosts=["private", "loopback", "*.corp.example", "db.local",
                                                  "203.0.113.0/24"])
    for host in ("10.0.0.5", "172.20.1.1", "192.168.0.1", "100.64.1.1", "[fd12::1]", "127.0.0.1",
                 "127.1", "[::1]", "[::ffff:10.0.0.1]", "a.corp.example", "x.y.corp.example",
                 "db.local", "203.0.113.9"):
        with pytest.raises(ForbiddenTarget):
            p.check_url(url(host))
    p.check_url(url("corp.example"))  # "*.corp.example" covers names under it, not itself
    p.check_url(url("8.8.8.8"))


def test_an_allow_list_restricts_by_name_or_by_range_and_forbidding_wins() -> None:
    p = EgressPolicy.from_config(allowed_hosts=["*.youtube.com", "ingest.example.com", "198.51.100.0/24"],
                                 forbidden_hosts=["198.51.100.66"])
    p.check_url(url("a.rtmp.youtube.com"))
    p.check_url(url("ingest.example.com"))
    p.check_url(url("198.51.100.7"))
    for host in ("127.0.0.1", "8.8.8.8", "198.51.100.66"):
        with pytest.raises(ForbiddenTarget):
            p.check_url(url(host))
    # A name outside the names may still resolve into an allowed range: its text alone
    # does not decide, its addresses do.
    p.check_url(url("youtube.com"))
    resolve = resolver({"youtube.com": ["8.8.8.8"], "edge.example": ["198.51.100.8"]})
    with pytest.raises(ForbiddenTarget, match="allowed"):
        asyncio.run(check_resolved(p, url("youtube.com"), resolve=resolve))
    asyncio.run(check_resolved(p, url("edge.example"), resolve=resolve))
    names_only = EgressPolicy.from_config(allowed_hosts=["ingest.example.com"])
    with pytest.raises(ForbiddenTarget, match="allowed hosts"):
        names_only.check_url(url("other.example.com"))  # no address could make it allowed


def test_allowed_ports_cover_the_schemes_default_ports() -> None:
    p = EgressPolicy.from_config(allowed_ports=[1935, 443])
    p.check_url("rtmp://h.example/live/k")
    p.check_url("rtmps://h.example/live/k")
    p.check_url("rtmp://h.example:443/live/k")
    with pytest.raises(ForbiddenTarget, match="port"):
        p.check_url("rtmp://h.example:22/live/k")
    with pytest.raises(ForbiddenTarget, match="port"):
        p.check_url("rtmps://h.example:1936/live/k")


@pytest.mark.parametrize("entry", ["not a host", "http://x", "10.0.0.0/33", "*", "a..b", "-x.com", "é.com"])
def test_configuration_entries_that_mean_nothing_are_refused_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="rtmp_forbidden_hosts"):
        EgressPolicy.from_config(forbidden_hosts=[entry])
    with pytest.raises(ValueError, match="rtmp_allowed_ports"):
        EgressPolicy.from_config(allowed_ports=[0])


@given(st.integers(0xA9FE0000, 0xA9FEFFFF), st.sampled_from(["dec", "hex", "dotted", "mapped", "nat64"]))
@settings(max_examples=200, deadline=None)
def test_no_spelling_of_a_link_local_address_gets_through(n: int, form: str) -> None:
    v4 = ipaddress.IPv4Address(n)
    host = {"dec": str(n), "hex": hex(n), "dotted": str(v4), "mapped": f"[::ffff:{v4}]",
            "nat64": f"[64:ff9b::{v4}]"}[form]
    with pytest.raises(ForbiddenTarget):
        DEFAULT.check_url(url(host))


def test_a_name_that_resolves_to_a_forbidden_address_is_forbidden() -> None:
    names = {"evil.example": ["169.254.169.254"], "mixed.example": ["203.0.113.5", "fe80::1"],
             "mapped.example": ["::ffff:169.254.169.254"], "fine.example": ["203.0.113.5"],
             "private.example": ["10.0.0.7"]}
    resolve = resolver(names)

    async def body() -> None:
        assert await check_resolved(DEFAULT, url("fine.example"), resolve=resolve) == (
            ipaddress.ip_address("203.0.113.5"),)
        assert await check_resolved(DEFAULT, url("private.example"), resolve=resolve)
        for host in ("evil.example", "mixed.example", "mapped.example"):
            with pytest.raises(ForbiddenTarget, match="forbidden"):
                await check_resolved(DEFAULT, url(host), resolve=resolve)
        no_private = EgressPolicy.from_config(forbidden_hosts=["private"])
        with pytest.raises(ForbiddenTarget):
            await check_resolved(no_private, url("private.example"), resolve=resolve)
        by_range = EgressPolicy.from_config(allowed_hosts=["203.0.113.0/24"])
        await check_resolved(by_range, url("fine.example"), resolve=resolve)
        with pytest.raises(ForbiddenTarget, match="allowed"):
            await check_resolved(by_range, url("private.example"), resolve=resolve)
        with pytest.raises(UnresolvedTarget):
            await check_resolved(DEFAULT, url("nowhere.example"), resolve=resolve)

    asyncio.run(body())


def test_a_lookup_that_hangs_fails_within_its_timeout_without_blocking_the_loop() -> None:
    async def body() -> None:
        never = asyncio.Event()
        ticks = 0

        async def hanging(host: str, port: int) -> list[IPAddress]:
            await never.wait()
            return []

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        with pytest.raises(UnresolvedTarget, match="within"):
            await check_resolved(DEFAULT, url("slow.example"), resolve=hanging, timeout=0.05)
        t.cancel()
        assert ticks > 10  # the loop kept running while the lookup waited

    asyncio.run(body())


def test_the_system_resolver_checks_localhost_and_skips_literals() -> None:
    async def body() -> None:
        addrs = await check_resolved(DEFAULT, url("localhost", 1935))
        assert addrs and all(a.is_loopback for a in addrs)
        with pytest.raises(ForbiddenTarget):
            await check_resolved(EgressPolicy.from_config(forbidden_hosts=["loopback"]),
                                 url("localhost", 1935))
        assert await check_resolved(DEFAULT, url("127.0.0.1")) == (ipaddress.ip_address("127.0.0.1"),)

    asyncio.run(body())


@pytest.mark.parametrize("url,address,pinned", [
    ("rtmp://ingest.example/live/key", "203.0.113.7", "rtmp://203.0.113.7:1935/live/key"),
    ("rtmps://Ingest.Example.:8443/app/k?x=1", "203.0.113.7", "rtmps://203.0.113.7:8443/app/k?x=1"),
    ("rtmp://ingest.example/live/key", "2001:db8::7", "rtmp://[2001:db8::7]:1935/live/key"),
])
def test_the_connection_url_names_the_checked_address(url: str, address: str, pinned: str) -> None:
    import ipaddress

    from avatarfarm.egress import pinned_url

    assert pinned_url(url, ipaddress.ip_address(address)) == pinned
