"""``numaemu bench scale``: how per-page costs grow with the number of pages.

Two sweeps on one 2-node cluster, each figure in microseconds per page:

* migration: ``pages`` pages (4k, 16k, 64k, 256k: 16 MiB to 1 GiB) faulted in on node 0,
  then moved to node 1 with one ``mbind(MPOL_BIND, [1], MPOL_MF_MOVE)``.  Baselines,
  timed in the same repetition: a *warm* copy, numpy copying the same number of frames
  between the two node segments (already populated, and copied once before the timed
  copy, so that neither side takes a fault), and beside it a *cold* copy of them into
  fresh anonymous memory of this process (the real kernel's first-touch faults
  included);
* first touch: one ``write`` into a fresh mapping of ``pages`` pages (1, 16, 256, 4096,
  65536), every page faulted in by it; the baseline is the same first write into fresh
  anonymous memory of this process.

The migration sweep's growth is the largest per-page cost over the smallest: 1.0 means
a page costs the same however many move at once (and the per-page cost at the largest
size over that at the smallest says which way it goes).  ``plot`` draws both sweeps (log-log).
Figures are medians over repetitions, ratios medians of per-repetition ratios.  Nothing
here is asserted in tests.
"""

from __future__ import annotations

import mmap
import statistics
import time

import numpy as np

from .cluster import Cluster
from .constants import MPOL_BIND, MPOL_MF_MOVE
from .topology import Topology

MIGRATE_SIZES = (4096, 16384, 65536, 262144)
FAULT_BATCHES = (1, 16, 256, 4096, 65536)
#: Bytes per ``write`` that fills a mapping before it moves: a 1 GiB mapping is filled in
#: pieces, not from one 1 GiB ``bytes`` object.
FILL_CHUNK = 64 << 20


