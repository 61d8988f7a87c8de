"""``numaemu demo``: the page-migration document's story, on the built-in cluster.

A workload task allocates and works on its memory from a CPU of node 0 (local,
fast).  The scheduler moves it to a CPU of node 1 (``sched_setaffinity``): its
memory is now remote and every access is slower.  ``migrate_pages`` moves its
pages to node 1 while it keeps running (its accesses meet migration entries and
wait on page locks), and its accesses are local and fast again.

The workload runs in its own client process with delay injection on, so its
wall-clock latency shows the model too; it records one sample per window of
accesses.  The demo prints a table per phase and writes a PNG plot of latency
over time with the migration marked.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .cluster import Cluster
from .latency import DEFAULT_DILATION
from .topology import Topology

PHASES = ("local", "moved to node 1", "migrating", "local again")
CTL_COMMAND, CTL_READY = 0, 1  # bytes of the control page
RUN, MOVE, STOP = 0, 1, 2


def workload(task, ctl_name: str, pages: int, window: int, cpus_node1: list[int]):
    """The demo's workload (its own client process): random 8-byte reads over its memory,
    ``window`` of them at a time as one gather through an array view.

    Returns samples (wall time, accesses, virtual ns, wall ns, local accesses, waits) per
    window; moves itself to node 1 when the control page says so.
    """
    ctl = task.mmap(task.page_size, shared=ctl_name).ndarray(np.uint8)
    data = task.mmap(pages * task.page_size).ndarray(np.int64)
    data[:] = np.arange(len(data))  # first touch: node 0
    ctl[CTL_READY] = 1
    where = np.random.default_rng(1).integers(0, len(data), window)
    samples, moved = [], False
    before = task.stats()
    while True:
        command = ctl[CTL_COMMAND]
        if command == STOP:
            break
        if command == MOVE and not moved:
            task.sched_setaffinity(cpus_node1)  # the scheduler moves the task
            moved = True
        t0 = time.perf_counter_ns()
        data[where]
        wall = time.perf_counter_ns() - t0
        after = task.stats()
        local = after["local_accesses"] - before["local_accesses"]
        total = local + after["remote_accesses"] - before["remote_accesses"]
        samples.append((time.time(), total, after["vtime_ns"] - before["vtime_ns"], wall,
                        local, after["migration_waits"] - before["migration_waits"]))
        before = after
    return samples


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    where: str = ""


def _placement(driver, pid: int) -> str:
    counts: dict[int, int] = {}
    for line in driver.numa_maps(pid).splitlines():
        for field in line.split()[2:]:
            if field.startswith("N") and "=" in field:
                node, n = field[1:].split("=")
                counts[int(node)] = counts.get(int(node), 0) + int(n)
    return " ".join(f"N{n}={c}" for n, c in sorted(counts.items()))


def run_demo(quick: bool = False, plot: str | None = "numaemu-demo.png",
             dilation: float = DEFAULT_DILATION) -> int:
    """Run the demo; returns the exit status."""
    pages = 1024 if quick else 4096
    phase_s = 0.6 if quick else 2.0
    window = 200
    topo = Topology.default()
    t_start = time.perf_counter()
    print(f"numaemu demo: a {topo.num_nodes}-node machine (distance "
          f"{topo.distances[0][1]}), a workload of {pages * topo.page_size >> 20} MiB "
          f"reading at random, delay injection x{dilation:g}", flush=True)
    with Cluster(topo, inject_delays=dilation) as cluster:
        print(f"  cluster up in {time.perf_counter() - t_start:.2f} s", flush=True)
        driver = cluster.attach(cpu=topo.cpus_of(0)[-1], privileged=True, inject=None)
        ctl = driver.mmap(topo.page_size, shared="demo-ctl").ndarray(np.uint8)
        handle = cluster.spawn(workload, "demo-ctl", pages, window, list(topo.cpus_of(1)),
                               cpu=topo.cpus_of(0)[0])
        while ctl[CTL_READY] != 1:
            time.sleep(0.01)
        pid = handle.pid
        print(f"  workload task {pid} on CPU {topo.cpus_of(0)[0]} (node 0) touched its "
              f"pages: {_placement(driver, pid)}", flush=True)
        phases = [Phase(PHASES[0], time.time())]
        time.sleep(phase_s)
        phases[-1].where = _placement(driver, pid)

        print(f"  the scheduler moves task {pid} to node 1 (sched_setaffinity)", flush=True)
        ctl[CTL_COMMAND] = MOVE
        phases[-1].end = time.time()
        phases.append(Phase(PHASES[1], time.time()))
        time.sleep(phase_s)
        phases[-1].where = _placement(driver, pid)

        print(f"  migrate_pages({pid}, {{0}}, {{1}}) while it runs...", end=" ", flush=True)
        phases[-1].end = time.time()
        phases.append(Phase(PHASES[2], time.time()))
        t0 = time.perf_counter()
        left = driver.migrate_pages(pid, [0], [1])
        took = time.perf_counter() - t0
        phases[-1].end = time.time()
        phases[-1].where = _placement(driver, pid)
        print(f"done in {took * 1e3:.0f} ms ({left} pages not moved)", flush=True)
        phases.append(Phase(PHASES[3], time.time()))
        time.sleep(phase_s)
        phases[-1].where = _placement(driver, pid)
        phases[-1].end = time.time()
        ctl[CTL_COMMAND] = STOP
        samples = handle.join(60)
        vmstat = cluster.vmstat()
        driver.shm_unlink("demo-ctl")
    print()
    _print_table(phases, samples, dilation)
    print(f"\n  pages migrated: {vmstat['pgmigrate_success']}, failed: "
          f"{vmstat['pgmigrate_fail']}")
    if plot:
        path = _plot(phases, samples, dilation, plot)
        print(f"  latency over time: {path}")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s; the cluster stopped and "
          "left no process or segment behind.")
    return 0


def _in(phase: Phase, sample) -> bool:
    return phase.start <= sample[0] <= (phase.end or float("inf"))


def _print_table(phases: list[Phase], samples, dilation: float) -> None:
    print("  Per phase: where the workload's pages are, its share of local accesses, and the\n"
          "  mean cost of an 8-byte read: virtual (the model, including faults and waits on\n"
          "  migrating pages) and wall clock (with delay injection, divided by the dilation).\n")
    print(f"  {'phase':<16} {'pages':<16} {'local':>6} {'virtual ns':>11} "
          f"{'wall ns':>9} {'waits':>6}")
    print(f"  {'':<16} {'':<16} {'':>6} {'per access':>11} {'/ ' + format(dilation, 'g'):>9}")
    for phase in phases:
        mine = [s for s in samples if _in(phase, s)]
        n = sum(s[1] for s in mine) or 1
        vns = sum(s[2] for s in mine) / n
        wall = sum(s[3] for s in mine) / n / dilation
        local = sum(s[4] for s in mine) / n
        waits = sum(s[5] for s in mine)
        print(f"  {phase.name:<16} {phase.where:<16} {local:>6.0%} {vns:>11.1f} "
              f"{wall:>9.1f} {waits:>6}")


def _plot(phases: list[Phase], samples, dilation: float, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = samples[0][0] if samples else 0.0
    xs = [s[0] - t0 for s in samples]
    vns = [s[2] / max(s[1], 1) for s in samples]
    wall = [s[3] / max(s[1], 1) / dilation for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(xs, wall, ".", markersize=3, alpha=0.6, label=f"wall clock / {dilation:g}")
    ax.plot(xs, vns, "-", linewidth=1.5, label="virtual (model)")
    for phase in phases:
        if phase.name == "migrating":
            ax.axvspan(phase.start - t0, max(phase.end - t0, phase.start - t0 + 0.02),
                       color="orange", alpha=0.3, label="migrate_pages")
        elif phase.name == "moved to node 1":
            ax.axvline(phase.start - t0, color="grey", linestyle="--",
                       label="sched_setaffinity to node 1")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("ns per 8-byte access")
    ax.set_title("A task's memory latency: local, remote after a CPU move, migrated back to "
                 "local")
    # Windows with a fault or a wait on a migrating page cost far more; clip the axis at a
    # few times the remote latency and show those windows as markers at the top.
    typical = sorted(vns)[len(vns) // 2] if vns else 1.0
    top = max(3 * max((v for v in vns if v < 10 * typical), default=typical), 1.0)
    clipped = [(x, top * 0.97) for x, w, v in zip(xs, wall, vns) if max(w, v) > top]
    if clipped:
        ax.plot(*zip(*clipped), "^", color="red", markersize=6,
                label="windows with faults / migration waits (clipped)")
    ax.set_ylim(0, top)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = os.path.abspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
