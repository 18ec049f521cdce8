"""The scheduler's front door: each call of the session, avatar and worker APIs passes here
before its servicer (see avatarfarm.serving.add_service). It reads what the call
carried (``authorization: Bearer``, ``x-api-key``, the verified client certificate),
asks scheduler.api.auth who that is and whether they may use this API, applies the
tenant's rate limit to session and avatar calls, and refuses with UNAUTHENTICATED,
PERMISSION_DENIED or RESOURCE_EXHAUSTED; what it admits, the servicer reads with
`caller()`. On the worker stream it also checks that every Register names the
worker its credential is for. A stream lasts no longer than the token it was opened
with: it ends with UNAUTHENTICATED when the token expires (avatarfarm.serving), and
the client opens it again with a renewed one.

Refusals are logged with the reason, never with the credential.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc

from scheduler.api import auth
from scheduler.api.auth import Presented, Principal, Service, Unauthenticated
from scheduler.api.ratelimit import RateLimiter
from scheduler.errors import PermissionDenied

log = logging.getLogger(__name__)

SERVICES = {"avatarfarm.v1.SessionService": Service.SESSIONS,
            "avatarfarm.v1.WorkerService": Service.WORKERS,
            "avatarfarm.v1.AvatarService": Service.AVATARS,
            "avatarfarm.v1.AdminService": Service.ADMIN}
WORKER_CONNECT = "/avatarfarm.v1.WorkerService/Connect"
CREATE_SESSIONS = "/avatarfarm.v1.SessionService/CreateSessions"


def calls_in(method: str, request: Any) -> int:
    """What a call counts for against its tenant's rate limit: a batch, each of its rooms."""
    if method == CREATE_SESSIONS and request is not None:
        return max(1, len(request.requests))
    return 1

# Set by the gate in the call's own task, read by the servicer in the same task.
_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("avatarfarm_caller",
                                                                           default=None)


def caller() -> Principal:
    """Who is making the current call. A servicer reached without the gate refuses
    everything rather than serve an unknown caller."""
    p = _caller.get()
    if p is None:
        raise Unauthenticated("the call was not authenticated")
    return p


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def presented(context: grpc.aio.ServicerContext, certificates: bool) -> Presented:
    """The credentials in a call's metadata and, when client certificates identify
    callers, the verified certificate's URI SANs."""
    seen: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in ("authorization", "x-api-key"):
            if key in seen:
                raise Unauthenticated(f"more than one {key} header")
            seen[key] = _text(value)
    bearer = ""
    if "authorization" in seen:
        scheme, _, rest = seen["authorization"].strip().partition(" ")
        if scheme.lower() != "bearer" or not rest.strip():
            raise Unauthenticated("the authorization header must be `Bearer <token>`")
        bearer = rest.strip()
    certificate = False
    uris: tuple[str, ...] = ()
    if certificates:
        ctx = context.auth_context()
        # With a client CA configured the handshake has verified any certificate here.
        certificate = (b"ssl" in ctx.get("transport_security_type", ())
                       and bool(ctx.get("x509_subject") or ctx.get("x509_pem_cert")))
        uris = tuple(_text(u) for u in ctx.get("peer_uri", ())) if certificate else ()
    return Presented(bearer, seen.get("x-api-key", "").strip(), certificate, uris)


class Gate:
    def __init__(self, authenticator: auth.Authenticator, limiter: RateLimiter,
                 clock: Callable[[], float] = time.time) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self._clock = clock  # wall clock: token expiry is a date

    async def __call__(self, method: str, context: grpc.aio.ServicerContext,
                       request: Any = None) -> float | None:
        """Admits the call (or aborts it); returns when its credential expires, if it
        does, so that a stream opened with a token ends with the token."""
        if not self.authenticator.enabled:
            _caller.set(auth.OPEN)  # a loopback farm: nothing to check, nothing to limit
            return None
        service = SERVICES.get(method.split("/")[1])
        try:
            p = self.authenticator.authenticate(
                presented(context, self.authenticator.certificates), self._clock())
            if service is not None:
                auth.check_service(p, service)
        except Unauthenticated as e:
            log.info("refused %s from %s: %s", method, context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            raise  # unreachable: abort raises
        except PermissionDenied as e:
            log.info("refused %s from %s: %s", method, context.peer(), e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            raise
        if service in (Service.SESSIONS, Service.AVATARS) and p.kind is auth.SubjectKind.TENANT:
            throttled = self.limiter.admit(p.name, calls_in(method, request))
            if throttled is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, throttled.message)
        _caller.set(p)
        return p.expires_at if math.isfinite(p.expires_at) else None

    async def check(self, method: str, message: Any, context: grpc.aio.ServicerContext) -> None:
        if method != WORKER_CONNECT or message.WhichOneof("kind") != "register":
            return
        try:
            auth.check_worker_id(caller(), message.register.worker_id)
        except PermissionDenied as e:
            log.info("refused %s from %s: %s", method, context.peer(), e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
