"""Encoders in processes of their own, off the worker's interpreter lock.

PyAV releases the interpreter lock inside FFmpeg, but one encode takes it back several
times (wrapping the frame, stamping it, muxing, resampling the audio). On a loaded worker
every one of those waits for the event loop and the device thread to let go of it: an
encoder thread beside a thread running Python all the time encodes ~1% of what it does
alone (``loadtests/encode_bench.py``). So the outputs on local disk can be encoded in a
few processes, each holding many rooms' ``StreamEncoder``s, and the worker process keeps
only the cheap part: preparing each frame and copying it into the room's shared buffer.

Each taking of the lock is a wait on a busy worker, so the worker's side takes it as few
times per frame as it can. A room's frame goes into a free slot of the room's ring (a
memory-mapped file both processes map: one copy, no pickling) and onto its process's
list of requests, and the room goes on. One sender thread per process sends everything
listed in one message and takes the answers in one: the busier the worker, the more
frames each round trip carries. An encoder error comes back with its frame's answer and
is raised at the room's next call (``Superseded`` included: a newer assignment holds
the output); the child's CPU time comes back too, so a room's encoding is measured whole.

A child that dies fails its rooms' outputs, not the worker; the next room starts a fresh
one. A child whose worker died sees its socket close and exits, as the encoder threads
would have died with it: what is written stays (fragmented MP4, published segments).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from workers.output.encode import EncoderPool, EncoderSettings, OutputTarget, StreamEncoder, pool_threads

log = logging.getLogger(__name__)

# Where frame buffers live: memory, not disk, where the system has it.
_SHM = Path("/dev/shm")


class EncoderProcessDied(RuntimeError):
    """The process encoding a room's output ended under it."""


RING = 4  # frame slots per room: frames a room may have on their way to its process


