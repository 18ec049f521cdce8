"""The load tests themselves: the packing simulator behind the load test's cost
figures (on a small day of the trace, the bound is below every strategy, packing
beats the baselines and consolidation beats packing alone), a tiny run of the scheduler load test (every phase against the
real scheduler), a short run of the chaos load test, the autoscaling simulator, the
hand-off benchmark, the worker benchmark's steady window, and a
short run of the camera rooms' benchmark."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.packing_sim import Strategy, compare, peak_demand, simulate
from loadtests.trace import DAYS, Room, make_day, make_tenants, show_hours
from loadtests.worker_specs import make_workers


def run_script(script: str, *args: str, timeout: float) -> str:
    """Runs a load test as a user would (from the repository's root), checks that it
    succeeded and returns what it printed."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def test_packing_beats_the_baselines_and_stays_above_the_bound() -> None:
    rng = random.Random(3)
    tenants = make_tenants()
    avatars = sorted({a for t in tenants for a in t.avatars})
    workers = make_workers(20, 0.2, avatars, rng)
    trace = make_day(200, tenants, 3)
    result = compare(trace, workers)
    pack, least, rr = (result.by(s).cost_per_stream_hour
                       for s in ("pack", "least_loaded", "round_robin"))
    assert 0 < result.lower_bound <= pack
    assert pack < least and pack < rr
    assert result.by("pack").unplaced <= result.by("least_loaded").unplaced
    # Consolidation after the peak costs less than packing alone, within the move budget.
    consolidated = result.by("pack+consolidate")
    assert result.lower_bound <= consolidated.cost_per_stream_hour < pack
    assert 0 < consolidated.moves / consolidated.stream_hours * 4 < 1  # moves per room per 4 h
    assert "lower bound" in str(result)


def test_the_simulators_fleet_is_sized_by_what_the_days_rooms_need_not_their_count() -> None:
    # A 1080p-heavy day fills several times the workers of the default day at the same
    # peak: a fleet sized by room count alone would refuse rooms and skew the figures.
    demand = {}
    for day in ("default", "premium-1080p"):
        tenants = make_tenants(shape=DAYS[day])
        avatars = sorted({a for t in tenants for a in t.avatars})
        trace = make_day(300, tenants, 3, DAYS[day])
        demand[day] = peak_demand(trace, make_workers(20, 0.1, avatars, random.Random(3)))
        fleet = make_workers(max(10, int(2 * demand[day]) + 1), 0.1, avatars, random.Random(3))
        assert simulate(trace, fleet, Strategy.PACK).unplaced == 0
    assert demand["premium-1080p"] > 2 * demand["default"] > 0


@pytest.mark.slow
def test_a_brand_books_the_whole_hours_in_which_its_shows_run() -> None:
    def room(start_h: float, end_h: float) -> Room:
        return Room("r", start_h * 3600, (end_h - start_h) * 3600, "brand", "premium",
                    (720, 1280, 25), "voice", "a")

    shows = [room(19.2, 22.9)] * 5 + [room(3.0, 3.5)]  # one night room: under a quarter
    assert show_hours(shows) == ("19:00-23:00",)
    assert show_hours([room(21.5, 24.0)]) == ("21:00-24:00",)
    assert show_hours([]) == ()


def test_the_scheduler_load_test_runs_every_phase_at_a_tiny_scale() -> None:
    out = run_script("loadtests/scheduler_load.py", "--workers", "4", "--rooms", "40",
                     "--day-seconds", "4", "--hold-seconds", "1", "--rate", "50", "--rate-seconds", "1",
                     "--seed", "3", timeout=240)
    for header in ("[1] burst", "[1b] batched burst", "[2] rate", "[3] trace", "[4] metrics", "[5] cost comparison", "== summary"):
        assert header in out, out
    rows = {line.split("  ")[1]: line for line in out.splitlines() if line.startswith("  ") and "  " in line[2:]}
    assert {"placements per second (burst)", "placements per second (CreateSessions of 100)",
            "scheduler CPU at the peak"} <= rows.keys(), out
    assert rows["premium guarantees kept"].endswith("PASS"), out
    assert "stream errors 0" in out, out


def test_the_scheduler_load_test_compares_the_stores(postgres_server: object) -> None:
    out = run_script("loadtests/scheduler_load.py", "--workers", "4", "--rooms", "40",
                     "--day-seconds", "4", "--hold-seconds", "1", "--rate", "50", "--rate-seconds", "1",
                     "--seed", "3", "--store", "both", "--phases", "burst,rate", timeout=300)
    assert "==== the scheduler on postgresql ====" in out, out
    side = out.split("== the stores side by side ==")[1].splitlines()
    assert side[1].split() == ["sqlite", "postgresql"], out
    rows = {line[:34].strip(): line[34:].split() for line in side[2:] if line.strip()}
    assert len(rows["placements/s, burst"]) == 2 and len(rows["rate achieved"]) == 2, out


def test_the_core_benchmark_places_every_room_and_times_the_tick() -> None:
    out = run_script("loadtests/core_bench.py", "--workers", "20", "--rooms", "100",
                     "--ended", "50", "--ticks", "2", timeout=240)
    assert "100 rooms in" in out and "100 placed in the answer" in out, out
    assert "tick:" in out and "(100 live rooms, 50 ended, 20 workers)" in out, out
    assert "reopened: 150 rooms loaded in" in out, out


@pytest.mark.slow
def test_the_chaos_load_test_loses_no_room_and_no_usage(model_dir: Path, tmp_path: Path) -> None:
    out = run_script("loadtests/chaos.py", "--workers", "2", "--rooms", "3", "--seconds", "24",
                     "--kill-every", "8", "--model-dir", str(model_dir), "--home", str(tmp_path), timeout=300)
    lines = {line.split("  ")[0]: line for line in out.splitlines() if "  " in line}
    assert "failovers not resumed: 0" in lines["rooms resumed"]
    assert int(lines["rooms resumed"].split()[2]) >= 3  # every kill moved rooms
    assert lines["usage lost / doubled"].endswith("PASS")
    assert lines["rooms dropped"].endswith("PASS")


@pytest.mark.slow
def test_the_chaos_load_test_changes_leaders_and_loses_nothing(model_dir: Path, tmp_path: Path,
                                                               postgres_server: object) -> None:
    out = run_script("loadtests/chaos.py", "--workers", "1", "--rooms", "2", "--seconds", "24",
                     "--kill-every", "1000", "--replicas", "2", "--leader-every", "7", "--lease-seconds", "2",
                     "--model-dir", str(model_dir), "--home", str(tmp_path), timeout=300)
    lines = {line.split("  ")[0]: line for line in out.splitlines() if "  " in line}
    assert "(1 killed, 1 frozen)" in lines["leader changes"] or \
        "(2 killed, 1 frozen)" in lines["leader changes"], out
    assert lines["new leader serving"].endswith("PASS")
    assert lines["woken leaders exited"].endswith("PASS")
    assert lines["usage lost / doubled"].endswith("PASS")
    assert lines["rooms dropped"].endswith("PASS")


def test_autoscaling_a_day_keeps_every_room_and_tracks_demand(tmp_path: Path) -> None:
    """The diurnal trace at a small scale, the autoscaler on, workers booting in 90 s:
    no room dropped or failed, rooms wait only while capacity boots, the fleet grows
    for the evening and shrinks after it, and it costs a bounded multiple of the
    minimum (headroom, whole workers, the premium reservations held all day)."""
    from loadtests.autoscale_sim import run

    r = run(peak_rooms=150, hours=24, boot_seconds=90.0, interval=15.0, dt=2.0, seed=3,
            rtmp_share=0.3, window=600.0, home=tmp_path)
    assert r.dropped == 0 and r.failed == 0
    assert max(r.pending) <= 90.0 + 15.0 + 2.0  # at most one boot (+ a decision, a step)
    assert r.ups >= 3 and r.downs >= 1
    assert r.minimum_seconds <= r.floor_seconds <= r.worker_seconds <= 3.0 * r.floor_seconds


@pytest.mark.slow
def test_the_wav2lip_benchmark_runs_on_a_prepared_real_photograph() -> None:
    out = run_script("loadtests/wav2lip_bench.py", "--preset", "tiny", "--batches", "1,2",
                     "--iterations", "1", timeout=240)
    assert "batched (b=" in out and "paste-back" in out
    assert "skip the model" in out


@pytest.mark.slow
def test_the_worker_benchmark_runs_rooms_on_a_video_avatar() -> None:
    out = run_script("loadtests/worker_bench.py", "--family", "wav2lip", "--wav2lip", "tiny",
                     "--size", "256x256", "--rooms", "1", "--seconds", "2", "--modes", "batched", timeout=300)
    assert "face model wav2lip-tiny at S=96" in out
    # mode, rooms, frames/s, late, render, a2m, encode, model frames, batch sizes
    load = next(line for line in out.splitlines() if line.startswith("batched ")).split()
    # The face model ran for the speaking frames of the room, and only for them.
    assert load[1] == "1" and 0 < float(load[7].rstrip("%")) < 100
    # Encoded as the worker encodes: in encoder processes, the requests of a round trip counted.
    trips = next(line for line in out.splitlines() if "requests a round trip" in line)
    assert float(trips.split(":")[1].split()[0]) >= 1.0


@pytest.mark.slow
def test_the_soak_runs_every_drive_mode_and_reads_its_outputs_back() -> None:
    out = run_script("loadtests/soak.py", "--stream-seconds", "12", "--sample-every", "1", timeout=300)
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("  ") and line.split()[0] in ("text", "voice", "mocap")
            and "ended" in line}
    assert set(rows) == {"text", "voice", "mocap"}
    for mode, row in rows.items():
        # mode, state, frames, frames in the file, late, ts gap, "ms", video s, audio s, checks
        assert row[2] == row[3] == "300", (mode, row)
        assert abs(float(row[7]) - 12.0) < 0.02 and abs(float(row[8]) - 12.0) < 0.02
        assert float(row[5]) == pytest.approx(40.0, abs=0.5)  # no frame stretched, the first included
    assert "corrections in" in out and "slope" in out


