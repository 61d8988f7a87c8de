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

from numaemu import arrayops
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

    The LRU lists are the coordinator's page flags (nodes keep no copy), so isolation costs
    no message at all.
    """
    ok = np.zeros(len(pfns), dtype=bool)
    key = nodes.astype(np.int64) << 40 | pfns
    if arrayops.is_strictly_increasing(key):
        first = np.arange(len(key))
    else:  # a page listed twice is isolated once
        _, first = np.unique(key, return_index=True)
    for n in arrayops.values(nodes):
        sel = first[nodes[first] == n]
        table = kernel.tables[n]
        sel = sel[(table.flags[pfns[sel]] & PG_LRU) != 0]
        if len(sel) == 0:
            continue
        got = pfns[sel]
        table.flags[got] = (table.flags[got] & ~int(PG_LRU)) | PG_ISOLATED
        table.refcount[got] += 1
        ok[sel] = True
    return ok


async def putback_pages(kernel, node: int, pfns: np.ndarray) -> None:
    """putback_lru_page: back on the LRU, drop the isolation reference (free if it was the
    last one: the page was unmapped while isolated)."""
    if len(pfns) == 0:
        return
    table = kernel.tables[node]
    table.flags[pfns] = (table.flags[pfns] & ~int(PG_ISOLATED)) | PG_LRU
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
            pairs = arrayops.unique(nodes[pending].astype(np.int64) << 16 | targets[pending])
            for s, t in ((int(p) >> 16, int(p) & 0xFFFF) for p in pairs):
                group = pending[(nodes[pending] == s) & (targets[pending] == t)]
                chunks = _chunks(group, batch)
                await _run_batches(kernel, s, t, pfns, chunks, rc, sync, cpu_node)
            if (rc == -errno.ENOMEM).any():
                out_of_memory = NumaError(errno.ENOMEM, "no free frames on the target node")
                break
    finally:
        # Pages that did not move go back to their LRU; moved ones were put back already.
        failed = rc != 0
        back = np.flatnonzero(failed | same)
        for n in arrayops.values(nodes[back]):
            await putback_pages(kernel, n, pfns[back[nodes[back] == n]])
        kernel.vmstat.pgmigrate_success += int(np.count_nonzero(~failed & ~same))
        kernel.vmstat.pgmigrate_fail += int(np.count_nonzero(failed))
    if out_of_memory is not None:
        raise out_of_memory
    return rc


#: A group this big is cut in at least two batches, so that one batch's copy overlaps the
#: next one's bookkeeping (measured: 4096 pages in 6.6 ms as one batch, 5.5 ms as two).
SPLIT_MIN = 1024


def _chunks(group: np.ndarray, batch: int) -> list[np.ndarray]:
    """``group`` in batches of at most ``batch`` pages, equal in size, at least two of them
    when it has ``SPLIT_MIN`` pages or more (the pipeline needs two to overlap)."""
    count = -(-len(group) // batch)
    if count == 1 and len(group) >= SPLIT_MIN:
        count = 2
    size = -(-len(group) // count)
    return [group[i : i + size] for i in range(0, len(group), size)]


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
#
# A batch is a transaction.  Until step 16 makes the new pages visible (the commit point),
# everything done so far can be undone without an await: ``_Batch.abort`` puts the old
# pages' migration entries back, points page-cache slots at the old pages again, and
# leaves the new frames to be freed.  Any exception, and any node or client failure, between
# steps 1 and 16 ends in ``abort`` *before* the page locks are released at step 19, so no
# fault ever sees a migration entry on an unlocked page or a PTE to a freed frame.  The
# error is then reported per page (rc), never left to unwind half-done state.

#: Per page of a batch: how far it got (what ``abort`` has to undo).
PREPARED, UNMAPPED, SWITCHED, REFS_MOVED, COMMITTED = 1, 2, 3, 4, 5


class InjectedFailure(RuntimeError):
    """A failure injected at a migration step (tests of the back-out paths)."""


class _NodeLost(Exception):
    """The source or target node died during the batch."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _Batch:
    """One (source node, target node) batch of isolated pages on its way through steps 1-20."""

    def __init__(self, kernel, src: int, dst: int, old: np.ndarray, cpu_node: int) -> None:
        self.kernel, self.src, self.dst, self.old, self.cpu_node = kernel, src, dst, old, cpu_node
        n = len(old)
        self.rc = np.zeros(n, dtype=np.int32)
        self.new = np.full(n, -1, dtype=np.int64)  # target frame per page, once allocated
        self.locked = np.zeros(n, dtype=bool)  # old page locked by us (step 1)
        self.stage = np.zeros(n, dtype=np.int8)
        self.record = None  # the migration entries of step 5
        self.go_idx = np.empty(0, dtype=np.int64)  # the pages that entered step 3
        self.flags_moved = np.zeros(n, dtype=bool)  # step 13 done
        self.freed = np.zeros(n, dtype=bool)  # freed under us before we started (run)
        self.told, self.tnew = kernel.tables[src], kernel.tables[dst]

    def check_nodes(self) -> None:
        """After an await: a node that died meanwhile fails the rest of the batch."""
        offline = self.kernel.offline
        if self.src in offline:
            raise _NodeLost(errno.EIO, f"source node {self.src} died")
        if self.dst in offline:
            raise _NodeLost(errno.ENODEV, f"target node {self.dst} died")

    def step(self, step: int) -> None:
        """A point between two steps: fail here if a test asked for it (``inject_fault`` with
        request ``migrate_step_N``) and some page of the batch is still on its way."""
        left = self.kernel.inject_steps.get(step, 0)
        if left and ((self.rc == 0) & ~self.freed).any():
            self.kernel.inject_steps[step] = left - 1
            raise InjectedFailure(f"injected failure at migration step {step}")

    def fail(self, which: np.ndarray, err: int) -> None:
        self.rc[which & (self.rc == 0)] = -err

    # -- back-out -------------------------------------------------------------------
    def abort(self, err: int, which: np.ndarray | None = None) -> None:
        """Undo the pages of ``which`` (default: every page) that have not committed, without
        an await (see above), and fail them with ``err``."""
        k, src, dst, told, tnew = self.kernel, self.src, self.dst, self.told, self.tnew
        sel = (self.stage < COMMITTED) & ~self.freed
        if which is not None:
            sel &= which
        # Steps 13-14 back: the flags that travelled return to the old page.
        back = np.flatnonzero(sel & self.flags_moved)
        told.flags[self.old[back]] |= tnew.flags[self.new[back]] & MIGRATED_FLAGS
        self.flags_moved[back] = False
        # Steps 9-10 back: the cache slot names the old page again, with its reference.
        for i in np.flatnonzero(sel & (self.stage >= SWITCHED)).tolist():
            o, w = int(self.old[i]), int(self.new[i])
            obj = k.objects.get(int(told.mapping[o]))
            slot = int(told.index[o])
            if obj is not None and obj.cache[slot] == cache_entry(dst, np.array([w]))[0]:
                obj.cache[slot] = cache_entry(src, np.array([o]))[0]
            if self.stage[i] == REFS_MOVED:
                told.refcount[o] += 1
                tnew.refcount[w] -= 1
        # Step 5 back: the migration entries become PTEs of the old pages again.
        unmapped = sel & (self.stage >= UNMAPPED)
        if unmapped.any():
            remove_migration_entries(k, self.record, unmapped[self.go_idx], src,
                                     self.old[self.go_idx])
        self.stage[unmapped] = PREPARED
        self.fail(sel, err)

    # -- steps ------------------------------------------------------------------------
    async def run(self, sync: bool) -> None:
        k, src, dst, old, told, tnew = (self.kernel, self.src, self.dst, self.old, self.told,
                                        self.tnew)
        self.check_nodes()
        # A page whose only reference is ours was freed under us: nothing to move, just drop it.
        # (Those pages keep rc 0 and no stage: nothing to undo; step 20 drops our reference.)
        self.freed = (told.refcount[old] == 1) & (told.mapcount[old] == 0) & (
            told.mapping[old] == 0)
        live = ~self.freed

        # new_page_t: the target frames, for the whole batch at once.
        try:
            new = await k.alloc_on(dst, int(live.sum()), self.cpu_node)
        except (NumaError, ClusterError):
            self.check_nodes()
            self.fail(live, errno.ENOMEM)
            return
        self.new[live] = new
        self.check_nodes()

        # Fairness: a page that tasks were waiting for when it last moved is theirs for a
        # short while (HOLD); without it, back-to-back migrations of a hot page could starve
        # them, since a woken task needs a round trip to reach the new page.
        now = time.monotonic()
        until = told.held_until(old)
        held = live & (until > now) if until is not None else np.zeros(len(old), dtype=bool)
        if held.any():
            if sync:
                await asyncio.sleep(float(until[held].max() - now))
                self.check_nodes()
            else:
                self.fail(held, errno.EAGAIN)
                live &= ~held

        # Step 1: lock the old pages (trylock while not sync).
        idx = np.flatnonzero(live)
        if sync:
            got = await _lock_all(k, src, old[idx])
        else:
            got = k.locks.trylock(src, old[idx])
        self.locked[idx[got]] = True
        self.fail(live & ~self.locked, errno.EAGAIN)
        self.check_nodes()
        self.step(1)

        # Step 2: writeback must be complete.
        wb = self.locked & (self.rc == 0) & ((told.flags[old] & PG_WRITEBACK) != 0)
        if wb.any():
            if not sync:
                self.fail(wb, errno.EBUSY)
            else:
                try:
                    for pfn in old[wb].tolist():
                        await k.locks.wait_on_page_writeback(src, pfn, LOCK_TIMEOUT)
                except asyncio.TimeoutError:  # writeback stuck: these pages stay, -EBUSY
                    self.fail(wb, errno.EBUSY)
                self.check_nodes()
        self.step(2)

        # Step 3: new pages locked and not uptodate: accesses to them wait on the lock.
        # Step 4: they carry the old page's settings (mapping, index, anon).
        self.go_idx = g = np.flatnonzero(self.locked & (self.rc == 0))
        o, w = old[g], self.new[g]
        tnew.flags[w] = PG_LOCKED | (told.flags[o] & PG_ANON)
        tnew.refcount[w] = 1  # our reference, dropped at step 20
        tnew.mapping[w], tnew.index[w], tnew.owner[w] = told.mapping[o], told.index[o], \
            told.owner[o]
        self.stage[g] = PREPARED
        self.step(3)
        self.step(4)

        # Step 5: every PTE becomes a migration entry; flush the TLBs that may cache them.
        self.record, _ = try_to_migrate(k, src, o)
        self.stage[g] = UNMAPPED
        self.step(5)
        await flush_tlb(k, self.record.tasks())
        self.check_nodes()
        back_out = told.mapcount[o] != 0

        async with AsyncExitStack() as tree_locks:
            # Step 6: the mapping's tree lock (page-cache pages), in object order.
            oids = sorted(set(told.mapping[o][~back_out].tolist()) - {0})
            for oid in oids:
                obj = k.objects.get(oid)
                if obj is not None:
                    await tree_locks.enter_async_context(obj.tree_lock)
            self.check_nodes()
            self.step(6)
            cached = told.mapping[o] != 0
            # Step 7: back out if references remain (pins, a racing lookup).
            expected = 1 + cached.astype(np.int32)
            back_out |= told.refcount[o] != expected
            self.step(7)
            # Step 8: the slot must still point at the old page.
            for oid in oids:
                obj = k.objects.get(oid)
                mine = np.flatnonzero((told.mapping[o] == oid) & ~back_out)
                if obj is None:
                    back_out[mine] = True
                    continue
                slot = told.index[o[mine]]
                back_out[mine[obj.cache[slot] != cache_entry(src, o[mine])]] = True
            self.step(8)
            switched = []
            for oid in oids:
                obj = k.objects.get(oid)
                if obj is None:
                    continue
                ok = np.flatnonzero((told.mapping[o] == oid) & ~back_out)
                # Step 9: the slot points at the new page.
                obj.cache[told.index[o[ok]]] = cache_entry(dst, w[ok])
                self.stage[g[ok]] = SWITCHED
                switched.append(ok)
            self.step(9)
            for ok in switched:
                # Step 10: the cache's reference moves from the old page to the new one.
                told.refcount[o[ok]] -= 1
                tnew.refcount[w[ok]] += 1
                self.stage[g[ok]] = REFS_MOVED
            self.step(10)
            # Step 11: the tree lock is dropped on leaving this block.
        self.step(11)

        if back_out.any():  # those pages stay where they are: -EAGAIN, retried next pass
            which = np.zeros(len(old), dtype=bool)
            which[g[back_out]] = True
            self.abort(errno.EAGAIN, which)
        moving = ~back_out

        # Step 12: copy the contents, on the target node.
        if moving.any():
            src_info = k.node(src)
            await k.node(dst).peer.call(P.CopyIn(
                src_node=src, src_path=src_info.path, src_endpoint=src_info.data_endpoint,
                src_pfns=o[moving].astype(P.PFN), dst_pfns=w[moving].astype(P.PFN)))
            self.check_nodes()
        self.step(12)

        if moving.any():
            mo, mw = o[moving], w[moving]
            # Step 13: the remaining flags travel; step 14: the old page holds nothing.
            tnew.flags[mw] |= told.flags[mo] & MIGRATED_FLAGS
            tnew.last_nid[mw] = told.last_nid[mo]  # folio_migrate_flags copies last_cpupid
            self.flags_moved[g[moving]] = True
            self.step(13)
            told.flags[mo] &= ~MIGRATED_FLAGS
            self.step(14)
            # Step 15: a dirty page-cache page gets its writeback queued on the new page.
            objs = told.mapping[mo]
            for oid in arrayops.values(objs[(objs != 0) & ((tnew.flags[mw] & PG_DIRTY) != 0)]):
                k.queue_writeback(oid)
            self.step(15)
            # Step 16: migration entries become real PTEs to the new page: the commit point.
            mask = np.zeros(len(o), dtype=bool)
            mask[moving] = True
            remove_migration_entries(k, self.record, mask, dst, w)
            self.stage[g[moving]] = COMMITTED
        self.step(16)

    async def finish(self) -> None:
        """Steps 19-20, whatever happened before: unlock, put the moved pages back on the
        target's LRU, free the old frames of moved pages and the new frames of the rest."""
        k, src, dst = self.kernel, self.src, self.dst
        moved = self.stage == COMMITTED
        # Step 19: unlock old and new; everyone waiting on them redoes its fault.
        k.locks.unlock(dst, self.new[self.stage >= PREPARED])
        woke = k.locks.unlock(src, self.old[self.locked])
        with_waiters = np.zeros(len(self.old), dtype=bool)
        with_waiters[np.flatnonzero(self.locked)[woke]] = True
        if (with_waiters & moved).any():
            self.tnew.hold(self.new[with_waiters & moved], HOLD)
        # Step 20: the new pages go on the target's LRU, the old frames are freed; pages that
        # did not move keep their isolation reference (retried, or put back by the caller).
        try:
            if moved.any():
                await _putback_new(k, dst, self.new[moved])
                await _put_old(k, src, self.old[moved])
        finally:
            if self.freed.any():
                await _put_old(k, src, self.old[self.freed])
            unused = (self.new >= 0) & ~moved
            if unused.any():
                await k.release_new(dst, self.new[unused])


