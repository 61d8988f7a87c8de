"""The coordinator's state: the emulated kernel's view of the whole machine.

``Kernel`` holds the topology, the ``struct page`` tables of every node, the
page locks, the node links, the tasks and the shared objects, and the two
primitives everything else is built on: allocating frames by policy
(``alloc_pages``, the emulated ``alloc_pages_mpol``) and freeing them.

Free-frame counts are mirrored here so that a batch can be planned (policy,
fallback) without asking the nodes first; the node process stays the owner of
its free list and the mirror is reserved before any await, so concurrent
faults never oversubscribe a node.

Per-node page lists (the kernel's per-cpu pagesets): the coordinator keeps a
few hundred zeroed frames of each node that it took from the node in bulk, so
an ordinary fault allocates without a round trip to the node; the list is
refilled in the background below ``PCP_LOW``.  numastat increments are
batched the same way and sent to the node before anyone reads its counters
(messages on one connection stay in order).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.errors import NumaError
from numaemu.topology import Topology

from .cpuset import ROOT, root_cpuset
from .links import Peer
from .mempolicy import MemPolicy, plan_allocation
from .migrate import BATCH as MIGRATE_BATCH
from .migrate import MigrateStats
from .mm import MMAP_BASE
from .numa_balancing import NumaBalancing
from .pages import FrameTable, PageLocks

log = logging.getLogger("numaemu.coordinator")

NUMASTAT_KEYS = ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit", "local_node",
                 "other_node")
#: Synthetic pids (a second task in one OS process, or a client on another host) start here,
#: above Linux's pid_max, so they never collide with a real pid.
SYNTHETIC_PID_BASE = 1 << 22
#: Per-node page list: refill below PCP_LOW, up to PCP_HIGH frames, in one bulk alloc.
PCP_LOW = 256
PCP_HIGH = 1024


@dataclass
class NodeInfo:
    """A registered node process."""

    node: int
    peer: Peer
    path: str
    frames: int
    host: str
    os_pid: int
    data_endpoint: str
    last_heard: float = 0.0  # monotonic time of the node's last message (heartbeat lease)
    pidfd: int | None = None  # a local node's process: its death is seen at once


class Kernel:
    """Shared state of the coordinator (single-threaded: one asyncio loop)."""

    def __init__(self, topology: Topology, cluster_id: str) -> None:
        self.topology = topology
        self.cluster_id = cluster_id
        self.host = socket.gethostname()
        self.page_size = topology.page_size
        self.num_nodes = topology.num_nodes
        vpn_base = MMAP_BASE // topology.page_size  # anonymous pages' index is above it
        self.tables = [FrameTable(f, vpn_base) for f in topology.frames_per_node]
        self.locks = PageLocks(self.tables)
        self.free = np.array(topology.frames_per_node, dtype=np.int64)
        self.nodes: dict[int, NodeInfo] = {}
        self.offline: set[int] = set()  # nodes that died (coordinator/memory_failure.py)
        self.last_stats: dict[int, dict] = {}  # numastat each node last reported
        self.inject_steps: dict[int, int] = {}  # migration step -> failures to inject
        self.stopping = False  # the cluster is shutting down: nodes leaving is expected
        self.loop_stall_max = 0.0  # worst event-loop stall seen, seconds (server.stall_monitor)
        self.loop_restarts = 0  # receive loops the watchdog had to restart
        self.tasks: dict[int, object] = {}
        self.objects: dict[int, object] = {}  # id -> SharedObject
        self.shm_names: dict[str, object] = {}
        self.files: dict[str, object] = {}
        self._next_synthetic_pid = SYNTHETIC_PID_BASE
        self._next_object_id = 1
        self.distances = [list(row) for row in topology.distances]
        self.weights = [topology.weight(n) for n in topology.nodes]
        self.node_set = frozenset(topology.nodes_with_memory)
        self.cpusets = {ROOT: root_cpuset(topology)}  # name -> Cpuset (coordinator/cpuset.py)
        self.pcp = [np.empty(0, dtype=np.int64) for _ in topology.nodes]
        self._refilling: set[int] = set()
        self.pending_stats: list[dict[str, int]] = [{} for _ in topology.nodes]
        self.spawn = lambda coro: asyncio.ensure_future(coro)  # the server installs its own
        self.migrate_batch = MIGRATE_BATCH
        self.vmstat = MigrateStats()
        self.numa = NumaBalancing(self)  # scanner knobs, counters, access profile
        self.pins: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # id -> (pid, nodes, pfns)
        self._next_pin = 1
        self.writeback_queue: set[int] = set()
        self.flusher_wakeup = asyncio.Event()

    # -- identities ----------------------------------------------------------
    def new_pid(self, os_pid: int, host: str) -> int:
        """The OS pid when it is free and local, so users can pass ``$!`` to the CLI."""
        if host == self.host and os_pid not in self.tasks and os_pid < SYNTHETIC_PID_BASE:
            return os_pid
        pid = self._next_synthetic_pid
        self._next_synthetic_pid += 1
        return pid

    def new_object_id(self) -> int:
        oid = self._next_object_id
        self._next_object_id += 1
        return oid

    def task(self, pid: int):
        """Look up a task; unknown pids are ESRCH."""
        task = self.tasks.get(pid)
        if task is None or task.exiting:
            raise NumaError(3, f"no task with pid {pid}")
        return task

    def mems_allowed(self, task) -> frozenset[int]:
        """The nodes ``task`` may allocate from: its cpuset's online nodes with memory."""
        return self.node_set & frozenset(task.cpuset.mems)

    def cpu_node(self, task) -> int:
        return self.topology.node_of_cpu(task.cpu)

    # -- frames --------------------------------------------------------------
    def node(self, n: int) -> NodeInfo:
        """A live node; one that is not up, or died, is ENODEV."""
        info = self.nodes.get(n)
        if info is None:
            raise NumaError(19, f"node {n} is not up")
        if n in self.offline:
            raise NumaError(19, f"node {n} is offline ({info.peer.reason})")
        return info

    async def post(self, n: int, req) -> None:
        """A fire-and-forget message to node ``n`` (links.Peer.post); a node that died needs
        none of them any more."""
        info = self.nodes.get(n)
        if info is not None and n not in self.offline:
            await info.peer.post(req)

    async def alloc_pages(self, policy: MemPolicy | None, cpu_node: int, ilx: np.ndarray, *,
                          flags: int, mapping: int, index: np.ndarray, owner: int,
                          zero: bool = True, mems: frozenset[int] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Allocate one zeroed frame per entry of ``ilx`` by ``policy``; return (nodes, pfns).

        ``mems``: the nodes the allocating task's cpuset allows (others count as full).

        Frames come back with refcount 0 and mapcount 0: the caller installs them.
        Raises ``NumaError(ENOMEM)`` and allocates nothing if the policy cannot be met.
        """
        count = len(ilx)
        if count == 0:
            return np.empty(0, dtype=np.int16), np.empty(0, dtype=np.int64)
        plan = plan_allocation(policy, cpu_node=cpu_node, ilx=ilx,
                               free=self.free_within(mems), distances=self.distances,
                               weights=self.weights)
        per_node = np.bincount(plan.nodes, minlength=self.num_nodes)
        self.free -= per_node  # reserve before awaiting: concurrent faults see it
        wanted = [int(n) for n in np.flatnonzero(per_node)]
        if all(per_node[n] <= len(self.pcp[n]) for n in wanted):
            results = [await self._take(n, int(per_node[n])) for n in wanted]  # no waiting
        else:
            results = await asyncio.gather(*(self._take(n, int(per_node[n])) for n in wanted),
                                           return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for n, r in zip(wanted, results):
                if n in self.offline:
                    continue  # it died meanwhile: nothing of it is free any more
                self.free[n] += per_node[n]
                if not isinstance(r, BaseException):
                    self.pcp[n] = np.concatenate((r, self.pcp[n]))
            raise NumaError(12, f"frame allocation failed: {failed[0]}")
        for key, per in plan.numastat_deltas(cpu_node, self.num_nodes).items():
            for n in np.flatnonzero(per).tolist():
                stats = self.pending_stats[n]
                stats[key] = stats.get(key, 0) + int(per[n])
        pfns = np.empty(count, dtype=np.int64)
        for n, got in zip(wanted, results):
            sel = plan.nodes == n
            pfns[sel] = got
            self.tables[n].prep_new(got, flags, mapping, index[sel], owner)
        return plan.nodes.astype(np.int16), pfns

    def free_within(self, mems: frozenset[int] | None) -> np.ndarray:
        """Free frames per node, as a cpuset confined to ``mems`` sees them (None: all)."""
        free = self.free.copy()
        if mems is not None:
            free[[n for n in range(self.num_nodes) if n not in mems]] = 0
        return free

    async def alloc_on(self, node: int, count: int, cpu_node: int) -> np.ndarray:
        """``count`` frames on exactly ``node`` (a migration target); ENOMEM if it is short."""
        if count == 0:
            return np.empty(0, dtype=np.int64)
        self.node(node)  # ENODEV for a node that died
        if count > self.free[node]:
            raise NumaError(12, f"node {node} has {self.free[node]} free frames, {count} wanted")
        self.free[node] -= count  # reserved before awaiting, as in alloc_pages
        try:
            if count <= len(self.pcp[node]) or count < PCP_LOW:
                pfns = await self._take(node, count)
            else:  # a big batch: straight from the node, not zeroed (the copy fills them)
                reply = await self.node(node).peer.call(P.Alloc(count=count, zero=False))
                pfns = np.frombuffer(reply["pfns"], dtype=P.PFN).astype(np.int64)
        except BaseException:
            if node not in self.offline:
                self.free[node] += count
            raise
        # A migration target is a hit on its node, local or other by the migrating CPU.
        stats = self.pending_stats[node]
        stats["numa_hit"] = stats.get("numa_hit", 0) + count
        where = "local_node" if node == cpu_node else "other_node"
        stats[where] = stats.get(where, 0) + count
        return pfns

    async def release_new(self, node: int, pfns: np.ndarray) -> None:
        """Free target frames a migration allocated but did not use."""
        await self.free_frames(node, pfns)

    def queue_writeback(self, oid: int) -> None:
        """Ask the flusher to write this object's dirty pages back soon (migration step 15)."""
        self.writeback_queue.add(oid)
        self.flusher_wakeup.set()

    def extra_refs(self, node: int) -> np.ndarray:
        """References held by pins, per frame (invariant checks).  Isolation references are
        not counted: at rest no page is isolated, so one that is has leaked (the check says
        so instead of explaining its reference away)."""
        refs = np.zeros(len(self.tables[node].refcount), dtype=np.int64)
        for _pid, nodes, pfns in self.pins.values():
            arrayops.add_at(refs, pfns[nodes == node], 1)
        return refs

    async def _take(self, node: int, count: int) -> np.ndarray:
        """``count`` zeroed frames of ``node``: from its page list, else straight from it."""
        pcp = self.pcp[node]
        if count <= len(pcp):
            got, self.pcp[node] = pcp[:count], pcp[count:]
        else:
            # Take the whole list before awaiting: other faults may use it meanwhile.
            have, self.pcp[node] = pcp, np.empty(0, dtype=np.int64)
            need = count - len(have)
            try:
                try:  # take a page list's worth more while asking anyway
                    reply = await self.node(node).peer.call(P.Alloc(count=need + PCP_HIGH))
                except NumaError:
                    reply = await self.node(node).peer.call(P.Alloc(count=need))
            except BaseException:
                if node not in self.offline:
                    self.pcp[node] = np.concatenate((have, self.pcp[node]))
                raise
            bulk = np.concatenate((have,
                                   np.frombuffer(reply["pfns"], dtype=P.PFN).astype(np.int64)))
            got = bulk[:count]
            self.pcp[node] = np.concatenate((self.pcp[node], bulk[count:]))
        if len(self.pcp[node]) < PCP_LOW and node not in self._refilling:
            self._refilling.add(node)
            self.spawn(self._refill(node))
        return got

    async def _refill(self, node: int) -> None:
        try:
            need = PCP_HIGH - len(self.pcp[node])
            if need > 0:
                reply = await self.node(node).peer.call(P.Alloc(count=need))
                bulk = np.frombuffer(reply["pfns"], dtype=P.PFN).astype(np.int64)
                if node not in self.offline:  # it may have died while we waited
                    self.pcp[node] = np.concatenate((self.pcp[node], bulk))
        except Exception as exc:  # the node is short of frames: the list simply stays short
            log.debug("page list refill of node %d: %s", node, exc)
        finally:
            self._refilling.discard(node)

    async def flush_stats(self) -> None:
        """Send the batched numastat increments to their nodes."""
        for n, stats in enumerate(self.pending_stats):
            if stats and n in self.nodes and n not in self.offline:
                self.pending_stats[n] = {}
                await self.post(n, P.Account(stats=stats))

    async def free_frames(self, node: int, pfns: np.ndarray) -> None:
        """Give frames back to their node (their refcount reached zero)."""
        if len(pfns) == 0:
            return
        self.tables[node].clear(pfns)
        if node in self.offline:
            return  # the node's memory is gone: nothing to give back
        self.free[node] += len(pfns)
        # No need to wait: the node handles its requests in order, so a later alloc or
        # free-map query sees these frames free; the free counts here are updated already.
        await self.post(node, P.Free(pfns=pfns.astype(P.PFN)))

    async def put_pages(self, nodes: np.ndarray, pfns: np.ndarray) -> None:
        """Drop one reference from each page; free those that reach zero (put_page)."""
        for n in arrayops.values(nodes):
            sel = pfns[nodes == n]
            table = self.tables[n]
            arrayops.subtract_at(table.refcount, sel, 1)
            dead = sel[table.refcount[sel] <= 0]
            if len(dead):
                await self.free_frames(n, arrayops.unique(dead))
