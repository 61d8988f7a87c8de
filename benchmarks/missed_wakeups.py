"""Reproducer for the coordinator's missed socket wake-ups (docs/performance.md, "A loose
end"): three clients issue syscalls in a loop while a fourth moves 64 MiB back and forth;
prints how many requests the 20 ms safety tick of coordinator/zloop.py had to find.

    python benchmarks/missed_wakeups.py [SECONDS]

Typically a handful in 8 s on the 2-core development machine.
"""

import sys
import time

from numaemu import MPOL_BIND, MPOL_MF_MOVE, Cluster, Topology


def syscalls(task, seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        task.get_mempolicy()
        n += 1
    return n


def main(seconds: float) -> None:
    topo = Topology.symmetric(nodes=2, frames_per_node=40000, cpus_per_node=2)
    with Cluster(topo) as cluster:
        mover = cluster.attach(cpu=0, privileged=True)
        workers = [cluster.spawn(syscalls, seconds, cpu=c) for c in (1, 2, 3)]
        m = mover.mmap(16384 * mover.page_size)
        mover.write(m.addr, bytes(m.length))
        end, moves = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            mover.mbind(m.addr, m.length, MPOL_BIND, [moves % 2], MPOL_MF_MOVE)
            moves += 1
        calls = [w.join(60) for w in workers]
        stats = cluster.coordinator_stats()
        print(f"{sum(calls)} syscalls and {moves} 64 MiB moves in {seconds:g} s: "
              f"{stats['missed_wakeups']} missed wake-ups, worst loop stall "
              f"{stats['loop_stall_max_ms']:.0f} ms")
        mover.close()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 8.0)
