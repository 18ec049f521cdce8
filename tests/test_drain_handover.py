"""A worker leaving on SIGTERM (a pod deleted, a node drained) with the real
processes: it asks the scheduler to drain it, its HLS room is handed over to the
other worker without leaving the air, the output continues from exactly where the
first worker stopped (no stream time missing, none repeated), the leaving worker
exits by itself long before its drain deadline, and usage is counted once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.test_failover import (
    ENDED,
    RUNNING,
    SCRIPT,
    create,
    decoded_seconds,
    make_farm,
    playlist,
    usage_seconds,
    wait,
    worker_of,
)

pytestmark = pytest.mark.slow


def test_a_worker_stopped_with_sigterm_hands_its_room_over_without_a_gap(
        tmp_path: Path, model_dir: Path) -> None:
    farm = make_farm(tmp_path, model_dir)
    farm.worker_args += ["--drain-timeout", "60"]
    with farm:
        s = create(farm, "show", seconds=12)
        first = s.worker_id
        s = wait(farm, s.session_id, lambda x: x.progress.stream_seconds >= 3.0)
        leaving = worker_of(farm, first)
        assert leaving.proc is not None
        stopped_at = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        moved = wait(farm, s.session_id, lambda x: x.worker_id != first and x.state == RUNNING, 30)
        code = leaving.proc.wait(30)  # it leaves once its room is gone, not at the deadline
        gone = time.monotonic() - stopped_at
        done = wait(farm, s.session_id, lambda x: x.state == ENDED, 60)
        billed = usage_seconds(farm, "vendor")
    assert moved.worker_id and code == 0 and gone < 15, (code, gone)
    assert done.progress.stream_seconds == pytest.approx(12, abs=0.1)
    assert done.progress.script_segments_done == len(SCRIPT)
    out = farm.output_of("vendor", "show")
    segs = playlist(out)
    assert sum(d for _, _, d in segs) == 1  # one continuation, after one discontinuity
    # Unlike a crash, nothing is lost: the first worker published the segment it was
    # writing and the second started exactly at its end.
    assert decoded_seconds(out) == pytest.approx(12, abs=0.1)
    assert billed == pytest.approx(done.progress.stream_seconds, abs=1e-6)
    log = (farm.home / "logs" / f"{first}.log").read_text()
    assert "drained" in log
