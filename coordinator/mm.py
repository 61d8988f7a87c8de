"""Tasks and their address spaces: VMAs, page tables, the mmap lock.

A VMA covers page numbers ``[start, end)`` and carries its page table as one
int64 array (see ``coordinator.pages`` for the entry encoding), its memory
policy and, for shared mappings, the object and page offset it maps.  VMAs are
split when munmap or mbind covers part of one, as in the kernel.

Virtual addresses are handed out upward from ``MMAP_BASE`` so that a client
can index its TLB by ``vpn - MMAP_BASE_VPN`` in a plain list.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from numaemu.constants import TASK_SIZE  # noqa: F401 (the address-space end, used with MMAP_BASE)
from numaemu.errors import NumaError

from .mempolicy import MemPolicy

if TYPE_CHECKING:
    from .creds import PeerCred
    from .filemap import SharedObject
    from .links import Peer

MMAP_BASE = 0x7F0000000000


class RWLock:
    """An asyncio reader-writer lock (the mmap_lock): faults read, mmap/munmap/mbind write.

    Uncontended acquire and release do not touch the event loop (faults take it on every
    request); only a waiter creates a future.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiters: list[asyncio.Future] = []

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def acquire_read(self) -> None:
        while self._writer:
            await self._wait()
        self._readers += 1

    async def release_read(self) -> None:
        self._readers -= 1
        if self._readers == 0 and self._waiters:
            self._wake()

    async def acquire_write(self) -> None:
        while self._writer or self._readers:
            await self._wait()
        self._writer = True

    async def release_write(self) -> None:
        self._writer = False
        self._wake()

    def read(self) -> _Held:
        return _Held(self.acquire_read, self.release_read)

    def write(self) -> _Held:
        return _Held(self.acquire_write, self.release_write)


class _Held:
    def __init__(self, acquire, release) -> None:
        self._acquire, self._release = acquire, release

    async def __aenter__(self) -> None:
        await self._acquire()

    async def __aexit__(self, *exc) -> None:
        await self._release()


@dataclass(eq=False)
class Vma:
    """One virtual memory area of a task."""

    start: int  # first vpn
    end: int  # vpn past the last page
    pte: np.ndarray
    policy: MemPolicy | None = None
    obj: SharedObject | None = None
    pgoff: int = 0  # page offset of ``start`` inside ``obj``

    @property
    def kind(self) -> str:
        return "anon" if self.obj is None else self.obj.kind

    def split(self, vpn: int) -> Vma:
        """Cut at ``vpn``: self keeps ``[start, vpn)``, the returned VMA gets the rest."""
        cut = vpn - self.start
        tail = Vma(vpn, self.end, self.pte[cut:].copy(), self.policy, self.obj,
                   self.pgoff + cut)
        if self.obj is not None:
            # ``maps`` counts VMAs: without this, unmapping one piece of a split mapping
            # released the object (and its page cache) while the other piece still mapped it.
            self.obj.maps += 1
        self.pte = self.pte[:cut].copy()
        self.end = vpn
        return tail


