"""A node that dies: the emulated memory_failure() for all of a node's memory at once.

A node process can die (SIGKILL, a crash) or, on another host, fall silent.
The coordinator notices through the node's ``Peer`` failing: a local node's
pidfd fires when its process exits, a send to it fails, or its heartbeat
lease runs out (``server.ping_nodes``).  ``node_offline`` then, without an
await, so that no request sees half of it:

* fails every request in flight to the node (``Peer.fail``): an allocation,
  a copy of a migration to or from it, a free-map query end at once;
* takes the node out of the machine: no free frames (allocation falls back as
  for a full node), out of the set of nodes with memory (policies, move_pages
  targets: ENODEV), its page list dropped;
* poisons its pages: every frame the node held is lost, like a page with a
  hardware error.  Page tables and page caches keep naming them, so
  ``numa_maps`` still lists them, but a fault on one is ``EIO`` (the SIGBUS of a
  poisoned page), ``move_pages`` reports ``-EIO``, and migration from the node
  is ``-EIO`` (migration to it: the page stays where it is).

Then, in the background (``poison_node``), every client TLB entry that names a
frame of the node is shot down, so that no client keeps reading the dead
node's orphaned segment, and the segment file is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np

from numaemu import arrayops

from .pages import PTE_MIGRATION, PTE_PRESENT, pte_node

log = logging.getLogger("numaemu.coordinator")


def node_offline(kernel, node: int, reason: str) -> None:
    """Take ``node`` out of the machine and poison its pages (see the module docstring)."""
    if node in kernel.offline:
        return
    kernel.offline.add(node)
    if kernel.stopping:
        log.info("node %d left (%s)", node, reason)
        return
    log.error("node %d is offline: %s; its pages are poisoned", node, reason)
    info = kernel.nodes.get(node)
    if info is not None:
        info.peer.fail(reason)
    kernel.free[node] = 0
    kernel.pcp[node] = np.empty(0, dtype=np.int64)
    kernel.pending_stats[node] = {}
    kernel.node_set = kernel.node_set - {node}
    kernel.spawn(poison_node(kernel, node))


def mapped_on(kernel, node: int) -> dict:
    """{task: [vpns]} of every present or migration PTE naming a frame of ``node``."""
    targets: dict = {}
    for task in list(kernel.tasks.values()):
        for vma in task.vmas:
            ptes = vma.pte
            hit = ((ptes & (PTE_PRESENT | PTE_MIGRATION)) != 0) & (pte_node(ptes) == node)
            if hit.any():
                targets.setdefault(task, []).append(np.flatnonzero(hit) + vma.start)
    return targets


async def poison_node(kernel, node: int) -> None:
    """Shoot down every client translation into the dead node, then remove its segment."""
    from .shootdown import flush_tlb

    try:
        await flush_tlb(kernel, mapped_on(kernel, node))
    except Exception:
        log.exception("shooting down translations into dead node %d failed", node)
    info = kernel.nodes.get(node)
    if info is not None and info.host == kernel.host:
        try:
            await asyncio.to_thread(os.unlink, info.path)
            log.info("removed the segment %s of dead node %d", info.path, node)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the segment of dead node %d: %s", node, exc)


def poisoned(kernel, nodes: np.ndarray) -> np.ndarray:
    """Mask of entries whose node is offline."""
    if not kernel.offline:
        return np.zeros(len(nodes), dtype=bool)
    return arrayops.isin(nodes, list(kernel.offline))
