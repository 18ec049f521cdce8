"""gRPC adapter for the AvatarService: registering likenesses with their licences,
revoking them, the audit log and usage per avatar. It validates at the edge and
holds no state beyond a lock that puts registrations in order.

Authorisation follows the session API: a tenant registers, sees and revokes only
its own avatars, and another tenant's avatar gets word for word the answer an
unknown id gets; an operator acts on every tenant's avatars (and registers for a
named tenant). Audit entries of an avatar that concern another tenant's rooms
(refused attempts) are shown to its owner without that tenant's name or ids.

A registration is written in this order: the image is checked and normalised off
the event loop into a temporary file, the registry row and its audit entry are
committed, and only then is the image renamed into the avatar folder, so an image
on disk always has its licence on record.

A video avatar is registered the same way: the clip is prepared off the event loop
first (decoded within limits, the face found and tracked in every frame, crops at
the workers' model sides; `avatarfarm.preparation.bundle`), one preparation at a
time, its progress logged. The bundle is content-addressed (the same clip is
prepared once) and is not an avatar until the pointer naming it is renamed into
place after the row is committed; a refused clip leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import grpc

from avatarfarm import convert, images, voices
from avatarfarm.avatars import BUNDLES, bundle_of, install_bundle_pointer, stage_bundle_pointer
from avatarfarm.domain import InvalidRequest, validate_id, validate_voice
from avatarfarm.egress import ForbiddenTarget, check_service_url
from avatarfarm.preparation.bundle import Bundle, VideoLimits
from avatarfarm.preparation.bundle import prepare as prepare_bundle
from avatarfarm.preparation.faces import FaceDetector, PreparationError, load_detector
from avatarfarm.v1 import avatars_pb2, avatars_pb2_grpc
from scheduler.api import auth
from scheduler.api import session_service as service
from scheduler.api.auth import Principal
from scheduler.api.gate import caller
from scheduler.core import Scheduler
from scheduler.errors import NotFound, PermissionDenied
from scheduler.policy import licences
from scheduler.policy.ledger import Dimension, UsageRow
from scheduler.policy.licences import Licence
from scheduler.state.avatars import AuditEntry, RegisteredAvatar, RegisteredVoice, VoiceKind, VoiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageUnavailable(RuntimeError):
    """The avatar folder could not be written (maps to UNAVAILABLE: retry later)."""


class UploadTooLarge(ValueError):
    """A reference video or a voice model over the configured size (RESOURCE_EXHAUSTED)."""


# The session API's statuses, and the image refusals': a bad image is the caller's
# mistake; one over the size limit is what gRPC answers for an oversized message.
_STATUS: dict[type[Exception], grpc.StatusCode] = {**service.ERROR_STATUS,
           images.ImageRefused: grpc.StatusCode.INVALID_ARGUMENT,
           images.ImageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
           PreparationError: grpc.StatusCode.INVALID_ARGUMENT,
           UploadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
           StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
           voices.VoiceError: grpc.StatusCode.INVALID_ARGUMENT,
           voices.ServiceConfigError: grpc.StatusCode.INVALID_ARGUMENT,
           ForbiddenTarget: grpc.StatusCode.PERMISSION_DENIED}
DEFAULT_PAGE = 100
MAX_PAGE = 1000
USAGE_BY = (Dimension.AVATAR, Dimension.VOICE, Dimension.PLATFORM, Dimension.TENANT)


async def _guard(context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
    return await service.guard(context, fn, _STATUS)


async def _guard_async(context: grpc.aio.ServicerContext, aw: Awaitable[T]) -> T:
    return await service.guard_async(context, aw, _STATUS)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def licence_from_pb(pb: avatars_pb2.Licence) -> Licence:
    lic = Licence(pb.person_ref, pb.consent_record_id, _unique(pb.allowed_platforms),
                  _unique(pb.allowed_categories), _unique(pb.forbidden_categories),
                  _unique(pb.allowed_languages),
                  convert.optional_time_from_pb(pb, "valid_from", "licence valid_from"),
                  convert.optional_time_from_pb(pb, "valid_until", "licence valid_until"),
                  pb.live_voice_conversion)
    licences.validate(lic)
    return lic


def licence_to_pb(lic: Licence) -> avatars_pb2.Licence:
    return avatars_pb2.Licence(
        person_ref=lic.person_ref, consent_record_id=lic.consent_record_id,
        allowed_platforms=lic.allowed_platforms, allowed_categories=lic.allowed_categories,
        forbidden_categories=lic.forbidden_categories, allowed_languages=lic.allowed_languages,
        valid_from=None if lic.valid_from is None else convert.timestamp(lic.valid_from),
        valid_until=None if lic.valid_until is None else convert.timestamp(lic.valid_until),
        live_voice_conversion=lic.live_voice_conversion)


def voice_from_pb(pb: avatars_pb2.VoiceSettings) -> VoiceSettings:
    validate_voice("voice", pb.voice)
    if not (math.isfinite(pb.rate) and 0 <= pb.rate <= 1000):
        raise InvalidRequest("voice rate must be within 0..1000 words per minute (0: default)")
    if not (math.isfinite(pb.pitch) and 0 <= pb.pitch <= 99):
        raise InvalidRequest("voice pitch must be within 0..99 (0: default)")
    return VoiceSettings(pb.voice, pb.rate, pb.pitch)


def avatar_to_pb(a: RegisteredAvatar, bundle_id: str = "") -> avatars_pb2.Avatar:
    return avatars_pb2.Avatar(bundle_id=bundle_id,
        avatar_id=a.avatar_id, tenant=a.tenant, licence=licence_to_pb(a.licence),
        voice=avatars_pb2.VoiceSettings(voice=a.voice.voice, rate=a.voice.rate, pitch=a.voice.pitch),
        image_sha256=a.image_sha256, width=a.width, height=a.height,
        registered_at=convert.timestamp(a.registered_at), revoked=a.revoked,
        revoked_reason=a.revoked_reason,
        revoked_at=None if a.revoked_at is None else convert.timestamp(a.revoked_at))


def entry_to_pb(e: AuditEntry, p: Principal) -> avatars_pb2.AuditEntry:
    # Another tenant's attempt on this avatar: what and when, not who.
    foreign = not auth.may_see(p, e.tenant)
    return avatars_pb2.AuditEntry(
        seq=e.seq, at=convert.timestamp(e.at), avatar_id=e.avatar_id,
        tenant="" if foreign else e.tenant, action=e.action.value,
        session_id="" if foreign else e.session_id, room_id="" if foreign else e.room_id,
        platform=e.platform, worker_id=e.worker_id, clause=e.clause,
        detail="a room of another tenant" if foreign else e.detail)


def usage_to_pb(r: UsageRow) -> avatars_pb2.AvatarUsageRow:
    return avatars_pb2.AvatarUsageRow(
        avatar_id=r.avatar_id, platform=r.platform, tenant=r.tenant, sessions=len(r.sessions),
        stream_seconds=r.stream_seconds, stream_hours=r.stream_seconds / 3600.0, cost=r.cost,
        voice=r.voice)


def _revocation(p: Principal, reason: str) -> str:
    """Why a licence was revoked: the caller's words, or who did it."""
    return convert.reason_from_pb(reason) or f"revoked by {'an operator' if p.admin else 'its owner'}"


