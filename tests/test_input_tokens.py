"""Live-input tokens and the scheduler's secret they come from, on plain values."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from avatarfarm.input_tokens import InputRefused, InputTokenExpired, mint, room_key, verify
from scheduler.api.input_keys import LiveInputKeys

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_a_token_opens_its_own_room_only_and_until_it_expires() -> None:
    key = room_key(SECRET, "room-a")
    t = mint(key, "room-a", "brand", ttl=60, now=NOW)
    assert t.expires_at == NOW + 60
    assert verify(key, t.token, "room-a", now=NOW + 59) == "brand"
    with pytest.raises(InputTokenExpired):
        verify(key, t.token, "room-a", now=NOW + 60)
    with pytest.raises(InputRefused):  # another room's key, or its id with this key
        verify(room_key(SECRET, "room-b"), t.token, "room-b", now=NOW)
    with pytest.raises(InputRefused):
        verify(key, t.token, "room-b", now=NOW)
    with pytest.raises(InputRefused):  # another secret
        verify(room_key(b"x" * 32, "room-a"), t.token, "room-a", now=NOW)


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # signature changed
    lambda t: t.replace("afi1.", "afi2."),
    lambda t: t + ".x",
    lambda t: t + "é",  # not ASCII: refused, not an error
    lambda t: "",
    lambda t: "afi1." + "A" * 2000 + ".x",
    lambda t: "afi1.%%%.sig",
])
def test_a_mangled_token_is_refused_the_same_way(mangle: object) -> None:
    key = room_key(SECRET, "room-a")
    token = mint(key, "room-a", "brand", now=NOW).token
    with pytest.raises(InputRefused) as e:
        verify(key, mangle(token), "room-a", now=NOW)  # type: ignore[operator]
    assert type(e.value) is InputRefused


def test_the_secret_is_made_once_owner_only_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "scheduler.db.input-secret"
    found: list[bytes] = []
    starts = [threading.Thread(target=lambda: found.append(LiveInputKeys.load(path).secret))
              for _ in range(4)]
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    assert len(found) == 4  # none failed
    assert len(set(found)) == 1 and len(found[0]) == 32  # schedulers starting at once agree
    assert path.stat().st_mode & 0o777 == 0o600
    assert LiveInputKeys.load(path).secret == found[0]  # and a restart keeps it
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing half-written left
