"""Decisions as data: an operation of the core records what must happen outside it and
one dispatcher carries it out when the operation returns, in a fixed order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from avatarfarm.domain import Progress, SessionState
from scheduler.decisions import Decisions, Dispatcher, SchedulerOutput
from scheduler.policy.pacing import flush_part
from scheduler.state.worker_conn import AssignCmd, ReleaseCmd, UsageAckCmd
from tests.builders import connect, make_core, make_spec, sent


def recording(core_dispatcher: Dispatcher) -> list[SchedulerOutput]:
    """Every output the dispatcher is handed (then carried out as usual)."""
    outputs: list[SchedulerOutput] = []
    apply = core_dispatcher.apply

    def record(out: SchedulerOutput) -> None:
        outputs.append(out)
        apply(out)

    core_dispatcher.apply = record  # type: ignore[method-assign]
    return outputs


def test_an_operation_hands_over_what_it_decided_once_when_it_returns(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    conn = connect(core, "w1")
    outputs = recording(core.dispatcher)
    s = core.create(make_spec("r1"))
    (out,) = outputs  # one output for the whole call, however many steps it took
    (cmd,) = out.commands
    assert cmd.worker_id == "w1" and isinstance(cmd.command, AssignCmd)
    assert cmd.command.session_id == s.session_id
    # The session went PENDING -> PLACED within the call: one row, the latest.
    assert [(r.session_id, r.state) for r in out.rows] == [(s.session_id, SessionState.PLACED)]
    assert [e.session.state for e in out.events] == [SessionState.PENDING, SessionState.PLACED]
    assert sent(conn) == [cmd.command]  # carried out: on the worker's stream
    assert core.store.load_sessions()[0].state is SessionState.PLACED  # and in the store


def test_a_call_that_decides_nothing_hands_over_nothing(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    connect(core, "w1")
    s = core.create(make_spec("r1"))
    outputs = recording(core.dispatcher)
    # Ending twice: the second call decides nothing and hands over nothing.
    core.end(s.session_id)
    core.end(s.session_id)
    assert len(outputs) == 1
    (out,) = outputs
    assert [type(c.command) for c in out.commands] == [ReleaseCmd]
    assert out.rows[-1].state is SessionState.ENDED


def test_the_dispatcher_drops_commands_for_gone_workers_and_closes_retired_streams(
        tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    w1, w2 = connect(core, "w1"), connect(core, "w2")
    d = Decisions()
    d.send("w1", ReleaseCmd("s1", "bye"))
    d.send("gone", ReleaseCmd("s2", "nobody to tell"))
    d.retire(w2)
    core.dispatcher.apply(d.take())
    assert sent(w1) == [ReleaseCmd("s1", "bye")]
    assert w2.outbox.get_nowait() is None  # the stream's end
    assert not d.take()  # taking empties the collector


def test_usage_is_acknowledged_only_once_the_rows_holding_it_are_on_disk(tmp_path: Path) -> None:
    async def scenario() -> None:
        core, _ = make_core(tmp_path)
        conn = connect(core, "w1")
        s = core.create(make_spec("r1"))
        sent(conn)
        conn.usage_epoch = 7
        assert core.worker_usage(conn, 1, [(s.session_id, s.epoch, SessionState.RUNNING, "",
                                            Progress(frames_rendered=25, stream_seconds=1.0))])
        core.flush_progress()
        # Handed to the store's writer thread; nothing acknowledged before it committed.
        assert not [c for c in sent(conn) if isinstance(c, UsageAckCmd)]
        await core.durable()
        acks: list[object] = []
        deadline = time.monotonic() + 5
        while not acks and time.monotonic() < deadline:
            await asyncio.sleep(0)  # the commit's callbacks run on the loop
            acks = [c for c in sent(conn) if isinstance(c, UsageAckCmd)]
        assert acks == [UsageAckCmd(1)]
        core.store.close()

    asyncio.run(scenario())


def test_a_flush_in_parts_writes_and_acknowledges_only_its_workers(tmp_path: Path) -> None:
    async def scenario() -> None:
        core, _ = make_core(tmp_path)
        ids = [f"w{i}" for i in range(20)]
        a = next(w for w in ids if flush_part(w, 2) == 0)
        b = next(w for w in ids if flush_part(w, 2) == 1)
        conns = {w: connect(core, w) for w in (a, b)}
        rooms = [core.create(make_spec(f"r{i}")) for i in range(2)]
        for w, conn in conns.items():
            sent(conn)
            conn.usage_epoch = 7
            mine = [core.sessions[r.session_id] for r in rooms
                    if core.sessions[r.session_id].worker_id == w]
            assert core.worker_usage(conn, 1, [
                (s.session_id, s.epoch, SessionState.RUNNING, "",
                 Progress(frames_rendered=25, stream_seconds=1.0)) for s in mine])

        async def acked() -> dict[str, list[object]]:
            await core.durable()
            for _ in range(100):
                await asyncio.sleep(0)  # the commit's callbacks run on the loop
            return {w: [c for c in sent(c) if isinstance(c, UsageAckCmd)] for w, c in conns.items()}

        def stored() -> set[str]:  # the workers whose reports are on disk
            return set(core.store.load_usage()[1])

        core.flush_progress(0, 2)
        assert await acked() == {a: [UsageAckCmd(1)], b: []}
        assert stored() == {a}
        core.flush_progress(1, 2)
        assert await acked() == {a: [], b: [UsageAckCmd(1)]}
        assert stored() == {a, b}
        core.store.close()

    asyncio.run(scenario())
