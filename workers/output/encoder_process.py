"""Encoders in processes of their own, off the worker's interpreter lock.

PyAV releases the interpreter lock inside FFmpeg, but one encode takes it back several
times (wrapping the frame, stamping it, muxing, resampling the audio). On a loaded worker
every one of those waits for the event loop and the device thread to let go of it: an
encoder thread beside a thread running Python all the time encodes ~1% of what it does
alone (``loadtests/encode_bench.py --lock-seconds``). So the outputs on local disk are
encoded in a few processes (one per core by default), each holding many rooms'
``StreamEncoder``s, and the worker process keeps only the cheap part: preparing the frame
and copying it into the room's shared frame buffer.

One call per frame, answered before the room's next one (``RemoteEncoder``): the room's
encoder turns still run on an ``EncoderPool`` thread, which now waits on a socket
without the lock instead of encoding under it. Frames go through a memory-mapped file
per room (one copy, no pickling); the messages carry only the frame's shape, its audio
and its timing. A child's CPU time per call comes back with its answer, so a room's
encoding cost is still measured whole.

Errors come back as the exception the encoder raised (``Superseded`` included: a newer
assignment holds the output). A child that dies fails its rooms' outputs, not the
worker; the next room starts a fresh one. A child whose worker died sees its socket
close and exits, as the encoder threads would have died with it.
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


@dataclass(slots=True)
class _Call:
    """One request waiting for its answer (a room has at most one in flight)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    seconds: float = 0.0


class EncoderProcess:
    """One child process and the worker's end of its socket.

    Requests from many pool threads share the socket (sent under a lock); a reader
    thread hands each answer to the call waiting for it.
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
        self._socket = mine  # shut down to end the child: closing alone leaves the reader's recv
        self._conn = Connection(os.dup(mine.fileno()))
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self.rooms = 0  # encoders placed here and not yet closed
        self.alive = True
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name=f"encoder-process-{self.process.pid}",
                                        daemon=True)
        self._reader.start()

    def call(self, room: int, message: tuple[typing.Any, ...]) -> float:
        """Sends a request and waits for its answer; the child's CPU seconds on it.
        Raises what the child's encoder raised."""
        c = _Call()
        with self._calls_lock:
            if not self.alive:
                raise EncoderProcessDied(f"encoder process {self.process.pid} has ended")
            self._calls[room] = c
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as e:
            self._fail(e)
        c.done.wait()
        if c.error is not None:
            raise c.error
        return c.seconds

    def _read(self) -> None:
        try:
            while True:
                room, error, seconds = self._conn.recv()
                with self._calls_lock:
                    c = self._calls.pop(room)
                c.error, c.seconds = error, seconds
                c.done.set()
        except (EOFError, OSError) as e:
            self._fail(e)

    def _fail(self, cause: BaseException) -> None:
        with self._calls_lock:
            if not self.alive:
                return
            self.alive = False
            calls, self._calls = list(self._calls.values()), {}
        code = self.process.poll()
        if self._stopping:
            return
        log.error("encoder process %d ended (exit status %s): %s", self.process.pid, code, cause)
        for c in calls:
            c.error = EncoderProcessDied(f"encoder process {self.process.pid} ended "
                                         f"(exit status {code})")
            c.done.set()

    def stop(self) -> None:
        """Closes the socket (the child exits at once) and waits for the child."""
        self._stopping = True
        self._socket.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        self._conn.close()
        self._socket.close()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EncoderProcesses:
    """The worker's encoder processes, started when the first room needs one; a room goes
    to the live process with the fewest rooms, and a dead one is replaced. Turns run on
    an EncoderPool of twice as many threads: a thread mostly waits for its process, and
    the next room's frame should be ready when the process is."""

    def __init__(self, processes: int) -> None:
        self.size = max(1, processes)
        self.pool = EncoderPool(2 * self.size)
        self._processes: list[EncoderProcess] = []
        self.lock = threading.Lock()  # guards the process list and their room counts
        self._ids = itertools.count(1)

    def start(self) -> None:
        """Starts every process now and waits until each answers (a child takes a few
        tenths of a second to import its encoder): the first rooms' frames need not wait."""
        with self.lock:
            self._processes = [p for p in self._processes if p.alive]
            while len(self._processes) < self.size:
                self._processes.append(EncoderProcess())
            processes = list(self._processes)
        for p in processes:
            p.call(0, ("ping", 0))

    def place(self) -> tuple[EncoderProcess, int]:
        """A process for a new room's encoder and the room's number in it."""
        with self.lock:
            self._processes = [p for p in self._processes if p.alive]
            if len(self._processes) < self.size:
                self._processes.append(EncoderProcess())
            p = min(self._processes, key=lambda p: p.rooms)
            p.rooms += 1
            return p, next(self._ids)

    def stop(self) -> None:
        with self.lock:
            processes, self._processes = self._processes, []
        for p in processes:
            p.stop()


