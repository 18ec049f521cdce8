"""The licence policy with plain values: each clause refusing and allowing, the
messages a tenant can act on, language ranges, and the invariants (adding to a
non-empty allow-list never refuses a room it allowed; a forbidden category
always refuses)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarfarm.domain import InvalidRequest
from scheduler.policy import licences
from scheduler.policy.licences import Licence, allowing, check, language_allows
from tests.builders import make_licence

NOW = 1_750_000_000.0


def room(**kw: Any) -> dict[str, Any]:
    base = {"platform": "douyin", "product_category": "cosmetics", "language": "zh-CN",
            "now": NOW, "revoked": False}
    return {**base, **kw}


REFUSED = [
    ("revoked", {}, {"revoked": True}, "revoked"),
    ("valid_from", {"valid_from": NOW + 60}, {}, "2025-06-15"),
    ("valid_until", {"valid_until": NOW - 60}, {}, "has ended"),
    ("valid_until", {"valid_until": NOW}, {}, "has ended"),  # the end itself is outside
    ("allowed_platforms", {"allowed_platforms": ["douyin", "taobao-live"]}, {"platform": "tiktok"},
     "may not be used on platform 'tiktok' (licence clause allowed_platforms: douyin, taobao-live)"),
    ("allowed_platforms", {"allowed_platforms": ["douyin"]}, {"platform": ""},
     "set the session's platform"),
    ("forbidden_categories", {"forbidden_categories": ["alcohol"]}, {"product_category": "alcohol"},
     "may not be used to sell 'alcohol'"),
    ("forbidden_categories", {"forbidden_categories": ["alcohol"]}, {"product_category": ""},
     "set the session's product_category"),
    ("allowed_categories", {"allowed_categories": ["cosmetics"]}, {"product_category": "toys"},
     "(licence clause allowed_categories: cosmetics)"),
    ("allowed_categories", {"allowed_categories": ["cosmetics"]}, {"product_category": ""},
     "states none"),
    ("allowed_languages", {"allowed_languages": ["zh-CN"]}, {"language": "zh-TW"},
     "may not be used in language 'zh-TW'"),
    ("allowed_languages", {"allowed_languages": ["zh-CN"]}, {"language": "zh"}, "zh-CN"),
    ("allowed_languages", {"allowed_languages": ["en"]}, {"language": ""},
     "set the session's language"),
]


@pytest.mark.parametrize(("clause", "licence", "attrs", "says"), REFUSED,
                         ids=[f"{c}-{i}" for i, (c, *_rest) in enumerate(REFUSED)])
def test_each_clause_refuses_naming_itself(clause: str, licence: dict[str, Any],
                                           attrs: dict[str, Any], says: str) -> None:
    refusal = check(make_licence(**licence), **room(**attrs))
    assert refusal is not None
    assert refusal.clause == clause
    assert says in refusal.message
    assert f"licence clause {clause}" in refusal.message
    assert refusal.explain("anna").startswith("avatar 'anna' ")


ALLOWED = [
    ({}, {}, ("unrestricted",)),
    ({"allowed_platforms": ["douyin", "taobao-live"]}, {"platform": "taobao-live"},
     ("allowed_platforms",)),
    ({"forbidden_categories": ["alcohol"]}, {"product_category": "cosmetics"},
     ("forbidden_categories",)),
    ({"allowed_categories": ["cosmetics"]}, {}, ("allowed_categories",)),
    ({"allowed_languages": ["zh"]}, {"language": "zh-CN"}, ("allowed_languages",)),
    ({"allowed_languages": ["zh-cn"]}, {"language": "ZH-CN"}, ("allowed_languages",)),
    ({"allowed_languages": ["en", "zh-Hans"]}, {"language": "zh-Hans-CN"}, ("allowed_languages",)),
    ({"valid_from": NOW}, {}, ("valid_from",)),  # from its first second
    ({"valid_from": NOW - 10, "valid_until": NOW + 10}, {}, ("valid_from", "valid_until")),
    # An unrestricted dimension needs no statement.
    ({"allowed_platforms": ["douyin"]}, {"product_category": "", "language": ""},
     ("allowed_platforms",)),
]


@pytest.mark.parametrize(("licence", "attrs", "clauses"), ALLOWED)
def test_each_clause_allows_what_it_lists(licence: dict[str, Any], attrs: dict[str, Any],
                                          clauses: tuple[str, ...]) -> None:
    lic = make_licence(**licence)
    assert check(lic, **room(**attrs)) is None
    assert allowing(lic) == clauses


def test_language_ranges() -> None:
    assert language_allows("zh", "zh-CN")
    assert language_allows("zh-CN", "zh-CN")
    assert not language_allows("zh-CN", "zh-TW")
    assert not language_allows("zh-CN", "zh")
    assert not language_allows("z", "zh")  # a prefix of a subtag is not a range


def test_ends_at_is_valid_until() -> None:
    assert licences.ends_at(make_licence()) is None
    assert licences.ends_at(make_licence(valid_until=NOW)) == NOW


@pytest.mark.parametrize(("licence", "says"), [
    ({"allowed_categories": ["alcohol"], "forbidden_categories": ["alcohol"]}, "both allowed and forbidden"),
    ({"allowed_languages": ["english"]}, "BCP 47"),
    ({"allowed_platforms": ["tik tok"]}, "may contain only"),
    ({"valid_from": NOW, "valid_until": NOW}, "after valid_from"),
    ({"valid_until": float("nan")}, "not a valid time"),
    ({"person_ref": "x" * 300}, "longer than"),
    ({"consent_record_id": "a\x00b"}, "control characters"),
    ({"allowed_platforms": [f"p{i}" for i in range(300)]}, "more than"),
])
def test_registration_refuses_malformed_licences(licence: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        licences.validate(make_licence(**licence))


PLATFORMS = ["douyin", "taobao-live", "tiktok", "kuaishou"]
CATEGORIES = ["cosmetics", "alcohol", "food", "toys"]
LANGUAGES = ["en", "en-US", "zh", "zh-CN", "zh-TW", "ja"]
subset = st.lists

licences_st = st.builds(
    Licence,
    allowed_platforms=subset(st.sampled_from(PLATFORMS), unique=True).map(tuple),
    allowed_categories=subset(st.sampled_from(CATEGORIES), unique=True).map(tuple),
    forbidden_categories=subset(st.sampled_from(CATEGORIES), unique=True).map(tuple),
    allowed_languages=subset(st.sampled_from(LANGUAGES), unique=True).map(tuple),
    valid_from=st.none() | st.floats(NOW - 100, NOW + 100),
    valid_until=st.none() | st.floats(NOW - 100, NOW + 100))
rooms_st = st.fixed_dictionaries({
    "platform": st.sampled_from(["", *PLATFORMS]),
    "product_category": st.sampled_from(["", *CATEGORIES]),
    "language": st.sampled_from(["", *LANGUAGES]),
    "now": st.floats(NOW - 200, NOW + 200),
    "revoked": st.booleans()})
LISTS = ("allowed_platforms", "allowed_categories", "allowed_languages")
VALUES = {"allowed_platforms": PLATFORMS, "allowed_categories": CATEGORIES,
          "allowed_languages": LANGUAGES}


@given(licences_st, rooms_st, st.sampled_from(LISTS), st.data())
def test_adding_to_an_allow_list_never_refuses_an_allowed_room(
        lic: Licence, attrs: dict[str, Any], which: str, data: st.DataObject) -> None:
    if check(lic, **attrs) is not None or not getattr(lic, which):
        return  # an empty allow-list allows anything: adding to it is a restriction
    extra = data.draw(st.sampled_from(VALUES[which]))
    wider = dataclasses.replace(lic, **{which: (*getattr(lic, which), extra)})
    assert check(wider, **attrs) is None


@given(licences_st, rooms_st)
def test_a_forbidden_category_always_refuses(lic: Licence, attrs: dict[str, Any]) -> None:
    if attrs["product_category"] in lic.forbidden_categories:
        assert check(lic, **attrs) is not None
    # And listing it as allowed too changes nothing.
    if lic.forbidden_categories:
        both = dataclasses.replace(lic, allowed_categories=(*lic.allowed_categories,
                                                            *lic.forbidden_categories))
        refusal = check(both, **{**attrs, "product_category": lic.forbidden_categories[0]})
        assert refusal is not None


@given(licences_st, rooms_st)
def test_an_unstated_dimension_is_refused_where_the_licence_restricts_it(
        lic: Licence, attrs: dict[str, Any]) -> None:
    refusal = check(lic, **attrs)
    restricted_and_unstated = (
        (lic.allowed_platforms and not attrs["platform"])
        or ((lic.allowed_categories or lic.forbidden_categories) and not attrs["product_category"])
        or (lic.allowed_languages and not attrs["language"]))
    if restricted_and_unstated:
        assert refusal is not None
    if refusal is None:
        assert allowing(lic)  # an allowed room is always written with what allowed it