@dataclass(eq=False)
class Task:
    """An emulated process: identity, CPU, task policy and address space."""

    pid: int
    os_pid: int
    host: str
    uid: int
    privileged: bool
    command: str
    cpu: int
    cpus_allowed: tuple[int, ...]
    policy: MemPolicy | None = None
    il_count: int = 0  # counter-based interleave position (page cache allocations)
    vmas: list[Vma] = field(default_factory=list)
    next_vpn: int = 0  # end of the highest area handed out (+ its guard page)
    mmap_base: int = 0  # the first vpn mmap hands out
    mmap_lock: RWLock = field(default_factory=RWLock)
    tlb: Peer | None = None  # the client's shootdown thread, once it said hello
    # While a syscall of this task runs with its own translations dropped beforehand (the
    # local TLB flush), shootdowns skip it for these vpns (True: all of them).
    self_flushed: np.ndarray | tuple | bool | None = None
    requests: int = 0  # requests received from this task, in order
    last_seen: float = 0.0
    exiting: bool = False
    pidfd: int | None = None  # a local client's process (coordinator/procwatch.py)
    cpuset: Any = None  # its Cpuset (coordinator/cpuset.py); the root one unless moved
    # NUMA balancing (coordinator/numa_balancing.py): hinting faults per page node, the
    # current scan period's faults (all, local), the scan schedule and window.
    numa_faults: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    numa_period_faults: int = 0
    numa_period_local: int = 0
    numa_next_scan: float = 0.0
    numa_scan_period: float = 1.0
    numa_scan_offset: int = 0
    numa_preferred_nid: int = -1
    # Identity (coordinator/creds.py): the rpc connection that attached the task and its
    # peer's credentials; requests naming this pid are served on that connection only.
    conn_id: bytes | None = None
    cred: PeerCred | None = None

    # -- lookups -----------------------------------------------------------
    def find_vma(self, vpn: int) -> Vma | None:
        i = bisect.bisect_right([v.start for v in self.vmas], vpn) - 1
        if i >= 0 and vpn < self.vmas[i].end:
            return self.vmas[i]
        return None

    def locate(self, vpns: np.ndarray) -> np.ndarray:
        """Index of the VMA holding each vpn, or -1 for addresses in no VMA."""
        if not self.vmas:
            return np.full(len(vpns), -1, dtype=np.int64)
        starts = np.fromiter((v.start for v in self.vmas), dtype=np.int64, count=len(self.vmas))
        ends = np.fromiter((v.end for v in self.vmas), dtype=np.int64, count=len(self.vmas))
        vpns = vpns.astype(np.int64)
        idx = np.searchsorted(starts, vpns, side="right") - 1
        ok = (idx >= 0) & (vpns < ends[np.maximum(idx, 0)])
        return np.where(ok, idx, -1)

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def covered(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is fully mapped (no hole)."""
        pos = start
        for v in self.vmas_in(start, end):
            if v.start > pos:
                return False
            pos = max(pos, v.end)
        return pos >= end

    # -- changes -------------------------------------------------------------
    def get_unmapped_area(self, npages: int) -> int:
        """The lowest free vpn range of ``npages`` above the mmap base, with a guard page
        after every area: freed ranges are reused, as Linux does, so that a client's TLB (a
        list indexed by vpn) stays as big as what is mapped, not what was ever mapped."""
        pos = self.find_unmapped_area(npages)
        self.next_vpn = max(self.next_vpn, pos + npages + 1)
        return pos

    def find_unmapped_area(self, npages: int) -> int:
        """Where ``get_unmapped_area`` would put ``npages`` pages (changes nothing)."""
        pos = self.mmap_base
        for vma in self.vmas:
            if vma.end + 1 <= pos:
                continue
            if vma.start >= pos + npages + 1:
                break
            pos = vma.end + 1
        return pos

    def insert_vma(self, vma: Vma) -> None:
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    def split_at(self, start: int, end: int) -> list[Vma]:
        """Split VMAs at ``start`` and ``end``; return the VMAs now inside ``[start, end)``."""
        for vpn in (start, end):
            vma = self.find_vma(vpn)
            if vma is not None and vma.start < vpn:
                self.insert_vma(vma.split(vpn))
        return self.vmas_in(start, end)


def check_range(page_size: int, addr: int, length: int) -> tuple[int, int]:
    """Validate an (addr, length) range as mbind/munmap do; return its vpn range."""
    if addr < 0 or length < 0:
        raise NumaError(22, "address and length must not be negative")
    if addr % page_size:
        raise NumaError(22, f"address {addr:#x} is not page-aligned")
    end = addr + ((length + page_size - 1) // page_size) * page_size
    if end >= 1 << 64:
        raise NumaError(22, "addr + length wraps around")
    return addr // page_size, end // page_size
