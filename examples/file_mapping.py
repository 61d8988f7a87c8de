"""A real file mapped into a task: reads fault pages in from the file, msync writes back.

    numaemu up --detach   # export NUMAEMU_ADDRESS=...
    python examples/file_mapping.py /tmp/some-file
"""

import os
import sys

import numaemu
from numaemu import MPOL_PREFERRED

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/numaemu-example.bin"
if not os.path.exists(path):
    with open(path, "wb") as f:
        f.write(b"." * 3 * 4096)

task = numaemu.attach()
task.set_mempolicy(MPOL_PREFERRED, [task.topology.nodes[-1]])  # page cache follows it
size = os.path.getsize(path)
m = task.mmap(size, file=path)
print("first bytes:", task.read(m.addr, 16))
task.write(m.addr, b"numaemu was here")
print("dirty pages written back:", task.msync(m.addr, m.length))
print(task.numa_maps(), end="")
with open(path, "rb") as f:
    print("file now starts with:", f.read(16))
task.close()