def voice_to_pb(v: RegisteredVoice) -> avatars_pb2.Voice:
    return avatars_pb2.Voice(
        voice_id=v.voice_id, tenant=v.tenant, licence=licence_to_pb(v.licence), kind=v.kind.value,
        sha256=v.sha256, registered_at=convert.timestamp(v.registered_at), revoked=v.revoked,
        revoked_reason=v.revoked_reason,
        revoked_at=None if v.revoked_at is None else convert.timestamp(v.revoked_at))


class AvatarService(avatars_pb2_grpc.AvatarServiceServicer):
    def __init__(self, core: Scheduler, detector: FaceDetector | None = None) -> None:
        self.core = core
        self._registering = asyncio.Lock()  # one registration at a time: image and row agree
        self._preparing = asyncio.Semaphore(1)  # one video preparation at a time (CPU-bound)
        self._detector = detector or load_detector(None)  # finds faces in video avatars

    def _to_pb(self, a: RegisteredAvatar) -> avatars_pb2.Avatar:
        try:
            root = bundle_of(self.core.config.avatar_dir, a.avatar_id)
        except (OSError, ValueError, KeyError):
            root = None
        return avatar_to_pb(a, root.name if root is not None else "")

    def _visible(self, p: Principal, avatar_id: str) -> RegisteredAvatar:
        validate_id("avatar_id", avatar_id)
        a = self.core.avatars.get(avatar_id)
        if a is None or not auth.may_see(p, a.tenant):
            # The same words for another tenant's avatar as for one that does not exist.
            raise NotFound(f"avatar {avatar_id!r} is not registered")
        return a

    def _visible_voice(self, p: Principal, voice_id: str) -> RegisteredVoice:
        validate_id("voice_id", voice_id)
        v = self.core.avatars.voice(voice_id)
        if v is None or not auth.may_see(p, v.tenant):
            raise NotFound(f"voice {voice_id!r} is not registered")
        return v

    def _auditable(self, p: Principal, avatar_id: str) -> None:
        """A registered avatar or voice the caller may see, or, for an operator, any id
        (local avatars' rooms are audited too)."""
        if p.admin:
            validate_id("avatar_id", avatar_id)
        elif self.core.avatars.voice(avatar_id) is not None:
            self._visible_voice(p, avatar_id)
        else:
            self._visible(p, avatar_id)

    async def RegisterAvatar(self, request: avatars_pb2.RegisterAvatarRequest,
                             context: grpc.aio.ServicerContext) -> avatars_pb2.Avatar:
        def prepare() -> tuple[Principal, str, Licence, VoiceSettings]:
            p = caller()
            validate_id("avatar_id", request.avatar_id)
            if p.admin and not request.tenant:
                raise InvalidRequest("tenant is required when an operator registers an avatar")
            tenant = convert.tenant_from_pb(request.tenant) or p.name
            if not auth.may_see(p, tenant):
                raise PermissionDenied(f"{p} cannot register avatars for tenant {tenant!r}")
            if not request.HasField("licence"):
                raise InvalidRequest("licence is required (an empty Licence allows any use)")
            lic = licence_from_pb(request.licence)
            voice = voice_from_pb(request.voice)
            self.core.check_voice_settings(voice, tenant)
            if bool(request.reference_image) == bool(request.reference_video):
                raise InvalidRequest("give exactly one of reference_image (a PNG or JPEG portrait) "
                                     "and reference_video (a 5-60 s MP4, MOV or WebM clip)")
            limit = self.core.config.avatar_video_max_bytes
            if len(request.reference_video) > limit:
                raise UploadTooLarge(f"the reference video is {len(request.reference_video)} bytes; "
                                    f"at most {limit} are accepted (trim the clip or lower its bitrate)")
            # Before the image is decoded: an id that cannot be had costs nothing more.
            self.core.claim_avatar(request.avatar_id, tenant, operator=p.admin)
            return p, tenant, lic, voice

        p, tenant, lic, voice = await _guard(context, prepare)
        if request.reference_video:
            return await self._register_video(context, request, p, tenant, lic, voice)
        limits = images.Limits(max_bytes=self.core.config.avatar_image_max_bytes)
        image = await _guard_async(context, asyncio.to_thread(
            images.normalise, request.reference_image, limits))
        draft = RegisteredAvatar(request.avatar_id, tenant, lic, 0.0, voice, image.sha256,
                                 image.width, image.height)
        # Once begun, a registration completes even if its caller goes away: the row and
        # the image on disk must agree.
        a = await _guard_async(context, asyncio.shield(asyncio.ensure_future(
            self._register(
                draft, lambda folder: images.stage(folder, draft.avatar_id, image.png),
                lambda staged, folder: images.install(staged, folder, draft.avatar_id),
                operator=p.admin))))
        log.info("avatar %s registered for tenant %s by %s (%dx%d, sha256 %s)", a.avatar_id,
                 a.tenant, p, a.width, a.height, a.image_sha256[:16])
        return self._to_pb(a)

    async def _register_video(self, context: grpc.aio.ServicerContext,
                              request: avatars_pb2.RegisterAvatarRequest, p: Principal, tenant: str,
                              lic: Licence, voice: VoiceSettings) -> avatars_pb2.Avatar:
        cfg = self.core.config
        video = request.reference_video
        avatar_id = request.avatar_id

        def progress(stage: str, done: float) -> None:
            log.info("avatar %s: preparing the video, %s %.0f%%", avatar_id, stage, 100 * done)

        def prepare() -> Bundle:
            return prepare_bundle(video, cfg.avatar_dir / BUNDLES, cfg.avatar_crop_sides,
                                  detector=self._detector,
                                  limits=VideoLimits(max_bytes=cfg.avatar_video_max_bytes),
                                  progress=progress)

        async with self._preparing:
            bundle = await _guard_async(context, asyncio.to_thread(prepare))
        m = bundle.manifest
        draft = RegisteredAvatar(avatar_id, tenant, lic, 0.0, voice,
                                 hashlib.sha256(video).hexdigest(), m.width, m.height)
        a = await _guard_async(context, asyncio.shield(asyncio.ensure_future(
            self._register(
                draft, lambda folder: stage_bundle_pointer(folder, avatar_id, m.bundle_id),
                lambda staged, folder: install_bundle_pointer(staged, folder, avatar_id),
                operator=p.admin))))
        log.info("video avatar %s registered for tenant %s by %s (%d frames at %g fps, %dx%d, "
                 "face found in %d, bundle %s)", a.avatar_id, a.tenant, p, m.frames, m.fps,
                 m.width, m.height, m.faces_found, m.bundle_id[:16])
        return self._to_pb(a)

    async def _register(self, draft: RegisteredAvatar, stage: Callable[[Path], Path],
                        install: Callable[[Path, Path], object], *, operator: bool) -> RegisteredAvatar:
        """Stages the avatar's file (`stage(folder)`: a temporary file), commits the row,
        then installs the file (`install(staged, folder)`: a rename into place)."""
        folder = self.core.config.avatar_dir
        async with self._registering:
            try:
                staged = await asyncio.to_thread(stage, folder)
            except OSError as e:
                log.error("cannot write avatar %s into %s: %s", draft.avatar_id, folder, e)
                raise StorageUnavailable("the avatar folder cannot be written; try again later") from e
            try:
                a = self.core.register_avatar(
                    dataclasses.replace(draft, registered_at=self.core.clock()), operator=operator)
                await self.core.durable()
                await asyncio.to_thread(install, staged, folder)
            finally:
                images.discard(staged)  # gone already once installed
            self.core.avatar_images_changed()
        return a

    async def GetAvatar(self, request: avatars_pb2.GetAvatarRequest,
                        context: grpc.aio.ServicerContext) -> avatars_pb2.Avatar:
        a = await _guard(context, lambda: self._visible(caller(), request.avatar_id))
        return self._to_pb(a)

    async def ListAvatars(self, request: avatars_pb2.ListAvatarsRequest,
                          context: grpc.aio.ServicerContext) -> avatars_pb2.ListAvatarsResponse:
        found = await _guard(context, lambda: self.core.avatars.of(
            auth.tenant_scope(caller(), convert.tenant_from_pb(request.tenant))))
        # Each video avatar's bundle is read from its pointer file: off the event loop.
        pbs = await asyncio.to_thread(lambda: [self._to_pb(a) for a in found])
        return avatars_pb2.ListAvatarsResponse(avatars=pbs)

    async def RevokeLicence(self, request: avatars_pb2.RevokeLicenceRequest,
                            context: grpc.aio.ServicerContext) -> avatars_pb2.Avatar:
        def revoke() -> RegisteredAvatar:
            p = caller()
            self._visible(p, request.avatar_id)
            return self.core.revoke_licence(request.avatar_id, _revocation(p, request.reason))

        a = await _guard(context, revoke)
        await self.core.durable()
        return self._to_pb(a)

    async def ListAuditEntries(self, request: avatars_pb2.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> avatars_pb2.ListAuditEntriesResponse:
        def check() -> tuple[Principal, int]:
            p = caller()
            self._auditable(p, request.avatar_id)
            if request.page_size > MAX_PAGE:
                raise InvalidRequest(f"page_size must be at most {MAX_PAGE}")
            return p, request.page_size or DEFAULT_PAGE

        p, size = await _guard(context, check)
        await self.core.durable()  # the log as of this call, committed
        found = await asyncio.to_thread(self.core.avatars.entries, request.avatar_id,
                                        request.after_seq, size + 1)
        page = found[:size]
        return avatars_pb2.ListAuditEntriesResponse(
            entries=[entry_to_pb(e, p) for e in page],
            next_after_seq=page[-1].seq if len(found) > size else 0)

    async def GetAvatarUsage(self, request: avatars_pb2.GetAvatarUsageRequest,
                             context: grpc.aio.ServicerContext) -> avatars_pb2.GetAvatarUsageResponse:
        def usage() -> list[UsageRow]:
            p = caller()
            if request.avatar_id:
                self._auditable(p, request.avatar_id)
            start = convert.optional_time_from_pb(request, "start")
            end = convert.optional_time_from_pb(request, "end")
            rows = self.core.usage(tenant="" if p.admin else p.name, group_by=USAGE_BY,
                                   start=start, end=end)
            if not p.admin:
                mine = {a.avatar_id for a in self.core.avatars.of(p.name)}
                rows = [r for r in rows if r.avatar_id in mine]
            if request.avatar_id:
                rows = [r for r in rows if request.avatar_id in (r.avatar_id, r.voice)]
            return rows

        rows = await _guard(context, usage)
        return avatars_pb2.GetAvatarUsageResponse(rows=[usage_to_pb(r) for r in rows],
                                                  as_of=convert.timestamp(self.core.clock()))

    # -- voices -------------------------------------------------------------------------

    async def RegisterVoice(self, request: avatars_pb2.RegisterVoiceRequest,
                            context: grpc.aio.ServicerContext) -> avatars_pb2.Voice:
        def prepare() -> tuple[Principal, str, Licence]:
            p = caller()
            validate_id("voice_id", request.voice_id)
            validate_voice("voice_id", request.voice_id, required=True)  # a voice name too
            if p.admin and not request.tenant:
                raise InvalidRequest("tenant is required when an operator registers a voice")
            tenant = convert.tenant_from_pb(request.tenant) or p.name
            if not auth.may_see(p, tenant):
                raise PermissionDenied(f"{p} cannot register voices for tenant {tenant!r}")
            if not request.HasField("licence"):
                raise InvalidRequest("licence is required (an empty Licence allows any use)")
            lic = licence_from_pb(request.licence)
            asset = request.WhichOneof("asset")
            if asset is None:
                raise InvalidRequest("give the voice: piper (its model and JSON config) or "
                                     "service_config (a TTS service's voice)")
            if asset == "piper" and not (request.piper.model and request.piper.config):
                raise InvalidRequest("a piper voice needs both its model and its JSON config")
            limit = self.core.config.voice_model_max_bytes
            if len(request.piper.model) > limit:
                raise UploadTooLarge(f"the voice model is {len(request.piper.model)} bytes; at most "
                                    f"{limit} are accepted (voice_model_max_bytes)")
            self.core.claim_voice(request.voice_id, tenant)
            return p, tenant, lic

        p, tenant, lic = await _guard(context, prepare)
        voice_id, avatar_dir = request.voice_id, self.core.config.avatar_dir
        if request.WhichOneof("asset") == "piper":
            kind, digest = VoiceKind.PIPER, hashlib.sha256(request.piper.model).hexdigest()
            model, config = request.piper.model, request.piper.config

            def stage() -> list[tuple[Path, Path]]:
                return voices.stage_piper(avatar_dir, voice_id, model, config)
        else:
            service = request.service_config.encode()
            kind, digest = VoiceKind.SERVICE, hashlib.sha256(service).hexdigest()
            await _guard(context, lambda: self._check_service(request.service_config))

            def stage() -> list[tuple[Path, Path]]:
                return voices.stage_service(avatar_dir, voice_id, service)

        draft = RegisteredVoice(voice_id, tenant, lic, 0.0, kind, digest)
        v = await _guard_async(context, asyncio.shield(asyncio.ensure_future(
            self._register_voice(draft, stage))))
        log.info("%s voice %s registered for tenant %s by %s (sha256 %s)", kind.value, voice_id,
                 tenant, p, digest[:16])
        return voice_to_pb(v)

    def _check_service(self, config: str) -> None:
        """Workers will POST to the service: never to a host no output may reach."""
        try:
            url = json.loads(config).get("url", "")
        except (ValueError, AttributeError):
            return  # not a config: the voice's own check says why
        if isinstance(url, str) and url:
            check_service_url(self.core.egress, url)

    async def _register_voice(self, draft: RegisteredVoice,
                              stage: Callable[[], list[tuple[Path, Path]]]) -> RegisteredVoice:
        """Stages and checks the voice's files, commits the row, then renames the files
        into place: a voice on disk always has its licence on record."""
        async with self._registering:
            try:
                staged = await asyncio.to_thread(stage)
            except OSError as e:
                log.error("cannot write voice %s: %s", draft.voice_id, e)
                raise StorageUnavailable("the voice folder cannot be written; try again later") from e
            try:
                v = self.core.register_voice(dataclasses.replace(draft, registered_at=self.core.clock()))
                await self.core.durable()
                await asyncio.to_thread(voices.install, staged, self.core.config.avatar_dir,
                                        draft.voice_id)
            finally:
                voices.discard(staged)
        return v

    async def GetVoice(self, request: avatars_pb2.GetVoiceRequest,
                       context: grpc.aio.ServicerContext) -> avatars_pb2.Voice:
        v = await _guard(context, lambda: self._visible_voice(caller(), request.voice_id))
        return voice_to_pb(v)

    async def ListVoices(self, request: avatars_pb2.ListVoicesRequest,
                         context: grpc.aio.ServicerContext) -> avatars_pb2.ListVoicesResponse:
        found = await _guard(context, lambda: self.core.avatars.voices_of(
            auth.tenant_scope(caller(), convert.tenant_from_pb(request.tenant))))
        return avatars_pb2.ListVoicesResponse(voices=[voice_to_pb(v) for v in found])

    async def RevokeVoiceLicence(self, request: avatars_pb2.RevokeVoiceLicenceRequest,
                                 context: grpc.aio.ServicerContext) -> avatars_pb2.Voice:
        def revoke() -> RegisteredVoice:
            p = caller()
            self._visible_voice(p, request.voice_id)
            return self.core.revoke_voice_licence(request.voice_id, _revocation(p, request.reason))

        v = await _guard(context, revoke)
        await self.core.durable()
        return voice_to_pb(v)
