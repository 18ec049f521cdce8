"""Output fencing: keeps a stale worker (frozen, or partitioned and back) out of an
output that a newer assignment of its room has taken over.

A fence file per logical output (``.fence`` in the HLS folder; ``.show.mp4.fence``
next to a file) holds the highest assignment epoch that has claimed it. An encoder
claims it at open, before touching the output, and checks it (one stat, a read only
when it changed) before every frame and every publish; finding a higher epoch it
raises Superseded and touches no public file again. Epoch 0 means unfenced (a
single writer: tests, local runs). What remains: a writer frozen between its last
check and one rename can still land that rename when it resumes; the owner
rewrites the playlist from its own record at its next segment, so such a stray
entry lasts one segment at most. On NFS the fence is only as fresh as the
attribute cache (``actimeo``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from avatarfarm.domain import OutputKind
from workers.output.targets import OutputTarget, write_new

log = logging.getLogger(__name__)


class Superseded(RuntimeError):
    """A newer assignment of the room holds the output: this writer must stop writing."""

    def __init__(self, location: str, epoch: int, holder: int) -> None:
        super().__init__(f"output {location} (assignment {epoch}) taken over by assignment {holder}")
        self.location, self.epoch, self.holder = location, epoch, holder

    def __reduce__(self) -> tuple[type[Superseded], tuple[str, int, int]]:
        # Raised in an encoder process and raised again in the worker (encoder_process).
        return Superseded, (self.location, self.epoch, self.holder)


def fence_path(target: OutputTarget) -> Path | None:
    """The fence file of a logical output; None for RTMP (the ingest is not in our folder)."""
    if target.kind is OutputKind.RTMP:
        return None
    path = Path(target.location)
    if target.kind is OutputKind.HLS:
        return path.parent / ".fence"
    return path.with_name(f".{path.name}.fence")


class Fence:
    """An output's fence file, read cheaply: one stat per check, a read only when it changed."""

    def __init__(self, path: Path, epoch: int, location: str) -> None:
        self.path, self.epoch, self.location = path, epoch, location
        self._seen: tuple[int, int, int] | None = None
        self._holder = 0

    def holder(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen = None
            return 0
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return 0
            try:
                self._holder = int(text.split()[0])
            except (ValueError, IndexError):
                log.warning("fence %s holds %r, not an epoch", self.path, text[:40])
                self._holder = 0
            self._seen = seen
        return self._holder

    def hold(self) -> None:
        """Claims the fence, or confirms this epoch still holds it.

        Raises Superseded where a higher epoch holds it. A lower one is overwritten:
        the first claim, a fence removed by hand, or an older claim that raced this
        one and replaced the file last (its writer sees this epoch at its next check).
        """
        holder = self.holder()
        if holder > self.epoch:
            raise Superseded(self.location, self.epoch, holder)
        if holder < self.epoch:
            tmp = self.path.with_name(f"{self.path.name}.{self.epoch}.{os.getpid()}.tmp")
            write_new(tmp, f"{self.epoch}\n", sync=True)
            os.replace(tmp, self.path)
            self._seen = None