@pytest.mark.slow
def test_the_camera_benchmark_runs_a_live_driver_through_a_room() -> None:
    out = run_script("loadtests/camera_bench.py", "--rooms", "1", "--seconds", "3",
                     "--modes", "batched", timeout=240)
    (row,) = [line.split() for line in out.splitlines() if line.startswith("batched")]
    _, rooms, fps, _, p50, p95, _, live = row
    assert rooms == "1" and float(fps) == 25.0  # every frame of the 3 s room was delivered
    assert 0 < float(p50) <= float(p95) < 2000  # driver frame in -> avatar frame out, ms
    assert float(live.rstrip("%")) > 50  # the test driver is live for most of the room


@pytest.mark.slow
def test_the_tts_benchmark_runs_every_backend() -> None:
    out = run_script("loadtests/tts_bench.py", "--rooms", "2", "--preset", "tiny", timeout=240)
    assert "espeak-ng: real-time factor" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("batched", "per-call", "http"))}
    assert set(rows) == {"batched", "per-call", "http"}
    for mode, (_, rooms, p50, p95, rate, batch) in rows.items():
        assert rooms == "2" and 0 < float(p50) <= float(p95) and float(rate) > 1
        assert float(batch) >= 1 if mode != "http" else float(batch) == 0  # no device calls


