"""What /proc and /sys would show: numa_maps per task, numastat per node."""

from __future__ import annotations

import asyncio

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.views import numa_maps_line

from .kernel import NUMASTAT_KEYS
from .mempolicy import policy_text
from .pages import (
    PG_ACTIVE,
    PG_ANON,
    PG_DIRTY,
    PG_LRU,
    PG_WRITEBACK,
    PTE_PRESENT,
    PTE_WRITE,
    pte_node,
    pte_pfn,
)


async def numa_maps(kernel, task) -> str:
    """/proc/<pid>/numa_maps: one line per VMA, in address order."""
    lines = []
    for vma in task.vmas:
        policy = vma.policy
        if vma.obj is not None and vma.obj.kind == "shm":
            # shmem has no VMA policy of its own: the shared policy at the VMA's start.
            policy = vma.obj.policy_at(vma.pgoff)
        if policy is None:
            policy = task.policy  # numa_maps shows the effective policy
        ptes = vma.pte
        present = (ptes & PTE_PRESENT) != 0
        ptes = ptes[present]
        nodes, pfns = pte_node(ptes), pte_pfn(ptes)
        anon = dirty = mapmax = writeback = active = 0
        per_node: dict[int, int] = {}
        for n in arrayops.values(nodes):
            sel = nodes == n
            table = kernel.tables[n]
            flags = table.flags[pfns[sel]]
            per_node[n] = int(sel.sum())
            anon += int(np.count_nonzero(flags & PG_ANON))
            dirty += int(np.count_nonzero(((flags & PG_DIRTY) != 0)
                                          | ((ptes[sel] & PTE_WRITE) != 0)))
            writeback += int(np.count_nonzero(flags & PG_WRITEBACK))
            mapmax = max(mapmax, int(table.mapcount[pfns[sel]].max()))
            active += int(np.count_nonzero(flags & PG_ACTIVE))
        lines.append(numa_maps_line(
            vma.start * kernel.page_size, policy_text(policy),
            file=vma.obj.path_text if vma.obj is not None else None,
            anon=anon, dirty=dirty, pages=len(ptes), mapmax=mapmax, active=active,
            writeback=writeback, per_node=per_node, page_size=kernel.page_size))
    return "".join(line + "\n" for line in lines)


def lru_sizes(kernel, node: int) -> tuple[int, int]:
    """Pages on the node's active and inactive LRU lists (the coordinator's page flags)."""
    flags = kernel.tables[node].flags
    on_lru = (flags & PG_LRU) != 0
    active = int(np.count_nonzero(on_lru & ((flags & PG_ACTIVE) != 0)))
    return active, int(np.count_nonzero(on_lru)) - active


async def node_stats(kernel) -> dict[int, dict]:
    """Every node's counters and free frames, asked of the node processes.

    An offline node (it died) is reported with ``offline: True``, no free frames and the
    counters it last reported; a node that does not answer within a second (it is dying,
    or hung until its lease runs out) with ``responding: False`` and the same stale
    figures, so the others' still come back in normal time."""
    await kernel.flush_stats()  # batched increments first: same connection, so in order
    nodes = sorted(kernel.nodes)
    live = [n for n in nodes if n not in kernel.offline]
    replies = await asyncio.gather(*(kernel.node(n).peer.call(P.NodeStats(), timeout=1.0)
                                     for n in live), return_exceptions=True)
    out = {}
    for n, r in zip(live, replies):
        if isinstance(r, asyncio.CancelledError):
            raise r
        if isinstance(r, BaseException):
            continue  # died meanwhile, or hung (its lease will tell): last known figures
        # Frames on the coordinator's per-node page lists are free, as in the kernel's MemFree.
        active, inactive = lru_sizes(kernel, n)
        out[n] = {"numastat": r["numastat"], "free": r["free"] + len(kernel.pcp[n]),
                  "frames": r["frames"], "active": active, "inactive": inactive,
                  "offline": False, "responding": True, "copy": r.get("copy", {})}
        kernel.last_stats[n] = r["numastat"]
    for n in nodes:
        if n not in out:
            last = kernel.last_stats.get(n) or dict.fromkeys(NUMASTAT_KEYS, 0)
            offline = n in kernel.offline
            out[n] = {"numastat": dict(last), "free": 0 if offline else int(kernel.free[n]),
                      "frames": kernel.nodes[n].frames, "active": 0, "inactive": 0,
                      "offline": offline, "responding": False, "copy": {}}
    return out
