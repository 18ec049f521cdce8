"""The scheduler's core, in layers that each add one concern (see `machine`)."""

from scheduler.core.scheduler import Scheduler, TenantStatus

__all__ = ["Scheduler", "TenantStatus"]