def sweep(sizes: tuple[int, ...], cap: int | None) -> list[int]:
    """``sizes`` up to ``cap``; a ``cap`` below all of them sweeps cap/16, cap/4, cap."""
    if cap is None:
        return list(sizes)
    if cap < 1:
        raise ValueError(f"pages must be at least 1, not {cap}")
    kept = [s for s in sizes if s <= cap]
    return kept or sorted({max(1, cap // 16), max(1, cap // 4), cap})


def bench_scale(pages: int | None = None, repeat: int = 5) -> dict:
    """Both sweeps (see the module docstring), the largest size capped at ``pages``."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    sizes, batches = sweep(MIGRATE_SIZES, pages), sweep(FAULT_BATCHES, pages)
    # Room for the warm copy's run of free frames on node 0 beside what the sweep leaves
    # allocated there (per-CPU frame caches, the pages of the last fault batch).
    frames = 2 * max(sizes + batches) + 4096
    topo = Topology.symmetric(nodes=2, frames_per_node=frames, cpus_per_node=1)
    with Cluster(topo) as cluster:
        task = cluster.attach(cpu=0, inject=False)
        try:
            migrate = [_migrate_row(task, n, repeat) for n in sizes]
            fault = [_fault_row(task, n, repeat) for n in batches]
        finally:
            task.close()
    per_page = [r["us_per_page"] for r in migrate]
    warm = [r["warm_copy_us_per_page"] for r in migrate]
    return {"repeat": repeat, "migrate": migrate, "fault": fault,
            "migrate_growth": max(per_page) / min(per_page),
            "migrate_largest_over_smallest": per_page[-1] / per_page[0],
            "warm_copy_growth": max(warm) / min(warm)}


def _migrate_row(task, pages: int, repeat: int) -> dict:
    ps = task.page_size
    moves, warm, cold = [], [], []
    pattern = bytes(range(256)) * (min(FILL_CHUNK, pages * ps) // 256)
    for _ in range(repeat):
        m = task.mmap(pages * ps)
        try:
            task.mbind(m.addr, m.length, MPOL_BIND, [0])
            for off in range(0, m.length, len(pattern)):
                task.write(m.addr + off, pattern[: m.length - off])
            t0 = time.perf_counter()
            task.mbind(m.addr, m.length, MPOL_BIND, [1], MPOL_MF_MOVE)
            moves.append(time.perf_counter() - t0)
            where = task.move_pages([m.addr, m.page(pages - 1)])
            if list(where) != [1, 1]:
                raise RuntimeError(f"pages did not move: {where}")
            warm.append(_warm_copy(task, pages))
            cold.append(_cold_copy(task, pages))
        finally:
            task.munmap(m.addr, m.length)
    us = 1e6 / pages
    return {"pages": pages,
            "us_per_page": statistics.median(moves) * us,
            "warm_copy_us_per_page": statistics.median(warm) * us,
            "cold_copy_us_per_page": statistics.median(cold) * us,
            "slowdown_vs_warm_copy": statistics.median(m / w for m, w in zip(moves, warm))}


def _warm_copy(task, pages: int) -> float:
    """Seconds of a numpy copy of ``pages`` frames of node 1's segment into free frames of
    node 0's, after a first copy that leaves no fault to either side (nothing reads free
    frames, and a node zeroes the frames it hands out)."""
    from .bench import _free_run

    src = task._segments[1].array[:pages]
    start = _free_run(task, 0, pages)
    dst = task._segments[0].array[start : start + pages]
    np.copyto(dst, src)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def _cold_copy(task, pages: int) -> float:
    """Seconds of a numpy copy of ``pages`` frames of node 1's segment into fresh anonymous
    memory of this process (its first-touch faults included)."""
    ps = task.page_size
    src = task._segments[1].array[:pages]
    region = mmap.mmap(-1, pages * ps)
    try:
        dst = np.frombuffer(region, dtype=np.uint8).reshape(pages, ps)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        seconds = time.perf_counter() - t0
        del dst
        return seconds
    finally:
        region.close()


def _fault_row(task, pages: int, repeat: int) -> dict:
    from .bench import _raw_first_touch

    ps = task.page_size
    data = bytes(pages * ps)
    # Small batches are quick and noisy: more repetitions.
    runs = max(repeat, min(50, 4096 // pages))
    ours, raw = [], []
    for _ in range(runs):
        m = task.mmap(pages * ps)
        try:
            t0 = time.perf_counter()
            task.write(m.addr, data)
            ours.append(time.perf_counter() - t0)
        finally:
            task.munmap(m.addr, m.length)
        raw.append(_raw_first_touch(data))
    us = 1e6 / pages
    return {"pages": pages, "us_per_page": statistics.median(ours) * us,
            "raw_us_per_page": statistics.median(raw) * us,
            "slowdown": statistics.median(o / r for o, r in zip(ours, raw))}


def scale_text(result: dict) -> str:
    lines = ["[scale] migration, mbind(MPOL_MF_MOVE) node 0 -> 1, us per page; baselines: "
             "numpy copy between the populated",
             "        segments (warm), and into fresh anonymous memory (cold)",
             f"  {'pages':>8} {'migrate':>10} {'warm copy':>10} {'x warm':>8} "
             f"{'cold copy':>10} {'x cold':>8}"]
    for r in result["migrate"]:
        lines.append(f"  {r['pages']:>8} {r['us_per_page']:>10.3f} "
                     f"{r['warm_copy_us_per_page']:>10.3f} {r['slowdown_vs_warm_copy']:>7.1f}x "
                     f"{r['cold_copy_us_per_page']:>10.3f} "
                     f"{r['us_per_page'] / r['cold_copy_us_per_page']:>7.1f}x")
    lines.append(f"  per-page cost growth (max/min): migrate {result['migrate_growth']:.2f} "
                 f"(target <= 1.25), warm copy {result['warm_copy_growth']:.2f}; migrate, "
                 f"largest size over smallest: {result['migrate_largest_over_smallest']:.2f}")
    lines.append("[scale] first-touch faults, one write into a fresh mapping, us per page; "
                 "baseline: the same write into fresh anonymous memory")
    lines.append(f"  {'pages':>8} {'fault':>10} {'raw':>10} {'slowdown':>9}")
    for r in result["fault"]:
        lines.append(f"  {r['pages']:>8} {r['us_per_page']:>10.3f} {r['raw_us_per_page']:>10.3f} "
                     f"{r['slowdown']:>8.1f}x")
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
    """Per-page cost against pages, log-log, both sweeps and their baselines, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    mig, fault = result["migrate"], result["fault"]
    x = [r["pages"] for r in mig]
    ax.plot(x, [r["us_per_page"] for r in mig], "o-", label="migrate (mbind MF_MOVE)")
    ax.plot(x, [r["warm_copy_us_per_page"] for r in mig], "o--", label="warm copy (numpy)")
    ax.plot(x, [r["cold_copy_us_per_page"] for r in mig], "o:",
            label="cold copy into fresh memory")
    x = [r["pages"] for r in fault]
    ax.plot(x, [r["us_per_page"] for r in fault], "s-", label="first-touch fault")
    ax.plot(x, [r["raw_us_per_page"] for r in fault], "s:",
            label="raw first write (fresh anonymous memory)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pages per call")
    ax.set_ylabel("µs per page")
    ax.set_title("numaemu: per-page cost against batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
