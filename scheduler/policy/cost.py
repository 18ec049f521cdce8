"""Cost per stream-hour: device time attributed to rooms, priced by device type.

A room is charged for the device time its own frames used (inference and
encode), as its worker measured it, not for a whole device: a GPU carrying
ten rooms bills each for its share. Pure code; the metrics module exports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from avatarfarm.domain import Tier


def cost_per_stream_hour(device_seconds: float, stream_seconds: float, price_per_hour: float) -> float:
    """Money per hour of stream; 0 before any stream time is recorded."""
    if stream_seconds <= 0:
        return 0.0
    return device_seconds * price_per_hour / stream_seconds


@dataclass(frozen=True, slots=True)
class UsageDelta:
    tier: Tier
    device_type: str
    stream_seconds: float
    device_seconds: float


@dataclass(slots=True)
class CostBook:
    """Running totals by (tier, device type) and the resulting cost per stream-hour."""

    price: Callable[[str], float]
    stream_seconds: dict[tuple[Tier, str], float] = field(default_factory=dict)
    device_seconds: dict[tuple[Tier, str], float] = field(default_factory=dict)

    def add(self, d: UsageDelta) -> None:
        key = (d.tier, d.device_type)
        self.stream_seconds[key] = self.stream_seconds.get(key, 0.0) + d.stream_seconds
        self.device_seconds[key] = self.device_seconds.get(key, 0.0) + d.device_seconds

    def money(self, tier: Tier | None = None, device_type: str | None = None) -> float:
        return sum(s * self.price(dev) / 3600.0 for (t, dev), s in self.device_seconds.items()
                   if (tier is None or t is tier) and (device_type is None or dev == device_type))

    def stream_hours(self, tier: Tier | None = None, device_type: str | None = None) -> float:
        return sum(s for (t, dev), s in self.stream_seconds.items()
                   if (tier is None or t is tier)
                   and (device_type is None or dev == device_type)) / 3600

    def per_stream_hour(self, tier: Tier | None = None, device_type: str | None = None) -> float:
        hours = self.stream_hours(tier, device_type)
        return self.money(tier, device_type) / hours if hours > 0 else 0.0
