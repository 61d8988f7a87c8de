"""Invariant checks (ARCHITECTURE.md "Invariants that tests must hold", 1 and 3).

Walks every page table and page cache and compares with the ``struct page``
arrays and with each node's own free bitmap:

* every present PTE points at an allocated frame, and a frame's mapcount is the
  number of PTEs that map it;
* a frame's refcount is its mapcount, plus one for a page-cache slot, plus pins;
* no frame is isolated (taken off its LRU by a migration) at rest;
* no frame is both free at its node and referenced (or on a page list);
* per node, free + used = total, and the coordinator's free count agrees.

Meant for a cluster at rest (no fault in flight: a frame being faulted in is
allocated but not yet referenced).  The only awaits are the node replies at
the start, so the coordinator state it checks is one consistent snapshot.
"""

from __future__ import annotations

import asyncio

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P

from .pages import PG_ISOLATED, PTE_MIGRATION, PTE_PRESENT, pte_node, pte_pfn


async def check(kernel) -> list[str]:
    """Every violation found, as text; empty when all invariants hold."""
    free_maps = {}
    await kernel.flush_stats()
    # A page-list refill in flight has frames the node counts as used and we do not list
    # yet: wait for it (bounded) so that the snapshot below is at rest.
    for _ in range(500):
        if not kernel._refilling:
            break
        await asyncio.sleep(0.01)
    for n in sorted(set(kernel.nodes) - kernel.offline):  # a dead node's memory is gone
        reply = await kernel.node(n).peer.call(P.FreeMap())
        frames = kernel.tables[n].refcount.shape[0]
        bits = np.unpackbits(np.frombuffer(reply["bits"], dtype=np.uint8))[:frames]
        free_maps[n] = (bits.astype(bool), reply["nr_free"])
    # From here on no await: the state below is one consistent snapshot.
    problems: list[str] = []
    maps = [np.zeros(t.refcount.shape[0], dtype=np.int64) for t in kernel.tables]
    cache_refs = [np.zeros(t.refcount.shape[0], dtype=np.int64) for t in kernel.tables]
    for task in kernel.tasks.values():
        for vma in task.vmas:
            ptes = vma.pte[(vma.pte & (PTE_PRESENT | PTE_MIGRATION)) != 0]
            nodes, pfns = pte_node(ptes), pte_pfn(ptes)
            for n in arrayops.values(nodes):
                arrayops.add_at(maps[n], pfns[nodes == n], 1)
    for obj in kernel.objects.values():
        entries = obj.cache[obj.cache != 0]
        nodes, pfns = pte_node(entries), pte_pfn(entries)
        for n in arrayops.values(nodes):
            arrayops.add_at(cache_refs[n], pfns[nodes == n], 1)
    for n, table in enumerate(kernel.tables):
        if n not in free_maps:
            continue
        free, nr_free = free_maps[n]
        bad = np.flatnonzero(maps[n] != table.mapcount)
        if len(bad):
            problems.append(f"node {n}: mapcount disagrees with the page tables for "
                            f"{len(bad)} frames (e.g. pfn {bad[0]}: {table.mapcount[bad[0]]} "
                            f"recorded, {maps[n][bad[0]]} mapped)")
        expected = maps[n] + cache_refs[n] + kernel.extra_refs(n)
        bad = np.flatnonzero(expected != table.refcount)
        if len(bad):
            problems.append(f"node {n}: refcount of {len(bad)} frames is not mapcount + "
                            f"cache + pins (e.g. pfn {bad[0]}: {table.refcount[bad[0]]} vs "
                            f"{expected[bad[0]]})")
        isolated = np.flatnonzero((table.flags & PG_ISOLATED) != 0)
        if len(isolated):
            problems.append(f"node {n}: {len(isolated)} frames are still isolated at rest (an "
                            f"isolation leak, e.g. pfn {isolated[0]})")
        used = table.refcount > 0
        both = np.flatnonzero(used & free)
        if len(both):
            problems.append(f"node {n}: {len(both)} referenced frames are free at the node "
                            f"(e.g. pfn {both[0]})")
        pcp = kernel.pcp[n]
        if len(pcp) and (free[pcp].any() or used[pcp].any()):
            problems.append(f"node {n}: a page-list frame is free at the node or in use")
        if int(free.sum()) != nr_free:
            problems.append(f"node {n}: free bitmap has {int(free.sum())} frames, the node "
                            f"counts {nr_free}")
        accounted = nr_free + len(pcp) + int(used.sum())
        if accounted != len(free):
            problems.append(f"node {n}: free {nr_free} + page list {len(pcp)} + used "
                            f"{int(used.sum())} != {len(free)} frames")
        if kernel.free[n] != nr_free + len(pcp):
            problems.append(f"node {n}: the coordinator counts {kernel.free[n]} free frames, "
                            f"the node {nr_free} + page list {len(pcp)}")
    return problems
