"""Output platforms' policies: what a platform requires of AI-generated streams.

Platforms require AI-generated content to be labelled, and some require a live
human driver (a voice or motion-capture performer) for virtual hosts. The policy
of a room's platform decides the label burned into its frames and whether a
text-driven room may stream there at all. Pure values; the core applies them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from avatarfarm.domain import DriveMode
from avatarfarm.live_driver import DriverPolicy


class LabelPosition(enum.Enum):
    TOP_LEFT = "top-left"
    TOP_RIGHT = "top-right"
    BOTTOM_LEFT = "bottom-left"
    BOTTOM_RIGHT = "bottom-right"


@dataclass(frozen=True, slots=True)
class Label:
    text: str = "AI-generated"
    position: LabelPosition = LabelPosition.TOP_RIGHT
    size: float = 0.05  # text height as a fraction of the frame height


@dataclass(frozen=True, slots=True)
class PlatformPolicy:
    label: bool = True
    label_text: str = "AI-generated"
    label_position: LabelPosition = LabelPosition.TOP_RIGHT
    label_size: float = 0.05
    # Virtual hosts must be driven live by a person: text-driven rooms are refused, and a
    # camera room's driver drives only while live (a frozen, looped or faceless feed
    # holds the room on its idle loop).
    require_live_driver: bool = False
    # A camera room whose driver left (or is not live, where that is required) for
    # driver_grace_seconds ends; otherwise it holds on its idle loop until they are back.
    end_when_driver_lost: bool = False
    driver_grace_seconds: float = 10.0
    # Converting a live speaker's voice into another person's: banned for livestreams on
    # major platforms, so banned unless an operator allows it for a platform.
    ban_voice_conversion: bool = True

    def __post_init__(self) -> None:
        if not 0.02 <= self.label_size <= 0.25:
            raise ValueError("label_size must be within 0.02..0.25 of the frame height")
        if not 0 <= self.driver_grace_seconds <= 3600:
            raise ValueError("driver_grace_seconds must be within 0..3600")
        if not self.label_text.isascii() or not 0 < len(self.label_text) <= 40 or \
                not self.label_text.isprintable():
            raise ValueError("label_text must be 1..40 printable ASCII characters")

    def label_for(self) -> Label | None:
        return Label(self.label_text, self.label_position, self.label_size) if self.label else None

    def driver_policy(self) -> DriverPolicy:
        """The rules a camera room's worker applies to its driver."""
        return DriverPolicy(self.require_live_driver, self.end_when_driver_lost,
                            self.driver_grace_seconds)


# Platforms not listed: labelled with the defaults (labelling is the safe default).
DEFAULT_POLICY = PlatformPolicy()


class PolicyRefused(Exception):
    """A room the platform's policy does not allow (maps to PERMISSION_DENIED)."""


def check_room(platform: str, policy: PlatformPolicy, drive: DriveMode,
               voice_conversion: bool = False) -> None:
    if voice_conversion and policy.ban_voice_conversion:
        raise PolicyRefused(
            f"platform {platform!r} bans converting a live speaker's voice into another person's "
            "(voice_conversion); stream the speaker's own voice")
    if policy.require_live_driver and drive is DriveMode.TEXT:
        raise PolicyRefused(
            f"platform {platform!r} requires a live human driver for virtual hosts: use a "
            "voice- or motion-capture-driven room, not a text-driven one")
