"""Synchronous request-reply to the coordinator, that never hangs on a dead cluster.

A ``Connection`` is a DEALER socket (ZeroMQ guide: request-reply through
ROUTER and DEALER) plus a socket monitor.  While a request waits, the monitor
tells when the connection drops (the coordinator process died: its end of
the ``ipc://`` or ``tcp://`` connection closes), and ZMTP heartbeats drop
connections to a host that vanished.  Either way the caller gets a
``ClusterError`` within a few seconds instead of waiting forever.

One socket, one thread: a Connection must be used by one thread at a time
(``Task`` serialises its requests with a lock).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .errors import ClusterError, NumaError
from .keys import Keys
from .keys import find as find_keys

#: How long to wait for a first connection to the coordinator.
CONNECT_TIMEOUT = 5.0
#: How long a request may wait for its reply while the connection is up.
REQUEST_TIMEOUT = 120.0
POLL_SLICE_MS = 200
#: Messages at least this big are handed to zmq without a copy.
COPY_THRESHOLD = 1 << 16

_ctx_pid = None
_ctx: zmq.Context | None = None


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """Send the frames of one message; big ones without a copy (zmq keeps a reference to
    the object until it has sent it)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _SNDMORE if i < last else 0, copy=len(frame) < COPY_THRESHOLD)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list:
    """The frames of the next message (``zmq.Frame``s: zmq's buffers, not copied).  Cheaper
    than ``recv_multipart``, which reads the RCVMORE option through pyzmq's enums per
    frame; a frame received without a copy knows whether more follow."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame)
    return frames


_SNDMORE = int(zmq.SNDMORE)


def context() -> zmq.Context:
    """This process's zmq context (a fresh one after a fork)."""
    global _ctx, _ctx_pid
    if _ctx is None or _ctx_pid != os.getpid():
        _ctx = zmq.Context()
        _ctx_pid = os.getpid()
    return _ctx


class Connection:
    """A DEALER connected to one ROUTER endpoint, with disconnect detection."""

    def __init__(self, address: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 keys: str | Keys | None = None, peer: str = "the coordinator") -> None:
        if not isinstance(address, str) or "://" not in address:
            raise ClusterError(f"not a cluster address: {address!r} (expected ipc://... or "
                               "tcp://...)")
        self.address = address
        self.peer = peer  # who serves the endpoint, for error messages
        self.connect_timeout = connect_timeout
        #: tcp: the cluster's CURVE keys (or a ClusterError saying where they are); ipc: None
        self.keys = find_keys(address, keys)
        ctx = context()
        self.sock = ctx.socket(zmq.DEALER)
        if self.keys is not None:
            self.keys.client(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
        # A receive waits at most one slice, then the monitor is read (``wait``).
        self.sock.setsockopt(zmq.RCVTIMEO, POLL_SLICE_MS)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.sock.connect(address)
        self.connected = False
        self.lost = False
        self.refused = False  # the cluster refused our credentials (tcp)
        self.handshaken = False
        self._created = time.monotonic()
        self._seq = itertools.count(1)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)

    def _drain_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and self.connected:
                self.lost = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshaken = True
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self.refused = True
        # A CURVE peer that is dropped before its handshake ever succeeded was refused.
        if self.lost and self.keys is not None and not self.handshaken:
            self.refused = True

    def _check_alive(self, op: str) -> None:
        self._drain_monitor()
        if self.refused:
            raise ClusterError(f"{self.address} refused our keys ({op}): they are not this "
                               "cluster's")
        if self.lost:
            raise ClusterError(f"{self.peer} at {self.address} went away ({op})")
        if not self.connected and time.monotonic() - self._created > self.connect_timeout:
            raise ClusterError(f"no {self.peer.removeprefix('the ')} answers at {self.address} "
                               f"({op})")

    def call(self, op: str, *, timeout: float = REQUEST_TIMEOUT, **fields: Any) -> dict:
        """Send request ``op`` and return its reply; error replies raise ``NumaError``."""
        req = P.REQUESTS[op](**fields)
        return self.request(req, timeout=timeout)

    def request(self, req: Any, *, timeout: float = REQUEST_TIMEOUT) -> dict:
        return self.wait(self.send(req), req.op, timeout=timeout)

    def send(self, req: Any) -> int:
        """Send request ``req`` without waiting; its sequence number, for ``wait``."""
        if self.sock is None:
            raise ClusterError("connection is closed")
        if not self.connected:  # (later, ``wait`` reads the monitor between its slices)
            self._check_alive(req.op)
        seq = next(self._seq)
        try:
            frames = P.message_frames(req, seq)
        except (TypeError, ValueError, OverflowError) as exc:
            # A value msgpack cannot carry (an int beyond 64 bits, text that is no UTF-8):
            # the call fails as the kernel fails arguments its types cannot hold.
            raise NumaError(errno.EINVAL, f"{req.op}: an argument cannot be sent ({exc})") \
                from None
        # A big data frame goes without a copy: zmq holds the caller's buffer until it has
        # sent it, and the reply, which the caller waits for, comes after that.
        send_frames(self.sock, frames)
        return seq

    def wait(self, seq: int, op: str, *, timeout: float = REQUEST_TIMEOUT) -> dict:
        """The reply to request ``seq`` (replies to earlier, abandoned requests are
        dropped); error replies raise ``NumaError``.  A reply's data frame (frame contents)
        is its ``data``, a memoryview of zmq's buffer."""
        deadline = time.monotonic() + timeout
        sock = self.sock
        while True:
            try:
                # Not copied: a data frame stays in zmq's buffer until the caller copies it
                # where it belongs.  (RCVTIMEO: at most one slice.)
                frames = recv_frames(sock)
            except zmq.Again:
                self._check_alive(op)
                if time.monotonic() > deadline:
                    raise ClusterError(f"no reply to {op} from {self.peer} at {self.address} "
                                       f"in {timeout} s") from None
                continue
            try:
                reply, data = P.unpack_message(frames)
            except P.ProtocolError as exc:
                raise ClusterError(f"{self.peer} at {self.address} sent a malformed "
                                   f"reply to {op}: {exc}") from None
            if not self.connected:  # (so that ``send`` stops reading the monitor)
                self._drain_monitor()
            if reply.get("re") != seq:
                continue  # a late reply to an abandoned request
            if not reply.get("ok"):
                raise NumaError(reply.get("errno", 5), reply.get("error"))
            if data is not None:
                reply["data"] = data  # a memoryview of the data frame
            return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.sock.close(0)
            self.sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
