"""Memory policies and their read-back, as get_mempolicy(2) reports them.

    numaemu up --nodes 4 --detach   # export NUMAEMU_ADDRESS=...
    python examples/policies.py
"""

import numaemu
from numaemu import (
    MPOL_BIND,
    MPOL_F_ADDR,
    MPOL_F_NODE,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    NumaError,
)

task = numaemu.attach(cpu=0)
last = task.topology.nodes[-1]
for mode, nodes in ((MPOL_BIND, [last]), (MPOL_PREFERRED, [last]),
                    (MPOL_PREFERRED_MANY, task.topology.nodes[1:])):
    task.set_mempolicy(mode, nodes)
    m = task.mmap(4 * task.page_size)
    task.write(m.addr, bytes(m.length))
    print(f"{numaemu.Mode(mode).name:<15} nodes={nodes}: read back {task.get_mempolicy()}, "
          f"pages on {task.move_pages(m.pages)}, first page via get_mempolicy: "
          f"{task.get_mempolicy(m.addr, MPOL_F_NODE | MPOL_F_ADDR)[0]}")
try:
    task.set_mempolicy(MPOL_BIND, [])
except NumaError as exc:
    print(f"MPOL_BIND with no nodes: {exc.errname}: {exc.strerror}")
task.close()
