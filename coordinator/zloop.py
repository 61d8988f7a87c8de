"""A ZeroMQ socket driven by the coordinator's asyncio loop without pyzmq's futures layer.

``zmq.asyncio`` wraps every send and receive in a Future, a list of pending events and an
enum-heavy state machine: ~50 us of the coordinator's CPU per request round trip on the
development machine, about half of what a ping costs it (docs/performance.md).  This
socket does the same job with plain non-blocking calls:

* ``recv_multipart`` takes a queued message at once; only when none is queued does it park
  on one Future that the socket's file descriptor wakes;
* ``send_now`` sends at once (``DONTWAIT``); a message that finds its peer's pipe full
  (``EAGAIN``) waits in that peer's FIFO, and every later message to the same peer waits
  behind it, so the order of messages to a peer never changes (nodes rely on it: a posted
  ``free`` precedes the next ``alloc``), while other peers are not held up at all.  Queued
  messages are retried whenever the descriptor fires and every ``RETRY_S``; the caller
  bounds the wait (``links.send_bounded``).

ZeroMQ's descriptor is edge-triggered and any operation on the socket may consume its
edge, so after every send and receive (refused ones too) the socket re-reads ``EVENTS`` and
wakes a parked receiver itself when a message is already waiting (the rule pyzmq's own loop
follows).  A slow tick (``TICK_S``) re-checks a parked receiver as a guard.  It is not what
keeps requests flowing: with the tick switched off, 3 clients x 270k echoed requests saw no
stall (``benchmarks/socket_loop.py``).  Counting the tick's finds as "missed wake-ups" was a
mistake: a request arriving between the tick's check of the descriptor and its read of
``EVENTS`` looks unannounced for a few microseconds.
"""

from __future__ import annotations

import asyncio
from collections import deque

import zmq

#: How often queued sends are retried while a peer's pipe stays full.
RETRY_S = 0.001
#: The guard: how often a parked receiver is checked for a message waiting anyway.
TICK_S = 0.05

# Plain ints: pyzmq's constants are IntFlag members, and enum arithmetic costs ~1 us a time.
_DONTWAIT = int(zmq.DONTWAIT)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class LoopSocket(zmq.Socket):
    """A non-blocking socket for one asyncio loop (create it from a sync ``zmq.Context``)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _reader: asyncio.Future | None = None
    _queued: dict[bytes, deque] | None = None  # routing id -> messages waiting for room
    _retry: asyncio.TimerHandle | None = None
    _tick: asyncio.TimerHandle | None = None
    _fd: int = -1

    def _attach(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._queued = {}
            self._fd = self.getsockopt(zmq.FD)
            self._loop.add_reader(self._fd, self._on_events)
            self._tick = self._loop.call_later(TICK_S, self._on_tick)

    def close(self, linger: int | None = None) -> None:
        if self._loop is not None and not self.closed:
            try:
                self._loop.remove_reader(self._fd)
            except (RuntimeError, zmq.ZMQError, ValueError):
                pass  # the loop is closed already
            for timer in (self._retry, self._tick):
                if timer is not None:
                    timer.cancel()
            for queue in self._queued.values():
                for _, fut in queue:
                    if not fut.done():
                        fut.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "socket closed"))
            self._queued.clear()
            if self._reader is not None and not self._reader.done():
                self._reader.cancel()
        super().close(linger)

    # -- receiving ---------------------------------------------------------------------
    async def recv_multipart(self, flags: int = 0, copy: bool = True,  # type: ignore[override]
                             track: bool = False) -> list:
        """The next message; waits (without blocking the loop) while none is queued."""
        self._attach()
        while True:
            try:
                frames = super().recv_multipart(_DONTWAIT, copy=copy, track=track)
            except zmq.Again:
                pass
            else:
                return frames  # (no receiver is parked: this one is the only receiver)
            if self.getsockopt(_EVENTS) & _POLLIN:
                continue  # the failed receive processed pending commands: try again
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    # -- sending -----------------------------------------------------------------------
    def send_now(self, frames: list) -> asyncio.Future | None:
        """Send ``frames`` (routing id first) at once, or queue them behind earlier messages
        to the same peer that are waiting for room.

        Returns ``None`` when the message went out, else a Future that completes when it
        does (or carries the send's error); cancelling it withdraws the message.  Errors
        of an immediate send (such as ``EHOSTUNREACH`` for an unknown routing id) raise
        here.  Only that peer waits: with ``ROUTER_MANDATORY`` a full pipe refuses the
        messages to its own peer, and a peer that stopped reading must never hold up the
        replies to everyone else (each waits at most ``links.SEND_TIMEOUT``).
        """
        self._attach()
        queue = self._queued.get(frames[0])
        if queue is None:
            try:
                super().send_multipart(frames, _DONTWAIT)
            except zmq.Again:
                pass
            else:
                return None
            finally:
                # Even a refused send processes the socket's commands, and may eat the edge.
                self._check_events()
            queue = self._queued[frames[0]] = deque()
        fut = self._loop.create_future()
        queue.append((frames, fut))
        self._schedule_retry()
        return fut

    def _flush_queue(self) -> None:
        for ident, queue in list(self._queued.items()):
            while queue:
                frames, fut = queue[0]
                if fut.done():  # its sender gave up
                    queue.popleft()
                    continue
                try:
                    super().send_multipart(frames, _DONTWAIT)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    queue.popleft()
                    fut.set_exception(exc)
                    continue
                queue.popleft()
                fut.set_result(None)
            if not queue:
                del self._queued[ident]
        self._schedule_retry()
        self._check_events()

    def _schedule_retry(self) -> None:
        if self._retry is None and self._queued:
            self._retry = self._loop.call_later(RETRY_S, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        self._flush_queue()

    # -- readiness ---------------------------------------------------------------------
    def _on_events(self) -> None:
        if self.closed:
            return
        if self._queued:
            self._flush_queue()
        else:
            self._check_events()

    def _on_tick(self) -> None:
        if self.closed:
            return
        self._check_events()
        self._tick = self._loop.call_later(TICK_S, self._on_tick)

    def _check_events(self) -> None:
        """Wake a parked receiver if a message is waiting (the descriptor may not fire)."""
        reader = self._reader
        if reader is not None and not reader.done() and \
                self.getsockopt(_EVENTS) & _POLLIN:
            reader.set_result(None)
