"""Who may see the status pages: the pure decision, and through a real HTTP port."""

from __future__ import annotations

import base64
import http.client

import pytest

from avatarfarm.serving import MetricsEndpoint, Page
from scheduler.api import auth
from scheduler.api.status_access import StatusAccess, host_name, presented, served_hosts
from scheduler.metrics import SchedulerMetrics

KEY = b"k" * 32
NOW = 1_800_000_000.0
ADMIN_KEY, TENANT_KEY = "admin-key-0123456789", "tenant-key-0123456789"
AUTHN = auth.Authenticator.build(signing_key=KEY, admin_keys=[auth.hash_api_key(ADMIN_KEY)],
                                 tenant_keys={"vendor": [auth.hash_api_key(TENANT_KEY)]})
HOSTS = served_hosts("0.0.0.0", ["status.farm.example"])


def access(authn: auth.Authenticator = AUTHN, *, open: bool = False) -> StatusAccess:
    return StatusAccess(authn, HOSTS, open=open, clock=lambda: NOW)


def token(kind: auth.SubjectKind, name: str, ttl: float = 600, now: float = NOW) -> str:
    return auth.mint_token(KEY, kind, name, ttl_seconds=ttl, now=now)


def basic(secret: str, user: str = "ops") -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


@pytest.mark.parametrize("header,name", [
    ("127.0.0.1:9464", "127.0.0.1"), ("LOCALHOST", "localhost"), ("[::1]:9464", "::1"),
    ("status.farm.example.:80", "status.farm.example"), ("host:port", ""), ("[::1", ""),
])
def test_the_host_is_read_without_its_port(header: str, name: str) -> None:
    assert host_name(header) == name


def test_a_bound_address_is_served_and_a_wildcard_is_not_a_name() -> None:
    assert "10.0.0.5" in served_hosts("10.0.0.5")
    assert served_hosts("0.0.0.0") == served_hosts("::") == {"localhost", "127.0.0.1", "::1"}


@pytest.mark.parametrize("authz", [
    basic(ADMIN_KEY), basic(token(auth.SubjectKind.ADMIN, "ops")), basic(ADMIN_KEY, user=""),
    "Bearer " + token(auth.SubjectKind.ADMIN, "ops"),
])
def test_an_operator_sees_the_pages(authz: str) -> None:
    assert access().check({"host": "127.0.0.1:9464", "authorization": authz}) is None
    assert access().check({"host": "status.farm.example", "x-api-key": ADMIN_KEY}) is None


@pytest.mark.parametrize("headers", [
    {}, {"authorization": basic("wrong")}, {"authorization": "Basic !!!"},
    {"authorization": basic(token(auth.SubjectKind.ADMIN, "ops", ttl=60, now=NOW - 120))},
    {"authorization": "Bearer " + token(auth.SubjectKind.ADMIN, "ops")[:-2]},
    {"authorization": basic("")}, {"x-api-key": "nope"},
])
def test_no_valid_credential_is_asked_to_log_in(headers: dict[str, str]) -> None:
    refused = access().check({"host": "localhost:9464", **headers})
    assert refused is not None and refused.status.startswith("401")
    assert ("WWW-Authenticate", 'Basic realm="avatarfarm status", charset="UTF-8"') in refused.headers


@pytest.mark.parametrize("authz", [basic(TENANT_KEY), basic(token(auth.SubjectKind.TENANT, "vendor")),
                                   "Bearer " + token(auth.SubjectKind.WORKER, "w1")])
def test_a_tenant_or_worker_credential_is_not_an_operator(authz: str) -> None:
    refused = access().check({"host": "localhost", "authorization": authz})
    assert refused is not None and refused.status.startswith("403")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9464", "", "10.0.0.9",
                                  "localhost.evil.example"])
def test_a_host_not_served_is_refused_even_to_an_operator_and_when_open(host: str) -> None:
    for a in (access(), access(open=True), access(auth.Authenticator())):
        refused = a.check({"host": host, "authorization": basic(ADMIN_KEY)})
        assert refused is not None and refused.status.startswith("421")


def test_open_pages_and_a_farm_without_credentials_need_no_login() -> None:
    assert access(open=True).check({"host": "localhost"}) is None
    assert access(auth.Authenticator()).check({"host": "127.0.0.1:1"}) is None


def test_credentials_are_read_from_each_form() -> None:
    t = token(auth.SubjectKind.ADMIN, "ops")
    assert presented({"authorization": basic(t)}) == auth.Presented(bearer=t)
    assert presented({"authorization": basic("k:with:colons")}) == auth.Presented(api_key="k:with:colons")
    assert presented({"authorization": f"bearer {t}"}) == auth.Presented(bearer=t)
    assert presented({"x-api-key": " k "}) == auth.Presented(api_key="k")


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_the_port_guards_every_page_and_leaves_metrics_to_scrapers() -> None:
    metrics = SchedulerMetrics()
    pages = {"/status": lambda: Page(b"every tenant's rooms", "text/plain")}
    e = MetricsEndpoint.start(-1, "127.0.0.1", metrics.registry, pages=pages,
                              guard=access().check)
    try:
        status, headers, body = get(e.port, "/status", {})
        assert status == 401 and b"rooms" not in body and "www-authenticate" in headers
        assert get(e.port, "/status", {"Authorization": basic(ADMIN_KEY)})[2] == b"every tenant's rooms"
        assert get(e.port, "/status", {"Authorization": basic(ADMIN_KEY),
                                       "Host": "evil.example"})[0] == 421
        status, _, body = get(e.port, "/metrics", {"Host": "10.1.2.3:9464"})
        assert status == 200 and b"avatarfarm_" in body
    finally:
        e.stop()
