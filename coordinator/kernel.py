"""The coordinator's state: the emulated kernel's view of the whole machine.

``Kernel`` holds the topology, the ``struct page`` tables of every node, the
page locks, the node links, the tasks and the shared objects, and the two
primitives everything else is built on: allocating frames by policy
(``alloc_pages``, the emulated ``alloc_pages_mpol``) and freeing them.

Free-frame counts are mirrored here so that a batch can be planned (policy,
fallback) without asking the nodes first; the node process stays the owner of
its free list and the mirror is reserved before the alloc request is sent, so
concurrent faults never oversubscribe a node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import numpy as np

from numaemu import protocol as P
from numaemu.errors import NumaError
from numaemu.topology import Topology

from .links import Peer
from .mempolicy import MemPolicy, plan_allocation
from .pages import FrameTable, PageLocks

log = logging.getLogger("numaemu.coordinator")

NUMASTAT_KEYS = ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit", "local_node",
                 "other_node")
#: Synthetic pids (a second task in one OS process, or a client on another host) start here,
#: above Linux's pid_max, so they never collide with a real pid.
SYNTHETIC_PID_BASE = 1 << 22


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


class Kernel:
    """Shared state of the coordinator (single-threaded: one asyncio loop)."""

    def __init__(self, topology: Topology, cluster_id: str) -> None:
        self.topology = topology
        self.cluster_id = cluster_id
        self.host = socket.gethostname()
        self.page_size = topology.page_size
        self.num_nodes = topology.num_nodes
        self.tables = [FrameTable(f) for f in topology.frames_per_node]
        self.locks = PageLocks(self.tables)
        self.free = np.array(topology.frames_per_node, dtype=np.int64)
        self.nodes: dict[int, NodeInfo] = {}
        self.tasks: dict[int, object] = {}
        self.objects: dict[int, object] = {}  # id -> SharedObject
        self.shm_names: dict[str, object] = {}
        self.files: dict[str, object] = {}
        self._next_synthetic_pid = SYNTHETIC_PID_BASE
        self._next_object_id = 1
        self.distances = [list(row) for row in topology.distances]
        self.weights = [topology.weight(n) for n in topology.nodes]
        self.node_set = frozenset(topology.nodes_with_memory)

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

    def cpu_node(self, task) -> int:
        return self.topology.node_of_cpu(task.cpu)

    # -- frames --------------------------------------------------------------
    def node(self, n: int) -> NodeInfo:
        info = self.nodes.get(n)
        if info is None:
            raise NumaError(19, f"node {n} is not up")
        return info

    async def alloc_pages(self, policy: MemPolicy | None, cpu_node: int, ilx: np.ndarray, *,
                          flags: int, mapping: int, index: np.ndarray, owner: int,
                          zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Allocate one frame per entry of ``ilx`` by ``policy``; return (nodes, pfns).

        Frames come back with refcount 0 and mapcount 0: the caller installs them.
        Raises ``NumaError(ENOMEM)`` and allocates nothing if the policy cannot be met.
        """
        count = len(ilx)
        if count == 0:
            return np.empty(0, dtype=np.int16), np.empty(0, dtype=np.int64)
        plan = plan_allocation(policy, cpu_node=cpu_node, ilx=ilx, free=self.free.copy(),
                               distances=self.distances, weights=self.weights)
        per_node = np.bincount(plan.nodes, minlength=self.num_nodes)
        self.free -= per_node  # reserve before awaiting: concurrent faults see it
        deltas = plan.numastat_deltas(cpu_node, self.num_nodes)
        wanted = [int(n) for n in np.flatnonzero(per_node)]
        stats_for = {n: {k: int(v[n]) for k, v in deltas.items() if v[n]}
                     for n in range(self.num_nodes)}
        calls = [self.node(n).peer.call(P.Alloc(count=int(per_node[n]), zero=zero,
                                                stats=stats_for[n])) for n in wanted]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.free += per_node
            for n, r in zip(wanted, results):
                if not isinstance(r, BaseException):
                    got = np.frombuffer(r["pfns"], dtype=P.PFN)
                    self.free[n] -= len(got)
                    await self.free_frames(n, got)
            raise NumaError(12, f"frame allocation failed: {failed[0]}")
        # numa_foreign lands on intended nodes that supplied nothing themselves.
        for n, stats in stats_for.items():
            if stats and n not in wanted:
                await self.node(n).peer.send(P.Account(stats=stats))
        pfns = np.empty(count, dtype=np.int64)
        for n, r in zip(wanted, results):
            sel = plan.nodes == n
            pfns[sel] = np.frombuffer(r["pfns"], dtype=P.PFN)
            self.tables[n].prep_new(pfns[sel], flags, mapping, index[sel], owner)
        return plan.nodes.astype(np.int16), pfns

    async def free_frames(self, node: int, pfns: np.ndarray) -> None:
        """Give frames back to their node (their refcount reached zero)."""
        if len(pfns) == 0:
            return
        self.tables[node].clear(pfns)
        self.free[node] += len(pfns)
        await self.node(node).peer.call(P.Free(pfns=pfns.astype(P.PFN)))

    async def put_pages(self, nodes: np.ndarray, pfns: np.ndarray) -> None:
        """Drop one reference from each page; free those that reach zero (put_page)."""
        for n in np.unique(nodes).tolist():
            sel = pfns[nodes == n]
            table = self.tables[n]
            np.subtract.at(table.refcount, sel, 1)
            dead = sel[table.refcount[sel] <= 0]
            if len(dead):
                await self.free_frames(n, np.unique(dead))

    def node_alive(self, os_pid: int, host: str) -> bool:
        """Liveness of a local process by pid (remote ones rely on leases)."""
        if host != self.host:
            return True
        try:
            os.kill(os_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
