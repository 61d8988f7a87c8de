"""The fault handler (mm/memory.c): resolve every missing page of one access at once.

A client's access that misses its TLB sends one ``fault`` with all missing
pages.  For each page, by its VMA:

* anonymous, none: a write allocates a zeroed frame by policy; a read maps the
  shared zero page (no frame, as Linux does);
* shared object (shm / file): look the page up in the object's page cache; a
  missing page is allocated (and read from the file), inserted locked, filled,
  then unlocked; a page found locked is waited on and the lookup redone;
* a write to a read-only file page marks the page dirty (page_mkwrite);
* a migration entry: wait on the old page's lock, then redo the fault, which
  reaches the new page (seed steps 5, 11, 19).

Allocation of all new pages of a VMA is one batch per node.
"""

from __future__ import annotations

import asyncio
import errno
import logging

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.errors import NumaError

from .filemap import cache_entry, fill_from_file
from .memory_failure import poisoned
from .mm import Task, Vma
from .numa_balancing import hinting_faults
from .pages import (
    PG_ANON,
    PG_DIRTY,
    PG_LOCKED,
    PG_LRU,
    PG_UPTODATE,
    PTE_MIGRATION,
    PTE_NUMA,
    PTE_PRESENT,
    PTE_WRITE,
    PTE_ZERO,
    make_ptes,
    pte_node,
    pte_pfn,
)

log = logging.getLogger("numaemu.coordinator")

WAIT_TIMEOUT = 60.0
#: Pages unmapped between two yields to the event loop (~10-20 ms of work).
ZAP_CHUNK = 16384


class _Retry(Exception):
    """Some page was locked (being filled or migrated): wait on it, then redo the fault."""

    def __init__(self, node: int, pfn: int, migration: bool = False) -> None:
        self.node, self.pfn, self.migration = node, pfn, migration


async def handle_fault(kernel, task: Task, vpns: np.ndarray, write: bool):
    """Fault in ``vpns``; return (vpns, nodes, pfns, prot bits, page-lock waits)."""
    vpns = arrayops.unique(vpns.astype(np.int64))
    waits = 0
    async with task.mmap_lock.read():
        while True:
            if task.exiting:  # reaped while it waited: nobody is left to answer
                raise NumaError(errno.ESRCH, f"task {task.pid} has exited")
            try:
                return (vpns, *await _fault_once(kernel, task, vpns, write), waits)
            except _Retry as wait:
                waits += wait.migration  # task.stats()["migration_waits"]
                if wait.migration and not _page_locked(kernel, wait.node, wait.pfn):
                    # A migration entry is only ever installed on a locked page (step 5) and
                    # removed before the unlock (step 16, or the back-out): one on an unlocked
                    # page is a bug.  Repair it instead of retrying forever.
                    repair_migration_entries(kernel, task, vpns, wait.node, wait.pfn)
                    continue
                await kernel.locks.wait_on_page_locked(wait.node, wait.pfn, WAIT_TIMEOUT)
                await asyncio.sleep(0)  # never spin the loop, whatever the page's state


async def _fault_once(kernel, task: Task, vpns: np.ndarray, write: bool):
    where = task.locate(vpns)
    if (where < 0).any():
        bad = int(vpns[np.flatnonzero(where < 0)[0]]) * kernel.page_size
        raise NumaError(errno.EFAULT, f"address {bad:#x} is not mapped (SIGSEGV)")
    vmas = list(task.vmas)
    groups = []
    for vi in arrayops.values(where):
        sel = np.flatnonzero(where == vi)
        vma = vmas[vi]
        offs = vpns[sel] - vma.start
        if vma.obj is None:
            await fault_anon(kernel, task, vma, offs, write)
        else:
            await fault_shared(kernel, task, vma, offs, write)
        groups.append((sel, vma, offs))
    # The reply is read after the last await, as one snapshot: a page handled earlier may
    # have been migrated (or write-protected) while a later VMA's pages were allocated.
    ptes = np.zeros(len(vpns), dtype=np.int64)
    for sel, vma, offs in groups:
        ptes[sel] = vma.pte[offs]
    _wait_for_migration(ptes)
    _check_poison(kernel, vpns, ptes)
    if (ptes == 0).any() or (write and ((ptes & (PTE_WRITE | PTE_ZERO)) != PTE_WRITE).any()):
        raise _Retry(-1, -1)  # changed under us (zapped, write-protected): look again
    hinted = (ptes & PTE_NUMA) != 0
    if hinted.any():  # NUMA hinting faults (do_numa_page): the PTEs map the page again
        for _sel, vma, offs in groups:
            vma.pte[offs] &= ~PTE_NUMA
        ptes &= ~PTE_NUMA
        if kernel.numa.recording:
            hinting_faults(kernel, task, vpns[hinted], ptes[hinted])
    zero = (ptes & PTE_ZERO) != 0
    prot = np.where(zero, P.PROT_ZERO | P.PROT_READ,
                    np.where((ptes & PTE_WRITE) != 0, P.PROT_READ | P.PROT_WRITE,
                             P.PROT_READ)).astype(P.PROT)
    return pte_node(ptes).astype(P.NODE), pte_pfn(ptes).astype(P.PFN), prot


