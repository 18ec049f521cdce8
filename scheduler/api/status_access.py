"""Who may see the status pages: operators only, and only under a host name we serve.

The pages show every tenant's rooms, so they take the scheduler's admin credentials
(an admin token or admin API key; with no credentials configured at all, a loopback
farm, whoever reaches the port is the operator, as for the gRPC API). A browser sends
them as HTTP Basic (any user name, the token or key as the password); scripts may send
``Authorization: Bearer <token>`` or ``x-api-key``. ``status_page_open`` serves them
without a login, for a proxy in front that authenticates operators itself.

Every page request must also name a host the pages answer to (``Host``): localhost,
the loopback addresses, the address the port is bound to and ``status_page_hosts``.
A web page elsewhere cannot then read them through a name of its own that it points at
this address (DNS rebinding).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from avatarfarm.serving import Page
from scheduler.api.auth import Authenticator, Presented, Unauthenticated

REALM = 'Basic realm="avatarfarm status", charset="UTF-8"'
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_TEXT = "text/plain; charset=utf-8"


def host_name(header: str) -> str:
    """The host of a Host header, without its port, in lower case ('' if malformed)."""
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else ""
    name, _, port = h.rpartition(":") if h.count(":") == 1 else (h, "", "")
    if port and not port.isdigit():
        return ""
    return name.rstrip(".")


def served_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names the pages answer to: the local ones, the bound address unless it
    is a wildcard, and `extra` (names or addresses, without ports)."""
    hosts = set(LOCAL_HOSTS) | {h.strip().lower().strip("[]").rstrip(".") for h in extra}
    b = bound.strip().lower().strip("[]")
    if b and b not in ("0.0.0.0", "::"):
        hosts.add(b)
    return frozenset(hosts)


def presented(headers: Mapping[str, str]) -> Presented:
    """The credential a request carries: a bearer token, an API key, or either as the
    password of HTTP Basic (a token is told by its form)."""
    authz = headers.get("authorization", "").strip()
    scheme, _, value = authz.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return Presented(bearer=value)
    if scheme.lower() == "basic" and value:
        try:
            _, _, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return Presented()
        if secret.startswith("af1."):
            return Presented(bearer=secret)
        return Presented(api_key=secret) if secret else Presented()
    return Presented(api_key=headers.get("x-api-key", "").strip())


@dataclass(frozen=True, slots=True)
class StatusAccess:
    authenticator: Authenticator
    hosts: frozenset[str]
    open: bool = False  # served without a login (a proxy in front authenticates)
    clock: Callable[[], float] = field(default=time.time)

    def check(self, headers: Mapping[str, str]) -> Page | None:
        """None when the request may see the pages, else the answer that refuses it."""
        host = host_name(headers.get("host", ""))
        if host not in self.hosts:
            return Page(f"this status page does not answer to host {host or '(none)'!r}; an "
                        "operator adds it to status_page_hosts\n".encode(), _TEXT,
                        "421 Misdirected Request")
        if self.open:
            return None
        try:
            who = self.authenticator.authenticate(presented(headers), self.clock())
        except Unauthenticated as e:
            return Page(f"operators only: log in with an admin token or admin API key as the "
                        f"password ({e})\n".encode(), _TEXT, "401 Unauthorized",
                        (("WWW-Authenticate", REALM),))
        if not who.admin:
            return Page(f"operators only: {who} is not an operator\n".encode(), _TEXT,
                        "403 Forbidden")
        return None