def test_the_handoff_benchmark_compares_the_two_ways_back_in_one_run() -> None:
    out = run_script("loadtests/handoff_bench.py", "--batches", "4", "--loop-work-us", "0",
                     "--seconds", "0.3", "--repeats", "1", timeout=120)
    rows = {line.split()[2]: line.split() for line in out.splitlines()
            if line.split()[:1] == ["4"]}
    # batch, loop work, path, items/s, cpu us/item, mean batch: both paths ran items.
    assert set(rows) == {"wrapped", "loop"}
    assert all(float(r[3]) > 0 and 1.0 <= float(r[5]) <= 4.0 for r in rows.values())
    assert "loop / wrapped:" in out


def test_the_encoder_benchmark_prices_video_and_each_audio_coder_in_one_run() -> None:
    out = run_script("loadtests/encode_bench.py", "--sizes", "64x64,96x48", "--frames", "10",
                     "--repeats", "1", "--lock-seconds", "0.3", timeout=120)
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["64x64"], ["96x48"])}
    assert set(rows) == {"64x64", "96x48"}
    for r in rows.values():  # video, +twoloop, +fast, ratio, audio twoloop, audio fast
        video, twoloop, fast = float(r[1]), float(r[2]), float(r[3])
        assert 0 < video and 0 < fast and 0 < twoloop
        assert float(r[4].rstrip("x")) == pytest.approx(twoloop / fast, rel=0.02)
    # The interpreter-lock part, at the first size: 1 and 2 encoder threads, then encoder
    # processes, each encoding.
    lock = [line.split() for line in out.splitlines() if "beside busy Python" in line]
    assert [(r[1], r[2]) for r in lock] == [("threads", "1:"), ("threads", "2:"),
                                            ("processes", "1:"), ("processes", "2:")]
    assert all(float(r[4]) > 0 and float(r[9]) > 0 for r in lock)


@pytest.mark.slow
def test_the_worker_benchmark_prints_a_steady_window_without_the_start() -> None:
    out = run_script("loadtests/worker_bench.py", "--size", "64x64", "--rooms", "2",
                     "--modes", "batched", "--renderer", "null", "--encode", "off", "--seconds", "3",
                     "--warmup", "1", timeout=300)
    steady = next(line for line in out.splitlines() if "steady (after the first 1 s):" in line)
    # Two rooms at 25 fps, from 1 s to 2.75 s of the run.
    assert 0 < float(steady.split(":")[1].split()[0]) <= 60


@pytest.mark.slow
def test_the_worker_benchmark_starts_rooms_one_after_another_and_prints_the_tiers_steady() -> None:
    out = run_script("loadtests/worker_bench.py", "--size", "64x64", "--rooms", "4", "--tiers", "mixed",
                     "--modes", "batched", "--renderer", "null", "--encode", "off", "--seconds", "4",
                     "--warmup", "1", "--start-over", "1", timeout=300)
    lines = out.splitlines()
    steady = next(line for line in lines if "steady (rooms started over 1 s; from 1 s after the last):" in line)
    # Four rooms at 25 fps, in the window from 1.75 s (the last start, then 1 s) to 3.75 s
    # (a frame a room either side of the window's edges).
    assert 0 < float(steady.split(":")[1].split()[0]) <= 105
    tiers = next(line for line in lines if "steady, late by tier:" in line)
    assert [w for w in tiers.split() if w in ("best_effort", "standard", "premium")] == \
        ["best_effort", "premium", "standard"]