def _page_locked(kernel, node: int, pfn: int) -> bool:
    return pfn >= 0 and bool(kernel.tables[node].flags[pfn] & PG_LOCKED)


def _check_poison(kernel, vpns: np.ndarray, ptes: np.ndarray) -> None:
    """A page on a node that died is lost: touching it is EIO (the SIGBUS of a poisoned
    page, coordinator/memory_failure.py)."""
    if not kernel.offline:
        return
    present = (ptes & PTE_PRESENT) != 0
    bad = np.flatnonzero(present & poisoned(kernel, pte_node(ptes)))
    if len(bad):
        node = int(pte_node(ptes[bad[:1]])[0])
        raise NumaError(errno.EIO, f"page at {int(vpns[bad[0]]) * kernel.page_size:#x} was on "
                                   f"node {node}, which failed (memory poisoned)")


def repair_migration_entries(kernel, task: Task, vpns: np.ndarray, node: int,
                             pfn: int) -> None:
    """Turn stray migration entries of ``task`` naming (node, pfn) back into what the page's
    state says: a present PTE to the page if it is still allocated and belongs here, none
    (the page is lost: the next touch allocates or reads anew) if it is not."""
    log.error("task %d: migration entry for unlocked page %d:%d; repairing it", task.pid,
              node, pfn)
    table = kernel.tables[node]
    alive = table.refcount[pfn] > 0
    entry = (make_ptes(node, np.array([pfn]), False)[0] & ~PTE_PRESENT) | PTE_MIGRATION
    for vma in task.vmas:
        hit = np.flatnonzero((vma.pte & ~PTE_WRITE) == entry)
        if len(hit) == 0:
            continue
        if alive:
            write = (vma.pte[hit] & PTE_WRITE) != 0
            vma.pte[hit] = make_ptes(node, np.full(len(hit), pfn), write)
            table.mapcount[pfn] += len(hit)
            table.refcount[pfn] += len(hit)
        else:
            vma.pte[hit] = 0


def _wait_for_migration(ptes: np.ndarray) -> None:
    migrating = np.flatnonzero((ptes & PTE_MIGRATION) != 0)
    if len(migrating):
        entry = ptes[migrating[:1]]
        raise _Retry(int(pte_node(entry)[0]), int(pte_pfn(entry)[0]), migration=True)


def _wait_if_locked(kernel, ptes: np.ndarray) -> None:
    nodes, pfns = pte_node(ptes), pte_pfn(ptes)
    for n in arrayops.values(nodes):
        sel = pfns[nodes == n]
        locked = (kernel.tables[n].flags[sel] & PG_LOCKED) != 0
        if locked.any():
            raise _Retry(n, int(sel[np.flatnonzero(locked)[0]]))


