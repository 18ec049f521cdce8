"""When a text room's voice fails or comes back, for the tenant to hear about it.

Workers report why a room's voice cannot speak (its TTS service failing) with the room's
progress, while the room holds on its idle loop; a change between speaking and not is
told once each way (the reason's wording, e.g. when the next try is, is not news).
"""

from __future__ import annotations

from avatarfarm.domain import Progress


def voice_change(before: Progress, now: Progress) -> str | None:
    """What to tell watchers about the room's voice (None: nothing changed)."""
    if bool(now.voice_unavailable) is bool(before.voice_unavailable):
        return None
    if now.voice_unavailable:
        return f"the voice cannot speak, the room holds on its idle loop: {now.voice_unavailable}"
    return "the voice speaks again"
