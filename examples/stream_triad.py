"""STREAM triad through array views: a = b + s * c, with the arrays on chosen nodes.

    python examples/stream_triad.py [NODE]   # the arrays' node (default: the task's own)

Bulk reads and writes of whole views; the latency model's bandwidth term charges the
bytes, so a remote node shows in the virtual time per byte.
"""

import sys

import numpy as np

import numaemu

task = numaemu.attach()
node = int(sys.argv[1]) if len(sys.argv) > 1 else task.node
n = 64 * task.page_size // 8
arrays = []
for _ in range(3):
    m = task.mmap(n * 8)
    task.mbind(m.addr, m.length, numaemu.MPOL_BIND, [node])
    arrays.append(m.ndarray(np.float64))
a, b, c = arrays
b[:] = np.arange(n, dtype=np.float64)
c[:] = 2.0
scalar = 3.0
before = task.stats()
a[:] = np.asarray(b) + scalar * np.asarray(c)
after = task.stats()
moved = 3 * n * 8  # two arrays read, one written
ns = after["access_ns"] - before["access_ns"]
print(f"triad on node {node} from cpu {task.cpu} (node {task.node}): {moved >> 10} KiB, "
      f"{ns / moved:.3f} virtual ns per byte")
assert (np.asarray(a) == np.arange(n) + 6.0).all()
print("triad verified")
task.close()
