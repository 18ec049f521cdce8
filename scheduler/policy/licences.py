"""Licences of avatars' likenesses, as pure policy: where, for what, in which
language and when a registered avatar may be rendered.

A licence restricts a dimension of a room (platform, product category,
language) only through a non-empty list; an empty allow-list allows any value,
and forbidden categories win over allowed ones. A room that leaves a restricted
dimension unstated is refused: the licence cannot be shown to allow it. `check`
answers with the clause that refused, and `allowing` names the clauses a room
that passed satisfied (written to the audit log with each room start).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from avatarfarm.domain import InvalidRequest, validate_id, validate_language

# Clause names, as the API and the audit log spell them.
REVOKED = "revoked"
VALID_FROM = "valid_from"
VALID_UNTIL = "valid_until"
ALLOWED_PLATFORMS = "allowed_platforms"
FORBIDDEN_CATEGORIES = "forbidden_categories"
ALLOWED_CATEGORIES = "allowed_categories"
ALLOWED_LANGUAGES = "allowed_languages"
LIVE_VOICE_CONVERSION = "live_voice_conversion"
CLAUSES = (REVOKED, VALID_FROM, VALID_UNTIL, ALLOWED_PLATFORMS, FORBIDDEN_CATEGORIES,
           ALLOWED_CATEGORIES, ALLOWED_LANGUAGES, LIVE_VOICE_CONVERSION)
# The audit's name for a licence that restricts nothing.
UNRESTRICTED = "unrestricted"

MAX_LIST = 256  # entries per list: a contract names a few platforms, not thousands
MAX_REF_CHARS = 256


@dataclass(frozen=True, slots=True)
class Licence:
    """Where and for what a likeness may be used (the proto's Licence). Times are epoch
    seconds; None: from registration (valid_from) or no expiry (valid_until)."""

    person_ref: str = ""
    consent_record_id: str = ""
    allowed_platforms: tuple[str, ...] = ()
    allowed_categories: tuple[str, ...] = ()
    forbidden_categories: tuple[str, ...] = ()
    allowed_languages: tuple[str, ...] = ()
    valid_from: float | None = None
    valid_until: float | None = None
    # Converting a live speaker's voice into this person's (a room's voice_conversion).
    live_voice_conversion: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    clause: str
    message: str  # completes "avatar 'x' ..."

    def explain(self, likeness_id: str, kind: str = "avatar") -> str:
        """The refusal in words: ``kind`` is what the licence is of (avatar, voice)."""
        return f"{kind} {likeness_id!r} {self.message}"


def language_allows(licensed: str, tag: str) -> bool:
    """Basic filtering (RFC 4647): "zh" allows "zh-CN"; "zh-CN" does not allow "zh-TW"
    nor plain "zh". Case does not matter in BCP 47."""
    licensed, tag = licensed.lower(), tag.lower()
    return tag == licensed or tag.startswith(licensed + "-")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _listed(values: Sequence[str]) -> str:
    return ", ".join(values)


def check(licence: Licence, *, platform: str, product_category: str, language: str, now: float,
          revoked: bool, voice_conversion: bool = False) -> Refusal | None:
    """None if the licence allows a room with these attributes at `now`; otherwise the
    first clause that refuses it, with what the tenant can do about it."""
    if revoked:
        return Refusal(REVOKED, "may not be used: its licence was revoked (licence clause revoked); "
                                "the avatar's owner must register it again with a new licence")
    if voice_conversion and not licence.live_voice_conversion:
        return Refusal(LIVE_VOICE_CONVERSION,
                       "may not have a live speaker's voice converted into it (licence clause "
                       "live_voice_conversion is not granted)")
    if licence.valid_from is not None and now < licence.valid_from:
        return Refusal(VALID_FROM, f"may not be used before {_utc(licence.valid_from)} "
                                   f"(licence clause valid_from)")
    if licence.valid_until is not None and now >= licence.valid_until:
        return Refusal(VALID_UNTIL, f"may not be used after {_utc(licence.valid_until)}: its "
                                    f"licence has ended (licence clause valid_until)")
    if licence.allowed_platforms:
        if not platform:
            return Refusal(ALLOWED_PLATFORMS,
                           f"may be used only on stated platforms and this room states none "
                           f"(licence clause allowed_platforms: {_listed(licence.allowed_platforms)}); "
                           f"set the session's platform")
        if platform not in licence.allowed_platforms:
            return Refusal(ALLOWED_PLATFORMS,
                           f"may not be used on platform {platform!r} (licence clause "
                           f"allowed_platforms: {_listed(licence.allowed_platforms)})")
    if licence.forbidden_categories or licence.allowed_categories:
        clause = FORBIDDEN_CATEGORIES if licence.forbidden_categories else ALLOWED_CATEGORIES
        if not product_category:
            listed = licence.forbidden_categories or licence.allowed_categories
            return Refusal(clause,
                           f"may be used only for stated product categories and this room states "
                           f"none (licence clause {clause}: {_listed(listed)}); set the "
                           f"session's product_category")
        if product_category in licence.forbidden_categories:
            return Refusal(FORBIDDEN_CATEGORIES,
                           f"may not be used to sell {product_category!r} (licence clause "
                           f"forbidden_categories: {_listed(licence.forbidden_categories)})")
        if licence.allowed_categories and product_category not in licence.allowed_categories:
            return Refusal(ALLOWED_CATEGORIES,
                           f"may not be used to sell {product_category!r} (licence clause "
                           f"allowed_categories: {_listed(licence.allowed_categories)})")
    if licence.allowed_languages:
        if not language:
            return Refusal(ALLOWED_LANGUAGES,
                           f"may be used only in stated languages and this room states none "
                           f"(licence clause allowed_languages: {_listed(licence.allowed_languages)}); "
                           f"set the session's language")
        if not any(language_allows(lang, language) for lang in licence.allowed_languages):
            return Refusal(ALLOWED_LANGUAGES,
                           f"may not be used in language {language!r} (licence clause "
                           f"allowed_languages: {_listed(licence.allowed_languages)})")
    return None


def allowing(licence: Licence) -> tuple[str, ...]:
    """The clauses a room that passed `check` satisfied: every clause that restricts
    anything (UNRESTRICTED when none does)."""
    clauses = tuple(name for name, restricts in (
        (VALID_FROM, licence.valid_from is not None),
        (VALID_UNTIL, licence.valid_until is not None),
        (ALLOWED_PLATFORMS, bool(licence.allowed_platforms)),
        (FORBIDDEN_CATEGORIES, bool(licence.forbidden_categories)),
        (ALLOWED_CATEGORIES, bool(licence.allowed_categories)),
        (ALLOWED_LANGUAGES, bool(licence.allowed_languages))) if restricts)
    return clauses or (UNRESTRICTED,)


def ends_at(licence: Licence) -> float | None:
    """When rooms under this licence must end (None: never, short of revocation)."""
    return licence.valid_until


def ended(licence: Licence, *, now: float, revoked: bool) -> Refusal | None:
    """Why running rooms under this licence must end now (revoked or expired), if so."""
    if revoked:
        return Refusal(REVOKED, "may no longer be used: its licence was revoked")
    end = ends_at(licence)
    if end is not None and now >= end:
        return Refusal(VALID_UNTIL, f"may no longer be used: its licence ended at {_utc(end)} "
                                    f"(licence clause valid_until)")
    return None


def validate(licence: Licence) -> None:
    """What a tenant registers: short ids in the lists, BCP 47 languages, a period that
    is not empty, references that are names rather than documents."""
    for name, ref in (("person_ref", licence.person_ref),
                      ("consent_record_id", licence.consent_record_id)):
        if len(ref) > MAX_REF_CHARS:
            raise InvalidRequest(f"licence {name} is longer than {MAX_REF_CHARS} characters")
        if any(not ch.isprintable() for ch in ref):
            raise InvalidRequest(f"licence {name} contains control characters")
    for name, values in ((ALLOWED_PLATFORMS, licence.allowed_platforms),
                         (ALLOWED_CATEGORIES, licence.allowed_categories),
                         (FORBIDDEN_CATEGORIES, licence.forbidden_categories),
                         (ALLOWED_LANGUAGES, licence.allowed_languages)):
        if len(values) > MAX_LIST:
            raise InvalidRequest(f"licence {name} has more than {MAX_LIST} entries")
        for v in values:
            if name == ALLOWED_LANGUAGES:
                validate_language(f"licence {name} entry", v)
            else:
                validate_id(f"licence {name} entry", v)
    both = set(licence.allowed_categories) & set(licence.forbidden_categories)
    if both:
        raise InvalidRequest(f"licence lists {sorted(both)} as both allowed and forbidden "
                             "categories")
    for name, t in ((VALID_FROM, licence.valid_from), (VALID_UNTIL, licence.valid_until)):
        if t is not None and not math.isfinite(t):
            raise InvalidRequest(f"licence {name} is not a valid time")
    if licence.valid_from is not None and licence.valid_until is not None and \
            licence.valid_until <= licence.valid_from:
        raise InvalidRequest("licence valid_until must be after valid_from")