@dataclass(slots=True)
class _Call:
    """A request whose caller waits for its answer (open, close, ping)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    seconds: float = 0.0


class EncoderProcess:
    """One child process and the worker's end of its socket.

    Requests are listed by the rooms' threads and sent by one sender thread, all that
    are listed in one message; the child answers each message with one list. Requests
    are answered in the order they were listed, so a room's close follows its frames.
    """

    def __init__(self) -> None:
        mine, theirs = socket.socketpair()
        fd = theirs.fileno()
        env = dict(os.environ)
        # The child imports the very code this process runs, wherever it was imported from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen([sys.executable, "-m", "workers.output.encoder_process", str(fd)],
                                        pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._socket = mine  # shut down to end the child: closing alone leaves a recv waiting
        self._conn = Connection(os.dup(mine.fileno()))
        self._lock = threading.Condition()
        # Listed, not yet sent: (the request, whom its answer goes to).
        self._listed: list[tuple[tuple[typing.Any, ...], RemoteEncoder | _Call]] = []
        self._open: set[RemoteEncoder] = set()  # rooms with an output here
        self.rooms = 0  # encoders placed here and not yet closed (EncoderProcesses.lock)
        self.alive = True
        self._stopping = False
        self.messages = 0  # round trips so far
        self.requests = 0  # requests in them
        self._sender = threading.Thread(target=self._send, name=f"encoder-process-{self.process.pid}",
                                        daemon=True)
        self._sender.start()

    def post(self, request: tuple[typing.Any, ...], to: RemoteEncoder | _Call) -> None:
        """Lists a request for the next message; its answer goes to `to`."""
        with self._lock:
            if not self.alive:
                raise EncoderProcessDied(f"encoder process {self.process.pid} has ended")
            self._listed.append((request, to))
            self._lock.notify()

    def attach(self, enc: RemoteEncoder) -> None:
        """An encoder whose output is open here: told if the process dies."""
        with self._lock:
            self._open.add(enc)

    def detach(self, enc: RemoteEncoder) -> None:
        with self._lock:
            self._open.discard(enc)

    def unlist(self, to: RemoteEncoder) -> None:
        """Takes a room's frames that are listed and not yet sent off the list (answered
        as done, nothing encoded): it was withdrawn."""
        with self._lock:
            mine = [item for item in self._listed if item[1] is to and item[0][0] == "encode"]
            self._listed = [item for item in self._listed if not (item[1] is to and item[0][0] == "encode")]
        for _ in mine:
            to.answered(None, 0.0)

    def call(self, request: tuple[typing.Any, ...]) -> float:
        """Lists a request and waits for its answer; the child's CPU seconds on it.
        Raises what the child raised."""
        c = _Call()
        self.post(request, c)
        c.done.wait()
        if c.error is not None:
            raise c.error
        return c.seconds

    def _send(self) -> None:
        batch: list[tuple[tuple[typing.Any, ...], RemoteEncoder | _Call]] = []
        try:
            while True:
                with self._lock:
                    while not self._listed:
                        if self._stopping:
                            raise EOFError("stopped")
                        self._lock.wait()
                    batch, self._listed = self._listed, []
                self._conn.send([request for request, _ in batch])
                answers = self._conn.recv()
                self.messages += 1
                self.requests += len(batch)
                for (_, to), (error, seconds) in zip(batch, answers, strict=True):
                    to_answer(to, error, seconds)
                batch = []
        except (EOFError, OSError) as e:
            self._fail(e, [to for _, to in batch])

    def _fail(self, cause: BaseException, unanswered: list[RemoteEncoder | _Call]) -> None:
        with self._lock:
            self.alive = False
            waiting = unanswered + [to for _, to in self._listed] + list(self._open)
            self._listed = []
        code = self.process.poll()
        if not self._stopping:
            log.error("encoder process %d ended (exit status %s): %s", self.process.pid, code, cause)
        for to in waiting:
            to_answer(to, EncoderProcessDied(f"encoder process {self.process.pid} ended "
                                             f"(exit status {code})"), 0.0)

    def stop(self) -> None:
        """Shuts the socket down (the child exits at once) and waits for the child."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._socket.shutdown(socket.SHUT_RDWR)
        self._sender.join(5.0)
        self._conn.close()
        self._socket.close()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def to_answer(to: RemoteEncoder | _Call, error: BaseException | None, seconds: float) -> None:
    if isinstance(to, _Call):
        to.error, to.seconds = error, seconds
        to.done.set()
    else:
        to.answered(error, seconds)


class EncoderProcesses:
    """The worker's encoder processes; a room goes to the live process with the fewest
    rooms, and a dead one is replaced. Rooms' turns (preparing a frame, copying it into
    a slot) run on an EncoderPool of as many threads as processes."""

    def __init__(self, processes: int) -> None:
        self.size = max(1, processes)
        self.pool = EncoderPool(self.size)
        self._processes: list[EncoderProcess] = []
        self.lock = threading.Lock()  # guards the process list and their room counts
        self._ids = itertools.count(1)

    def _replenish(self) -> list[EncoderProcess]:
        """The live processes, dead ones replaced up to `size` (call under `lock`)."""
        self._processes = [p for p in self._processes if p.alive]
        while len(self._processes) < self.size:
            self._processes.append(EncoderProcess())
        return list(self._processes)

    def start(self) -> None:
        """Starts every process now and waits until each answers (a child takes a few
        tenths of a second to import its encoder): the first rooms' frames need not wait."""
        with self.lock:
            processes = self._replenish()
        for p in processes:
            p.call(("ping", 0))

    def place(self) -> tuple[EncoderProcess, int]:
        """A process for a new room's encoder and the room's number in it."""
        with self.lock:
            p = min(self._replenish(), key=lambda p: p.rooms)
            p.rooms += 1
            return p, next(self._ids)

    def leave(self, process: EncoderProcess) -> None:
        """A room's encoder is gone from `process` (closed, or never opened)."""
        with self.lock:
            process.rooms -= 1

    def round_trips(self) -> tuple[int, int]:
        """Messages sent to the live processes so far, and the requests they carried."""
        with self.lock:
            return (sum(p.messages for p in self._processes),
                    sum(p.requests for p in self._processes))

    def stop(self) -> None:
        with self.lock:
            processes, self._processes = self._processes, []
        for p in processes:
            p.stop()