async def fault_anon(kernel, task: Task, vma: Vma, offs: np.ndarray, write: bool) -> np.ndarray:
    """Private anonymous pages: zero page on read, a new frame on first write."""
    ptes = vma.pte[offs]
    _wait_for_migration(ptes)
    if write:
        need = (ptes & PTE_PRESENT) == 0  # none or zero page
    else:
        none = ptes == 0
        vma.pte[offs[none]] = PTE_ZERO  # map the shared zero page
        need = np.zeros(len(offs), dtype=bool)
    if need.any():
        new_offs = offs[need]
        before = vma.pte[new_offs].copy()
        vpns = new_offs + vma.start
        policy = vma.policy if vma.policy is not None else task.policy
        # Private anonymous memory interleaves by virtual page number (linux-semantics §8).
        nodes, pfns = await kernel.alloc_pages(
            policy, kernel.cpu_node(task), vpns, flags=PG_UPTODATE | PG_LRU
            | PG_ANON | PG_DIRTY, mapping=0, index=vpns, owner=task.pid,
            mems=kernel.mems_allowed(task))
        # The mmap lock is held for read, so only this task could have changed these
        # entries meanwhile; give back frames for any that are no longer empty.
        lost = vma.pte[new_offs] != before
        for n in arrayops.values(nodes):
            table = kernel.tables[n]
            mine = (nodes == n) & ~lost
            table.refcount[pfns[mine]] = 1
            table.mapcount[pfns[mine]] = 1
            extra = pfns[(nodes == n) & lost]
            if len(extra):
                await kernel.free_frames(n, extra)
        keep = ~lost
        vma.pte[new_offs[keep]] = make_ptes(nodes[keep], pfns[keep], True)
    return vma.pte[offs]


