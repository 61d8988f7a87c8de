"""``numaemu bench memory``: what touched pages cost the coordinator, and whether a
client gives its memory back after ``munmap``.

* coordinator: its resident memory (``VmRSS`` and ``RssAnon`` of /proc/PID/status) before
  and after a task touches ``pages`` pages (1M: 4 GiB of frames), per touched page, and
  again after the ``munmap``.  Baseline, measured in the same run: the real kernel's
  page-table bytes per mapped page (``VmPTE`` of this process after reading one byte of
  each page of a fresh anonymous mapping, which maps the shared zero page and allocates
  nothing else), plus the 64-byte ``struct page`` every frame has on x86-64 (a constant:
  user space cannot measure it);
* client (this process): ``RssAnon`` and the sizes of the task's TLB structures (its
  translation lists and their numpy twins) before and after ``cycles`` rounds of
  mmap, touch and munmap of ``cycle_pages`` pages; the baseline is the first reading.
  Memory counts as given back when the TLB is as small as before and ``RssAnon`` grew by
  at most ``RSS_SLACK`` (the allocator keeps some freed memory for reuse).

Nothing here is asserted in tests.
"""

from __future__ import annotations

import gc
import mmap
import time

import numpy as np

from .cluster import Cluster
from .topology import Topology

RSS_SLACK = 2 << 20
#: ``sizeof(struct page)`` on x86-64: the kernel's per-frame state, beside the page table.
STRUCT_PAGE = 64


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes (VmRSS, RssAnon, RssShmem, VmPTE...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) * 1024
    return out


def tlb_slots(task) -> dict[str, int]:
    """Lengths of the task's TLB structures (numaemu/task.py keeps them in step)."""
    return {name: len(getattr(task, f"_{name}"))
            for name in ("rtlb", "wtlb", "tnode", "npfn", "nnode", "nwrite")}


def coordinator_pid(cluster: Cluster) -> int:
    """The OS pid of the cluster's coordinator (the supervisor starts it first)."""
    return cluster.processes()["children"][0]


def bench_memory(pages: int = 1 << 20, cycles: int = 10, cycle_pages: int = 16384) -> dict:
    """Coordinator bytes per touched page and client memory after munmap (see above)."""
    if min(pages, cycles, cycle_pages) < 1:
        raise ValueError("pages, cycles and cycle pages must be at least 1")
    cycle_pages = min(cycle_pages, pages)
    # Node 0 holds the touched pages; node 1 only makes it a NUMA machine.
    topo = Topology.symmetric(nodes=2, frames_per_node=[pages + 8192, 1024], cpus_per_node=1)
    out: dict = {"pages": pages, "cycles": cycles, "cycle_pages": cycle_pages}
    with Cluster(topo) as cluster:
        task = cluster.attach(cpu=0, inject=False)
        try:
            # The coordinator first: frames the cycles used would have warmed its per-frame
            # state already.
            out.update(_coordinator_per_page(task, coordinator_pid(cluster), pages))
            out.update(_client_cycles(task, cycles, cycle_pages))
        finally:
            task.close()
    out.update(_kernel_per_page(pages))
    return out


def _client_cycles(task, cycles: int, pages: int) -> dict:
    length = pages * task.page_size
    data = bytes(length)

    def cycle() -> dict[str, int]:
        m = task.mmap(length)
        task.write(m.addr, data)
        peak = tlb_slots(task)
        task.munmap(m.addr, m.length)
        return peak

    cycle()  # warm-up: first-use allocations of the access path are not a leak
    gc.collect()
    before, tlb_before = proc_status(), tlb_slots(task)
    t0 = time.perf_counter()
    peak = max((cycle() for _ in range(cycles)), key=lambda t: max(t.values()))
    seconds = time.perf_counter() - t0
    gc.collect()
    after, tlb_after = proc_status(), tlb_slots(task)
    grew = after["RssAnon"] - before["RssAnon"]
    return {"client_rss_anon_before_kib": before["RssAnon"] / 1024,
            "client_rss_anon_after_kib": after["RssAnon"] / 1024,
            "client_rss_before_kib": before["VmRSS"] / 1024,
            "client_rss_after_kib": after["VmRSS"] / 1024,
            "client_tlb_slots_before": max(tlb_before.values()),
            "client_tlb_slots_peak": max(peak.values()),
            "client_tlb_slots_after": max(tlb_after.values()),
            "client_cycle_ms": seconds / cycles * 1e3,
            "client_returned": bool(max(tlb_after.values()) <= max(tlb_before.values())
                                    and grew <= RSS_SLACK)}


