"""Access policy with plain values: tokens (minted, verified, expired, forged,
tampered), API keys kept as hashes, certificate identities, what each kind of
caller may touch, and the rate limiter's token bucket."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.api import auth
from scheduler.api.auth import (
    OPEN,
    Authenticator,
    Presented,
    Principal,
    Service,
    SubjectKind,
    Unauthenticated,
)
from scheduler.api.ratelimit import Bucket, Rate, RateLimiter, take
from scheduler.errors import PermissionDenied

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NOW = 1_800_000_000.0


def tenant(name: str = "brand", via: str = "token") -> Principal:
    return Principal(SubjectKind.TENANT, name, via)


def mint(kind: SubjectKind = SubjectKind.TENANT, name: str = "brand", *, key: bytes = KEY,
         ttl: float = 60.0, now: float = NOW) -> str:
    return auth.mint_token(key, kind, name, ttl_seconds=ttl, now=now)


def test_a_token_round_trips_until_it_expires() -> None:
    token = mint(SubjectKind.WORKER, "gpu-0", ttl=60)
    claims = auth.verify_token(KEY, token, now=NOW + 59)
    assert (claims.kind, claims.name, claims.issued_at, claims.expires_at) == (
        SubjectKind.WORKER, "gpu-0", int(NOW), int(NOW) + 60)
    assert claims.principal() == Principal(SubjectKind.WORKER, "gpu-0", "token")
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify_token(KEY, token, now=NOW + 60)


def _swap_claims(token: str, **changes: object) -> str:
    prefix, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{forged}.{sig}"


@pytest.mark.parametrize("bad", [
    mint(key=OTHER_KEY),  # signed with another key
    _swap_claims(mint(), sub="rival"),  # another tenant's name under a valid signature
    _swap_claims(mint(), kind="admin"),  # promoted to operator
    _swap_claims(mint(), exp=int(NOW) + 10**9),  # lifetime stretched
    mint()[:-2] + ("AA" if not mint().endswith("AA") else "BB"),  # signature bytes changed
])
def test_forged_and_tampered_tokens_are_refused(bad: str) -> None:
    with pytest.raises(Unauthenticated, match="signature"):
        auth.verify_token(KEY, bad, now=NOW)


@pytest.mark.parametrize("bad", ["", "x", "af1.a", "af2.a.b", "af1..", "af1.a.b.c", "af1.!!.??",
                                 "af1." + "a" * 5000 + ".b"])
def test_malformed_tokens_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(KEY, bad, now=NOW)
    assert bad not in str(err.value) or bad in ("", "x")


def test_a_token_from_the_future_is_refused_beyond_the_clock_leeway() -> None:
    auth.verify_token(KEY, mint(now=NOW + 30), now=NOW)
    with pytest.raises(Unauthenticated, match="future"):
        auth.verify_token(KEY, mint(now=NOW + 3600, ttl=7200), now=NOW)


def test_minting_checks_key_name_and_lifetime() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mint(key=b"short")
    with pytest.raises(ValueError, match="name"):
        mint(name="two words")
    with pytest.raises(ValueError, match="positive"):
        mint(ttl=0)


def test_the_signing_key_file_is_read_without_its_newline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "key"
    f.write_text("ab" * 32 + "\n")
    assert auth.read_signing_key(f) == ("ab" * 32).encode()
    f.write_text("short\n")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        auth.read_signing_key(f)
    with pytest.raises(ValueError, match="cannot read"):
        auth.read_signing_key(tmp_path / "missing")


def authenticator(**kw: object) -> Authenticator:
    kw.setdefault("signing_key", KEY)
    kw.setdefault("tenant_keys", {"brand": [auth.hash_api_key("brand-key")]})
    kw.setdefault("admin_keys", [auth.hash_api_key("root-key")])
    return Authenticator.build(**kw)  # type: ignore[arg-type]


def test_with_nothing_configured_every_caller_is_the_open_operator() -> None:
    a = Authenticator.build()
    assert not a.enabled
    assert a.authenticate(Presented(), NOW) is OPEN
    assert a.authenticate(Presented(bearer="anything"), NOW) is OPEN


def test_credentials_map_to_principals() -> None:
    a = authenticator(certificates=True)
    assert a.authenticate(Presented(bearer=mint()), NOW) == tenant()
    assert a.authenticate(Presented(api_key="brand-key"), NOW) == tenant(via="api-key")
    assert a.authenticate(Presented(api_key="root-key"), NOW).admin
    assert a.authenticate(Presented(certificate=True,
                                    certificate_uris=("avatarfarm://worker/gpu-1",)), NOW) == \
        Principal(SubjectKind.WORKER, "gpu-1", "certificate")
    # A token sent with the call is the identity, whatever the certificate says.
    assert a.authenticate(Presented(bearer=mint(), certificate=True,
                                    certificate_uris=("avatarfarm://admin/x",)), NOW) == tenant()
    with pytest.raises(Unauthenticated, match="names no avatarfarm identity"):
        a.authenticate(Presented(certificate=True), NOW)


@pytest.mark.parametrize(("presented", "why"), [
    (Presented(), "no credential"),
    (Presented(api_key="guess"), "unknown API key"),
    (Presented(bearer=mint(key=OTHER_KEY)), "signature"),
    (Presented(bearer=mint(ttl=1), api_key="brand-key"), "not both"),
    # Certificates identify only where a client CA verifies them.
    (Presented(certificate=True, certificate_uris=("avatarfarm://tenant/brand",)), "no credential"),
])
def test_refusals(presented: Presented, why: str) -> None:
    with pytest.raises(Unauthenticated, match=why):
        authenticator().authenticate(presented, NOW)


def test_tokens_are_refused_when_no_signing_key_is_configured() -> None:
    a = authenticator(signing_key=None)
    with pytest.raises(Unauthenticated, match="accepts no tokens"):
        a.authenticate(Presented(bearer=mint()), NOW)


@pytest.mark.parametrize("uris", [(), ("https://example.com",), ("avatarfarm://king/x",),
                                  ("avatarfarm://tenant/",),
                                  ("avatarfarm://tenant/a", "avatarfarm://tenant/b")])
def test_a_certificate_names_exactly_one_identity(uris: tuple[str, ...]) -> None:
    with pytest.raises(Unauthenticated, match="certificate"):
        auth.principal_from_certificate(uris)


def test_api_keys_are_configured_as_hashes_and_never_shared() -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        authenticator(tenant_keys={"brand": ["brand-key"]})  # the key itself, not its hash
    h = auth.hash_api_key("k")
    with pytest.raises(ValueError, match="both"):
        authenticator(tenant_keys={"a": [h], "b": [h]})
    assert auth.hash_api_key(" k\n") == h  # pasted with a newline, same key


def test_who_may_touch_what() -> None:
    brand, rival = tenant("brand"), tenant("rival")
    admin = Principal(SubjectKind.ADMIN, "ops", "token")
    worker = Principal(SubjectKind.WORKER, "gpu-0", "token")
    auth.check_service(brand, Service.SESSIONS)
    auth.check_service(worker, Service.WORKERS)
    auth.check_service(admin, Service.SESSIONS)
    auth.check_service(admin, Service.WORKERS)
    with pytest.raises(PermissionDenied):
        auth.check_service(worker, Service.SESSIONS)
    with pytest.raises(PermissionDenied):
        auth.check_service(brand, Service.WORKERS)

    assert auth.may_see(brand, "brand") and not auth.may_see(rival, "brand")
    assert auth.may_see(admin, "brand") and not auth.may_see(worker, "brand")
    auth.check_create(brand, "brand")
    with pytest.raises(PermissionDenied):
        auth.check_create(rival, "brand")

    assert auth.tenant_scope(brand, "") == "brand" == auth.tenant_scope(brand, "brand")
    assert auth.tenant_scope(admin, "") == "" and auth.tenant_scope(admin, "rival") == "rival"
    with pytest.raises(PermissionDenied):
        auth.tenant_scope(rival, "brand")

    auth.check_worker_id(worker, "gpu-0")
    auth.check_worker_id(admin, "any")
    for p, wid in ((worker, "gpu-1"), (brand, "gpu-0")):
        with pytest.raises(PermissionDenied):
            auth.check_worker_id(p, wid)


# -- rate limits ------------------------------------------------------------------


def test_a_bucket_admits_its_burst_then_says_when_to_retry() -> None:
    rate = Rate(2.0, 3.0)
    b = Bucket.full(rate, 0.0)
    for _ in range(3):
        b, wait = take(rate, b, 0.0)
        assert wait == 0
    b, wait = take(rate, b, 0.0)
    assert wait == pytest.approx(0.5)
    b, wait = take(rate, b, 0.5)  # retried exactly when told
    assert wait == 0


def test_the_limiter_keeps_a_bucket_per_tenant_and_honours_overrides() -> None:
    now = [0.0]
    rates = {"vip": Rate(0.0, 0.0), "small": Rate(1.0, 1.0)}
    limiter = RateLimiter(lambda t: rates.get(t, Rate(1.0, 2.0)), lambda: now[0])
    assert limiter.admit("a") is None and limiter.admit("a") is None
    throttled = limiter.admit("a")
    assert throttled is not None and "1 calls/s (bursts of 2)" in throttled.message
    assert "retry in 1.000 s" in throttled.message
    assert limiter.admit("b") is None  # its own bucket
    assert all(limiter.admit("vip") is None for _ in range(1000))  # unlimited
    assert limiter.admit("small") is None and limiter.admit("small") is not None
    now[0] = 1.0
    assert limiter.admit("a") is None and limiter.admit("small") is None


def test_a_batch_takes_a_call_for_each_of_its_items() -> None:
    rate = Rate(2.0, 4.0)
    b, wait = take(rate, Bucket.full(rate, 0.0), 0.0, calls=3)
    assert wait == 0 and b.tokens == pytest.approx(1.0)
    b, wait = take(rate, b, 0.0, calls=2)
    assert wait == pytest.approx(0.5)  # one more token in half a second
    assert take(rate, b, 0.5, calls=2)[1] == 0
    # More than the burst is never admitted, and the limiter says so, not when to retry.
    assert take(rate, Bucket.full(rate, 0.0), 0.0, calls=5)[1] == float("inf")
    limiter = RateLimiter(lambda t: rate, lambda: 0.0)
    throttled = limiter.admit("a", 5)
    assert throttled is not None and "batches of at most 4" in throttled.message
    assert limiter.admit("a", 4) is None  # the refused batch took nothing


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        Rate(-1.0, 1.0)
    with pytest.raises(ValueError):
        Rate(1.0, 0.5)


@settings(max_examples=300, deadline=None)
@given(per_second=st.floats(0.1, 100.0), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300))
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_time(
        per_second: float, burst: int, gaps: list[float]) -> None:
    rate = Rate(per_second, float(burst))
    t0 = now = 5.0
    bucket = Bucket.full(rate, now)
    admitted = 0
    for gap in gaps:
        now += gap
        bucket, wait = take(rate, bucket, now)
        admitted += wait == 0
        assert admitted <= burst + per_second * (now - t0) + 1e-6
        if wait > 0:  # the advised retry time is honest
            assert take(rate, bucket, now + wait)[1] == 0
