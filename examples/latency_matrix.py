"""Local vs remote latency: the same pointer chase over memory of each node.

    numaemu up --detach            # then export NUMAEMU_ADDRESS=...
    python examples/latency_matrix.py
    numaemu run --cpunodebind=1 -- python examples/latency_matrix.py

Every read charges the model's cost to the task's virtual clock (``vtime_ns``); with
delay injection on, the task also busy-waits that cost times a dilation, so wall-clock
time shows the same ratios.  ``numaemu bench latency`` does this for every pair of nodes.
"""

import random
import time

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
    task.write(m.addr, bytes(m.length))  # fault all pages in at once
    # A random cycle through the pages: each holds the address of the next one.
    addrs = [m.page(p) + 8 * random.randrange(ps // 8) for p in random.sample(range(PAGES), PAGES)]
    for here, there in zip(addrs, addrs[1:] + addrs[:1]):
        task.write(here, there.to_bytes(8, "little"))
    addr = addrs[0]
    for _ in range(PAGES):  # warm up (and start the injection's deadline from now)
        addr = int.from_bytes(task.read(addr, 8), "little")
    v0, t0 = task.stats()["vtime_ns"], time.perf_counter_ns()
    for _ in range(STEPS):
        addr = int.from_bytes(task.read(addr, 8), "little")
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
