"""`avatarfarm token`: signing keys, tokens the scheduler accepts, API key hashes;
and the scheduler command refusing an exposed port without authentication."""

from __future__ import annotations

import io
import stat
import time
from pathlib import Path

import pytest

from farm.cli import main
from scheduler.api import auth


def test_a_new_secret_mints_tokens_the_scheduler_verifies(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "token.key"
    assert main(["token", "--new-secret", "--secret-file", str(secret)]) == 0
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert main(["token", "--new-secret", "--secret-file", str(secret)]) == 2  # never replaced
    capsys.readouterr()
    key = auth.read_signing_key(secret)
    for args, kind, name in ((["--tenant", "brand"], auth.SubjectKind.TENANT, "brand"),
                             (["--worker", "gpu-0"], auth.SubjectKind.WORKER, "gpu-0"),
                             (["--admin"], auth.SubjectKind.ADMIN, "operator")):
        assert main(["token", *args, "--ttl", "120", "--secret-file", str(secret)]) == 0
        out = capsys.readouterr().out.strip()
        claims = auth.verify_token(key, out, now=time.time())
        assert (claims.kind, claims.name) == (kind, name)
        assert 118 <= claims.expires_at - time.time() <= 121
    # The key never appears in what the command prints.
    assert main(["token", "--tenant", "brand", "--secret-file", str(secret)]) == 0
    assert key.decode() not in capsys.readouterr().out


def test_token_mistakes_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--tenant", "brand"]) == 2
    assert "--secret-file" in capsys.readouterr().err
    short = tmp_path / "short.key"
    short.write_text("tiny\n")
    assert main(["token", "--tenant", "brand", "--secret-file", str(short)]) == 2
    assert "at least 32 bytes" in capsys.readouterr().err
    ok = tmp_path / "ok.key"
    ok.write_text("k" * 32)
    assert main(["token", "--tenant", "two words", "--secret-file", str(ok)]) == 2
    assert main(["token", "--tenant", "b", "--ttl", "-5", "--secret-file", str(ok)]) == 2
    with pytest.raises(SystemExit):
        main(["token", "--tenant", "a", "--worker", "b", "--secret-file", str(ok)])


def test_an_api_key_is_hashed_from_standard_input(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-key\n"))
    assert main(["token", "--hash-api-key"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == auth.hash_api_key("s3cret-key") and "s3cret" not in out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["token", "--hash-api-key"]) == 2


def test_the_scheduler_refuses_an_open_port_on_the_network(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["scheduler", "--listen", "0.0.0.0:0", "--metrics-port", "0",
               "--database", str(tmp_path / "s.db")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "without authentication" in err and "allow_insecure" in err
    assert not (tmp_path / "s.db").exists()
