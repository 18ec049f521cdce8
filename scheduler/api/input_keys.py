"""The scheduler's side of live-input credentials (see ``avatarfarm.input_tokens``): the
secret each room's key is derived from, and the tokens minted for a room's tenant."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from avatarfarm import input_tokens
from avatarfarm.input_tokens import INPUT_TOKEN_TTL, InputToken

SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class LiveInputKeys:
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(SECRET_BYTES), repr=False)
    ttl: float = INPUT_TOKEN_TTL
    clock: Callable[[], float] = time.time

    def key(self, session_id: str) -> bytes:
        return input_tokens.room_key(self.secret, session_id)

    def token(self, session_id: str, tenant: str) -> InputToken:
        return input_tokens.mint(self.key(session_id), session_id, tenant, ttl=self.ttl,
                                 now=self.clock())

    @staticmethod
    def load(path: Path, ttl: float = INPUT_TOKEN_TTL) -> LiveInputKeys:
        """The secret in `path`, made (32 random bytes, owner-only) if there is none yet:
        it must outlive the process, or a restarted scheduler could not renew the tokens
        of rooms still running on workers that hold their keys."""
        if path.name.startswith(":memory:"):  # a database in memory: a key for this process
            return LiveInputKeys(ttl=ttl)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Written whole to a file of its own, then linked into place: a crash leaves
            # no empty secret behind, and of two schedulers starting at once one secret wins.
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        secret = path.read_bytes()
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the live-input secret in {path} is shorter than {SECRET_BYTES} bytes")
        return LiveInputKeys(secret, ttl)


def secret_path(database: Path, configured: Path | None) -> Path:
    """Where the live-input secret is: as configured, else beside the database."""
    return configured if configured is not None else database.with_name(database.name + ".input-secret")