_SHARED: EncoderProcesses | None = None
_SHARED_LOCK = threading.Lock()


def shared_encoder_processes(processes: int = -1) -> EncoderProcesses:
    """The worker's encoder processes (-1: one per core, see pool_threads)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = EncoderProcesses(pool_threads() if processes < 0 else processes)
        return _SHARED


class RemoteEncoder:
    """A StreamEncoder that runs in an encoder process; the same calls, made from one
    thread at a time (an EncoderThread's turns).

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
        self._frame: np.ndarray | None = None

    def _call(self, *message: typing.Any) -> None:
        assert self._process is not None
        self.offloaded_seconds += self._process.call(self._room, message)

    def open(self) -> None:
        _, width, height, _, _, _ = self._args
        size = width * height * 3
        fd, path = tempfile.mkstemp(prefix="avatarfarm-frame-", dir=_SHM if _SHM.is_dir() else None)
        try:
            self._process, self._room = self._processes.place()
            os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)
            self._frame = np.ndarray((height, width, 3), np.uint8, buffer=self._buffer)
            self._call("open", self._room, path, self._args)
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
        if self._frame is not None and rgb.shape == self._frame.shape and rgb.dtype == np.uint8:
            self._frame[...] = rgb
            self._call("encode", self._room, None, audio, fps, frames)
        else:  # not the output's own size: sent whole, and the encoder says what is wrong
            self._call("encode", self._room, rgb, audio, fps, frames)

    def withdraw(self) -> None:
        """As StreamEncoder.withdraw (safe from another thread): frames from now on are
        dropped here, and the child is told at close."""
        self._withdrawn = True

    def close(self) -> None:
        if self._process is None:
            return
        try:
            self._call("close", self._room, self._withdrawn, self.leave_open)
        finally:
            self._release()

    def _release(self) -> None:
        if self._process is not None:
            with self._processes.lock:
                self._process.rooms -= 1
            self._process = None
        self._frame = None
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
    """The child's loop: one request at a time, each answered with (room, error, CPU seconds)."""
    encoders: dict[int, tuple[StreamEncoder, mmap.mmap]] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The worker is gone: stop as its encoder threads would have, with what is
            # written kept (fragmented MP4, published HLS segments) and nothing ended.
            os._exit(0)
        op, room = message[0], message[1]
        t0 = time.thread_time()
        error: BaseException | None = None
        try:
            if op == "ping":
                pass
            elif op == "open":
                path, (target, width, height, fps, settings, options) = message[2], message[3]
                with open(path, "r+b") as f:
                    buffer = mmap.mmap(f.fileno(), width * height * 3)
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
                rgb, audio, fps, frames = message[2:]
                if rgb is None:  # the frame is in the room's buffer (the encoder copies it)
                    rgb = np.ndarray((enc.height, enc.width, 3), np.uint8, buffer=buffer)
                enc.encode(rgb, audio, fps, frames)
                del rgb  # a view of the buffer keeps it from being closed
            elif op == "close":
                enc, buffer = encoders.pop(room)
                withdrawn, enc.leave_open = message[2], message[3]
                if withdrawn:
                    enc.withdraw()
                try:
                    enc.close()
                finally:
                    buffer.close()
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:  # noqa: BLE001 - every error goes back to the room it belongs to
            error = _portable(e)
        conn.send((room, error, time.thread_time() - t0))


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s encoder process: %(message)s")
    serve(Connection(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
