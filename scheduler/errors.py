"""Typed errors of the scheduler's core; the gRPC layer maps each to one status."""

from avatarfarm.domain import InvalidRequest


class NotFound(LookupError):
    pass


class AlreadyExists(RuntimeError):
    pass


class FailedPrecondition(RuntimeError):
    pass


__all__ = ["AlreadyExists", "FailedPrecondition", "InvalidRequest", "NotFound"]
