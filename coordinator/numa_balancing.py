"""Automatic NUMA balancing: the scanner, hinting faults, and what the kernel does with them.

The emulated ``task_numa_work`` / ``do_numa_page`` (reference/kernel-and-numactl.md §9):

* **Scanner** (``scan_loop``).  With ``kernel.numa_balancing`` (or numaemu's own
  ``numaemu.numa_sampling``, which records without acting), each task is scanned once per
  scan period, after ``scan_delay`` from its start: a window of ``scan_size_mb`` of its
  present PTEs gets the ``PTE_NUMA`` bit (the kernel's PROT_NONE hinting PTEs): the page
  stays mapped where it is, but the task's TLB loses those translations through the usual
  shootdown, so its next access to each page faults.
* **Hinting fault** (``hinting_faults``, from the fault handler, without an await): the bit
  is cleared and the access recorded in the profile: task, page, node of the accessing
  CPU, node of the page, time.  Counters as ``/proc/vmstat`` names them.
* **Acting** (``kernel.numa_balancing = 1`` only):
  - page migration with the kernel's two-stage filter: a page on another node than the
    faulting CPU moves there only if the previous hinting fault on it came from that same
    node (``last_nid``, the kernel's last_cpupid), and the node is in the task's cpuset;
    the move runs in the background through the migration engine (``migrate_misplaced``);
  - task placement: per task, hinting faults are counted per page node (halved every scan
    period, so old evidence fades); the node with most is ``numa_preferred_nid``, and a
    task whose CPU is elsewhere is moved onto a CPU of that node its cpuset allows;
  - scan-period adaptation (update_task_scan_period, simplified): a period whose hinting
    faults were at least 70 % local doubles the period (up to the maximum), one with more
    remote faults halves it (down to the minimum).

The profile is a log of numpy arrays (one chunk per fault request, compacted by
``np.unique`` when it grows), never an object per page; ``profile`` aggregates it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.errors import NumaError

from .pages import PTE_MIGRATION, PTE_NUMA, PTE_PRESENT, pte_node, pte_pfn
from .shootdown import flush_tlb

log = logging.getLogger("numaemu.coordinator")

#: sysctl name -> (attribute of NumaBalancing, lowest, highest).  ``kernel.*`` are Linux's
#: names; ``numaemu.numa_sampling`` records hinting faults without the kernel acting.
TUNABLES = {
    "kernel.numa_balancing": ("mode", 0, 1),
    "kernel.numa_balancing_scan_delay_ms": ("scan_delay_ms", 0, 3_600_000),
    "kernel.numa_balancing_scan_period_min_ms": ("scan_period_min_ms", 10, 3_600_000),
    "kernel.numa_balancing_scan_period_max_ms": ("scan_period_max_ms", 10, 3_600_000),
    "kernel.numa_balancing_scan_size_mb": ("scan_size_mb", 1, 1 << 20),
    "numaemu.numa_sampling": ("sampling", 0, 1),
}
#: The scanner's tick: how often it looks for tasks whose scan period has come.
TICK = 0.02
#: Local share of a period's hinting faults at or above which scanning slows down.
LOCAL_THRESHOLD = 0.7
#: Profile rows kept before the log is compacted.
COMPACT_AT = 1 << 16


class NumaBalancing:
    """The knobs, counters and profile of NUMA balancing (one per coordinator)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.mode = 0
        self.sampling = 0
        self.scan_delay_ms = 1000
        self.scan_period_min_ms = 1000
        self.scan_period_max_ms = 60_000
        self.scan_size_mb = 256
        self.counters = dict.fromkeys(("numa_pte_updates", "numa_hint_faults",
                                       "numa_hint_faults_local", "numa_pages_migrated"), 0)
        self._log: list[np.ndarray] = []  # chunks of PROFILE_DTYPE rows
        self._rows = 0

    @property
    def recording(self) -> bool:
        return bool(self.mode or self.sampling)

    def set(self, name: str, value: int) -> None:
        attr, lo, hi = TUNABLES[name]
        if name == "kernel.numa_balancing" and value == 2:
            raise NumaError(errno.EINVAL, "kernel.numa_balancing=2 (memory tiering) is "
                                          "reserved: numaemu has no slow tier yet")
        if not lo <= value <= hi:
            raise NumaError(errno.EINVAL, f"{name} must be in {lo}..{hi}")
        setattr(self, attr, value)

    def get(self, name: str) -> int:
        return getattr(self, TUNABLES[name][0])

    # -- the profile ----------------------------------------------------------------
    def record(self, rows: np.ndarray) -> None:
        self._log.append(rows)
        self._rows += len(rows)
        if self._rows > COMPACT_AT:
            self._log = [aggregate(np.concatenate(self._log))]
            self._rows = len(self._log[0])

    def profile(self, pid: int | None, reset: bool) -> np.ndarray:
        """The aggregated profile (of ``pid``, or every task); ``reset`` forgets it after."""
        rows = aggregate(np.concatenate(self._log)) if self._log else \
            np.empty(0, dtype=PROFILE_DTYPE)
        self._log = [rows] if len(rows) else []
        self._rows = len(rows)
        mine = rows if pid is None else rows[rows["pid"] == pid]
        if reset:
            keep = rows[rows["pid"] != pid] if pid is not None else rows[:0]
            self._log = [keep] if len(keep) else []
            self._rows = len(keep)
        return mine

    def forget(self, pid: int) -> None:
        """A task exited: its rows go (its pid may be reused)."""
        if self._log:
            rows = np.concatenate(self._log)
            rows = rows[rows["pid"] != pid]
            self._log = [rows] if len(rows) else []
            self._rows = len(rows)


