"""The coordinator process: one asyncio loop serving three ROUTER sockets.

    rpc    clients and the CLI: the syscall interface (request-reply, DEALER clients)
    tlb    client shootdown threads: hello, heartbeats, invalidate acks
    nodes  node processes: registration, then requests from us (alloc, free, ...)

Every request runs as its own asyncio task, so a fault waiting on a node or a
page lock, or a writeback waiting on TLB acks, never stalls other callers
(ARCHITECTURE.md: "one slow client must not stall the cluster").  State
changes between two awaits are atomic, like code holding a spinlock.

Identity (coordinator/creds.py): the sockets are ``CredRouter``s, which record each
peer's kernel credentials (ipc) by routing id; a task is bound to the connection that
attached it, and ``answer`` refuses requests naming another connection's task.

Liveness: nodes are pinged every ``NODE_PING`` seconds (a node exits when the
pings stop); clients send heartbeats on their tlb socket and local clients are
also checked by pid; a dead client's address space is reaped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time

import zmq
import zmq.asyncio

from numaemu import protocol as P
from numaemu.errors import ClusterError, NumaError
from numaemu.keys import find as find_keys
from numaemu.protocol import ProtocolError
from numaemu.topology import Topology

from . import creds, memory_failure, numa_balancing, procwatch
from .kernel import Kernel, NodeInfo
from .links import Peer, PeerGone, send_bounded
from .shootdown import client_alive
from .syscalls import CURRENT_REQUEST, Syscalls, exit_task

log = logging.getLogger("numaemu.coordinator")

NODE_PING = 0.25
#: A node on another host not heard from for this long is dead.  A local node's death is
#: seen at once through its pidfd; its lease only catches a hung process, and is longer.
NODE_LEASE = 1.5
LOCAL_NODE_LEASE = 5.0
REAP_INTERVAL = 1.0
#: Largest message each endpoint accepts (a request carries at most 65536 pages: 512 KiB of
#: page numbers); the nodes endpoint carries frame contents: ``P.max_frame_message``.
MAX_MESSAGE = {"rpc": 8 << 20, "tlb": 1 << 20}
#: How many unread messages one client connection may queue here (ZMQ_RCVHWM is per peer on
#: a ROUTER): past it libzmq stops reading that connection (tcp backpressure, nothing is
#: dropped), so one peer holds at most MAX_MESSAGE x MAX_QUEUED bytes of our memory.  A
#: client has one request in flight at a time, a few when it pipelines.
MAX_QUEUED = {"rpc": 64, "tlb": 64}
#: Period of the loop-stall monitor.
STALL_TICK = 0.01
#: The flusher writes dirty file pages back this often (and sooner when woken).
FLUSH_INTERVAL = 5.0


class Coordinator:
    """Owns the sockets and the loop; the state is in ``Kernel``, the handlers in ``Syscalls``."""

    def __init__(self, topology: Topology, cluster_id: str, endpoints: dict,
                 supervisor_pid: int = 0, inject_dilation: float | None = None,
                 keys: str | None = None) -> None:
        self.kernel = Kernel(topology, cluster_id)
        self.inject_dilation = inject_dilation
        self.kernel.schedule_reap = self.schedule_reap
        self.kernel.spawn = self.spawn
        self.endpoints = endpoints
        self.keys = keys  # tcp: the cluster's CURVE key directory (numaemu/keys.py)
        self.supervisor_pid = supervisor_pid
        self.syscalls = Syscalls(self.kernel, self)
        self._stop: asyncio.Event | None = None
        self._stop_reason = ""
        self._tasks: set[asyncio.Task] = set()
        self._tlb_owner: dict[bytes, int] = {}
        self._node_by_ident: dict[bytes, int] = {}

    # -- lifecycle -------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        if self._stop is not None:
            self._stop.set()

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def schedule_reap(self, task) -> None:
        self.spawn(exit_task(self.kernel, task))

    async def run(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        ctx = zmq.asyncio.Context()
        # The sockets are plain ones driven by this loop (coordinator/zloop.py); the asyncio
        # context is for the CURVE authenticator, which shares the underlying context.
        sock_ctx = zmq.Context.shadow(ctx.underlying)
        socks = {}
        auth = None
        topology_page_size = self.kernel.page_size
        try:
            for name in ("rpc", "tlb", "nodes"):
                curve = find_keys(self.endpoints[name], self.keys)
                if curve is not None and auth is None:
                    # Before any bind: no tcp handshake may happen without the ZAP handler.
                    auth = curve.authenticator(ctx)
                sock = sock_ctx.socket(zmq.ROUTER, socket_class=creds.CredRouter)
                if curve is not None:
                    curve.server(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                # A bigger message drops its sender's connection before it is read: no
                # peer makes the loop unpack megabytes (or exhausts our memory).
                limit = MAX_MESSAGE.get(name) or P.max_frame_message(topology_page_size)
                sock.setsockopt(zmq.MAXMSGSIZE, limit)
                if name in MAX_QUEUED:
                    sock.setsockopt(zmq.RCVHWM, MAX_QUEUED[name])
                sock.bind(self.endpoints[name])
                socks[name] = sock
            log.info("coordinator listening on %s", self.endpoints["rpc"])
            loops = {"serve_rpc": lambda: self.serve(socks["rpc"], self.on_rpc),
                     "serve_tlb": lambda: self.serve(socks["tlb"],
                                                     self.one_frame("tlb", self.on_tlb)),
                     "serve_nodes": lambda: self.serve(socks["nodes"], self.one_frame(
                         "node", self.on_node, data_replies=True)),
                     "ping_nodes": self.ping_nodes, "reap_dead": self.reap_dead,
                     "flusher": self.flusher, "stall_monitor": self.stall_monitor,
                     "numa_scanner": lambda: numa_balancing.scan_loop(self.kernel)}
            workers = [asyncio.ensure_future(self.watchdog(name, fn))
                       for name, fn in loops.items()]
            await self._stop.wait()
            log.info("coordinator stopping (%s)", self._stop_reason or "stop")
            await self.shutdown()
            for w in workers + list(self._tasks):
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            for sock in socks.values():
                sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()

    async def watchdog(self, name: str, loop_fn) -> None:
        """Run one of the coordinator's loops forever: a loop that dies anyway (a bug the
        per-message guards missed) is logged loudly and restarted, never left dead."""
        restarts = 0
        while True:
            try:
                await loop_fn()
                log.error("loop %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except BaseException:
                restarts += 1
                self.kernel.loop_restarts += 1
                log.exception("loop %s died (restart %d)", name, restarts)
            await asyncio.sleep(min(1.0, 0.01 * restarts))

    async def stall_monitor(self) -> None:
        """Measure how late the loop wakes up: the worst stall any request caused (no request
        may hold the loop for more than ~50 ms; ``Cluster.coordinator_stats()`` reports it)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(STALL_TICK)
            late = loop.time() - before - STALL_TICK
            if late > self.kernel.loop_stall_max:
                self.kernel.loop_stall_max = late
                if late > 0.05:
                    log.warning("the event loop stalled for %.0f ms", late * 1000)

    async def serve(self, sock, on_message) -> None:
        """Receive loop of one ROUTER socket: any message, however malformed, ends in a reply
        or a logged drop; nothing a peer sends can end the loop."""
        while True:
            frames = await sock.recv_multipart()
            try:
                await on_message(sock, frames)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("a message of %d frames could not be handled; dropped",
                              len(frames))

    async def reply(self, sock, ident: bytes, raw: bytes) -> None:
        """Answer a peer; one that vanished or does not read is logged, never fatal."""
        try:
            await send_bounded(sock, [ident, raw])
        except (zmq.ZMQError, PeerGone) as exc:
            log.info("could not answer a peer: %s", exc)

    async def shutdown(self) -> None:
        """Write dirty file pages back (like sync at shutdown), then stop the nodes."""
        from .filemap import writeback

        self.kernel.stopping = True
        for obj in list(self.kernel.files.values()):
            try:
                await asyncio.wait_for(writeback(self.kernel, obj), 10)
            except Exception as exc:  # best effort: never block the stop
                log.warning("writeback of %s at stop failed: %s", obj.name, exc)
        for info in list(self.kernel.nodes.values()):
            await info.peer.post(P.Exit())

    # -- rpc ---------------------------------------------------------------------
    async def on_rpc(self, sock, frames: list) -> None:
        if len(frames) != 2:
            log.warning("a request of %d frames instead of 1", len(frames) - 1)
            if len(frames) > 2:  # answer it, or a raw client waits for its timeout
                await self.reply(sock, frames[0], P.error_reply(
                    None, errno.EINVAL, "malformed message: a request is one frame"))
            return
        self.spawn(self.answer(sock, frames[0], frames[1]))

    async def answer(self, sock, ident: bytes, raw: bytes) -> None:
        obj: dict = {}
        seq = None
        try:
            obj = P.unpack(raw)
            seq = obj.get("seq")
            req = P.decode_request(obj)
            handler = self.syscalls.handlers.get(req.op)
            if handler is None:
                raise ProtocolError(f"op {req.op!r} is not a syscall")
            # Identity first: a request naming another connection's task changes nothing,
            # not even that task's request count (coordinator/creds.py).
            caller = creds.identify(self.kernel, ident, creds.peer_of(sock, ident), req)
            creds.CALLER.set(caller)
            task = caller.task
            if task is not None:
                task.last_seen = time.monotonic()
                # A new request means the client stopped waiting for the one that promised
                # a flushed TLB (interrupted, timed out): it may cache translations again.
                task.self_flushed = None
                task.requests += 1
                CURRENT_REQUEST.set(task.requests)
            reply = P.ok_reply(seq, **await handler(req))
        except NumaError as exc:
            reply = P.error_reply(seq, exc.errno, exc.strerror)
        except ProtocolError as exc:
            log.warning("malformed request: %s", exc)
            reply = P.protocol_error_reply(obj, exc)
        except ClusterError as exc:
            log.error("request %s failed: %s", obj.get("op"), exc)
            reply = P.error_reply(seq, errno.EIO, str(exc))
        except (asyncio.TimeoutError, TimeoutError):
            reply = P.error_reply(seq, errno.ETIMEDOUT, f"{obj.get('op')} timed out")
        except Exception as exc:  # a handler bug must not kill the coordinator
            log.exception("request %s failed", obj.get("op"))
            reply = P.error_reply(seq, errno.EIO, f"coordinator error: {exc!r}")
        await self.reply(sock, ident, reply)

    def one_frame(self, kind: str, handler, data_replies: bool = False):
        """A message handler for the tlb and nodes sockets: one-frame msgpack maps only (with
        ``data_replies``, a reply may carry a data frame: a node's frame contents, put in
        its ``data`` field); a malformed one is logged and, unless it was a reply, answered
        with EINVAL."""

        async def on_message(sock, frames: list) -> None:
            if len(frames) != 2 and not (data_replies and len(frames) == 3):
                return
            ident = frames[0]
            obj: dict = {}
            try:
                obj = P.unpack(frames[1])
                data = P.data_frame(obj, frames[1:])
                if data is not None:
                    if "re" not in obj:
                        raise ProtocolError("a request with a data frame")
                    obj["data"] = data
                await handler(sock, ident, obj)
            except ProtocolError as exc:
                log.warning("malformed %s message: %s", kind, exc)
                if "re" not in obj:
                    await self.reply(sock, ident, P.protocol_error_reply(obj, exc))

        return on_message

    # -- tlb -----------------------------------------------------------------------
    async def on_tlb(self, sock, ident: bytes, obj: dict) -> None:
        if "re" in obj:  # an invalidate ack
            pid = self._tlb_owner.get(ident)
            task = self.kernel.tasks.get(pid)
            if task is not None and task.tlb is not None and task.tlb.ident == ident:
                task.last_seen = time.monotonic()
                task.tlb.on_reply(obj)
            return
        req = P.decode_request(obj)
        if req.op not in ("tlb_hello", "heartbeat"):
            raise ProtocolError(f"{req.op!r} is not a tlb message")
        task = self.kernel.tasks.get(req.pid)
        if task is None or task.exiting:
            if req.op == "tlb_hello":
                await self.reply(sock, ident, P.error_reply(
                    obj.get("seq"), errno.ESRCH, "no such task"))
            return
        refused = creds.check_tlb_peer(task, creds.peer_of(sock, ident))
        if refused is not None:  # a stranger's hello or heartbeat for this task
            log.warning("tlb %s refused: %s", req.op, refused)
            await self.reply(sock, ident, P.error_reply(obj.get("seq"), errno.EPERM, refused))
            return
        task.last_seen = time.monotonic()
        if req.op == "tlb_hello":
            task.tlb = Peer(sock, ident, f"task {task.pid}")
            self._tlb_owner[ident] = task.pid
            await self.reply(sock, ident, P.ok_reply(obj.get("seq")))

    # -- nodes ---------------------------------------------------------------------
    async def on_node(self, sock, ident: bytes, obj: dict) -> None:
        node = self._node_by_ident.get(ident)
        info = self.kernel.nodes.get(node) if node is not None else None
        if info is not None and info.peer.ident == ident:
            info.last_heard = time.monotonic()
            if "re" in obj:
                info.peer.on_reply(obj)
                return
        if "re" in obj:
            return
        req = P.decode_request(obj)
        if req.op != "register":
            raise ProtocolError(f"nodes may only register, not {req.op!r}")
        await self.reply(sock, ident, self.register(sock, ident, req, obj.get("seq")))

    def register(self, sock, ident: bytes, req: P.Register, seq) -> bytes:
        refused = creds.check_register(req, creds.peer_of(sock, ident))
        if refused is not None:
            log.warning("registration of node %d refused: %s", req.node, refused)
            return P.error_reply(seq, errno.EPERM, f"register: {refused}")
        topo = self.kernel.topology
        if req.node not in topo.nodes:
            return P.error_reply(seq, errno.ENODEV, f"node {req.node} is not in the topology")
        if req.node in self.kernel.offline:
            # Its frames are poisoned and still named by page tables: a fresh node under the
            # same number would serve other memory at those addresses.
            return P.error_reply(seq, errno.EBUSY, f"node {req.node} failed and is offline; "
                                                   "restart the cluster to bring it back")
        if req.node in self.kernel.nodes:
            return P.error_reply(seq, errno.EEXIST, f"node {req.node} is already registered")
        if req.frames != topo.frames_per_node[req.node] or req.page_size != topo.page_size:
            return P.error_reply(seq, errno.EINVAL,
                                 f"node {req.node} must have {topo.frames_per_node[req.node]} "
                                 f"frames of {topo.page_size} bytes")
        node = req.node
        peer = Peer(sock, ident, f"node {node}",
                    on_fail=lambda _peer, reason: memory_failure.node_offline(
                        self.kernel, node, reason))
        info = NodeInfo(node, peer, req.path, req.frames, req.host, req.os_pid,
                        req.data_endpoint, last_heard=time.monotonic())
        if req.host == self.kernel.host:
            # The process sentinel: a local node's death is noticed at once, not after a lease.
            info.pidfd = procwatch.pidfd_open(req.os_pid)
            if info.pidfd is None:
                return P.error_reply(seq, errno.ESRCH, f"no local process {req.os_pid}")
            procwatch.watch(info.pidfd, lambda: peer.fail(f"node {node}'s process exited"))
        self.kernel.nodes[node] = info
        self._node_by_ident[ident] = node
        log.info("node %d registered (pid %d on %s)", req.node, req.os_pid, req.host)
        return P.ok_reply(seq)

    async def ping_nodes(self) -> None:
        """Heartbeats: every node hears from us at least every ``NODE_PING`` s (it exits after
        5 s of silence) and answers each ping; a node not heard from for ``NODE_LEASE`` s is
        declared dead (a local node's death is seen at once through its pidfd)."""
        while True:
            await self.kernel.flush_stats()
            now = time.monotonic()
            for info in list(self.kernel.nodes.values()):
                if info.peer.gone:
                    continue
                lease = NODE_LEASE if info.pidfd is None else LOCAL_NODE_LEASE
                if now - info.last_heard > lease:
                    info.peer.fail(f"node {info.node} silent for {now - info.last_heard:.1f} s")
                    if info.pidfd is not None:  # a hung local node: fence it (STONITH)
                        self.spawn(procwatch.kill_and_wait(info.pidfd, 5.0))
                    continue
                await info.peer.post(P.Ping())
            await asyncio.sleep(NODE_PING)

    async def flusher(self) -> None:
        """Background writeback of dirty file pages (the kernel's flusher threads)."""
        from .filemap import writeback

        kernel = self.kernel
        while True:
            try:
                await asyncio.wait_for(kernel.flusher_wakeup.wait(), FLUSH_INTERVAL)
            except asyncio.TimeoutError:
                kernel.writeback_queue.update(kernel.objects)  # periodic: every file
            kernel.flusher_wakeup.clear()
            queued, kernel.writeback_queue = kernel.writeback_queue, set()
            for oid in sorted(queued):
                obj = kernel.objects.get(oid)
                if obj is None or obj.kind != "file":
                    continue
                try:
                    await writeback(kernel, obj)
                except Exception as exc:  # keep flushing the others
                    log.warning("background writeback of %s failed: %s", obj.name, exc)

    async def reap_dead(self) -> None:
        """Reap tasks whose process died (local) or whose lease expired (another host)."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for task in list(self.kernel.tasks.values()):
                if not task.exiting and not client_alive(self.kernel, task):
                    log.warning("task %d (os pid %d) is gone; reaping its address space",
                                task.pid, task.os_pid)
                    self.schedule_reap(task)


def run_coordinator(topology: Topology, cluster_id: str, endpoints: dict,
                    supervisor_pid: int = 0, inject_dilation: float | None = None,
                    keys: str | None = None) -> None:
    """Entry point of the coordinator process.

    ``NUMAEMU_PROFILE=FILE`` runs it under cProfile and writes the stats to FILE at exit
    (``python -m pstats FILE``): the way to see where a slow path spends its time.
    """
    coordinator = Coordinator(topology, cluster_id, endpoints, supervisor_pid, inject_dilation,
                              keys)
    profile = os.environ.get("NUMAEMU_PROFILE")
    if not profile:
        asyncio.run(coordinator.run())
        return
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(asyncio.run, coordinator.run())
    finally:
        profiler.dump_stats(profile)
