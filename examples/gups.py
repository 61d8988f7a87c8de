"""GUPS-style random updates through an array view: table[idx] ^= value, in batches.

    python examples/gups.py [UPDATES]      # NUMAEMU_ADDRESS set, or under `numaemu run`

The table is interleaved over every node, so most updates are remote from any CPU; the
latency model charges each one, and the result is checked against plain numpy.
"""

import sys

import numpy as np

import numaemu

updates = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
task = numaemu.attach()
m = task.mmap(256 * task.page_size)
task.mbind(m.addr, m.length, numaemu.MPOL_INTERLEAVE, range(task.topology.num_nodes))
table = m.ndarray(np.uint64)
table[:] = np.arange(len(table), dtype=np.uint64)
check = np.arange(len(table), dtype=np.uint64)
rng = np.random.default_rng(1)
before = task.stats()
for _ in range(updates // 1024):
    idx = rng.integers(0, len(table), 1024)
    value = rng.integers(0, 2**63, 1024, dtype=np.uint64)
    table[idx] ^= value  # one gather and one scatter per batch, not per element
    check[idx] ^= value  # the same semantics as the view: repeated indices update once
after = task.stats()
local = after["local_accesses"] - before["local_accesses"]
remote = after["remote_accesses"] - before["remote_accesses"]
ns = after["access_ns"] - before["access_ns"]
print(f"{updates} updates: {local} local and {remote} remote accesses, "
      f"{ns / (local + remote):.1f} virtual ns per access")
assert (np.asarray(table) == check).all()
print("GUPS verified")
task.close()