#: One profile row: a page of a task, who touched it from where, how often, when last.
PROFILE_DTYPE = np.dtype([("pid", "<i8"), ("vpn", "<u8"), ("page_node", "<i2"),
                          ("cpu_node", "<i2"), ("count", "<i8"), ("last_ns", "<i8")])


def aggregate(rows: np.ndarray) -> np.ndarray:
    """Rows with the same (pid, vpn, page node, cpu node) summed: counts added, last kept."""
    if len(rows) == 0:
        return rows
    keys = np.stack([rows["pid"].astype(np.int64), rows["vpn"].astype(np.int64),
                     rows["page_node"].astype(np.int64), rows["cpu_node"].astype(np.int64)])
    uniq, inverse = np.unique(keys, axis=1, return_inverse=True)
    inverse = inverse.ravel()
    out = np.empty(uniq.shape[1], dtype=PROFILE_DTYPE)
    out["pid"], out["vpn"], out["page_node"], out["cpu_node"] = uniq
    out["count"] = np.bincount(inverse, weights=rows["count"], minlength=len(out))
    last = np.full(len(out), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, inverse, rows["last_ns"])
    out["last_ns"] = last
    return out


# -- hinting faults (called by the fault handler, no await) -------------------------------


def hinting_faults(kernel, task, vpns: np.ndarray, ptes: np.ndarray) -> None:
    """``vpns`` of ``task`` took hinting faults (their PTEs carried ``PTE_NUMA``, already
    cleared): record them, and with numa_balancing=1 act on them."""
    nb = kernel.numa
    cpu_node = kernel.cpu_node(task)
    page_nodes, pfns = pte_node(ptes), pte_pfn(ptes)
    local = page_nodes == cpu_node
    nb.counters["numa_hint_faults"] += len(vpns)
    nb.counters["numa_hint_faults_local"] += int(np.count_nonzero(local))
    task.numa_faults += np.bincount(page_nodes, minlength=kernel.num_nodes)[: kernel.num_nodes]
    task.numa_period_faults += len(vpns)
    task.numa_period_local += int(np.count_nonzero(local))
    rows = np.empty(len(vpns), dtype=PROFILE_DTYPE)
    rows["pid"], rows["vpn"], rows["page_node"] = task.pid, vpns, page_nodes
    rows["cpu_node"], rows["count"], rows["last_ns"] = cpu_node, 1, time.monotonic_ns()
    nb.record(rows)
    # last_nid of each page, read before it is updated: the two-stage filter.
    previous = np.full(len(vpns), -1, dtype=np.int16)
    for n in arrayops.values(page_nodes):
        sel = page_nodes == n
        table = kernel.tables[n]
        previous[sel] = table.last_nid[pfns[sel]]
        table.last_nid[pfns[sel]] = cpu_node
    if nb.mode != 1 or cpu_node not in kernel.mems_allowed(task):
        return
    misplaced = ~local & (previous == cpu_node)
    if misplaced.any():
        kernel.spawn(migrate_misplaced(kernel, page_nodes[misplaced], pfns[misplaced],
                                       cpu_node))