_SHARED: EncoderProcesses | None = None
_SHARED_LOCK = threading.Lock()


def shared_encoder_processes(processes: int = -1) -> EncoderProcesses:
    """The worker's encoder processes (-1: one per core, see pool_threads); the first
    call's count holds for the process's life."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = EncoderProcesses(pool_threads() if processes < 0 else processes)
        return _SHARED


def _ring_file(size: int) -> tuple[int, str]:
    """A new file of `size` bytes for a room's ring, its space reserved: in shared memory
    where there is room, else in the temporary folder (a container's /dev/shm is often
    64 MiB, four 1080p rings). Reserved, because touching a page of a memory file past
    the space left kills the process (SIGBUS) instead of failing a call."""
    for folder in ([_SHM] if _SHM.is_dir() else []) + [None]:
        fd, path = tempfile.mkstemp(prefix="avatarfarm-frame-", dir=folder)
        try:
            os.posix_fallocate(fd, 0, size)
            return fd, path
        except OSError:
            os.close(fd)
            os.unlink(path)
            if folder is None:
                raise
            log.warning("no room for a %d-byte frame ring in %s; using the temporary folder", size, folder)
    raise AssertionError("unreachable")


class RemoteEncoder:
    """A StreamEncoder that runs in an encoder process; the same calls, made from one
    thread at a time (an EncoderThread's turns).

    ``encode`` returns once the frame is in a slot and listed; it waits only while all
    RING slots are on their way. An error of an earlier frame is raised by the next
    call, and by ``close``, which waits for every frame before it.

    It keeps an unopened StreamEncoder of the same output for what the room reads
    (``target``, ``location``, ``fps``) and checks its arguments here, where a bad one
    should fail.
    """

    def __init__(self, processes: EncoderProcesses, target: OutputTarget, width: int, height: int,
                 fps: int, settings: EncoderSettings = EncoderSettings(), **options: typing.Any) -> None:
        self.spec = StreamEncoder(target, width, height, fps, settings, **options)
        self.target, self.location, self.fps = target, self.spec.location, fps
        self.leave_open = False
        self.offloaded_seconds = 0.0  # the child's CPU time on this output so far
        self._args = (target, width, height, fps, settings, options)
        self._processes = processes
        self._process: EncoderProcess | None = None
        self._room = 0
        self._withdrawn = False
        self._buffer: mmap.mmap | None = None
        self._slots: list[np.ndarray] = []
        self._free = threading.Condition()
        self._next = 0  # the slot the next frame goes to (slots are answered in order)
        self._on_way = 0  # frames listed or sent, not answered
        self._error: BaseException | None = None

    def open(self) -> None:
        _, width, height, _, _, _ = self._args
        frame = width * height * 3
        fd, path = _ring_file(RING * frame)
        try:
            self._buffer = mmap.mmap(fd, RING * frame)
            self._slots = [np.ndarray((height, width, 3), np.uint8, buffer=self._buffer, offset=i * frame)
                           for i in range(RING)]
            self._process, self._room = self._processes.place()
            self.offloaded_seconds += self._process.call(("open", self._room, path, self._args))
            self._process.attach(self)
        except BaseException:
            self._release()  # the child let go of a room that failed to open
            raise
        finally:
            os.close(fd)
            Path(path).unlink(missing_ok=True)  # the child's, unless it never opened it

    def encode(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None,
               frames: int = 1) -> None:
        if self._withdrawn:
            return
        assert self._process is not None
        with self._free:
            while self._on_way >= RING and self._error is None:
                self._free.wait()
            if self._error is not None:
                raise self._error
            self._on_way += 1
            slot, self._next = self._next, (self._next + 1) % RING
        inline = None
        if rgb.shape == self._slots[slot].shape and rgb.dtype == np.uint8:
            self._slots[slot][...] = rgb
        else:  # not the output's own size: sent whole, and the encoder says what is wrong
            inline = rgb
        self._process.post(("encode", self._room, slot, inline, audio, fps, frames), self)

    def answered(self, error: BaseException | None, seconds: float) -> None:
        """A frame's answer (on the sender's thread): its slot is free again."""
        with self._free:
            self._on_way = max(0, self._on_way - 1)
            self.offloaded_seconds += seconds
            if error is not None and self._error is None:
                self._error = error
            self._free.notify_all()

    def withdraw(self) -> None:
        """As StreamEncoder.withdraw (safe from another thread): frames from now on are
        dropped, and so are those listed and not yet sent (a message already with the
        child is encoded, as a thread's frame in the middle of its encode would be); the
        child is told at close."""
        self._withdrawn = True
        process = self._process
        if process is not None:
            process.unlist(self)

    def close(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            seconds = process.call(("close", self._room, self._withdrawn, self.leave_open))
            self.offloaded_seconds += seconds
        finally:
            self._release()
        if self._error is not None and not self._withdrawn:
            raise self._error

    def _release(self) -> None:
        if self._process is not None:
            self._process.detach(self)
            self._processes.leave(self._process)
            self._process = None
        self._slots = []
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception that cannot travel is described instead
        return RuntimeError(f"{type(e).__name__}: {e}")


def serve(conn: Connection) -> None:
    """The child's loop: a message of requests at a time, answered with one list of
    (error, CPU seconds), in order."""
    encoders: dict[int, tuple[StreamEncoder, mmap.mmap]] = {}
    while True:
        try:
            requests = conn.recv()
        except (EOFError, OSError):
            # The worker is gone: stop as its encoder threads would have, with what is
            # written kept (fragmented MP4, published HLS segments) and nothing ended.
            os._exit(0)
        conn.send([_handle(encoders, request) for request in requests])


def _handle(encoders: dict[int, tuple[StreamEncoder, mmap.mmap]],
            request: tuple[typing.Any, ...]) -> tuple[BaseException | None, float]:
    op, room = request[0], request[1]
    t0 = time.thread_time()
    try:
        if op == "ping":
            pass
        elif op == "open":
            path, (target, width, height, fps, settings, options) = request[2], request[3]
            with open(path, "r+b") as f:
                buffer = mmap.mmap(f.fileno(), RING * width * height * 3)
            # Both ends have it mapped: nothing is left behind, whichever of them dies.
            Path(path).unlink(missing_ok=True)
            try:
                enc = StreamEncoder(target, width, height, fps, settings, **options)
                enc.open()
            except BaseException:
                buffer.close()  # the room's close never comes for an output that did not open
                raise
            encoders[room] = (enc, buffer)
        elif op == "encode":
            enc, buffer = encoders[room]
            slot, rgb, audio, fps, frames = request[2:]
            if rgb is None:  # the frame is in the room's slot (the encoder copies it)
                size = enc.width * enc.height * 3
                rgb = np.ndarray((enc.height, enc.width, 3), np.uint8, buffer=buffer, offset=slot * size)
            enc.encode(rgb, audio, fps, frames)
            del rgb  # a view of the buffer keeps it from being closed
        elif op == "close":
            enc, buffer = encoders.pop(room)
            withdrawn, enc.leave_open = request[2], request[3]
            if withdrawn:
                enc.withdraw()
            try:
                enc.close()
            finally:
                buffer.close()
        else:
            raise ValueError(f"unknown request {op!r}")
    except Exception as e:  # noqa: BLE001 - every error goes back to the room it belongs to
        return _portable(e), time.thread_time() - t0
    return None, time.thread_time() - t0


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s encoder process: %(message)s")
    serve(Connection(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
