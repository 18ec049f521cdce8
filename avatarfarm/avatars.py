"""Where avatar images live on disk: a folder of ``<avatar_id>.png`` (or JPEG)."""

from __future__ import annotations

from pathlib import Path

AVATAR_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_avatars(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in AVATAR_SUFFIXES)
