"""Linux NUMA constants, with the same numeric values as ``numaif.h``."""

from __future__ import annotations

from enum import IntEnum, IntFlag

PAGE_SIZE = 4096
#: Highest node number + 1 that a nodemask may name (the kernel's MAX_NUMNODES).
MAX_NUMNODES = 1024
#: Pages one fault or move_pages request may carry.  The client library splits bigger
#: calls (as the kernel's move_pages works in chunks); the coordinator refuses bigger
#: requests with EINVAL, so that no request can hold its event loop for long.
MAX_REQUEST_PAGES = 1 << 16
#: Most CPUs a CPU set may name (glibc's ``CPU_SETSIZE``).
CPU_SETSIZE = 1024
#: End of the user address space (x86-64, 4-level page tables): mmap beyond it is ENOMEM.
TASK_SIZE = 1 << 47
#: Longest file name (one path component) and longest path, in bytes (``limits.h``).
NAME_MAX = 255
PATH_MAX = 4096


class Mode(IntEnum):
    """Memory policy modes (``MPOL_*``)."""

    DEFAULT = 0
    PREFERRED = 1
    BIND = 2
    INTERLEAVE = 3
    LOCAL = 4
    PREFERRED_MANY = 5
    WEIGHTED_INTERLEAVE = 6


MPOL_MAX = 7


class ModeFlag(IntFlag):
    """Flags ORed into a policy mode."""

    NUMA_BALANCING = 1 << 13
    RELATIVE_NODES = 1 << 14
    STATIC_NODES = 1 << 15


MPOL_MODE_FLAGS = int(ModeFlag.NUMA_BALANCING | ModeFlag.RELATIVE_NODES | ModeFlag.STATIC_NODES)


class GetFlag(IntFlag):
    """``get_mempolicy`` flags."""

    NODE = 1
    ADDR = 2
    MEMS_ALLOWED = 4


class MoveFlag(IntFlag):
    """``mbind`` / ``move_pages`` flags."""

    STRICT = 1
    MOVE = 2
    MOVE_ALL = 4


MPOL_DEFAULT = Mode.DEFAULT
MPOL_PREFERRED = Mode.PREFERRED
MPOL_BIND = Mode.BIND
MPOL_INTERLEAVE = Mode.INTERLEAVE
MPOL_LOCAL = Mode.LOCAL
MPOL_PREFERRED_MANY = Mode.PREFERRED_MANY
MPOL_WEIGHTED_INTERLEAVE = Mode.WEIGHTED_INTERLEAVE

MPOL_F_NUMA_BALANCING = ModeFlag.NUMA_BALANCING
MPOL_F_RELATIVE_NODES = ModeFlag.RELATIVE_NODES
MPOL_F_STATIC_NODES = ModeFlag.STATIC_NODES

MPOL_F_NODE = GetFlag.NODE
MPOL_F_ADDR = GetFlag.ADDR
MPOL_F_MEMS_ALLOWED = GetFlag.MEMS_ALLOWED

MPOL_MF_STRICT = MoveFlag.STRICT
MPOL_MF_MOVE = MoveFlag.MOVE
MPOL_MF_MOVE_ALL = MoveFlag.MOVE_ALL
