"""The scheduler paces its fleet's reports over the real protocol: a worker registers
with the interval of the fleet it joins, and every worker is told a longer one as the
fleet outgrows what the scheduler aims to receive (scheduler.policy.pacing)."""

from __future__ import annotations

from pathlib import Path

from tests.scheduler.api.test_service import ProtocolWorker, run, scheduler


def test_workers_are_told_to_report_less_often_as_the_fleet_grows(tmp_path: Path,
                                                                  model_dir: Path) -> None:
    async def body() -> None:
        # Two reports a second at most, and a timeout that allows up to 3 s between them.
        async with scheduler(tmp_path, model_dir, worker_reports_per_second=2.0,
                             worker_timeout=9.0) as (running, _, ch):
            w1, w2 = ProtocolWorker(ch, "w1"), ProtocolWorker(ch, "w2")
            for w in (w1, w2):
                assert (await w.next("registered")).registered.heartbeat_interval_seconds == 1.0
            w3 = ProtocolWorker(ch, "w3")
            await w3.next("registered")
            # Three workers at two reports a second: each reports every 1.5 s, and all are told.
            for w in (w1, w2, w3):
                assert (await w.next("pace")).pace.heartbeat_interval_seconds == 1.5
            w4 = ProtocolWorker(ch, "w4")
            assert (await w4.next("registered")).registered.heartbeat_interval_seconds == 1.5
            for w in (w1, w2, w3, w4):
                assert (await w.next("pace")).pace.heartbeat_interval_seconds == 2.0
            assert running.core.report_interval == 2.0
            for w in (w1, w2, w3, w4):
                await w.close()

    run(body)