async def migrate_misplaced(kernel, nodes: np.ndarray, pfns: np.ndarray, target: int) -> None:
    """migrate_misplaced_folio for a batch: isolate what can be, move it to ``target``."""
    from .migrate import isolate_pages, migrate_pages

    try:
        ok = await isolate_pages(kernel, nodes, pfns)
        if not ok.any():
            return
        rc = await migrate_pages(kernel, nodes[ok], pfns[ok],
                                 np.full(int(ok.sum()), target, dtype=np.int64),
                                 cpu_node=target)
        kernel.numa.counters["numa_pages_migrated"] += int(np.count_nonzero(rc == 0))
    except NumaError as exc:  # the target is full: the pages simply stay
        log.debug("NUMA balancing could not move %d pages to node %d: %s", len(pfns), target,
                  exc)


# -- the scanner ---------------------------------------------------------------------------


async def scan_loop(kernel) -> None:
    """task_numa_work for every task whose scan period has come (a server loop)."""
    while True:
        await asyncio.sleep(TICK)
        nb = kernel.numa
        if not nb.recording:
            continue
        now = time.monotonic()
        for task in list(kernel.tasks.values()):
            if task.exiting:
                continue
            if task.numa_next_scan == 0.0:  # first look: wait the scan delay
                task.numa_next_scan = now + nb.scan_delay_ms / 1000
                task.numa_scan_period = nb.scan_period_min_ms / 1000
            if now < task.numa_next_scan:
                continue
            adapt_period(kernel, task)
            task.numa_next_scan = now + task.numa_scan_period
            if nb.mode == 1:
                place_task(kernel, task)
            await scan_task(kernel, task)


async def scan_task(kernel, task) -> None:
    """Turn the next window of the task's present PTEs into hinting PTEs and shoot down the
    task's translations of them."""
    budget = max(1, (kernel.numa.scan_size_mb << 20) // kernel.page_size)
    marked: list[np.ndarray] = []
    async with task.mmap_lock.read():
        if not any(v.end > task.numa_scan_offset for v in task.vmas):
            task.numa_scan_offset = 0  # a full pass ended: start over
        for vma in task.vmas:
            if budget <= 0:
                break
            if vma.end <= task.numa_scan_offset:
                continue
            lo = max(0, task.numa_scan_offset - vma.start)
            ptes = vma.pte[lo:]
            hit = np.flatnonzero(((ptes & PTE_PRESENT) != 0) & ((ptes & PTE_NUMA) == 0)
                                 & ((ptes & PTE_MIGRATION) == 0))[:budget]
            vma.pte[lo + hit] |= PTE_NUMA
            marked.append(lo + hit + vma.start)
            budget -= len(hit)
            # Where the next window starts: after the last page marked, or past this VMA.
            task.numa_scan_offset = int(lo + hit[-1] + vma.start + 1) if budget <= 0 \
                else vma.end
    vpns = np.concatenate(marked) if marked else np.empty(0, dtype=np.int64)
    if len(vpns) == 0:
        return
    kernel.numa.counters["numa_pte_updates"] += len(vpns)
    await flush_tlb(kernel, {task: [vpns]})


def adapt_period(kernel, task) -> None:
    """update_task_scan_period, simplified: local-heavy periods scan less often."""
    nb = kernel.numa
    faults, local = task.numa_period_faults, task.numa_period_local
    task.numa_period_faults = task.numa_period_local = 0
    lo, hi = nb.scan_period_min_ms / 1000, nb.scan_period_max_ms / 1000
    if faults and local / faults < LOCAL_THRESHOLD:
        task.numa_scan_period = max(lo, task.numa_scan_period / 2)
    else:
        task.numa_scan_period = min(hi, task.numa_scan_period * 2)
    task.numa_faults //= 2  # old evidence fades


def place_task(kernel, task) -> None:
    """numa_preferred_nid and task placement: run where most hinting faults' pages are."""
    if not task.numa_faults.any():
        return
    preferred = int(np.argmax(task.numa_faults))
    task.numa_preferred_nid = preferred
    if kernel.cpu_node(task) == preferred:
        return
    there = [c for c in task.cpus_allowed if kernel.topology.node_of_cpu(c) == preferred]
    if not there:
        return
    log.info("NUMA balancing moves task %d from cpu %d to cpu %d (node %d)", task.pid,
             task.cpu, there[0], preferred)
    task.cpu = there[0]
    if task.tlb is not None:
        kernel.spawn(task.tlb.post(P.Resched(cpu=task.cpu)))
