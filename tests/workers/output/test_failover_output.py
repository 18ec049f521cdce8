"""An output continued by a newer assignment of the room, and fenced against the older one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest

from avatarfarm.domain import OutputKind
from tests.media import probe
from workers.media.audio import SAMPLE_RATE
from workers.output.encode import EncoderSettings, EncoderThread, StreamEncoder
from workers.output.fence import Superseded, fence_path
from workers.output.hls import HlsSegment, hls_segments
from workers.output.targets import OutputTarget

FPS, SIDE = 10, 128
# One-second segments and keyframes: a few seconds give several segments.
SETTINGS = EncoderSettings(gop_seconds=1.0, hls_segment_seconds=1.0)
REPO = Path(__file__).resolve().parents[3]


def make_encoder(target: OutputTarget, epoch: int, continuation: int = 0) -> StreamEncoder:
    enc = StreamEncoder(target, SIDE, SIDE, FPS, SETTINGS, epoch=epoch, continuation=continuation)
    enc.open()
    return enc


def feed(enc: StreamEncoder, seconds: float) -> None:
    t = np.arange(SAMPLE_RATE // FPS) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for i in range(round(seconds * FPS)):
        enc.encode(np.full((SIDE, SIDE, 3), (i * 7) % 255, np.uint8), audio)


def frames_in(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def public_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def crash_after(seconds: float, root: Path, epoch: int) -> None:
    """Runs an HLS writer in a child process that kills itself with SIGKILL mid-stream."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from avatarfarm.domain import OutputKind
        from tests.workers.output.test_failover_output import feed, make_encoder
        from workers.output.targets import OutputTarget
        enc = make_encoder(OutputTarget.resolve(OutputKind.HLS, "show", Path({str(root)!r})), {epoch})
        feed(enc, {seconds})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def test_hls_continuation_after_a_crash_appends_after_a_discontinuity(tmp_path: Path) -> None:
    crash_after(3.0, tmp_path, epoch=1)
    folder = tmp_path / "show"
    # Two segments completed before the kill; the third was in the staging folder.
    assert [s.name for s in hls_segments(folder)] == ["segment_e1_00000.ts", "segment_e1_00001.ts"]
    assert "#EXT-X-ENDLIST" not in (folder / "index.m3u8").read_text()

    enc = make_encoder(OutputTarget.resolve(OutputKind.HLS, "show", tmp_path), epoch=2, continuation=1)
    feed(enc, 3.0)
    enc.close()

    segments = hls_segments(folder)
    assert segments == [
        HlsSegment("segment_e1_00000.ts", 1.0, False), HlsSegment("segment_e1_00001.ts", 1.0, False),
        HlsSegment("segment_e2_00000.ts", 1.0, True), HlsSegment("segment_e2_00001.ts", 1.0, False),
        HlsSegment("segment_e2_00002.ts", 1.0, False)]
    assert [frames_in(folder / s.name) for s in segments] == [10] * 5
    playlist = (folder / "index.m3u8").read_text()
    assert playlist.startswith("#EXTM3U\n") and "#EXT-X-TARGETDURATION:1\n" in playlist
    assert playlist.count("#EXT-X-DISCONTINUITY") == 1 and playlist.endswith("#EXT-X-ENDLIST\n")
    assert "#EXT-X-INDEPENDENT-SEGMENTS" in playlist
    f = probe(folder / "index.m3u8")
    assert (f.video_codec, f.frames, f.audio_codec) == ("h264", 50, "aac") and f.audio_rms > 0.1
    # The crashed writer's staging folder stays behind; the clean one's is gone.
    assert (folder / ".e1").is_dir() and not (folder / ".e2").exists()
    assert (folder / ".fence").read_text() == "2\n"


@pytest.mark.parametrize("stale_encodes_first", [True, False])
def test_a_superseded_hls_writer_never_touches_the_public_folder_again(
        tmp_path: Path, stale_encodes_first: bool) -> None:
    target = OutputTarget.resolve(OutputKind.HLS, "show", tmp_path)
    folder = tmp_path / "show"
    stale = make_encoder(target, epoch=1)
    feed(stale, 3.0)
    assert len(hls_segments(folder)) == 2

    new = make_encoder(target, epoch=2, continuation=1)
    before = public_files(folder)
    if stale_encodes_first:
        with pytest.raises(Superseded, match="taken over by assignment 2"):
            feed(stale, 1.0)
        stale.close()  # already told: closes its own staging output quietly
    else:
        with pytest.raises(Superseded, match="taken over by assignment 2"):
            stale.close()  # its last segment is not published
    with pytest.raises(Superseded):
        feed(stale, 0.1)
    assert public_files(folder) == before
    assert not (folder / ".e1").exists()

    with pytest.raises(Superseded, match="taken over by assignment 2"):
        make_encoder(target, epoch=1, continuation=2)
    assert public_files(folder) == before

    feed(new, 3.0)
    new.close()
    segments = hls_segments(folder)
    assert [s.name for s in segments] == ["segment_e1_00000.ts", "segment_e1_00001.ts", "segment_e2_00000.ts",
                                          "segment_e2_00001.ts", "segment_e2_00002.ts"]
    assert [s.discontinuity_before for s in segments] == [False, False, True, False, False]
    assert sum(s.duration for s in segments) == pytest.approx(5.0)
    assert [frames_in(folder / s.name) for s in segments] == [10] * 5


