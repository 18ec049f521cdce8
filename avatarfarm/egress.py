"""Where a room's RTMP output may push: the egress policy.

A tenant names an RTMP URL and a worker connects to it, so an unchecked URL lets a
tenant make the farm open connections inside its own network (server-side request
forgery): to the cloud metadata service, to link-local devices, to private
services. The policy decides, from the operator's configuration, which hosts a
push may reach. Some addresses are never allowed, whatever the configuration:
link-local ranges (169.254.0.0/16 holds the metadata service of AWS, GCP and
Azure; fe80::/10), the other metadata addresses, the unspecified address (0.0.0.0
reaches the local host on Linux) and multicast and broadcast. Loopback and private
ranges are allowed by default, so a laptop or a test can push to a local ingest;
an operator forbids them with ``private`` and ``loopback``.

The checks on a URL's text are pure and run on the scheduler, at admission, and on
the worker. Only the worker resolves host names (``check_resolved``): a name whose
addresses include a forbidden one is forbidden. FFmpeg resolves the name again
when it connects, so a name that changes its answer in between (DNS rebinding) is
not stopped by this check alone; forbid the ranges at the network too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from avatarfarm.domain import IPAddress, Output, OutputKind, RtmpUrl, ip_literal, parse_rtmp_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# The options' help, shared by the scheduler's and the worker's configuration (both
# apply the policy: at admission, and again on the addresses a name resolves to).
ALLOWED_HOSTS_HELP = ("RTMP ingests outputs may push to: host names, *.domain patterns, IP "
                      "addresses, CIDR ranges (empty: any host not forbidden)")
FORBIDDEN_HOSTS_HELP = ("RTMP hosts outputs may never push to, besides the built-in link-local, "
                        "cloud metadata, unspecified and multicast addresses: host names, "
                        "*.domain patterns, IP addresses, CIDR ranges, 'private' (RFC 1918, "
                        "CGNAT, fc00::/7) or 'loopback'")
ALLOWED_PORTS_HELP = "ports RTMP outputs may push to (empty: any)"


class ForbiddenTarget(Exception):
    """An output target the egress policy does not allow (maps to PERMISSION_DENIED)."""


class UnresolvedTarget(ForbiddenTarget):
    """An RTMP host whose addresses could not be found in time, so it cannot be checked."""


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Never allowed, whatever the configuration says.
BUILTIN_FORBIDDEN_NETWORKS = _nets(
    "169.254.0.0/16",     # IPv4 link-local: the metadata service of AWS, GCP, Azure, OCI
    "fe80::/10",          # IPv6 link-local
    "fd00:ec2::254/128",  # AWS metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "0.0.0.0/8",          # "this network": 0.0.0.0 connects to the local host
    "::/128",             # unspecified
    "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast, broadcast: no TCP peer
)
BUILTIN_FORBIDDEN_NAMES = ("metadata", "metadata.google.internal", "instance-data",
                           "instance-data.ec2.internal")
# Shorthands an operator may list instead of the ranges.
KEYWORDS: dict[str, tuple[IPNetwork, ...]] = {
    "private": _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                     "fc00::/7"),
    "loopback": _nets("127.0.0.0/8", "::1/128"),
}
_NAME_PATTERN = re.compile(
    r"(\*\.)?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
# IPv6 prefixes that carry an IPv4 address in their low 32 bits and reach it through a
# translator (NAT64) or a tunnel; the IPv4 address inside is checked too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _parse_entries(entries: Iterable[str], what: str) -> tuple[tuple[str, ...], tuple[IPNetwork, ...]]:
    names: list[str] = []
    nets: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry in KEYWORDS:
            nets.extend(KEYWORDS[entry])
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not _NAME_PATTERN.fullmatch(entry):
            raise ValueError(f"{what}: {raw!r} is not a host name, *.domain pattern, IP address, "
                             f"CIDR range or one of {', '.join(KEYWORDS)}")
        names.append(entry)
    return tuple(names), tuple(nets)


def _name_matches(host: str, patterns: tuple[str, ...]) -> bool:
    # "*.example.com" covers every name under example.com, not example.com itself.
    return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in patterns)


def _views(addr: IPAddress) -> tuple[IPAddress, ...]:
    """The address and any IPv4 address it stands for (mapped, NAT64, 6to4, compatible)."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return (addr,)
    out: list[IPAddress] = [addr]
    if addr.ipv4_mapped is not None:
        out.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr in _NAT64 or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
        out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Which RTMP hosts outputs may push to.

    A host is refused when it, or any address it has, is forbidden (built in or
    configured); forbidding wins over allowing. With an allow list, a host must also
    match it: by name, or with every address inside an allowed range. Allowed ports,
    when listed, restrict the port (the scheme's default port when the URL has none).
    """

    allowed_names: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    forbidden_names: tuple[str, ...] = ()
    forbidden_networks: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, allowed_hosts: Iterable[str] = (), forbidden_hosts: Iterable[str] = (),
                    allowed_ports: Iterable[int] = ()) -> EgressPolicy:
        """From the operator's lists (``rtmp_allowed_hosts``, ``rtmp_forbidden_hosts``,
        ``rtmp_allowed_ports``); raises ValueError naming an entry it cannot read."""
        allowed_names, allowed_nets = _parse_entries(allowed_hosts, "rtmp_allowed_hosts")
        forbidden_names, forbidden_nets = _parse_entries(forbidden_hosts, "rtmp_forbidden_hosts")
        ports = frozenset(allowed_ports)
        bad = sorted(p for p in ports if not 1 <= p <= 65535)
        if bad:
            raise ValueError(f"rtmp_allowed_ports: {bad} outside 1..65535")
        return cls(allowed_names, allowed_nets, forbidden_names, forbidden_nets, ports)

    @property
    def restricted(self) -> bool:
        """Whether an allow list is configured."""
        return bool(self.allowed_names or self.allowed_networks)

    def check(self, output: Output) -> None:
        """Raises ForbiddenTarget for an RTMP output the policy refuses; other outputs pass.

        The URL's syntax is the spec's concern (``validate_output``); a malformed one
        raises InvalidRequest here too."""
        if output.kind is OutputKind.RTMP:
            self.check_url(output.target)

    def check_url(self, url: str) -> RtmpUrl:
        """Checks what the URL's text says: scheme, port, a host name against the name
        lists, an IP address against the ranges. A host name's addresses are checked by
        ``check_addresses`` once they are known."""
        target = parse_rtmp_url(url)
        if self.allowed_ports and target.port not in self.allowed_ports:
            raise ForbiddenTarget(f"rtmp_url port {target.port} is not one of the allowed ports "
                                  f"{sorted(self.allowed_ports)}")
        if target.address is not None:
            self.check_addresses(target, (target.address,))
            return target
        if _name_matches(target.host, BUILTIN_FORBIDDEN_NAMES + self.forbidden_names):
            raise ForbiddenTarget(f"rtmp_url host {target.host!r} is forbidden")
        if (self.restricted and not self.allowed_networks
                and not _name_matches(target.host, self.allowed_names)):
            # Only names are allowed and this is not one of them: no address can help.
            raise ForbiddenTarget(f"rtmp_url host {target.host!r} is not in the allowed hosts")
        return target

    def check_addresses(self, target: RtmpUrl, addresses: Iterable[IPAddress]) -> None:
        """Checks the addresses ``target``'s host has (all of them: the connection may use
        any). No address at all is refused: nothing could be checked."""
        addrs = tuple(addresses)
        if not addrs:
            raise UnresolvedTarget(f"rtmp_url host {target.host!r} has no address")
        by_name = self.restricted and _name_matches(target.host, self.allowed_names)
        for addr in addrs:
            views = _views(addr)
            for view in views:
                if any(view in net for net in BUILTIN_FORBIDDEN_NETWORKS + self.forbidden_networks
                       if net.version == view.version):
                    shown = target.host if str(addr) == target.host else f"{target.host} ({addr})"
                    raise ForbiddenTarget(f"rtmp_url host {shown} is in a forbidden address range")
            if self.restricted and not by_name and not any(
                    view in net for view in views for net in self.allowed_networks
                    if net.version == view.version):
                raise ForbiddenTarget(f"rtmp_url host {target.host} ({addr}) is not in the allowed hosts")


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The system's addresses for ``host``, looked up on the loop's executor (getaddrinfo
    blocks), as FFmpeg will look them up when it connects."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


async def check_resolved(policy: EgressPolicy, url: str, *, timeout: float = 2.0,
                         resolve: Resolver = system_resolver) -> tuple[IPAddress, ...]:
    """Checks ``url`` and every address its host resolves to; returns the addresses.

    Raises ForbiddenTarget, or UnresolvedTarget when the lookup fails or takes longer
    than ``timeout`` (the event loop is never blocked: the lookup runs on a thread)."""
    target = policy.check_url(url)
    if target.address is not None:
        return (target.address,)
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve(target.host, target.port)
    except TimeoutError as e:
        raise UnresolvedTarget(f"rtmp_url host {target.host!r} did not resolve within "
                               f"{timeout:g}s") from e
    except (OSError, UnicodeError) as e:
        raise UnresolvedTarget(f"rtmp_url host {target.host!r} does not resolve: {e}") from e
    policy.check_addresses(target, addresses)
    return tuple(addresses)


def check_service_url(policy: EgressPolicy, url: str) -> None:
    """A TTS service's address a tenant registered (workers will POST to it): refused
    (ForbiddenTarget) where its host is one no output may reach, built in or configured
    (the metadata services, link-local ranges; an operator's forbidden hosts). The allow
    list, made for RTMP ingests, does not apply."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ForbiddenTarget(f"service url {url[:100]!r} names no host")
    address = ip_literal(host)
    if address is None and _name_matches(host, BUILTIN_FORBIDDEN_NAMES + policy.forbidden_names):
        raise ForbiddenTarget(f"service url host {host!r} is forbidden")
    for view in _views(address) if address is not None else ():
        if any(view in net for net in BUILTIN_FORBIDDEN_NETWORKS + policy.forbidden_networks
               if net.version == view.version):
            raise ForbiddenTarget(f"service url host {host} is in a forbidden address range")


def pinned_url(url: str, address: IPAddress) -> str:
    """``url`` with its host replaced by ``address`` (one the host was checked to have), so
    the connection goes where the check looked: FFmpeg would otherwise look the name up
    again when it connects, and a name can change its answer in between (DNS rebinding).
    The port is written out; the application and key are kept as they were.

    (For ``rtmps`` the TLS handshake then carries no server name: FFmpeg sends none for an
    address. It does not verify the ingest's certificate either way, as PyAV cannot pass
    it the options to.)"""
    target = parse_rtmp_url(url)
    host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    return f"{target.scheme}://{host}:{target.port}{target.path}"