async def unmap_and_move(kernel, src: int, dst: int, old: np.ndarray, *, sync: bool,
                         cpu_node: int) -> np.ndarray:
    """Migrate ``old`` (isolated pages of node ``src``) to node ``dst``; rc per page.

    Never raises for a failure inside the batch (only cancellation propagates, after the
    batch has been undone): see the transaction note above."""
    batch = _Batch(kernel, src, dst, old, cpu_node)
    try:
        await batch.run(sync)
    except asyncio.CancelledError:
        batch.abort(errno.EINTR)
        await asyncio.shield(batch.finish())
        raise
    except _NodeLost as exc:
        log.warning("migration %d -> %d: %s; backing the batch out", src, dst, exc)
        batch.abort(exc.errno)
    except (NumaError, ClusterError) as exc:
        log.warning("migration %d -> %d failed (%s); backing the batch out", src, dst, exc)
        batch.abort(errno.EAGAIN)
    except Exception as exc:
        if isinstance(exc, InjectedFailure):
            log.warning("migration %d -> %d: %s; backing the batch out", src, dst, exc)
        else:
            log.exception("migration %d -> %d failed; backing the batch out", src, dst)
        batch.abort(errno.EIO)
    await batch.finish()
    return batch.rc


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


async def _putback_new(kernel, node: int, pfns: np.ndarray) -> None:
    """Step 20 for the new pages: onto the LRU, and drop the reference migration held."""
    kernel.tables[node].flags[pfns] |= PG_LRU
    await kernel.put_pages(np.full(len(pfns), node, dtype=np.int16), pfns)


async def _put_old(kernel, node: int, pfns: np.ndarray) -> None:
    """Drop the isolation reference of old pages; they are free once nothing else holds them."""
    table = kernel.tables[node]
    table.flags[pfns] &= ~int(PG_ISOLATED)
    await kernel.put_pages(np.full(len(pfns), node, dtype=np.int16), pfns)