def test_a_room_that_moved_leaves_its_playlist_open_for_the_continuation(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.HLS, "show", tmp_path)
    folder = tmp_path / "show"
    thread = EncoderThread(StreamEncoder(target, SIDE, SIDE, FPS, SETTINGS, epoch=1))
    for i in range(25):
        thread.submit(np.full((SIDE, SIDE, 3), i, np.uint8), np.zeros(SAMPLE_RATE // FPS, np.float32))
    deadline = time.monotonic() + 60
    while thread.frames_encoded < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.close(end_output=False)
    assert thread.error is None and thread.frames_encoded == 25
    # The half segment after 2 s is not published, and the playlist is not ended.
    published = hls_segments(folder)
    assert len(published) == 2 and "#EXT-X-ENDLIST" not in (folder / "index.m3u8").read_text()
    assert not (folder / ".e1").exists()

    new = make_encoder(target, epoch=2, continuation=1)
    feed(new, 1.0)
    new.close()
    assert [s.discontinuity_before for s in hls_segments(folder)] == [False] * len(published) + [True]


def test_a_continuation_keeps_lines_it_did_not_write_and_drops_the_old_endlist(tmp_path: Path) -> None:
    folder = tmp_path / "show"
    folder.mkdir()
    (folder / "index.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:5\n#EXT-X-MEDIA-SEQUENCE:0\n"
        "#EXT-X-PLAYLIST-TYPE:EVENT\n#EXTINF:4.5,intro\nintro.ts\n# operator note\n#EXT-X-ENDLIST\n")
    enc = make_encoder(OutputTarget.resolve(OutputKind.HLS, "show", tmp_path), epoch=3, continuation=2)
    feed(enc, 1.5)
    enc.close()
    assert (folder / "index.m3u8").read_text() == (
        "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:5\n#EXT-X-MEDIA-SEQUENCE:0\n"
        "#EXT-X-PLAYLIST-TYPE:EVENT\n#EXTINF:4.5,intro\nintro.ts\n# operator note\n"
        "#EXT-X-DISCONTINUITY\n#EXTINF:1.000000,\nsegment_e3_00000.ts\n#EXTINF:0.500000,\nsegment_e3_00001.ts\n"
        "#EXT-X-ENDLIST\n")


def test_a_first_start_replaces_an_old_playlist(tmp_path: Path) -> None:
    folder = tmp_path / "show"
    folder.mkdir()
    (folder / "index.m3u8").write_text("#EXTM3U\n#EXTINF:4.5,\nold.ts\n#EXT-X-ENDLIST\n")
    enc = make_encoder(OutputTarget.resolve(OutputKind.HLS, "show", tmp_path), epoch=1)
    feed(enc, 1.0)
    enc.close()
    assert hls_segments(folder) == [HlsSegment("segment_e1_00000.ts", 1.0, False)]


def test_an_unfenced_hls_writer_leaves_no_fence_or_staging(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.HLS, "show", tmp_path)
    enc = make_encoder(target, epoch=0)
    feed(enc, 2.0)
    enc.close()
    folder = tmp_path / "show"
    assert sorted(p.name for p in folder.iterdir()) == ["index.m3u8", "segment_c0_00000.ts", "segment_c0_00001.ts"]
    assert fence_path(target) == folder / ".fence"


def test_file_continuations_go_next_to_the_original_and_are_fenced(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.FILE, "show.mp4", tmp_path)
    first = make_encoder(target, epoch=1)
    assert first.location == str(tmp_path / "show.mp4")
    feed(first, 2.0)
    second = make_encoder(target, epoch=2, continuation=1)
    assert second.location == str(tmp_path / "show.1.mp4")
    with pytest.raises(Superseded, match="taken over by assignment 2"):
        feed(first, 0.1)
    first.close()  # finalises its own file, which is not the new writer's
    feed(second, 2.0)
    second.close()
    assert probe(tmp_path / "show.mp4").frames == 20
    assert probe(tmp_path / "show.1.mp4").frames == 20
    assert (tmp_path / ".show.mp4.fence").read_text() == "2\n"

    # A stale first start that opens late neither claims the output nor truncates it.
    size = (tmp_path / "show.mp4").stat().st_size
    with pytest.raises(Superseded):
        make_encoder(target, epoch=1)
    assert (tmp_path / "show.mp4").stat().st_size == size
    assert (tmp_path / ".show.mp4.fence").read_text() == "2\n"


def test_names_the_encoder_creates_are_never_written_through_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "out", tmp_path / "outside"
    (root / "show").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_text("keep")
    for name in ["show.1.mp4", f".show.mp4.fence.2.{os.getpid()}.tmp", "show/.e2",
                 "show/.index.m3u8.e2.tmp"]:
        (root / name).symlink_to(outside / "victim")
    for kind, value in [(OutputKind.FILE, "show.mp4"), (OutputKind.HLS, "show")]:
        enc = make_encoder(OutputTarget.resolve(kind, value, root), epoch=2, continuation=1)
        feed(enc, 1.0)
        enc.close()
    assert (outside / "victim").read_text() == "keep"
    assert probe(root / "show.1.mp4").frames == 10
    assert [s.name for s in hls_segments(root / "show")] == ["segment_e2_00000.ts"]


def test_the_newest_writer_reasserts_a_fence_an_older_claim_overwrote(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.FILE, "show.mp4", tmp_path)
    enc = make_encoder(target, epoch=2)
    fence = fence_path(target)
    assert fence is not None
    # An older claim that read the fence before this one wrote it, and replaced it last.
    (tmp_path / "older").write_text("1\n")
    os.replace(tmp_path / "older", fence)
    feed(enc, 0.1)
    assert fence.read_text() == "2\n"
    enc.close()


def test_rtmp_outputs_have_no_fence(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.RTMP, "rtmp://127.0.0.1:9/live/x", tmp_path)
    assert fence_path(target) is None
    assert StreamEncoder(target, SIDE, SIDE, FPS, epoch=3, continuation=2).location == target.location
