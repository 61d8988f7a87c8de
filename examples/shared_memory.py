"""Two client processes share a named object: one writes, the other reads.

    numaemu up --detach   # export NUMAEMU_ADDRESS=...
    python examples/shared_memory.py
"""

import numaemu

NAME = "example-shared"


def writer(task, text):
    """Runs in its own client process, on a CPU of the last node."""
    m = task.mmap(task.page_size, shared=NAME)
    task.write(m.addr, text.encode())
    return task.move_pages([m.addr])[0]


if __name__ == "__main__":
    cluster = numaemu.Cluster.connect()  # the running cluster ($NUMAEMU_ADDRESS)
    reader = cluster.attach(cpu=0)
    m = reader.mmap(reader.page_size, shared=NAME)
    last_cpu = cluster.topology.cpus[-1]
    node = cluster.spawn(writer, "hello from another process", cpu=last_cpu).join(60)
    print(f"written by a task on cpu {last_cpu}; the page is on node {node}")
    print("read back:", reader.read(m.addr, 26).decode())
    print(reader.numa_maps(), end="")
    reader.shm_unlink(NAME)
    cluster.stop()  # closes this handle's tasks; the cluster keeps running
