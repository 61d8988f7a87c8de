"""First-touch placement: a page lands on the node of the CPU that first writes it.

    numaemu up --detach            # then export NUMAEMU_ADDRESS=...
    python examples/first_touch.py
    numaemu run --cpunodebind=1 -- python examples/first_touch.py
"""

import numaemu

task = numaemu.attach()  # takes NUMAEMU_ADDRESS, and `numaemu run`'s binding and policy
m = task.mmap(16 * task.page_size)
task.write(m.addr, bytes(m.length))  # first touch of all 16 pages: one batched fault
print(f"task {task.pid} on cpu {task.cpu} (node {task.node})")
print("pages are on nodes:", task.move_pages(m.pages))
print(task.numa_maps(), end="")
task.close()
