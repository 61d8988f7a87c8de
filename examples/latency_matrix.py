"""Local vs remote latency: the same pointer chase over memory of each node.

    numaemu up --detach            # then export NUMAEMU_ADDRESS=...
    python examples/latency_matrix.py
    numaemu run --cpunodebind=1 -- python examples/latency_matrix.py

Every read charges the model's cost to the task's virtual clock (``vtime_ns``); with
delay injection on, the task also busy-waits that cost times a dilation, so wall-clock
time shows the same ratios.  ``numaemu bench latency`` does this for every pair of nodes.
"""

import time

import numpy as np

import numaemu
from numaemu.latency import DEFAULT_DILATION

STEPS, PAGES = 2000, 64

task = numaemu.attach()
ps = task.page_size
task.inject_delays(DEFAULT_DILATION)
print(f"task {task.pid} on cpu {task.cpu} (node {task.node}): {STEPS} dependent 8-byte "
      f"reads per memory node, delays x{DEFAULT_DILATION:g}")
rows = []
for node in task.topology.nodes_with_memory:
    m = task.mmap(PAGES * ps)
    task.mbind(m.addr, m.length, numaemu.MPOL_BIND, [node])
    a = m.ndarray(np.int64)  # the mapping as an array of int64
    a[:] = 0  # fault all pages in at once
    # A random cycle through the pages: one slot per page holds the index of the next one.
    rng = np.random.default_rng()
    slots = rng.permutation(PAGES) * (ps // 8) + rng.integers(0, ps // 8, PAGES)
    a[slots] = np.roll(slots, -1)  # one scatter writes the whole cycle
    i = int(slots[0])
    for _ in range(PAGES):  # warm up (and start the injection's deadline from now)
        i = int(a[i])
    v0, t0 = task.stats()["vtime_ns"], time.perf_counter_ns()
    for _ in range(STEPS):
        i = int(a[i])  # a dependent 8-byte read: the next index is in this one
    wall = (time.perf_counter_ns() - t0) / STEPS / DEFAULT_DILATION
    rows.append((node, (task.stats()["vtime_ns"] - v0) / STEPS, wall))
    task.munmap(m.addr, m.length)

local = next((r for r in rows if r[0] == task.node), min(rows, key=lambda r: r[1]))
print("memory node   virtual ns   wall ns / dilation   virtual ratio   wall ratio")
for node, virtual, wall in rows:
    name = f"{node} (local)" if node == task.node else str(node)
    print(f"{name:>11} {virtual:>12.2f} {wall:>20.2f} {virtual / local[1]:>15.2f} "
          f"{wall / local[2]:>12.2f}")
task.close()
