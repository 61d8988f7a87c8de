"""One emulated NUMA node: its frames, frame allocator and numastat counters.

The LRU lists are the coordinator's page flags (PG_lru, PG_active): the node keeps no copy
of them, so isolating and putting back pages during a migration costs no message.

A node is a plain synchronous loop (no threads).  It is a DEALER connected to
the coordinator's ``nodes`` ROUTER: it registers, then answers the
coordinator's requests (alloc / free / read / write / stats ...) in order.  The
coordinator pings it every ``HEARTBEAT_INTERVAL``; a node that hears nothing
for ``HEARTBEAT_TIMEOUT`` assumes its coordinator is gone and exits, removing
its segment (ZeroMQ guide: heartbeating).  It also binds a data endpoint
(ROUTER) where clients that cannot map the segment, or other nodes, read and
write frames: only ``DATA_OPS`` are served there (anyone who can connect may
use it); everything else (alloc, free, inject ...) only on the coordinator's
connection, and on the data endpoint gets EPERM.

Frame contents travel as a data frame beside the msgpack header (numaemu/protocol.py):
a write is stored straight from zmq's buffer; a read reply is a copy of the frames taken
while the request is served (zmq sends it later, from another thread, and the frames may
change meanwhile), handed to zmq without another copy.

A copy from a node whose segment this one cannot map (another host, or the cluster's
``data_path="remote"``) fetches the frames from that node's data service (``_fetch``).
While it waits, the loop keeps serving its own data endpoint and the coordinator's pings
(``Loop.wait_for``): two nodes that fetch from each other at once each serve the other's
request, and a data service never waits for anything, so no cycle of waits can form.

Frame allocation is next-fit over a free bitmap, so a fresh node hands out
contiguous runs and copies of runs become slice copies.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import zmq

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.errors import ClusterError
from numaemu.keys import find as find_keys
from numaemu.protocol import ProtocolError
from numaemu.transport import recv_frames, send_frames

from .segment import Segment, load_frames, store_frames

log = logging.getLogger("numaemu.node")

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 5.0
#: How long a copy waits for each message's worth of frames from another node's data
#: service (the loop keeps serving meanwhile; the coordinator's copy_in call waits 30 s).
FETCH_TIMEOUT = 2.0

NUMASTAT_KEYS = ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit", "local_node",
                 "other_node")

#: What the data endpoint serves: frame contents, nothing that changes the node's state.
DATA_OPS = frozenset({"read_frames", "write_frames", "read_elements", "write_elements", "ping"})
#: Counters of the copy engine (seed step 12), in ``node_stats``: frames copied in from a
#: mapped peer segment, frames fetched from a peer's data service, fetches that failed,
#: and data requests this node served while one of its own fetches waited.
COPY_KEYS = ("frames_copied_mapped", "frames_fetched", "fetch_failures",
             "served_during_fetch")


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """Split a frame list into (start, length) runs of consecutive frames."""
    if len(pfns) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pfns)]))
    return [(int(pfns[s]), int(e - s)) for s, e in zip(starts, ends)]


class FrameAllocator:
    """Next-fit allocator over a free bitmap: fresh memory comes out in contiguous runs."""

    def __init__(self, frames: int) -> None:
        self.free_map = np.ones(frames, dtype=bool)
        self.nr_free = frames
        self.cursor = 0

    def alloc(self, count: int) -> np.ndarray:
        """Take ``count`` frames, or raise ``MemoryError`` and take none."""
        if count > self.nr_free:
            raise MemoryError(f"{count} frames wanted, {self.nr_free} free")
        frames = len(self.free_map)
        got: list[np.ndarray] = []
        need = count
        start = self.cursor
        for lo, hi in ((start, frames), (0, start)):
            pos = lo
            while need and pos < hi:
                window = min(hi, pos + max(4 * need, 4096))
                found = np.flatnonzero(self.free_map[pos:window])[:need] + pos
                if len(found):
                    got.append(found)
                    need -= len(found)
                pos = window
            if not need:
                break
        pfns = np.concatenate(got) if got else np.empty(0, dtype=np.int64)
        pfns = pfns.astype(P.PFN, copy=False)
        self.free_map[pfns] = False
        self.nr_free -= count
        self.cursor = int(pfns[-1]) + 1 if count else self.cursor
        if self.cursor >= frames:
            self.cursor = 0
        return pfns

    def free(self, pfns: np.ndarray) -> None:
        """Return frames; freeing a free frame is an error and changes nothing."""
        if len(pfns) == 0:
            return
        if pfns.min() < 0 or pfns.max() >= len(self.free_map):
            raise IndexError("frame number out of range")
        if self.free_map[pfns].any() or len(arrayops.unique(pfns)) != len(pfns):
            raise ValueError("double free of a frame")
        self.free_map[pfns] = True
        self.nr_free += len(pfns)


class Node:
    """The node process's state and request handlers."""

    def __init__(self, node: int, segment: Segment, data_path: str = "auto") -> None:
        self.node = node
        self.segment = segment
        self.frames = segment.array
        self.allocator = FrameAllocator(segment.frames)
        self.numastat = dict.fromkeys(NUMASTAT_KEYS, 0)
        self.copy_stats = dict.fromkeys(COPY_KEYS, 0)
        self.keys: str | None = None  # the cluster's key directory (tcp)
        #: "remote": never map another node's segment, fetch from its data service (the
        #: cluster's data_path, so that one machine exercises the path of several hosts)
        self.data_path = data_path
        self.sources: dict[str, Segment] = {}  # other nodes' segments, mapped for copy_in
        self.ctx: zmq.Context | None = None  # the loop's context, for fetch sockets
        self.fetchers: dict[str, zmq.Socket] = {}  # DEALERs to other nodes' data services
        self._fetch_seq = 0
        self.fetching = 0  # fetches waiting (the loop serves data requests meanwhile)
        #: Wait until ``sock`` is readable or ``timeout`` seconds passed; True if readable.
        #: ``serve`` makes this a wait that keeps the loop serving (``Loop.wait_for``).
        self.wait: Callable[[zmq.Socket, float], bool] = \
            lambda sock, timeout: bool(sock.poll(timeout * 1000))
        self.injected: dict[str, int] = {}
        self.delayed: dict[str, tuple[int, float]] = {}
        self.handlers: dict[str, Callable] = {
            "alloc": self.alloc,
            "free": self.free,
            "account": self.account,
            "read_frames": self.read_frames,
            "write_frames": self.write_frames,
            "read_elements": self.read_elements,
            "write_elements": self.write_elements,
            "free_map": self.free_map,
            "copy_in": self.copy_in,
            "inject": self.inject,
            "node_stats": self.node_stats,
            "ping": lambda req: {},
        }

    def _check_pfns(self, pfns: np.ndarray) -> None:
        if len(pfns) == 1:  # (a page's access: numpy's min and max cost more than this)
            bad = not 0 <= int(pfns[0]) < self.segment.frames
        else:
            bad = len(pfns) and (pfns.min() < 0 or pfns.max() >= self.segment.frames)
        if bad:
            raise P.ProtocolError("frame number out of range")

    def alloc(self, req: P.Alloc) -> dict:
        if req.count < 0:
            raise ProtocolError("negative count")
        try:
            pfns = self.allocator.alloc(req.count)
        except MemoryError as exc:
            raise _Errno(errno.ENOMEM, str(exc)) from None
        if req.zero:
            for start, length in runs(pfns):
                self.frames[start : start + length] = 0
        self._add_stats(req.stats)
        return {"pfns": pfns}

    def free(self, req: P.Free) -> dict:
        self._check_pfns(req.pfns)
        try:
            self.allocator.free(req.pfns)
        except ValueError as exc:
            raise _Errno(errno.EINVAL, str(exc)) from None
        return {}

    def account(self, req: P.Account) -> dict:
        self._add_stats(req.stats)
        return {}

    def _add_stats(self, stats: dict) -> None:
        for key, value in stats.items():
            if key not in self.numastat or not isinstance(value, int):
                raise ProtocolError(f"bad numastat counter {key!r}")
        for key, value in stats.items():
            self.numastat[key] += value

    def _check_message_frames(self, pfns: np.ndarray) -> None:
        if len(pfns) > P.frames_per_message(self.segment.page_size):
            raise ProtocolError(f"{len(pfns)} frames in one message (at most "
                                f"{P.frames_per_message(self.segment.page_size)})")

    def read_frames(self, req: P.ReadFrames) -> dict:
        self._check_message_frames(req.pfns)
        self._check_pfns(req.pfns)
        total = len(req.pfns) * self.segment.page_size
        length = total - req.offset if req.length == -1 else req.length
        if not 0 <= req.offset <= total or not 0 <= length <= total - req.offset:
            raise ProtocolError("offset/length outside the frame list")
        # A copy, taken now: zmq sends it later, and the frames may change meanwhile.
        return {"data": load_frames(self.frames, req.pfns, req.offset, length)}

    def write_frames(self, req: P.WriteFrames) -> dict:
        self._check_message_frames(req.pfns)
        self._check_pfns(req.pfns)
        ps, n, end = self.segment.page_size, len(req.pfns), req.offset + len(req.data)
        if n == 0:
            if req.offset or req.data:
                raise ProtocolError("data without frames")
            return {}
        # The data starts in the first frame and ends in the last: no frame is listed for
        # nothing, and every byte has a frame.
        if not 0 <= req.offset < ps or not (n - 1) * ps < end <= n * ps:
            raise ProtocolError("data length does not match the frame list")
        store_frames(self.frames, req.pfns, req.offset, req.data)
        return {}

    def _items(self, elements: np.ndarray, itemsize: int) -> np.ndarray:
        """The node's memory as an array of ``itemsize``-byte rows, after checking a request
        for items at ``elements``."""
        ps = self.segment.page_size
        if not 1 <= itemsize <= ps or ps % itemsize:
            raise ProtocolError(f"item size {itemsize} does not divide the page size")
        if len(elements) > P.elements_per_message(itemsize):
            raise ProtocolError(f"{len(elements)} items in one message (at most "
                                f"{P.elements_per_message(itemsize)})")
        items = self.frames.reshape(-1, itemsize)
        if len(elements) and (elements.min() < 0 or elements.max() >= len(items)):
            raise ProtocolError("item position out of range")
        return items

    def read_elements(self, req: P.ReadElements) -> dict:
        items = self._items(req.elements, req.itemsize)
        return {"data": items[req.elements].tobytes()}

    def write_elements(self, req: P.WriteElements) -> dict:
        items = self._items(req.elements, req.itemsize)
        if len(req.data) != len(req.elements) * req.itemsize:
            raise ProtocolError("data length does not match the item list")
        items[req.elements] = np.frombuffer(req.data, dtype=np.uint8).reshape(-1, req.itemsize)
        return {}

    def copy_in(self, req: P.CopyIn) -> dict:
        """Seed step 12: copy contents from the source node, as slice copies of common runs:
        from its segment when this node maps it, else from its data service (``_fetch``)."""
        self._check_pfns(req.dst_pfns)
        if len(req.src_pfns) != len(req.dst_pfns):
            raise ProtocolError("src_pfns and dst_pfns differ in length")
        if len(req.dst_pfns) == 0:
            return {}
        src = self._source(req)
        dst = self.frames
        s, d = req.src_pfns.astype(np.int64), req.dst_pfns.astype(np.int64)
        if src is None and req.src_endpoint.startswith("ipc://") and self.data_path != "remote":
            # Same host, and the segment is gone: the source node died.
            raise _Errno(errno.EIO, f"node {req.src_node}'s memory is gone")
        if src is None:  # another host (or forced): from the source's data service
            try:
                self._fetch(req, s, d)
            except _Errno:
                self.copy_stats["fetch_failures"] += 1
                raise
            self.copy_stats["frames_fetched"] += len(d)
            return {}
        if s.max() >= len(src) or s.min() < 0:
            raise ProtocolError("source frame number out of range")
        breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(s)])).tolist()
        for a, b in zip(starts, ends):
            s0, d0 = int(s[a]), int(d[a])
            dst[d0 : d0 + b - a] = src[s0 : s0 + b - a]
        self.copy_stats["frames_copied_mapped"] += len(d)
        return {}

    def _source(self, req: P.CopyIn):
        if self.data_path == "remote":
            return None
        seg = self.sources.get(req.src_path)
        if seg is None:
            try:
                size = os.stat(req.src_path).st_size
            except OSError:
                return None
            seg = Segment(req.src_path, size // self.segment.page_size,
                          self.segment.page_size, create=False)
            self.sources[req.src_path] = seg
        return seg.array

    def _fetch(self, req: P.CopyIn, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy the source frames ``src`` into this node's frames ``dst`` from the source
        node's data service: one ``read_frames`` per message's worth (``P.MAX_FRAME_DATA``),
        all sent at once; each reply's data frame is stored straight from zmq's buffer.

        The wait (``self.wait``) keeps the loop serving this node's data endpoint: a node
        that fetches from this one at the same time gets its frames (docstring).  The
        destination frames are new pages (seed step 3): nobody maps them, so a request
        served meanwhile cannot touch them."""
        sock = self._fetcher(req)
        ps, step = self.segment.page_size, P.frames_per_message(self.segment.page_size)
        pending: dict[int, tuple[int, int]] = {}
        for lo in range(0, len(src), step):
            hi = min(lo + step, len(src))
            self._fetch_seq += 1
            send_frames(sock, P.message_frames(
                P.ReadFrames(pfns=src[lo:hi].astype(P.PFN, copy=False)), self._fetch_seq))
            pending[self._fetch_seq] = (lo, hi)
        self.fetching += 1
        try:
            while pending:
                if not self.wait(sock, FETCH_TIMEOUT):
                    raise _Errno(errno.EIO, f"node {req.src_node} did not send its frames")
                frames = recv_frames(sock)
                try:
                    obj, data = P.unpack_message(frames)
                except ProtocolError as exc:
                    raise _Errno(errno.EIO, f"node {req.src_node}: {exc}") from None
                seq = obj.get("re")
                piece = pending.pop(seq, None) if type(seq) is int else None
                if piece is None:
                    continue  # a late reply to a fetch that gave up
                lo, hi = piece
                if not obj.get("ok") or data is None or len(data) != (hi - lo) * ps:
                    raise _Errno(errno.EIO, f"node {req.src_node}: "
                                            f"{obj.get('error', 'a reply without its frames')}")
                rows = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, ps)
                d0 = int(dst[lo])
                if int(dst[hi - 1]) - d0 == hi - lo - 1 and \
                        not np.count_nonzero(np.diff(dst[lo:hi]) != 1):
                    self.frames[d0 : d0 + hi - lo] = rows
                else:
                    self.frames[dst[lo:hi]] = rows
        finally:
            self.fetching -= 1

    def _fetcher(self, req: P.CopyIn) -> zmq.Socket:
        """A DEALER connected to the source node's data service (kept for later copies)."""
        sock = self.fetchers.get(req.src_endpoint)
        if sock is not None:
            return sock
        try:
            curve = find_keys(req.src_endpoint, self.keys)
        except ClusterError as exc:
            raise _Errno(errno.EIO, str(exc)) from None
        sock = (self.ctx or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.client(sock)
        sock.connect(req.src_endpoint)
        self.fetchers[req.src_endpoint] = sock
        return sock

    def inject(self, req: P.Inject) -> dict:
        if req.request not in self.handlers or req.count < 0 or not 0 <= req.delay <= 10:
            raise ProtocolError(f"cannot inject that into {req.request!r}")
        if req.delay:
            if req.count:
                self.delayed[req.request] = (req.count, req.delay)
            else:
                self.delayed.pop(req.request, None)
        else:
            self.injected[req.request] = req.count
        return {}

    def free_map(self, req: P.FreeMap) -> dict:
        return {"bits": np.packbits(self.allocator.free_map).tobytes(),
                "nr_free": self.allocator.nr_free}

    def node_stats(self, req: P.NodeStats) -> dict:
        return {
            "node": self.node,
            "frames": self.segment.frames,
            "free": self.allocator.nr_free,
            "numastat": dict(self.numastat),
            "copy": dict(self.copy_stats),
        }

    def delay_for(self, op: str | None) -> float:
        """How late to serve the next ``op`` request (injected delays; consumes one)."""
        if op not in self.delayed:
            return 0.0
        count, delay = self.delayed.pop(op)
        if count > 1:
            self.delayed[op] = (count - 1, delay)
        return delay

    def handle(self, frames: list, ops: frozenset[str] | None = None) -> list | None:
        """Answer one request (its frames: header and data frame, if any) with the frames of
        the reply; a malformed one gets an error reply, never an exception.

        ``ops``: the requests this connection may make (None: all, the coordinator's);
        others get EPERM and change nothing."""
        obj: dict = {}
        try:
            obj = P.unpack(frames[0])
            if "re" in obj:  # a reply (to our register): not expected here
                return None
            req = P.decode_request(obj, P.data_frame(obj, frames))
            if ops is not None and req.op not in ops:
                raise _Errno(errno.EPERM, f"{req.op} is not served on the data endpoint")
            handler = self.handlers.get(req.op)
            if handler is None:
                raise ProtocolError(f"op {req.op!r} is not served by a node")
            if self.injected.get(req.op):
                self.injected[req.op] -= 1
                raise _Errno(errno.EIO, f"injected failure of {req.op}")
            out = handler(req)
            if "data" in out:
                return P.data_reply(obj.get("seq"), out["data"])
            return [P.ok_reply(obj.get("seq"), **out)]
        except _Errno as exc:
            return [P.error_reply(obj.get("seq"), exc.errno, exc.strerror)]
        except ProtocolError as exc:
            log.warning("node %d: bad request: %s", self.node, exc)
            return [P.protocol_error_reply(obj, exc)]
        except Exception as exc:  # a handler bug must not kill the node
            log.exception("node %d: request failed", self.node)
            return [P.error_reply(obj.get("seq"), errno.EIO, f"node error: {exc}")]


class _Errno(OSError):
    pass


class Loop:
    """The node's socket loop: the coordinator's connection (``ctrl``, a DEALER) and the data
    endpoint (``data``, a ROUTER), served from this one thread.

    Requests from the coordinator are served in order.  An injected delay holds that queue
    (``held``), not the loop; a copy that fetches from another node's data service waits
    in ``wait_for``, which goes on answering pings (a slow node is not a dead one) and
    serving the data endpoint (two nodes fetching from each other both get their frames),
    while the coordinator's other requests queue behind the copy."""

    def __init__(self, state: Node, ctrl: zmq.Socket, data: zmq.Socket) -> None:
        self.state, self.ctrl, self.data = state, ctrl, data
        self.poller = zmq.Poller()
        self.poller.register(ctrl, zmq.POLLIN)
        self.poller.register(data, zmq.POLLIN)
        self.held: deque[list] = deque()  # [frames, op, delay already taken]
        self.hold_until = 0.0
        self.last_heard = time.monotonic()
        self.stop: list[str] = []
        state.wait = self.wait_for

    def run(self) -> None:
        """Serve until told to exit or orphaned (no heartbeat from the coordinator)."""
        while not self.stop:
            wait = HEARTBEAT_INTERVAL
            if self.held:
                wait = max(0.0, min(wait, self.hold_until - time.monotonic()))
            self.turn(self.poller, wait)
            self.serve_held()
            if time.monotonic() - self.last_heard > HEARTBEAT_TIMEOUT:
                log.error("node %d: no heartbeat from the coordinator for %.1f s; exiting",
                          self.state.node, HEARTBEAT_TIMEOUT)
                return
        log.info("node %d stopping (%s)", self.state.node, self.stop[0])

    def turn(self, poller: zmq.Poller, timeout: float) -> dict:
        """Wait up to ``timeout`` seconds, then take one message from each socket that has
        one: serve a data request, answer a ping, queue the coordinator's other requests.
        Returns the poll's events."""
        events = dict(poller.poll(timeout * 1000))
        if self.ctrl in events:
            self.on_ctrl()
        if self.data in events:
            self.on_data()
        return events

    def wait_for(self, sock: zmq.Socket, timeout: float) -> bool:
        """Serve (``turn``) until ``sock`` is readable (True) or ``timeout`` seconds passed."""
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            if sock in self.turn(poller, max(0.0, deadline - time.monotonic())):
                return True
            if time.monotonic() >= deadline:
                return False

    def on_ctrl(self) -> None:
        frames = recv_frames(self.ctrl)
        self.last_heard = time.monotonic()
        op = _peek_op(frames[0])
        if op == "exit":
            self.stop.append("exit request")
        elif op == "ping":
            self.ctrl.send(P.ok_reply(0))
        else:
            self.held.append([frames, op, False])

    def serve_held(self) -> None:
        """Serve the coordinator's queued requests whose (injected) delay is over."""
        held = self.held
        while held and not self.stop and time.monotonic() >= self.hold_until:
            entry = held[0]
            if not entry[2]:
                entry[2] = True
                delay = self.state.delay_for(entry[1])
                if delay:
                    self.hold_until = time.monotonic() + delay
                    return
            held.popleft()
            out = self.state.handle(entry[0])
            if out is not None:
                send_frames(self.ctrl, out)

    def on_data(self) -> None:
        # The request is decoded from zmq's buffers, a write stored straight from them.
        frames = recv_frames(self.data)
        if len(frames) < 2:  # (a ROUTER puts the routing id first: never less than 2)
            return
        out = self.state.handle(frames[1:], DATA_OPS)
        if self.state.fetching:
            self.state.copy_stats["served_during_fetch"] += 1
        if out is not None:
            send_frames(self.data, [frames[0], *out])


def serve(node: int, coordinator: str, segment: Segment, data_endpoint: str,
          keys: str | None = None, data_path: str = "auto") -> None:
    """Register with the coordinator and answer requests until told to exit or orphaned.

    On tcp every socket authenticates with the cluster's CURVE keys (numaemu/keys.py): the
    node is a client of the coordinator and of other nodes, and serves its data endpoint
    only to peers holding the cluster's client credential.  ``data_path`` "remote": copies
    from other nodes always go through their data services (``Node.data_path``)."""
    state = Node(node, segment, data_path)
    state.keys = keys
    ctx = zmq.Context()
    state.ctx = ctx
    auth = None
    ctrl = ctx.socket(zmq.DEALER)
    ctrl.setsockopt(zmq.LINGER, 0)
    ctrl_keys = find_keys(coordinator, keys)
    if ctrl_keys is not None:
        ctrl_keys.client(ctrl)
    ctrl.connect(coordinator)
    data = ctx.socket(zmq.ROUTER)
    data.setsockopt(zmq.LINGER, 0)
    # Per frame (libzmq's limit): a data frame or a header, each at most a message's worth.
    data.setsockopt(zmq.MAXMSGSIZE, P.max_frame_message(segment.page_size))
    data_keys = find_keys(data_endpoint, keys)
    if data_keys is not None:
        auth = data_keys.authenticator(ctx)
        data_keys.server(data)
    data.bind(data_endpoint)
    data_endpoint = data.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port of "tcp://h:*"
    loop = Loop(state, ctrl, data)
    # SIGINT is left alone: under ``numaemu up`` Ctrl-C reaches the whole process group, and
    # the coordinator needs its nodes alive to write dirty pages back before it stops them.
    signal.signal(signal.SIGTERM, lambda *_: loop.stop.append("SIGTERM"))
    try:
        ctrl.send(P.encode_request(P.Register(
            node=node, path=segment.path, frames=segment.frames, page_size=segment.page_size,
            host=socket.gethostname(), os_pid=os.getpid(), data_endpoint=data_endpoint), 0))
        if not ctrl.poll(HEARTBEAT_TIMEOUT * 1000):
            log.error("node %d: coordinator %s did not answer the registration", node, coordinator)
            return
        reply = P.unpack(ctrl.recv())
        if not reply.get("ok"):
            log.error("node %d: registration refused: %s", node, reply.get("error"))
            return
        log.info("node %d up: %d frames of %d bytes in %s%s", node, segment.frames,
                 segment.page_size, segment.path,
                 "; copies through data services" if data_path == "remote" else "")
        loop.last_heard = time.monotonic()
        loop.run()
    finally:
        ctrl.close(0)
        data.close(0)
        for sock in state.fetchers.values():
            sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()
        state.frames = None
        for source in state.sources.values():
            source.close()
        segment.close()


def _peek_op(header) -> str | None:
    try:
        obj = P.unpack(header)
    except ProtocolError:
        return None
    return obj.get("op")
