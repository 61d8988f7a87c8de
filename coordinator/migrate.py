"""The migration engine: ``migrate_pages()`` of the kernel's page-migration document.

Part A of the document (in-kernel use):

1. ``isolate_pages`` takes the pages off their node's LRU and holds a
   reference on each (isolate_lru_page), so they cannot vanish;
2. the ``new_page`` step allocates the target frames (``Kernel.alloc_on``);
3. ``migrate_pages`` moves the list in passes.

Part B, steps 1-20, is ``unmap_and_move`` below, run on a *batch* of pages that
go from one source node to one target node, so every step is a few messages
for the whole batch, never one per page.  The step number is in the comment
of the code that performs it.

Passes follow the kernel: up to ``NR_PASSES`` (10); the first
``ASYNC_PASSES`` are non-blocking (a locked page or a page under writeback is
retried later), the rest block.  Per-page results: 0 (moved), ``-EAGAIN``
(retry in the next pass; failed after the last), ``-EBUSY``; ``-ENOMEM``
(no frame on the target) ends the whole call.

A failure at any step leaves the page where it was, mapped and intact.

Lock order (outermost first):

    page lock of the old page        step 1, until step 19
      page lock of the new page      step 3, until step 19
        tree_lock of the object      steps 6-11 (page-cache pages)

Faults that meet a migration entry (steps 5-16) wait on the old page's lock
without taking a reference and redo the fault when woken at step 19
(``coordinator.memory``); no client can touch the old frame after step 5
because the shootdown of step 5 is acknowledged only when no access is in
flight and the client's translations are gone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

import numpy as np

from numaemu import protocol as P
from numaemu.errors import ClusterError, NumaError

from .filemap import cache_entry
from .pages import (
    PG_ACTIVE,
    PG_ANON,
    PG_DIRTY,
    PG_ISOLATED,
    PG_LOCKED,
    PG_LRU,
    PG_UPTODATE,
    PG_WRITEBACK,
)
from .rmap import remove_migration_entries, try_to_migrate
from .shootdown import flush_tlb

log = logging.getLogger("numaemu.coordinator")

NR_PASSES = 10
ASYNC_PASSES = 3
#: Pages per (source, target) batch.  The kernel's is 512 (NR_MAX_BATCHED_MIGRATION), but a
#: batch here costs two cross-process round trips (TLB shootdown, node copy) of 0.3-1 ms
#: each, against ~1 ns per byte of copying: measured with `numaemu bench migrate`, 64 MiB
#: moves at ~0.6 GB/s with 512 and ~1.2 GB/s with 4096.  Tunable: sysctl migrate_batch.
BATCH = 4096
LOCK_TIMEOUT = 30.0
#: How long a migrated page that had waiters is left to them before it may move again.
HOLD = 0.01

#: Flags that travel to the new page at step 13.
MIGRATED_FLAGS = int(PG_UPTODATE | PG_DIRTY | PG_ANON | PG_ACTIVE)
#: Batches of one (source, target) group in flight at once: while one batch copies, the
#: next one's TLB shootdown runs ("allocation and invalidation of a batch can overlap").
PIPELINE = 2


@dataclass
class MigrateStats:
    """The vmstat counters of migration."""

    pgmigrate_success: int = 0
    pgmigrate_fail: int = 0


# -- Part A ------------------------------------------------------------------------------


async def isolate_pages(kernel, nodes: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """isolate_lru_page for each page: +1 reference, off the LRU; False where not possible
    (already isolated by another migration, or not on an LRU yet).

    The coordinator's PG_lru is the truth; the node's LRU lists follow it by messages that
    need no reply (the node serves them in order), so isolation costs no round trip.
    """
    ok = np.zeros(len(pfns), dtype=bool)
    key = nodes.astype(np.int64) << 40 | pfns
    _, first = np.unique(key, return_index=True)  # a page listed twice is isolated once
    for n in np.unique(nodes).tolist():
        sel = first[nodes[first] == n]
        table = kernel.tables[n]
        sel = sel[(table.flags[pfns[sel]] & PG_LRU) != 0]
        if len(sel) == 0:
            continue
        got = pfns[sel]
        table.flags[got] = (table.flags[got] & ~int(PG_LRU)) | PG_ISOLATED
        table.refcount[got] += 1
        ok[sel] = True
        await kernel.node(n).peer.send(P.Isolate(pfns=got.astype(P.PFN)))
    return ok


async def putback_pages(kernel, node: int, pfns: np.ndarray) -> None:
    """putback_lru_page: back on the LRU, drop the isolation reference (free if it was the
    last one: the page was unmapped while isolated)."""
    if len(pfns) == 0:
        return
    table = kernel.tables[node]
    active = (table.flags[pfns] & PG_ACTIVE) != 0
    table.flags[pfns] = (table.flags[pfns] & ~int(PG_ISOLATED)) | PG_LRU
    await kernel.node(node).peer.send(P.Putback(pfns=pfns.astype(P.PFN),
                                                active=active.astype(P.PROT)))
    await kernel.put_pages(np.full(len(pfns), node, dtype=np.int16), pfns)


async def migrate_pages(kernel, nodes: np.ndarray, pfns: np.ndarray, targets: np.ndarray, *,
                        cpu_node: int, batch: int | None = None) -> np.ndarray:
    """Move isolated pages ``(nodes, pfns)`` to ``targets``; return a result per page.

    0 means moved; a negative errno means the page stayed where it was.  Every page is
    put back (on its new node if it moved) before this returns.  Raises ``NumaError``
    with ENOMEM if the target ran out of frames (pages not moved are put back first).
    """
    batch = batch or kernel.migrate_batch
    rc = np.full(len(pfns), -errno.EAGAIN, dtype=np.int32)
    same = nodes == targets
    rc[same] = 0  # already there: nothing to move (callers normally filter these out)
    out_of_memory = None
    try:
        for npass in range(NR_PASSES):
            pending = np.flatnonzero((rc == -errno.EAGAIN) | (rc == -errno.EBUSY))
            if len(pending) == 0:
                break
            sync = npass >= ASYNC_PASSES
            if npass and not sync:
                await asyncio.sleep(0)  # let the holders of busy pages run
            pairs = np.unique(nodes[pending].astype(np.int64) << 16 | targets[pending])
            for s, t in ((int(p) >> 16, int(p) & 0xFFFF) for p in pairs):
                group = pending[(nodes[pending] == s) & (targets[pending] == t)]
                chunks = [group[i : i + batch] for i in range(0, len(group), batch)]
                await _run_batches(kernel, s, t, pfns, chunks, rc, sync, cpu_node)
            if (rc == -errno.ENOMEM).any():
                out_of_memory = NumaError(errno.ENOMEM, "no free frames on the target node")
                break
    finally:
        # Pages that did not move go back to their LRU; moved ones were put back already.
        failed = rc != 0
        back = np.flatnonzero(failed | same)
        for n in np.unique(nodes[back]).tolist():
            await putback_pages(kernel, n, pfns[back[nodes[back] == n]])
        kernel.vmstat.pgmigrate_success += int(np.count_nonzero(~failed & ~same))
        kernel.vmstat.pgmigrate_fail += int(np.count_nonzero(failed))
    if out_of_memory is not None:
        raise out_of_memory
    return rc


async def _run_batches(kernel, src: int, dst: int, pfns: np.ndarray, chunks: list,
                       rc: np.ndarray, sync: bool, cpu_node: int) -> None:
    """unmap_and_move each chunk, ``PIPELINE`` of them in flight at once."""
    if len(chunks) == 1:  # the common small case: no tasks to schedule
        sel = chunks[0]
        rc[sel] = await unmap_and_move(kernel, src, dst, pfns[sel], sync=sync,
                                       cpu_node=cpu_node)
        return
    slots = asyncio.Semaphore(PIPELINE)

    async def one(sel: np.ndarray) -> None:
        async with slots:
            rc[sel] = await unmap_and_move(kernel, src, dst, pfns[sel], sync=sync,
                                           cpu_node=cpu_node)

    results = await asyncio.gather(*(one(sel) for sel in chunks), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- Part B: one batch, steps 1-20 ---------------------------------------------------------


async def unmap_and_move(kernel, src: int, dst: int, old: np.ndarray, *, sync: bool,
                         cpu_node: int) -> np.ndarray:
    """Migrate ``old`` (isolated pages of node ``src``) to node ``dst``; rc per page."""
    n = len(old)
    rc = np.zeros(n, dtype=np.int32)
    told, tnew = kernel.tables[src], kernel.tables[dst]

    # A page whose only reference is ours was freed under us: nothing to move, just drop it.
    gone = (told.refcount[old] == 1) & (told.mapcount[old] == 0) & (told.mapping[old] == 0)
    if gone.any():
        await _put_old(kernel, src, old[gone])
    live = ~gone

    # new_page_t: the target frames, for the whole batch at once.
    try:
        new = await kernel.alloc_on(dst, int(live.sum()), cpu_node)
    except (NumaError, ClusterError):
        rc[live] = -errno.ENOMEM
        return rc
    new_of = np.full(n, -1, dtype=np.int64)
    new_of[live] = new

    # Fairness: a page that tasks were waiting for when it last moved is theirs for a short
    # while (HOLD); without it, back-to-back migrations of a hot page could starve them,
    # since a woken task needs a round trip to reach the new page.
    now = time.monotonic()
    held = live & (told.hold_until[old] > now)
    if held.any():
        if sync:
            await asyncio.sleep(float(told.hold_until[old[held]].max() - now))
        else:
            rc[held] = -errno.EAGAIN
            live &= ~held
            await kernel.release_new(dst, new_of[held])
            new_of[held] = -1

    # Step 1: lock the old pages (trylock while not sync).
    go = live.copy()
    if sync:
        idx = np.flatnonzero(go)
        got = await _lock_all(kernel, src, old[go])
        rc[idx[~got]] = -errno.EAGAIN
        go[idx[~got]] = False
    else:
        got = kernel.locks.trylock(src, old[go])
        idx = np.flatnonzero(go)
        rc[idx[~got]] = -errno.EAGAIN
        go[idx[~got]] = False
    try:
        # Step 2: writeback must be complete.
        wb = go & ((told.flags[old] & PG_WRITEBACK) != 0)
        if wb.any():
            if not sync:
                rc[wb] = -errno.EBUSY
                _unlock(kernel, src, old[wb])
                go &= ~wb
            else:
                try:
                    for pfn in old[wb].tolist():
                        await kernel.locks.wait_on_page_writeback(src, pfn, LOCK_TIMEOUT)
                except asyncio.TimeoutError:  # writeback stuck: these pages stay, -EBUSY
                    rc[wb] = -errno.EBUSY
                    _unlock(kernel, src, old[wb])
                    go &= ~wb

        # Step 3: new pages locked and not uptodate: accesses to them wait on the lock.
        # Step 4: they carry the old page's settings (mapping, index, anon).
        g = np.flatnonzero(go)
        o, w = old[g], new_of[g]
        tnew.flags[w] = PG_LOCKED | (told.flags[o] & PG_ANON)
        tnew.refcount[w] = 1  # our reference, dropped at step 20
        tnew.mapping[w], tnew.index[w], tnew.owner[w] = told.mapping[o], told.index[o], \
            told.owner[o]

        # Step 5: every PTE becomes a migration entry; flush the TLBs that may cache them.
        record, _ = try_to_migrate(kernel, src, o)
        await flush_tlb(kernel, record.tasks())
        still_mapped = told.mapcount[o] != 0
        back_out = still_mapped.copy()

        async with AsyncExitStack() as tree_locks:
            # Step 6: the mapping's tree lock (page-cache pages), in object order.
            oids = sorted(set(told.mapping[o][~back_out].tolist()) - {0})
            for oid in oids:
                obj = kernel.objects.get(oid)
                if obj is not None:
                    await tree_locks.enter_async_context(obj.tree_lock)
            cached = told.mapping[o] != 0
            # Step 7: back out if references remain (pins, a racing lookup).
            expected = 1 + cached.astype(np.int32)
            back_out |= told.refcount[o] != expected
            # Step 8: the slot must still point at the old page.
            for oid in oids:
                obj = kernel.objects.get(oid)
                mine = np.flatnonzero((told.mapping[o] == oid) & ~back_out)
                if obj is None:
                    back_out[mine] = True
                    continue
                slot = told.index[o[mine]]
                back_out[mine[obj.cache[slot] != cache_entry(src, o[mine])]] = True
                # Step 9: the slot points at the new page.
                ok = mine[obj.cache[slot] == cache_entry(src, o[mine])]
                obj.cache[told.index[o[ok]]] = cache_entry(dst, w[ok])
                # Step 10: the cache's reference moves from the old page to the new one.
                told.refcount[o[ok]] -= 1
                tnew.refcount[w[ok]] += 1
            # Step 11: the tree lock is dropped on leaving this block.

        if back_out.any():
            _restore(kernel, record, src, o, back_out)
            rc[g[back_out]] = -errno.EAGAIN
        moving = ~back_out

        # Step 12: copy the contents, on the target node.
        if moving.any():
            src_info = kernel.node(src)
            try:
                await kernel.node(dst).peer.call(P.CopyIn(
                    src_node=src, src_path=src_info.path, src_endpoint=src_info.data_endpoint,
                    src_pfns=o[moving].astype(P.PFN), dst_pfns=w[moving].astype(P.PFN)))
            except (NumaError, ClusterError) as exc:
                log.warning("copy %d -> %d failed (%s); backing the batch out", src, dst, exc)
                _undo_cache_switch(kernel, src, dst, o, w, moving)
                _restore(kernel, record, src, o, moving)
                rc[g[moving]] = -errno.EAGAIN
                moving[:] = False

        if moving.any():
            mo, mw = o[moving], w[moving]
            # Step 13: the remaining flags travel; step 14: the old page holds nothing.
            tnew.flags[mw] |= told.flags[mo] & MIGRATED_FLAGS
            told.flags[mo] &= ~MIGRATED_FLAGS
            # Step 15: a dirty page-cache page gets its writeback queued on the new page.
            dirty_files = set(told.mapping[mo][(tnew.flags[mw] & PG_DIRTY) != 0].tolist())
            for oid in dirty_files - {0}:
                kernel.queue_writeback(oid)
            # Step 16: migration entries become real PTEs to the new page.
            mask = np.zeros(len(o), dtype=bool)
            mask[moving] = True
            remove_migration_entries(kernel, record, mask, dst, w)
    finally:
        # Step 19: unlock old and new; everyone waiting on them redoes its fault.
        g = np.flatnonzero(go)
        kernel.locks.unlock(dst, new_of[g])
        woke = kernel.locks.unlock(src, old[go])
        moved = rc[g] == 0
        tnew.hold_until[new_of[g[woke & moved]]] = time.monotonic() + HOLD

    # Step 20: the new pages go on the target's LRU, the old frames are freed; pages that
    # did not move keep their isolation reference (retried, or put back by the caller).
    done = go & (rc == 0)
    if done.any():
        await _putback_new(kernel, dst, new_of[done])
        await _put_old(kernel, src, old[done])
    unused = live & ~done
    if unused.any():
        await kernel.release_new(dst, new_of[unused])
    return rc


async def _lock_all(kernel, node: int, pfns: np.ndarray) -> np.ndarray:
    """lock_page on each page, sleeping on held ones; the mask of pages locked (a page whose
    holder keeps it past LOCK_TIMEOUT is given up on, so the call never hangs)."""
    locked = np.zeros(len(pfns), dtype=bool)
    deadline = time.monotonic() + LOCK_TIMEOUT
    while not locked.all():
        pending = np.flatnonzero(~locked)
        locked[pending[kernel.locks.trylock(node, pfns[pending])]] = True
        if locked.all() or time.monotonic() > deadline:
            break
        first = int(pfns[np.flatnonzero(~locked)[0]])
        try:
            await kernel.locks.wait_on_page_locked(node, first, deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
    return locked


def _unlock(kernel, node: int, pfns: np.ndarray) -> None:
    kernel.locks.unlock(node, pfns)


def _restore(kernel, record, src: int, old: np.ndarray, which: np.ndarray) -> None:
    """Back out step 5 for ``which``: the migration entries point at the old page again."""
    remove_migration_entries(kernel, record, which, src, old)


def _undo_cache_switch(kernel, src: int, dst: int, old: np.ndarray, new: np.ndarray,
                       which: np.ndarray) -> None:
    """Back out steps 9-10 for ``which`` (the copy failed)."""
    told, tnew = kernel.tables[src], kernel.tables[dst]
    for i in np.flatnonzero(which & (told.mapping[old] != 0)).tolist():
        obj = kernel.objects.get(int(told.mapping[old[i]]))
        slot = int(told.index[old[i]])
        if obj is not None and obj.cache[slot] == cache_entry(dst, new[i:i + 1])[0]:
            obj.cache[slot] = cache_entry(src, old[i:i + 1])[0]
            told.refcount[old[i]] += 1
            tnew.refcount[new[i]] -= 1


async def _putback_new(kernel, node: int, pfns: np.ndarray) -> None:
    """Step 20 for the new pages: onto the LRU, and drop the reference migration held."""
    table = kernel.tables[node]
    active = (table.flags[pfns] & PG_ACTIVE) != 0
    table.flags[pfns] |= PG_LRU
    await kernel.node(node).peer.send(P.Putback(pfns=pfns.astype(P.PFN),
                                                active=active.astype(P.PROT)))
    await kernel.put_pages(np.full(len(pfns), node, dtype=np.int16), pfns)


async def _put_old(kernel, node: int, pfns: np.ndarray) -> None:
    """Drop the isolation reference of old pages; they are free once nothing else holds them."""
    table = kernel.tables[node]
    table.flags[pfns] &= ~int(PG_ISOLATED)
    await kernel.put_pages(np.full(len(pfns), node, dtype=np.int16), pfns)