async def fault_shared(kernel, task: Task, vma: Vma, offs: np.ndarray, write: bool) -> np.ndarray:
    """Pages of a shared object: find or create them in the page cache, then map them."""
    obj = vma.obj
    idx = offs + vma.pgoff
    if obj.kind == "file":
        eof_pages = -(-obj.size // kernel.page_size)
        if (idx >= eof_pages).any():
            bad = int(offs[np.flatnonzero(idx >= eof_pages)[0]] + vma.start) * kernel.page_size
            raise NumaError(errno.EFAULT, f"address {bad:#x} is beyond the end of "
                                          f"{obj.name} (SIGBUS)")
    ptes = vma.pte[offs]
    _wait_for_migration(ptes)
    if write:
        # page_mkwrite runs under the page lock: a page whose mappings writeback is
        # write-protecting (clear_page_dirty_for_io) must not be made writable and dirty
        # meanwhile, or writeback would clear the new dirty bit and lose the store.
        _wait_if_locked(kernel, ptes[(ptes & PTE_PRESENT) != 0])
    missing = ptes == 0
    if missing.any():
        entries = await find_or_create_pages(kernel, task, vma, idx[missing])
        # Another fault of this task (a retry after the client gave up waiting) may have
        # mapped some of them meanwhile: map each page once.
        still = vma.pte[offs[missing]] == 0
        missing[np.flatnonzero(missing)[~still]] = False
        entries = entries[still]
        new_nodes, new_pfns = pte_node(entries), pte_pfn(entries)
        for n in arrayops.values(new_nodes):
            sel = new_pfns[new_nodes == n]
            arrayops.add_at(kernel.tables[n].mapcount, sel, 1)
            arrayops.add_at(kernel.tables[n].refcount, sel, 1)
        # shm pages have no writeback, so map them writable; file pages start read-only so
        # that the first store faults and dirties the page.
        writable = write or obj.kind == "shm"
        vma.pte[offs[missing]] = make_ptes(new_nodes, new_pfns, writable)
    if write:
        # Checked again after the last await: writeback may have locked (and be
        # write-protecting) a page, or a migration unmapped it, while we filled others.
        ptes = vma.pte[offs]
        _wait_for_migration(ptes)
        _wait_if_locked(kernel, ptes[(ptes & PTE_PRESENT) != 0])
        upgrade = (ptes & PTE_WRITE) == 0
        vma.pte[offs[upgrade]] |= PTE_WRITE
    ptes = vma.pte[offs]
    if write or obj.kind == "shm":
        nodes, pfns = pte_node(ptes), pte_pfn(ptes)
        for n in arrayops.values(nodes):
            kernel.tables[n].flags[pfns[nodes == n]] |= PG_DIRTY
    return ptes


async def find_or_create_pages(kernel, task: Task, vma: Vma, idx: np.ndarray) -> np.ndarray:
    """Page-cache lookup for ``idx``; missing pages are allocated, filled and inserted."""
    obj = vma.obj
    entries = obj.cache[idx]
    absent = entries == 0
    if absent.any():
        new_idx = idx[absent]
        if obj.kind == "shm":
            nodes, pfns = await _alloc_shm_pages(kernel, task, obj, new_idx)
        else:
            # Page cache of a file follows the allocating task's policy, counter-based.
            ilx = task.il_count + np.arange(len(new_idx), dtype=np.int64)
            task.il_count += len(new_idx)
            nodes, pfns = await kernel.alloc_pages(
                task.policy, kernel.cpu_node(task), ilx, flags=PG_LRU | PG_LOCKED,
                mapping=obj.oid, index=new_idx, owner=0, zero=False,
                mems=kernel.mems_allowed(task))
        # Someone may have inserted some of these pages while we allocated.
        raced = obj.cache[new_idx] != 0
        ours = ~raced
        for n in arrayops.values(nodes):
            extra = pfns[(nodes == n) & raced]
            if len(extra):
                await kernel.free_frames(n, extra)
            mine = pfns[(nodes == n) & ours]
            kernel.tables[n].refcount[mine] = 1  # the page cache's reference
        ins_idx, ins_nodes, ins_pfns = new_idx[ours], nodes[ours], pfns[ours]
        obj.cache[ins_idx] = cache_entry(ins_nodes, ins_pfns)
        try:
            if obj.kind == "file" and len(ins_idx):
                await fill_from_file(kernel, obj, ins_idx, ins_nodes, ins_pfns)
        except Exception:
            obj.cache[ins_idx] = 0
            for n in arrayops.values(ins_nodes):
                sel = ins_pfns[ins_nodes == n]
                kernel.locks.unlock(n, sel)
                await kernel.free_frames(n, sel)
            raise
        for n in arrayops.values(ins_nodes):
            sel = ins_pfns[ins_nodes == n]
            kernel.tables[n].flags[sel] |= PG_UPTODATE
            kernel.locks.unlock(n, sel)
        entries = obj.cache[idx]
    nodes, pfns = pte_node(entries), pte_pfn(entries)
    for n in arrayops.values(nodes):
        sel = np.flatnonzero(nodes == n)
        locked = (kernel.tables[n].flags[pfns[sel]] & PG_LOCKED) != 0
        if locked.any():
            raise _Retry(n, int(pfns[sel[np.flatnonzero(locked)[0]]]))
    return entries


async def _alloc_shm_pages(kernel, task: Task, obj, idx: np.ndarray):
    """shmem pages ``idx``: each by the shared policy of its range, else the task policy.

    One allocation per policy in use (the shared policy is per page range, so one fault may
    span several); the interleave index is biased by the object id (the kernel uses the
    inode number). If a later group fails, the frames of the earlier ones are given back.
    """
    nodes = np.zeros(len(idx), dtype=np.int16)
    pfns = np.zeros(len(idx), dtype=np.int64)
    done = np.zeros(len(idx), dtype=bool)
    try:
        for sel, shared in obj.policy_groups(idx):
            policy = shared if shared is not None else task.policy
            nodes[sel], pfns[sel] = await kernel.alloc_pages(
                policy, kernel.cpu_node(task), idx[sel] + obj.oid,
                flags=PG_LRU | PG_LOCKED, mapping=obj.oid, index=idx[sel], owner=0,
                mems=kernel.mems_allowed(task))
            done[sel] = True
    except BaseException:
        for n in arrayops.values(nodes[done]):
            await kernel.free_frames(n, pfns[done & (nodes == n)])
        raise
    return nodes, pfns


async def zap_vma(kernel, vma: Vma) -> None:
    """Unmap every page of a VMA being removed: drop mapcount and the mapping's reference."""
    present = np.flatnonzero((vma.pte & PTE_PRESENT) != 0)
    ptes = vma.pte[present]
    vma.pte[:] = 0
    if len(ptes) == 0:
        return
    nodes, pfns = pte_node(ptes), pte_pfn(ptes)
    # In slices, yielding between them: unmapping a million pages must not hold the loop
    # (a page still counted here meanwhile is one migration backs out of, step 7).
    for lo in range(0, len(pfns), ZAP_CHUNK):
        if lo:
            await asyncio.sleep(0)
        n_, p_ = nodes[lo : lo + ZAP_CHUNK], pfns[lo : lo + ZAP_CHUNK]
        for n in arrayops.values(n_):
            arrayops.subtract_at(kernel.tables[n].mapcount, p_[n_ == n], 1)
        await kernel.put_pages(n_, p_)