def _coordinator_per_page(task, pid: int, pages: int) -> dict:
    warm = task.mmap(256 * task.page_size)  # the fault path's first-use allocations
    task.write(warm.addr, bytes(warm.length))
    task.munmap(warm.addr, warm.length)
    before = proc_status(pid)
    m = task.mmap(pages * task.page_size)
    a = m.ndarray(np.int64)
    t0 = time.perf_counter()
    a[:: task.page_size // 8] = 1  # one store per page: every page faulted in
    seconds = time.perf_counter() - t0
    during = proc_status(pid)
    task.munmap(m.addr, m.length)
    after = proc_status(pid)
    return {"frame_state_bytes_per_page": frame_state_bytes(),
            "coordinator_rss_before_kib": before["VmRSS"] / 1024,
            "coordinator_rss_touched_kib": during["VmRSS"] / 1024,
            "coordinator_rss_after_munmap_kib": after["VmRSS"] / 1024,
            "coordinator_bytes_per_page": (during["VmRSS"] - before["VmRSS"]) / pages,
            "coordinator_anon_bytes_per_page": (during["RssAnon"] - before["RssAnon"]) / pages,
            "coordinator_kept_bytes_per_page": (after["VmRSS"] - before["VmRSS"]) / pages,
            "touch_us_per_page": seconds / pages * 1e6}


def frame_state_bytes() -> int:
    """What the coordinator keeps per touched page by construction: its ``struct page``
    arrays (one element each per frame) and the 8-byte PTE."""
    from coordinator.pages import FrameTable

    table = FrameTable(1)
    return sum(a.itemsize for a in vars(table).values() if isinstance(a, np.ndarray)) + 8


def _kernel_per_page(pages: int) -> dict:
    """Page-table bytes per mapped page of this process's own (real) kernel."""
    ps = mmap.PAGESIZE
    region = mmap.mmap(-1, pages * ps)
    try:
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # one PTE per page, not a huge zero page
            region.madvise(mmap.MADV_NOHUGEPAGE)
        before = proc_status()["VmPTE"]
        view = np.frombuffer(region, dtype=np.uint8)
        int(view[::ps].sum())  # a read maps the zero page: page tables, no memory
        pte = (proc_status()["VmPTE"] - before) / pages
        del view
    finally:
        region.close()
    return {"kernel_pte_bytes_per_page": pte,
            "kernel_bytes_per_page": STRUCT_PAGE + pte}


def memory_text(r: dict) -> str:
    kib = 1024
    lines = [
        f"[memory] coordinator, {r['pages']} pages touched; baseline: the real kernel's "
        f"{STRUCT_PAGE} B struct page + page tables (VmPTE, measured)",
        f"  {'':<34} {'emulated':>12} {'baseline':>12} {'ratio':>8}",
        f"  {'struct page + PTE (by design)':<34} {r['frame_state_bytes_per_page']:>12.1f} "
        f"{r['kernel_bytes_per_page']:>12.1f} "
        f"{r['frame_state_bytes_per_page'] / r['kernel_bytes_per_page']:>7.2f}x   <= 32 B "
        f"({'met' if r['frame_state_bytes_per_page'] <= 32 else 'missed'})",
        f"  {'bytes per touched page (VmRSS)':<34} {r['coordinator_bytes_per_page']:>12.1f} "
        f"{r['kernel_bytes_per_page']:>12.1f} "
        f"{r['coordinator_bytes_per_page'] / r['kernel_bytes_per_page']:>7.2f}x",
        f"  {'bytes per touched page (RssAnon)':<34} "
        f"{r['coordinator_anon_bytes_per_page']:>12.1f} {r['kernel_bytes_per_page']:>12.1f}",
        f"  {'resident after munmap, per page':<34} "
        f"{r['coordinator_kept_bytes_per_page']:>12.1f} {STRUCT_PAGE:>12.1f}   "
        "(per-frame state stays, as struct page does)",
        f"  {'RSS MiB: before / touched / unmapped':<34} "
        f"{r['coordinator_rss_before_kib'] / kib:>12.1f} "
        f"{r['coordinator_rss_touched_kib'] / kib:>12.1f} "
        f"{r['coordinator_rss_after_munmap_kib'] / kib:>8.1f}",
        f"  first touch: {r['touch_us_per_page']:.2f} us per page",
        f"[memory] client, {r['cycles']} cycles of mmap/touch/munmap of {r['cycle_pages']} "
        "pages; baseline: before the cycles",
        f"  {'':<34} {'after':>12} {'baseline':>12}",
        f"  {'RssAnon (KiB)':<34} {r['client_rss_anon_after_kib']:>12.0f} "
        f"{r['client_rss_anon_before_kib']:>12.0f}",
        f"  {'TLB slots (peak while mapped: ' + str(r['client_tlb_slots_peak']) + ')':<34} "
        f"{r['client_tlb_slots_after']:>12} {r['client_tlb_slots_before']:>12}",
        f"  returned to baseline: {'yes' if r['client_returned'] else 'NO'} "
        f"(TLB no longer than before, RssAnon within {RSS_SLACK >> 20} MiB)",
    ]
    return "\n".join(lines) + "\n"

