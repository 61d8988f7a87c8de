"""``numaemu demo``: start the built-in cluster and show where pages land under each policy."""

from __future__ import annotations

import time

from .cluster import Cluster
from .constants import Mode
from .topology import Topology
from .views import hardware_text, numastat_text

PAGES = 256


def _placement(task, mapping) -> dict[int, int]:
    status = task.move_pages(mapping.pages)
    out: dict[int, int] = {}
    for s in status:
        out[s] = out.get(s, 0) + 1
    return out


def _touch(task, mapping) -> None:
    """First touch of the whole mapping: one access, so one batched fault."""
    task.write(mapping.addr, bytes([1]) * mapping.length)


def run_demo(quick: bool = False) -> int:
    """Run the demo; returns the exit status."""
    pages = 32 if quick else PAGES
    topo = Topology.default()
    t0 = time.perf_counter()
    print("numaemu demo: starting the built-in cluster "
          f"({topo.num_nodes} nodes, {topo.frames_per_node[0] * topo.page_size >> 20} MiB and "
          f"{len(topo.cpus_of(0))} CPUs each)...", flush=True)
    with Cluster(topo) as cluster:
        print(f"  up in {time.perf_counter() - t0:.2f} s at {cluster.address}\n")
        print(hardware_text(topo, [cluster.free_frames()[n] for n in topo.nodes]))
        cpu_node1 = topo.cpus_of(1)[0]
        cases = [
            ("first touch from a CPU of node 0", 0, None, None, None),
            (f"first touch from CPU {cpu_node1} (node 1)", cpu_node1, None, None, None),
            ("set_mempolicy(MPOL_BIND, {1}) on node 0", 0, "task", Mode.BIND, [1]),
            ("mbind(MPOL_INTERLEAVE, {0,1})", 0, "vma", Mode.INTERLEAVE, [0, 1]),
            ("set_mempolicy(MPOL_PREFERRED, {1})", 0, "task", Mode.PREFERRED, [1]),
            ("mbind(MPOL_WEIGHTED_INTERLEAVE, {0,1})", 0, "vma", Mode.WEIGHTED_INTERLEAVE,
             [0, 1]),
        ]
        print(f"Placing {pages} pages ({pages * topo.page_size >> 10} KiB) per case:\n")
        header = f"  {'case':<42} {'cpu node':>8}  " + "  ".join(
            f"{'N' + str(n):>5}" for n in topo.nodes) + f"  {'local':>6}  {'vns/page':>8}"
        print(header)
        print("  " + "-" * (len(header) - 2))
        for label, cpu, scope, mode, nodes in cases:
            task = cluster.attach(cpu=cpu)
            m = task.mmap(pages * topo.page_size)
            if scope == "task":
                task.set_mempolicy(mode, nodes)
            elif scope == "vma":
                task.mbind(m.addr, m.length, mode, nodes)
            _touch(task, m)
            before = task.stats()
            for addr in m.pages:
                task.read(addr, 8)
            after = task.stats()
            where = _placement(task, m)
            local = where.get(task.node, 0) / pages
            vns = (after["vtime_ns"] - before["vtime_ns"]) / pages
            cols = "  ".join(f"{where.get(n, 0):>5}" for n in topo.nodes)
            print(f"  {label:<42} {task.node:>8}  {cols}  {local:>6.0%}  {vns:>8.1f}")
            if scope == "vma" and mode == Mode.INTERLEAVE:
                example = task.numa_maps().splitlines()[0]
            task.close()
        print("\nnuma_maps of the interleaved task:\n  " + example)
        shared = [cluster.attach(cpu=0), cluster.attach(cpu=cpu_node1)]
        a, b = (t.mmap(topo.page_size, shared="demo") for t in shared)
        shared[0].write(a.addr, b"written by a task on node 0")
        text = shared[1].read(b.addr, 27).decode()
        print(f"\nA shared object: the task on node 1 reads {text!r}")
        print(f"  and the page lives on node {shared[1].move_pages([b.addr])[0]} "
              f"(mapmax=2 in numa_maps: {'mapmax=2' in shared[1].numa_maps()})")
        for t in shared:
            t.close()
        print("\nnumastat:")
        print(numastat_text(cluster.numastat()))
        print("Remote pages cost more virtual time per access (vns/page): the latency model "
              "charges\nlocal 80 ns x distance/10. Page migration comes next.")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; cluster stopped, "
          "no process or segment left.")
    return 0
