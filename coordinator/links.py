"""Request-reply with peers behind the coordinator's ROUTER sockets.

The coordinator is a ROUTER; nodes and client shootdown threads are DEALERs
that connected to it (ZeroMQ guide: asynchronous client/server with ROUTER and
DEALER).  A ``Peer`` is one such DEALER seen from the coordinator: ``call``
sends a request to its identity and awaits the reply matched by sequence
number, so many requests to many peers can be in flight at once while the
coordinator's loop keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from numaemu import protocol as P
from numaemu.errors import ClusterError, NumaError

log = logging.getLogger("numaemu.coordinator")


class PeerGone(ClusterError):
    """The peer disconnected or stopped answering."""


class Peer:
    """A DEALER peer reachable through a ROUTER socket."""

    def __init__(self, sock: zmq.asyncio.Socket, ident: bytes, name: str) -> None:
        self.sock = sock
        self.ident = ident
        self.name = name
        self.pending: dict[int, asyncio.Future] = {}
        self._seq = itertools.count(1)
        self.gone = False

    async def call(self, req: Any, timeout: float | None = 30.0) -> dict:
        """Send ``req`` and await its reply; error replies raise ``NumaError``."""
        if self.gone:
            raise PeerGone(f"{self.name} is gone")
        seq = next(self._seq)
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
            raise NumaError(reply.get("errno", 5), f"{self.name}: {reply.get('error')}")
        return reply

    async def send(self, req: Any, seq: int = 0) -> None:
        """Send without waiting for a reply."""
        frames = [self.ident, P.encode_request(req, seq)]
        try:
            try:
                # The plain non-blocking send: no future, no trip through the event loop.
                zmq.Socket.send_multipart(self.sock, frames, zmq.NOBLOCK)
            except zmq.Again:  # the pipe is full: wait for room
                await self.sock.send_multipart(frames)
        except zmq.ZMQError as exc:  # EHOSTUNREACH with ROUTER_MANDATORY: peer gone
            self.fail(f"{self.name} unreachable: {exc}")
            raise PeerGone(f"{self.name} unreachable: {exc}") from None

    def on_reply(self, obj: dict) -> None:
        fut = self.pending.get(obj.get("re"))
        if fut is not None and not fut.done():
            fut.set_result(obj)

    def fail(self, reason: str) -> None:
        """Fail every request in flight (the peer died)."""
        self.gone = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(PeerGone(reason))
