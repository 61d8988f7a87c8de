"""``struct page`` state for every frame, page-table entry encoding, and page locks.

Per node, page state lives in numpy arrays indexed by pfn (flags, refcount,
mapcount, mapping, index, owner, last_nid): 24 bytes per frame, no Python object per
page (with the 8-byte PTE, 32 bytes per touched page; Linux's struct page is 64).

A page-table entry is one int64:

    0                                   none
    PTE_PRESENT [| PTE_WRITE] | node<<40 | pfn   a present page
    PTE_ZERO                            the shared zero page (read-only, no frame)
    PTE_MIGRATION | node<<40 | pfn      a migration entry pointing at the locked old page
    PTE_NUMA bit on a present PTE       a NUMA hinting entry: still maps the page, but the
                                        client's TLB drops it, so the next access faults

The page lock (PG_locked) is a flag bit plus a wait queue of futures, because
the coordinator is one asyncio loop: whoever finds a page locked awaits
``wait_on_page_locked`` and redoes its lookup when woken (seed step 19).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from enum import IntFlag

import numpy as np

PTE_PRESENT = 1 << 62
PTE_WRITE = 1 << 61
PTE_ZERO = 1 << 60
PTE_MIGRATION = 1 << 59
PTE_NUMA = 1 << 58  # a NUMA hinting PTE (the kernel's PROT_NONE): present, but faults
NODE_SHIFT = 40
PFN_MASK = (1 << NODE_SHIFT) - 1
NODE_MASK = 0xFFFF


class PageFlag(IntFlag):
    """Page flags (a subset of the kernel's PG_*)."""

    LOCKED = 1 << 0
    UPTODATE = 1 << 1
    DIRTY = 1 << 2
    WRITEBACK = 1 << 3
    LRU = 1 << 4
    ANON = 1 << 5
    ISOLATED = 1 << 6
    ACTIVE = 1 << 7


# Plain-int forms for the numpy arrays: IntFlag arithmetic builds enum objects (~1 us each).
PG_LOCKED = int(PageFlag.LOCKED)
PG_UPTODATE = int(PageFlag.UPTODATE)
PG_DIRTY = int(PageFlag.DIRTY)
PG_WRITEBACK = int(PageFlag.WRITEBACK)
PG_LRU = int(PageFlag.LRU)
PG_ANON = int(PageFlag.ANON)
PG_ISOLATED = int(PageFlag.ISOLATED)
PG_ACTIVE = int(PageFlag.ACTIVE)


def make_ptes(node: int | np.ndarray, pfns: np.ndarray, writable: bool | np.ndarray) -> np.ndarray:
    """Present PTEs for frames ``pfns`` of ``node``."""
    ptes = PTE_PRESENT | (np.asarray(node, dtype=np.int64) << NODE_SHIFT) | pfns.astype(np.int64)
    return np.where(writable, ptes | PTE_WRITE, ptes).astype(np.int64)


def pte_node(ptes: np.ndarray) -> np.ndarray:
    return ((ptes >> NODE_SHIFT) & NODE_MASK).astype(np.int16)


def pte_pfn(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PFN_MASK).astype(np.int64)


def is_present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


class FrameTable:
    """``struct page`` arrays of one node: 24 bytes per frame.

    ``index`` is the page's index in its object, or for an anonymous page its vpn as an
    offset from ``vpn_base`` (the bottom of the mmap area: every anonymous address lies in
    the 2**28 pages above it), so it fits 32 bits; ``anon_vpns`` adds the base back.
    """

    def __init__(self, frames: int, vpn_base: int = 0) -> None:
        self.vpn_base = vpn_base
        self.flags = np.zeros(frames, dtype=np.int16)  # PG_* bits (PageFlag)
        self.refcount = np.zeros(frames, dtype=np.int32)
        self.mapcount = np.zeros(frames, dtype=np.int32)
        self.mapping = np.zeros(frames, dtype=np.int32)  # shared object id; 0 = anonymous
        self.index = np.zeros(frames, dtype=np.int32)  # page index in the object, or vpn
        self.owner = np.zeros(frames, dtype=np.int32)  # anon pages: the owning task's pid
        # Node of the CPU behind the last NUMA hinting fault on the page (the kernel's
        # last_cpupid): the two-stage filter of coordinator/numa_balancing.py.
        self.last_nid = np.full(frames, -1, dtype=np.int16)
        # pfn -> monotonic time until which a just-migrated page that had waiters is left
        # alone, so the waiters get to use it before it moves again (coordinator/migrate.py).
        # Few pages ever have one, so it is a dict, not 8 more bytes on every frame.
        self.holds: dict[int, float] = {}

    def prep_new(self, pfns: np.ndarray, flags: int, mapping: int, index: np.ndarray,
                 owner: int) -> None:
        """State of freshly allocated frames (refcount/mapcount set by the caller); ``index``
        is the page index in object ``mapping``, or the vpn of an anonymous page."""
        self.flags[pfns] = flags
        self.mapping[pfns] = mapping
        self.index[pfns] = index - self.vpn_base if mapping == 0 else index
        self.owner[pfns] = owner

    def anon_vpns(self, pfns: np.ndarray) -> np.ndarray:
        """The vpns of anonymous pages ``pfns`` in their owner's address space."""
        return self.index[pfns].astype(np.int64) + self.vpn_base

    def hold(self, pfns: np.ndarray, seconds: float) -> None:
        """Leave ``pfns`` where they are for ``seconds`` (migration fairness)."""
        until = time.monotonic() + seconds
        for pfn in pfns.tolist():
            self.holds[pfn] = until

    def held_until(self, pfns: np.ndarray) -> np.ndarray | None:
        """Per page, until when it is held (0: not held); ``None`` when nothing is."""
        if not self.holds:
            return None
        now = time.monotonic()
        for pfn in [p for p, until in self.holds.items() if until <= now]:
            del self.holds[pfn]
        if not self.holds:
            return None
        keys = np.fromiter(self.holds.keys(), dtype=np.int64, count=len(self.holds))
        until = np.fromiter(self.holds.values(), dtype=np.float64, count=len(self.holds))
        order = np.argsort(keys)
        keys, until = keys[order], until[order]
        pos = np.minimum(np.searchsorted(keys, pfns), len(keys) - 1)
        return np.where(keys[pos] == pfns, until[pos], 0.0)

    def clear(self, pfns: np.ndarray) -> None:
        """Frames going back to the node's free list hold no state."""
        self.flags[pfns] = 0
        self.refcount[pfns] = 0
        self.mapcount[pfns] = 0
        self.mapping[pfns] = 0
        self.index[pfns] = 0
        self.owner[pfns] = 0
        self.last_nid[pfns] = -1
        if self.holds:
            for pfn in pfns[np.isin(pfns, list(self.holds))].tolist():
                del self.holds[pfn]


class PageLocks:
    """PG_locked and PG_writeback wait queues: futures keyed by (bit, node, pfn)."""

    def __init__(self, tables: list[FrameTable]) -> None:
        self.tables = tables
        self.waiters: dict[tuple[int, int, int], list[asyncio.Future]] = defaultdict(list)

    def trylock(self, node: int, pfns: np.ndarray) -> np.ndarray:
        """Lock the pages that are unlocked; return the mask of those taken."""
        flags = self.tables[node].flags
        free = (flags[pfns] & PG_LOCKED) == 0
        flags[pfns[free]] |= PG_LOCKED
        return free

    def unlock(self, node: int, pfns: np.ndarray) -> np.ndarray:
        """Unlock and wake everyone waiting on these pages (seed step 19); return the mask of
        pages that had waiters."""
        return self._clear_and_wake(PG_LOCKED, node, pfns)

    def end_writeback(self, node: int, pfns: np.ndarray) -> None:
        """Writeback finished: wake those waiting for it (migration step 2)."""
        self._clear_and_wake(PG_WRITEBACK, node, pfns)

    def _clear_and_wake(self, bit: int, node: int, pfns: np.ndarray) -> np.ndarray:
        self.tables[node].flags[pfns] &= ~int(bit)
        woke = np.zeros(len(pfns), dtype=bool)
        if not self.waiters:
            return woke
        for i, pfn in enumerate(pfns.tolist()):
            for fut in self.waiters.pop((int(bit), node, pfn), ()):
                if not fut.done():
                    fut.set_result(None)
                    woke[i] = True
        return woke

    async def wait_on_page_locked(self, node: int, pfn: int, timeout: float | None = None) -> None:
        """Sleep until the page is unlocked; takes no page reference (migration_entry_wait)."""
        await self._wait(PG_LOCKED, node, pfn, timeout)

    async def wait_on_page_writeback(self, node: int, pfn: int,
                                     timeout: float | None = None) -> None:
        """Sleep until writeback of the page has ended."""
        await self._wait(PG_WRITEBACK, node, pfn, timeout)

    async def _wait(self, bit: int, node: int, pfn: int, timeout: float | None) -> None:
        if pfn < 0 or not self.tables[node].flags[pfn] & bit:
            return
        key = (int(bit), node, pfn)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[key].append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            queue = self.waiters.get(key)
            if queue is not None and fut in queue:
                queue.remove(fut)
                if not queue:
                    del self.waiters[key]
