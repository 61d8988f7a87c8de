"""Request-reply with peers behind the coordinator's ROUTER sockets.

The coordinator is a ROUTER; nodes and client shootdown threads are DEALERs
that connected to it (ZeroMQ guide: asynchronous client/server with ROUTER and
DEALER).  A ``Peer`` is one such DEALER seen from the coordinator.

Two ways to talk to it, and every send goes through ``send_bounded``:

* ``call`` sends a request and awaits the reply matched by sequence number, so
  many requests to many peers can be in flight while the loop keeps serving.
  A failed send, a timeout or the peer's death raises ``PeerGone``.
* ``post`` is fire-and-forget, for the messages the protocol declares as such
  (``P.POSTED``: free, account, isolate, putback, ping, exit).  It never
  raises: a send that fails *fails the peer* (``fail``), which fails every call
  in flight and tells the owner (``on_fail``: a node goes offline, a client is
  reaped).  Nothing is dropped silently: the only way a posted message is lost
  is with the peer that would have received it.

Full queues: a send waits for room at most ``SEND_TIMEOUT`` seconds (a
ROUTER_MANDATORY socket reports a full pipe as EAGAIN); a peer that cannot take
a message in that time is treated as gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq

from numaemu import protocol as P
from numaemu.errors import ClusterError, NumaError

from .zloop import LoopSocket

log = logging.getLogger("numaemu.coordinator")

#: How long a send may wait for room in a full pipe before the peer counts as gone.
SEND_TIMEOUT = 2.0


class PeerGone(ClusterError):
    """The peer disconnected, stopped answering, or could not take a message."""


async def send_bounded(sock: LoopSocket, frames: list, timeout: float = SEND_TIMEOUT,
                       ) -> None:
    """Send ``frames`` on ``sock``; raise ``zmq.ZMQError`` (or ``PeerGone`` after ``timeout``
    seconds without room) instead of leaving the error in a future nobody reads.

    The common case sends at once and costs no trip through the event loop; a message that
    has to wait for room is withdrawn when the wait times out (``zloop``).
    """
    fut = sock.send_now(frames)
    if fut is None:
        return
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise PeerGone(f"no room to send for {timeout} s") from None


class Peer:
    """A DEALER peer reachable through a ROUTER socket."""

    def __init__(self, sock: LoopSocket, ident: bytes, name: str,
                 on_fail: Callable[[Peer, str], None] | None = None) -> None:
        self.sock = sock
        self.ident = ident
        self.name = name
        self.on_fail = on_fail
        self.pending: dict[int, asyncio.Future] = {}
        self._seq = itertools.count(1)
        self.gone = False
        self.reason = ""

    def next_seq(self) -> int:
        return next(self._seq)

    async def call(self, req: Any, timeout: float | None = 30.0) -> dict:
        """Send ``req`` and await its reply; error replies raise ``NumaError``, a lost peer
        ``PeerGone``."""
        if self.gone:
            raise PeerGone(f"{self.name} is gone ({self.reason})")
        seq = self.next_seq()
        fut = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        try:
            await self.send(req, seq)
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PeerGone(f"{self.name} did not answer {req.op} within {timeout} s") from None
        finally:
            self.pending.pop(seq, None)
        if not reply.get("ok"):
            err = reply.get("errno")
            if type(err) is not int or not 0 < err < 4096:
                err = 5  # EIO: a reply that does not say what went wrong
            raise NumaError(err, f"{self.name}: {reply.get('error')}")
        return reply

    async def post(self, req: Any) -> None:
        """Send a fire-and-forget message (see the module docstring); never raises."""
        if req.op not in P.POSTED:
            raise TypeError(f"{req.op} expects a reply: use call()")
        if self.gone:
            return
        try:
            await self.send(req, 0)
        except PeerGone:
            pass  # the peer has been failed: its owner handles the loss

    async def send(self, req: Any, seq: int) -> None:
        """Send ``req`` numbered ``seq``; a failed send fails the peer and raises
        ``PeerGone`` (for callers that await the reply themselves, like the shootdown)."""
        try:
            await send_bounded(self.sock, [self.ident, *P.message_frames(req, seq)])
        except (zmq.ZMQError, PeerGone) as exc:  # EHOSTUNREACH with ROUTER_MANDATORY: gone
            reason = f"{self.name} unreachable: {exc}"
            self.fail(reason)
            raise PeerGone(reason) from None

    def on_reply(self, obj: dict) -> None:
        """Deliver a reply to the call awaiting it; anything unroutable is dropped."""
        seq = obj.get("re")
        if type(seq) is not int:
            log.warning("%s sent a reply with a bad sequence number %r; dropped", self.name,
                        type(seq).__name__)
            return
        fut = self.pending.get(seq)
        if fut is not None and not fut.done():
            fut.set_result(obj)

    def fail(self, reason: str) -> None:
        """The peer is gone: fail every request in flight and tell the owner (once)."""
        if self.gone:
            return
        self.gone = True
        self.reason = reason
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(PeerGone(reason))
        if self.on_fail is not None:
            try:
                self.on_fail(self, reason)
            except Exception:  # the owner's handler must not break the caller
                log.exception("handling the loss of %s failed", self.name)
