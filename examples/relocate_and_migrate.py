"""The page-migration document's scenario: the scheduler relocates a task to a distant
node, its memory becomes remote, and migrate_pages brings the pages next to it again.

    numaemu up --detach   # export NUMAEMU_ADDRESS=...
    python examples/relocate_and_migrate.py
"""

import numpy as np

import numaemu

cluster = numaemu.Cluster.connect()
topo = cluster.topology
near, far = topo.nodes_with_cpus[0], topo.nodes_with_cpus[-1]
task = cluster.attach(cpu=topo.cpus_of(near)[0], privileged=True)
m = task.mmap(256 * task.page_size)
a = m.ndarray(np.int64)
a[:] = 1  # first touch: the pages land on the task's node
one_per_page = np.arange(0, len(a), task.page_size // 8)  # an int64 at the start of each page


def cost_per_read() -> float:
    """Virtual ns per 8-byte read over the task's pages (the latency model's clock)."""
    before = task.stats()["vtime_ns"]
    a[one_per_page]  # one gather: an 8-byte read on every page, charged one by one
    return (task.stats()["vtime_ns"] - before) / len(m.pages)


print(f"on node {task.node}, pages on {set(task.move_pages(m.pages))}: "
      f"{cost_per_read():.1f} ns per read")
task.sched_setaffinity(topo.cpus_of(far))  # the scheduler moves the task
print(f"moved to node {task.node}, pages still on {set(task.move_pages(m.pages))}: "
      f"{cost_per_read():.1f} ns per read")
left = task.migrate_pages(task.pid, [near], [far])  # what numactl's migratepages does
refill = cost_per_read()  # the first touch of each moved page faults its translation in
print(f"migrate_pages -> {left} pages not moved; pages on {set(task.move_pages(m.pages))}: "
      f"{cost_per_read():.1f} ns per read (first pass {refill:.1f}: TLB refill faults)")
print(task.numa_maps(), end="")
cluster.stop()
