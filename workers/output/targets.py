"""Where a room's stream goes: a tenant's output target, resolved and vetted (a file,
an HLS folder or an RTMP URL), and where each continuation of it writes.

An output outlives the worker that started it. When the scheduler moves a room
to another worker it does so under a new *assignment epoch* (1 for the first
placement, one more for each), and the new worker continues the same output:

- RTMP: the same URL; nothing to do here.
- HLS folder: each assignment publishes its own segments into the folder and
  rewrites the playlist after what the earlier ones published (``workers.output.hls``).
- File: continuation k writes ``{stem}.{k}{suffix}`` next to the original:
  ``show.mp4``, then ``show.1.mp4``, ``show.2.mp4``, ...

Which assignment may write an output is the fence's to say (``workers.output.fence``).

Each tenant has its own output folder, ``@<tenant>`` inside the worker's output folder
(``tenant_root``): a tenant names paths inside its own folder and cannot name another
tenant's. No tenant path can name an ``@`` folder (``@`` is not allowed in output paths),
so outputs written before folders were per tenant, at the top of the output folder,
stay readable where they are and are never taken for a tenant's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from avatarfarm.domain import LIMITS, InvalidRequest, Output, OutputKind, validate_id, validate_output
from avatarfarm.egress import EgressPolicy, ForbiddenTarget


class OutputError(ValueError):
    """An output target that is malformed or not allowed."""


@dataclass(frozen=True, slots=True)
class OutputTarget:
    kind: OutputKind
    location: str  # resolved file path, HLS playlist path or RTMP URL

    @staticmethod
    def resolve(kind: OutputKind, value: str, root: Path,
                egress: EgressPolicy | None = None) -> OutputTarget:
        """Resolves a tenant-supplied target; paths must stay inside ``root`` and RTMP
        URLs must pass ``egress`` (the built-in policy when None) as far as their text
        tells (``avatarfarm.egress.check_resolved`` checks a host name's addresses)."""
        try:
            validate_output(Output(kind, value))
            if kind is OutputKind.RTMP:
                (egress or EgressPolicy()).check_url(value)
        except (InvalidRequest, ForbiddenTarget) as e:
            raise OutputError(str(e)) from e
        if kind is OutputKind.RTMP:
            return OutputTarget(kind, value)
        # Resolving follows symlinks, dangling ones too: a link inside the folder cannot
        # lead outside it. The files FFmpeg will open are checked as well as the folder.
        base = root.resolve()
        path = (root / value).resolve()
        opened = [path]
        if kind is OutputKind.HLS:
            opened = [path / "index.m3u8"]
            if path.is_dir():
                opened += sorted(path.glob("segment_*.ts"))
        for p in opened:
            if p.resolve() == base or not p.resolve().is_relative_to(base):
                raise OutputError(f"output path {value!r} leaves the output folder")
        if kind is OutputKind.FILE:
            return OutputTarget(kind, str(path))
        return OutputTarget(kind, str(path / "index.m3u8"))


TENANT_PREFIX = "@"
FOLDER_NAME_MAX = 255  # bytes in a file name, on every file system a worker writes to


def tenant_root(output_dir: Path, tenant: str) -> Path:
    """The tenant's own output folder inside the worker's (see the module). The id is
    checked to be a safe folder name, not against today's id length limit: a tenant
    admitted under an older limit keeps its folder."""
    try:
        validate_id("tenant", tenant, limits=replace(LIMITS, max_id_length=FOLDER_NAME_MAX - 1))
    except InvalidRequest as e:
        raise OutputError(str(e)) from e
    return output_dir / f"{TENANT_PREFIX}{tenant}"


def continuation_path(path: Path, continuation: int) -> Path:
    """Where continuation k of a file output goes: ``show.mp4``, ``show.1.mp4``, ..."""
    return path if continuation == 0 else path.with_name(f"{path.stem}.{continuation}{path.suffix}")


def write_new(path: Path, text: str, sync: bool = False) -> None:
    """Writes a fresh file: whatever had the name (a leftover, a planted link) is removed,
    not written through."""
    path.unlink(missing_ok=True)
    with open(path, "x") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
