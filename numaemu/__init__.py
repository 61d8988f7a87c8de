"""numaemu: a NUMA machine made of real OS processes.

The model, in the words of the Linux kernel's memory manager:

* A **cluster** is one emulated machine.  ``Cluster(topology)`` starts it and
  ``with`` stops it.  Its **topology** (``Topology``) gives the nodes, the SLIT
  distance matrix, each node's frames and CPUs.
* A **node** is an OS process holding the node's **frames** (page-size slots)
  in one shared-memory segment in /dev/shm, the node's frame allocator, its
  numastat counters and its LRU state (package ``nodes``).
* The **coordinator** is an OS process playing the kernel's mm: tasks and their
  address spaces (VMAs, page tables), ``struct page`` state of every frame,
  memory policies, the page cache of shared objects, the fault handler and the
  syscalls (package ``coordinator``).
* A **task** (``Task``) is one emulated process, living in a client OS process:
  it maps memory (``mmap`` -> ``Mapping``), reads and writes it straight from
  the frames through its TLB, faults missing pages in through the coordinator,
  and calls ``set_mempolicy``, ``mbind``, ``get_mempolicy``, ``move_pages`` ...
  A **page** is a virtual page of a task; it is backed by a frame ``(node, pfn)``.

Lifecycle: build a ``Topology``, start a ``Cluster``, ``attach`` tasks (or
``spawn`` client processes, or run scripts with ``numaemu run`` that call
``numaemu.attach()``), experiment, stop.  Every process and segment goes away
with the cluster.
"""

from .cluster import ClientHandle, Cluster, attach
from .constants import (
    MAX_NUMNODES,
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_F_ADDR,
    MPOL_F_MEMS_ALLOWED,
    MPOL_F_NODE,
    MPOL_F_NUMA_BALANCING,
    MPOL_F_RELATIVE_NODES,
    MPOL_F_STATIC_NODES,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_MF_STRICT,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SIZE,
    GetFlag,
    Mode,
    ModeFlag,
    MoveFlag,
)
from .cpuset import Cpuset
from .errors import ClusterError, NumaError
from .nodelist import format_nodes, parse_cpus, parse_nodes
from .task import Mapping, Task
from .topology import Topology, TopologyError

__version__ = "0.1.0"

__all__ = [
    "MAX_NUMNODES", "MPOL_BIND", "MPOL_DEFAULT", "MPOL_F_ADDR", "MPOL_F_MEMS_ALLOWED",
    "MPOL_F_NODE", "MPOL_F_NUMA_BALANCING", "MPOL_F_RELATIVE_NODES", "MPOL_F_STATIC_NODES",
    "MPOL_INTERLEAVE", "MPOL_LOCAL", "MPOL_MF_MOVE", "MPOL_MF_MOVE_ALL", "MPOL_MF_STRICT",
    "MPOL_PREFERRED", "MPOL_PREFERRED_MANY", "MPOL_WEIGHTED_INTERLEAVE", "PAGE_SIZE",
    "ClientHandle", "Cluster", "ClusterError", "Cpuset", "GetFlag", "Mapping", "Mode", "ModeFlag",
    "MoveFlag", "NumaError", "Task", "Topology", "TopologyError", "attach", "format_nodes",
    "parse_cpus", "parse_nodes",
]
