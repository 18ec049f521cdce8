"""Typed errors of the scheduler's core; the gRPC layer maps each to one status."""

from avatarfarm.domain import InvalidRequest


class NotFound(LookupError):
    pass


class AlreadyExists(RuntimeError):
    pass


class FailedPrecondition(RuntimeError):
    pass


class BudgetExceeded(RuntimeError):
    """A tenant's budget would be exceeded (maps to RESOURCE_EXHAUSTED)."""


class PermissionDenied(RuntimeError):
    pass


__all__ = ["AlreadyExists", "BudgetExceeded", "FailedPrecondition", "InvalidRequest", "NotFound",
           "PermissionDenied"]
