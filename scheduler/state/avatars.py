"""The avatar registry: likenesses tenants registered with their licences (avatars, and
the voices avatars speak with), and the append-only audit log of their use.

Registered avatars are held in memory (loaded from the store at start) and every
change is written through the store's queue, so it commits with the core's turn.
Audit entries go only to the store; each gets the next sequence number, so the
log's order is the order things happened in. Whether a room may use an avatar is
the pure `scheduler.policy.licences` policy; this module adds who owns which avatar.

A voice is a likeness too: registered with its licence (a Piper export or a TTS
service's voice, written to the avatar folder's voices/), named by avatars'
VoiceSettings, checked like the avatar whenever a room speaks with it, and audited
under its own id. Avatar and voice ids share one namespace, so an id's audit log is
one likeness's.

Avatar ids are global (they name image files workers read); an id is owned by
the tenant that registered it, and one that exists only as a file (the built-in
`presenter`, or an image an operator placed in the avatar folder) is an
unlicensed local avatar: usable by every tenant unless `require_licence` is set,
and claimable by an operator only.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from dataclasses import dataclass
from typing import Protocol

from avatarfarm.domain import SessionSpec
from scheduler.errors import AlreadyExists, NotFound
from scheduler.policy import licences
from scheduler.policy.licences import Licence, Refusal

# Audit clauses besides the licence's own.
UNLICENSED = "unlicensed"  # a local avatar with no licence registered
REQUIRE_LICENCE = "require_licence"  # refused: the farm runs licensed avatars only
OWNER = "tenant"  # refused: the avatar is registered by another tenant
REFUSAL_CLAUSES = (*licences.CLAUSES, REQUIRE_LICENCE, OWNER)


class AuditAction(enum.Enum):
    REGISTERED = "registered"
    REVOKED = "revoked"
    REFUSED = "refused"
    ROOM_STARTED = "room_started"
    ROOM_ENDED = "room_ended"
    LICENCE_ENDED = "licence_ended"
    DRIVER_LIVE = "driver_live"  # a camera room's driver went live (who, from where)
    DRIVER_NOT_LIVE = "driver_not_live"  # ...left, or their feed stopped being live


@dataclass(frozen=True, slots=True)
class VoiceSettings:
    voice: str = ""  # TTS voice name; empty: the worker's default
    rate: float = 0.0  # words per minute; 0: the engine's default
    pitch: float = 0.0  # 0..99; 0: the engine's default


@dataclass(frozen=True, slots=True)
class RegisteredAvatar:
    avatar_id: str
    tenant: str
    licence: Licence
    registered_at: float
    voice: VoiceSettings = VoiceSettings()
    image_sha256: str = ""
    width: int = 0
    height: int = 0
    revoked: bool = False
    revoked_reason: str = ""
    revoked_at: float | None = None


class VoiceKind(enum.Enum):
    PIPER = "piper"  # a Piper export, run on workers' devices
    SERVICE = "service"  # a TTS service's voice, streamed in


@dataclass(frozen=True, slots=True)
class RegisteredVoice:
    voice_id: str
    tenant: str
    licence: Licence
    registered_at: float
    kind: VoiceKind = VoiceKind.PIPER
    sha256: str = ""  # of the model (piper) or the service config
    revoked: bool = False
    revoked_reason: str = ""
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    avatar_id: str
    tenant: str  # the avatar's owner (registration, revocation) or the room's tenant
    action: AuditAction
    session_id: str = ""
    room_id: str = ""
    platform: str = ""
    worker_id: str = ""
    clause: str = ""  # what allowed or refused it
    detail: str = ""


class AvatarStore(Protocol):
    """The rows the registry keeps: avatars and their audit log (the scheduler's Store
    is one)."""

    def load_avatars(self) -> list[RegisteredAvatar]: ...
    def put_avatar(self, avatar: RegisteredAvatar) -> None: ...
    def load_voices(self) -> list[RegisteredVoice]: ...
    def put_voice(self, voice: RegisteredVoice) -> None: ...
    def append_audit(self, entry: AuditEntry) -> None: ...
    def last_audit_seq(self) -> int: ...
    def audit_entries(self, avatar_id: str, after_seq: int, limit: int) -> list[AuditEntry]:
        """Committed entries only, and safe to call from any thread (a read that may
        wait on the disk belongs off the event loop)."""


def taken_message(avatar_id: str) -> str:
    return f"avatar id {avatar_id!r} is taken on this farm; register under another id"


class AvatarRegistry:
    def __init__(self, store: AvatarStore) -> None:
        self.store = store
        self._avatars = {a.avatar_id: a for a in store.load_avatars()}
        self._voices = {v.voice_id: v for v in store.load_voices()}
        self._seq = store.last_audit_seq()
        # Avatars whose rooms must be checked again on the next pass: all at start (a
        # licence may have ended while the scheduler was down), then those changed.
        self._changed: set[str] = set(self._avatars)
        self._ends: list[tuple[float, str]] = []  # (valid_until, avatar id), a heap
        for a in self._avatars.values():
            self._watch_end(a)

    def _watch_end(self, a: RegisteredAvatar) -> None:
        """The avatar's rooms are checked again when its licence, or its voice's, ends."""
        v = self._voices.get(a.voice.voice)
        for lic, revoked in ((a.licence, a.revoked), *(((v.licence, v.revoked),) if v else ())):
            end = licences.ends_at(lic)
            if end is not None and not revoked:
                heapq.heappush(self._ends, (end, a.avatar_id))

    def _voice_changed(self, voice_id: str) -> None:
        """Rooms of the avatars speaking with the voice must be checked again."""
        for a in self._avatars.values():
            if a.voice.voice == voice_id:
                self._changed.add(a.avatar_id)
                self._watch_end(a)

    # -- registry ---------------------------------------------------------------

    def get(self, avatar_id: str) -> RegisteredAvatar | None:
        return self._avatars.get(avatar_id)

    def __contains__(self, avatar_id: str) -> bool:
        return avatar_id in self._avatars

    def of(self, tenant: str = "") -> list[RegisteredAvatar]:
        """The avatars `tenant` registered (empty: all), by id."""
        return sorted((a for a in self._avatars.values() if not tenant or a.tenant == tenant),
                      key=lambda a: a.avatar_id)

    def claim(self, avatar_id: str, tenant: str, *, local: frozenset[str], operator: bool) -> None:
        """Refuses (AlreadyExists) an id another tenant registered, or one that exists only
        as a local avatar file unless an operator claims it for `tenant`. A tenant may
        replace its own avatar. The answer is the same whoever holds the id."""
        a = self._avatars.get(avatar_id)
        if (a is not None and a.tenant != tenant) or avatar_id in self._voices:
            raise AlreadyExists(taken_message(avatar_id))
        if a is None and avatar_id in local and not operator:
            raise AlreadyExists(taken_message(avatar_id))

    def register(self, avatar: RegisteredAvatar, now: float) -> RegisteredAvatar:
        self._avatars[avatar.avatar_id] = avatar
        self.store.put_avatar(avatar)
        self._changed.add(avatar.avatar_id)
        self._watch_end(avatar)
        self.audit(AuditAction.REGISTERED, avatar.avatar_id, avatar.tenant, now,
                   detail=f"image {avatar.image_sha256[:16]} {avatar.width}x{avatar.height}")
        return avatar

    def revoke(self, avatar_id: str, reason: str, now: float) -> RegisteredAvatar:
        a = self._avatars.get(avatar_id)
        if a is None:
            raise NotFound(f"avatar {avatar_id!r} is not registered")
        if a.revoked:
            return a  # once is enough: a retry changes nothing
        a = RegisteredAvatar(a.avatar_id, a.tenant, a.licence, a.registered_at, a.voice,
                             a.image_sha256, a.width, a.height, True, reason, now)
        self._avatars[avatar_id] = a
        self.store.put_avatar(a)
        self._changed.add(avatar_id)
        self.audit(AuditAction.REVOKED, avatar_id, a.tenant, now, clause=licences.REVOKED,
                   detail=reason)
        return a

    # -- voices -----------------------------------------------------------------

    def voice(self, voice_id: str) -> RegisteredVoice | None:
        return self._voices.get(voice_id)

    def voices_of(self, tenant: str = "") -> list[RegisteredVoice]:
        """The voices `tenant` registered (empty: all), by id."""
        return sorted((v for v in self._voices.values() if not tenant or v.tenant == tenant),
                      key=lambda v: v.voice_id)

    def claim_voice(self, voice_id: str, tenant: str) -> None:
        """Refuses (AlreadyExists) an id another tenant's voice or any avatar holds; a
        tenant may replace its own voice."""
        v = self._voices.get(voice_id)
        if (v is not None and v.tenant != tenant) or voice_id in self._avatars:
            raise AlreadyExists(taken_message(voice_id))

    def register_voice(self, voice: RegisteredVoice, now: float) -> RegisteredVoice:
        self._voices[voice.voice_id] = voice
        self.store.put_voice(voice)
        self._voice_changed(voice.voice_id)
        self.audit(AuditAction.REGISTERED, voice.voice_id, voice.tenant, now,
                   detail=f"{voice.kind.value} voice {voice.sha256[:16]}")
        return voice

    def revoke_voice(self, voice_id: str, reason: str, now: float) -> RegisteredVoice:
        v = self._voices.get(voice_id)
        if v is None:
            raise NotFound(f"voice {voice_id!r} is not registered")
        if v.revoked:
            return v
        v = dataclasses.replace(v, revoked=True, revoked_reason=reason, revoked_at=now)
        self._voices[voice_id] = v
        self.store.put_voice(v)
        self._voice_changed(voice_id)
        self.audit(AuditAction.REVOKED, voice_id, v.tenant, now, clause=licences.REVOKED,
                   detail=reason)
        return v

    def voice_of(self, avatar_id: str) -> RegisteredVoice | None:
        """The registered voice an avatar speaks with (None: a worker's own voice or
        espeak-ng's, which carry no licence)."""
        a = self._avatars.get(avatar_id)
        return self._voices.get(a.voice.voice) if a is not None and a.voice.voice else None

    def admit_voice(self, spec: SessionSpec, now: float) -> tuple[RegisteredVoice | None, Refusal | None, str]:
        """Whether a room of `spec` may speak with its avatar's registered voice: the voice
        (None: none registered), the refusal, or None and the clauses that allow it."""
        v = self.voice_of(spec.avatar_id)
        if v is None or not (spec.drive_mode.uses_tts or spec.voice_conversion):
            return None, None, ""
        if v.tenant != spec.tenant:
            return v, Refusal(OWNER, f"is licensed to another tenant; tenant {spec.tenant!r} may "
                                     f"not use it"), ""
        refusal = licences.check(v.licence, platform=spec.platform,
                                 product_category=spec.product_category, language=spec.language,
                                 now=now, revoked=v.revoked, voice_conversion=spec.voice_conversion)
        return v, refusal, "" if refusal is not None else ",".join(licences.allowing(v.licence))

    # -- licences ---------------------------------------------------------------

    def admit(self, spec: SessionSpec, now: float, *, require_licence: bool) -> tuple[Refusal | None, str]:
        """Whether a room of `spec` may use its avatar at `now`: the refusal, or None and
        the clause(s) that allow it (for the audit)."""
        a = self._avatars.get(spec.avatar_id)
        if a is None and spec.voice_conversion:
            return Refusal(licences.LIVE_VOICE_CONVERSION,
                           "has no licence registered, and only a licence can grant converting a "
                           "live speaker's voice into a person's (live_voice_conversion)"), ""
        if a is None:
            if require_licence:
                return Refusal(REQUIRE_LICENCE,
                               "has no licence registered and this farm renders licensed avatars "
                               "only (require_licence); its owner must register it with "
                               "AvatarService.RegisterAvatar"), ""
            return None, UNLICENSED
        if a.tenant != spec.tenant:
            return Refusal(OWNER, f"is licensed to another tenant; tenant {spec.tenant!r} may not "
                                  f"use it"), ""
        # Converting a voice into this person's is the voice's licence's to allow, or,
        # where no voice is registered, the avatar's.
        converting = spec.voice_conversion and self.voice_of(spec.avatar_id) is None
        refusal = licences.check(a.licence, platform=spec.platform,
                                 product_category=spec.product_category, language=spec.language,
                                 now=now, revoked=a.revoked, voice_conversion=converting)
        if refusal is not None:
            return refusal, ""
        return None, ",".join(licences.allowing(a.licence))

    def refusal(self, spec: SessionSpec, now: float, *,
                require_licence: bool) -> tuple[str, str, Refusal] | None:
        """The first of a room's likenesses whose licence refuses it: what it is (avatar,
        voice), its id and the refusal; None: the avatar and its voice allow the room."""
        refusal, _ = self.admit(spec, now, require_licence=require_licence)
        if refusal is not None:
            return "avatar", spec.avatar_id, refusal
        v, refusal, _ = self.admit_voice(spec, now)
        if v is not None and refusal is not None:
            return "voice", v.voice_id, refusal
        return None

    def due(self, now: float) -> set[str]:
        """Avatars whose running rooms must be checked again: changed or revoked since the
        last call, or whose licence reached its end."""
        out, self._changed = self._changed, set()
        while self._ends and self._ends[0][0] <= now:
            out.add(heapq.heappop(self._ends)[1])
        return out

    # -- audit log --------------------------------------------------------------

    def audit(self, action: AuditAction, avatar_id: str, tenant: str, now: float, *,
              session_id: str = "", room_id: str = "", platform: str = "", worker_id: str = "",
              clause: str = "", detail: str = "") -> AuditEntry:
        self._seq += 1
        entry = AuditEntry(self._seq, now, avatar_id, tenant, action, session_id, room_id,
                           platform, worker_id, clause, detail)
        self.store.append_audit(entry)
        return entry

    def entries(self, avatar_id: str, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        """One avatar's entries after `after_seq`, oldest first: what is committed (await
        the core's `durable()` first). A blocking read: call it off the event loop."""
        return self.store.audit_entries(avatar_id, after_seq, limit)
