"""Interleaving: page at virtual page number v goes to the (v mod |S|)-th node of S."""

import numaemu
from numaemu import MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE

task = numaemu.attach()
nodes = list(task.topology.nodes_with_memory)
m = task.mmap(4 * len(nodes) * task.page_size)
task.mbind(m.addr, m.length, MPOL_INTERLEAVE, nodes)
task.write(m.addr, bytes(m.length))
print("interleave:", task.move_pages(m.pages))

w = task.mmap(8 * task.page_size)
task.mbind(w.addr, w.length, MPOL_WEIGHTED_INTERLEAVE, nodes)  # weights from the topology
task.write(w.addr, bytes(w.length))
print("weighted interleave:", task.move_pages(w.pages))
print(task.numa_maps(), end="")
task.close()
