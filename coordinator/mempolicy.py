"""Memory policies: the emulated ``mm/mempolicy.c``.

Pure functions and frozen values, no I/O and no processes. The coordinator uses them to

* validate and build a policy for ``set_mempolicy`` and ``mbind`` (:func:`new_policy`,
  :func:`check_mbind_flags`, and the early steps :func:`sanitize_mode_flags`,
  :func:`read_nodes`, :func:`get_nodes` for callers that interleave their own checks),
* answer ``get_mempolicy`` (:func:`validate_get_flags`, :func:`get_policy_readback`,
  :func:`next_interleave_node`),
* print the policy column of ``numa_maps`` (:func:`policy_text`),
* decide which node supplies each page of a fault (:func:`plan_allocation`) and how the
  numastat counters move for it (:meth:`AllocPlan.numastat_deltas`).

Words as in the kernel: the *node set* is the set of nodes the caller may allocate from that
also have memory (cpuset ``mems_allowed`` intersected with ``N_MEMORY``); the *user nodes* are
the nodes the caller passed; the *effective nodes* are what the policy really uses. "No policy"
(``MPOL_DEFAULT``) is ``None`` everywhere, never a :class:`MemPolicy`.
"""

from __future__ import annotations

import errno
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from numbers import Integral

import numpy as np

from numaemu import arrayops
from numaemu.constants import (
    MAX_NUMNODES,
    MPOL_MAX,
    MPOL_MODE_FLAGS,
    PAGE_SIZE,
    GetFlag,
    Mode,
    ModeFlag,
    MoveFlag,
)
from numaemu.errors import NumaError
from numaemu.nodelist import format_nodes

__all__ = [
    "AllocPlan",
    "MemPolicy",
    "check_mbind_flags",
    "get_nodes",
    "get_policy_readback",
    "interleave_nodes",
    "new_policy",
    "next_interleave_node",
    "plan_allocation",
    "policy_text",
    "read_nodes",
    "sanitize_mode_flags",
    "validate_get_flags",
]

_STATIC = int(ModeFlag.STATIC_NODES)
_RELATIVE = int(ModeFlag.RELATIVE_NODES)
_BALANCING = int(ModeFlag.NUMA_BALANCING)
# With either of these the kernel keeps the caller's mask (mpol_store_user_nodemask).
_USER_MASK_FLAGS = _STATIC | _RELATIVE
_MBIND_VALID_FLAGS = int(MoveFlag.STRICT | MoveFlag.MOVE | MoveFlag.MOVE_ALL)
_GET_VALID_FLAGS = int(GetFlag.NODE | GetFlag.ADDR | GetFlag.MEMS_ALLOWED)
_INTERLEAVE_MODES = frozenset({Mode.INTERLEAVE, Mode.WEIGHTED_INTERLEAVE})

# The names numa_maps prints (the kernel's policy_modes[] table).
_MODE_TEXT = {
    Mode.DEFAULT: "default",
    Mode.PREFERRED: "prefer",
    Mode.BIND: "bind",
    Mode.INTERLEAVE: "interleave",
    Mode.LOCAL: "local",
    Mode.PREFERRED_MANY: "prefer (many)",
    Mode.WEIGHTED_INTERLEAVE: "weighted interleave",
}


@dataclass(frozen=True)
class MemPolicy:
    """A task or VMA memory policy (never ``MPOL_DEFAULT``: no policy is ``None``).

    ``nodes`` are the effective nodes, ascending (one node for PREFERRED, none for LOCAL);
    ``flags`` the STATIC/RELATIVE/BALANCING bits; ``user_nodes`` the caller's own nodes when
    STATIC or RELATIVE is set (what get_mempolicy reports back), otherwise empty, so that two
    policies compare equal exactly when the kernel's ``mpol_equal`` says they are.
    """

    mode: Mode
    nodes: tuple[int, ...]
    flags: int = 0
    user_nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode == Mode.DEFAULT:
            raise ValueError("MPOL_DEFAULT is represented by None, not by a MemPolicy")

    @property
    def is_interleave(self) -> bool:
        """True for INTERLEAVE and WEIGHTED_INTERLEAVE."""
        return self.mode in _INTERLEAVE_MODES


# ---------------------------------------------------------------------------------------------
# Building a policy: set_mempolicy and mbind
# ---------------------------------------------------------------------------------------------


def _call(for_mbind: bool) -> str:
    return "mbind" if for_mbind else "set_mempolicy"


def _mode_name(mode: int) -> str:
    return f"MPOL_{Mode(mode).name}"


def _as_int(value: object, what: str, call: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise NumaError(errno.EINVAL, f"{call}: {what} {value!r} is not an integer") from None


def sanitize_mode_flags(mode: int, *, for_mbind: bool = False) -> tuple[Mode, int]:
    """Split ``mode | mode_flags`` into the mode and its flags; EINVAL if the pair is invalid."""
    call = _call(for_mbind)
    mode = _as_int(mode, "mode", call)
    flags = mode & MPOL_MODE_FLAGS
    base = mode & ~MPOL_MODE_FLAGS
    # sanitize_mpol_flags compares the mode as unsigned, so negative modes (e.g. -1) fail too.
    if not 0 <= base < MPOL_MAX:
        raise NumaError(errno.EINVAL, f"{call}: unknown mode {mode} (modes are 0..{MPOL_MAX - 1})")
    if flags & _STATIC and flags & _RELATIVE:
        raise NumaError(
            errno.EINVAL,
            f"{call}: MPOL_F_STATIC_NODES and MPOL_F_RELATIVE_NODES cannot be used together",
        )
    # Recent kernels accept NUMA balancing for BIND and PREFERRED_MANY only.
    if flags & _BALANCING and base not in (Mode.BIND, Mode.PREFERRED_MANY):
        raise NumaError(
            errno.EINVAL,
            f"{call}: MPOL_F_NUMA_BALANCING needs MPOL_BIND or MPOL_PREFERRED_MANY,"
            f" not {_mode_name(base)}",
        )
    return Mode(base), flags


def read_nodes(nodes: Iterable[int] | None, *, for_mbind: bool = False) -> tuple[int, ...]:
    """Read the caller's nodes into sorted unique ids (the kernel's nodemask copy-in).

    ``None`` is the empty set. Something that is not an iterable of integers is EFAULT (our
    stand-in for an unreadable nodemask pointer); a node outside ``0..MAX_NUMNODES-1`` is EINVAL.
    """
    call = _call(for_mbind)
    if nodes is None:
        return ()
    # A str is the client's marker for an object it could not read; a map is no list.
    if isinstance(nodes, (str, bytes, Mapping)):
        raise NumaError(errno.EFAULT, f"{call}: the node list cannot be read")
    try:  # one entry more than a nodemask has bits is enough to tell (also if endless)
        items = list(islice(nodes, MAX_NUMNODES + 1))
    except TypeError:
        raise NumaError(errno.EFAULT, f"{call}: cannot read the node list {nodes!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise NumaError(errno.EFAULT, f"{call}: node list holds {item!r}, not a node number")
    if len(items) > MAX_NUMNODES:
        raise NumaError(errno.EINVAL, f"{call}: more than {MAX_NUMNODES} nodes (MAX_NUMNODES)")
    ids = sorted({int(item) for item in items})
    # Bits at or above MAX_NUMNODES must be clear (get_nodes); a negative id cannot be a bit.
    for n in ids:
        if not 0 <= n < MAX_NUMNODES:
            raise NumaError(
                errno.EINVAL, f"{call}: node {n} is outside 0..{MAX_NUMNODES - 1} (MAX_NUMNODES)"
            )
    return tuple(ids)


def get_nodes(mask: int | None, maxnode: int, *, for_mbind: bool = False) -> tuple[int, ...]:
    """Decode a C-style nodemask bitmap as the kernel reads it, ``maxnode`` quirks included.

    For callers that mimic the raw syscall arguments: only bits ``0..maxnode-2`` are read,
    ``None`` or ``maxnode == 1`` is the empty set, and ``maxnode`` is an unsigned long.
    """
    call = _call(for_mbind)
    # The kernel decrements maxnode first, as an unsigned long: 0 wraps to ULONG_MAX.
    bits = (_as_int(maxnode, "maxnode", call) - 1) % (1 << 64)
    if mask is None or bits == 0:
        return ()
    if bits > PAGE_SIZE * 8:
        raise NumaError(errno.EINVAL, f"{call}: maxnode {maxnode} exceeds {PAGE_SIZE * 8 + 1}")
    if isinstance(mask, bool) or not isinstance(mask, Integral):
        raise NumaError(errno.EFAULT, f"{call}: cannot read the nodemask {mask!r}")
    # Only bits below maxnode-1 exist for the kernel; Python's infinite two's complement gives
    # negative masks the same all-ones high words a C array of -1 longs would have.
    word = int(mask) & ((1 << bits) - 1)
    if word >> MAX_NUMNODES:
        raise NumaError(
            errno.EINVAL, f"{call}: nodemask sets a bit at or above MAX_NUMNODES ({MAX_NUMNODES})"
        )
    return tuple(n for n in range(min(bits, MAX_NUMNODES)) if word >> n & 1)


def _relative_nodes(user: Sequence[int], allowed: Sequence[int]) -> tuple[int, ...]:
    # MPOL_F_RELATIVE_NODES (mpol_relative_nodemask): fold the user bits modulo the size of the
    # node set, then map bit k onto the k-th lowest node of the node set.
    if not allowed:
        return ()
    width = len(allowed)
    return tuple(sorted({allowed[n % width] for n in user}))


def new_policy(
    mode: int,
    nodes: Iterable[int] | None,
    *,
    node_set: Iterable[int],
    for_mbind: bool = False,
) -> MemPolicy | None:
    """Validate ``mode`` and ``nodes`` and build the policy, or ``None`` for MPOL_DEFAULT.

    ``node_set`` is the nodes that exist, are allowed and have memory. Checks run in the
    kernel's order: mode and flags, the nodemask copy, mode versus mask, then the node set.
    ``for_mbind`` only changes which call the error messages name.
    """
    call = _call(for_mbind)
    base, flags = sanitize_mode_flags(mode, for_mbind=for_mbind)
    user = read_nodes(nodes, for_mbind=for_mbind)

    # Mode versus mask (mpol_new).
    if base == Mode.DEFAULT:
        if user:
            raise NumaError(errno.EINVAL, f"{call}: MPOL_DEFAULT takes no nodes")
        return None
    if base == Mode.PREFERRED and not user:
        # An empty preferred set means local allocation, which has no mask to be static or
        # relative about.
        if flags & _USER_MASK_FLAGS:
            raise NumaError(
                errno.EINVAL,
                f"{call}: MPOL_PREFERRED without nodes (local allocation) cannot take"
                " MPOL_F_STATIC_NODES or MPOL_F_RELATIVE_NODES",
            )
        base = Mode.LOCAL
    elif base == Mode.LOCAL:
        if user:
            raise NumaError(errno.EINVAL, f"{call}: MPOL_LOCAL takes no nodes")
        if flags & _USER_MASK_FLAGS:
            raise NumaError(
                errno.EINVAL,
                f"{call}: MPOL_LOCAL cannot take MPOL_F_STATIC_NODES or MPOL_F_RELATIVE_NODES",
            )
    elif not user:
        raise NumaError(errno.EINVAL, f"{call}: {_mode_name(base)} needs at least one node")
    if base == Mode.LOCAL:
        # Local allocation is never remapped against the node set (mpol_set_nodemask).
        return MemPolicy(Mode.LOCAL, (), flags, ())

    # Intersection with the node set (mpol_set_nodemask): other bits are dropped silently.
    allowed = sorted({int(n) for n in node_set})
    if flags & _RELATIVE:
        effective = _relative_nodes(user, allowed)
    else:
        allowed_set = set(allowed)
        effective = tuple(n for n in user if n in allowed_set)
    if not effective:
        raise NumaError(
            errno.EINVAL,
            f"{call}: none of nodes {format_nodes(user)} is an allowed node with memory"
            f" (allowed: {format_nodes(allowed) or 'none'})",
        )
    if base == Mode.PREFERRED:
        # mpol_new_preferred keeps only the first node of the mask.
        effective = effective[:1]
    return MemPolicy(base, effective, flags, user if flags & _USER_MASK_FLAGS else ())


def check_mbind_flags(flags: int) -> None:
    """EINVAL unless ``flags`` is a combination of MPOL_MF_STRICT, MOVE and MOVE_ALL."""
    value = _as_int(flags, "flags", "mbind")
    # A negative value is all bits set for the kernel's unsigned flags, so it fails here too.
    if value < 0 or value & ~_MBIND_VALID_FLAGS:
        raise NumaError(
            errno.EINVAL,
            f"mbind: flags {value:#x} hold bits other than MPOL_MF_STRICT|MOVE|MOVE_ALL",
        )


# ---------------------------------------------------------------------------------------------
# Reading a policy back: get_mempolicy and numa_maps
# ---------------------------------------------------------------------------------------------


def get_policy_readback(policy: MemPolicy | None) -> tuple[int, tuple[int, ...]]:
    """What get_mempolicy reports for ``policy``: ``(mode | mode_flags, nodes)``."""
    if policy is None:
        return int(Mode.DEFAULT), ()
    mode = int(policy.mode) | (policy.flags & MPOL_MODE_FLAGS)
    # With STATIC or RELATIVE the caller gets its own mask back, not the effective one.
    nodes = policy.user_nodes if policy.flags & _USER_MASK_FLAGS else policy.nodes
    return mode, nodes


def validate_get_flags(flags: int, addr_given: bool, policy_is_interleave: bool) -> None:
    """Check get_mempolicy's ``flags`` (and whether an address came with them); EINVAL if bad.

    ``policy_is_interleave`` says whether the task policy is (weighted) interleave, which
    MPOL_F_NODE without MPOL_F_ADDR needs.
    """
    value = _as_int(flags, "flags", "get_mempolicy")
    if value < 0 or value & ~_GET_VALID_FLAGS:
        raise NumaError(
            errno.EINVAL,
            f"get_mempolicy: flags {value:#x} hold bits other than"
            " MPOL_F_NODE|MPOL_F_ADDR|MPOL_F_MEMS_ALLOWED",
        )
    if value & GetFlag.MEMS_ALLOWED:
        if value & (GetFlag.NODE | GetFlag.ADDR):
            raise NumaError(
                errno.EINVAL,
                "get_mempolicy: MPOL_F_MEMS_ALLOWED cannot be combined with"
                " MPOL_F_NODE or MPOL_F_ADDR",
            )
        # The kernel answers MEMS_ALLOWED before it ever looks at addr.
        return
    if addr_given and not value & GetFlag.ADDR:
        raise NumaError(errno.EINVAL, "get_mempolicy: an address needs MPOL_F_ADDR")
    if value & GetFlag.NODE and not value & GetFlag.ADDR and not policy_is_interleave:
        raise NumaError(
            errno.EINVAL,
            "get_mempolicy: MPOL_F_NODE without MPOL_F_ADDR needs an interleave task policy",
        )


def policy_text(policy: MemPolicy | None) -> str:
    """The policy as numa_maps prints it, e.g. ``bind=static:0-1`` or ``prefer (many):0,2``."""
    if policy is None:
        return _MODE_TEXT[Mode.DEFAULT]
    text = _MODE_TEXT[policy.mode]
    flags = policy.flags & MPOL_MODE_FLAGS
    if flags:
        # STATIC and RELATIVE exclude each other; BALANCING is appended after a '|'.
        names = []
        if flags & _STATIC:
            names.append("static")
        elif flags & _RELATIVE:
            names.append("relative")
        if flags & _BALANCING:
            names.append("balancing")
        text += "=" + "|".join(names)
    # numa_maps shows the effective nodes, and no colon at all when there are none.
    if policy.nodes:
        text += ":" + format_nodes(policy.nodes)
    return text


# ---------------------------------------------------------------------------------------------
# Placement: which node supplies each new page
# ---------------------------------------------------------------------------------------------


def _node_weights(nodes: Sequence[int], weights: Sequence[int] | None) -> np.ndarray:
    # Weighted interleave: an unset weight, or a weight of 0, counts as 1.
    out = np.ones(len(nodes), dtype=np.int64)
    if weights is not None:
        for i, n in enumerate(nodes):
            if n < len(weights):
                out[i] = max(int(weights[n]), 1)
    return out


def interleave_nodes(
    policy: MemPolicy, ilx: np.ndarray, weights: Sequence[int] | None
) -> np.ndarray:
    """The interleave target node (int16) of each interleave index in ``ilx``.

    ``weights[n]`` is node n's weighted-interleave weight; plain INTERLEAVE ignores it.
    """
    if policy is None or not policy.is_interleave:
        raise ValueError(f"interleave_nodes needs an interleave policy, not {policy!r}")
    nodes = np.asarray(policy.nodes, dtype=np.int64)
    ilx = np.asarray(ilx, dtype=np.int64)
    if policy.mode == Mode.INTERLEAVE:
        # Plain interleave: the (ilx mod |S|)-th lowest node of S.
        index = np.mod(ilx, len(nodes))
    else:
        # Weighted: t = ilx mod (sum of weights), then walk S upward spending each node's
        # weight; a sorted search over the running totals does the walk for every page at once.
        totals = np.cumsum(_node_weights(policy.nodes, weights))
        index = np.searchsorted(totals, np.mod(ilx, totals[-1]), side="right")
    return nodes[index].astype(np.int16)


def next_interleave_node(
    policy: MemPolicy | None, counter: int, weights: Sequence[int] | None
) -> int:
    """The node get_mempolicy(MPOL_F_NODE) reports: where the next counter-based page goes.

    ``counter`` counts the counter-based interleave allocations since the policy was set, so
    0 gives the lowest node. EINVAL if ``policy`` is not (weighted) interleave.
    """
    if policy is None or not policy.is_interleave:
        raise NumaError(
            errno.EINVAL,
            "get_mempolicy: MPOL_F_NODE without MPOL_F_ADDR needs an interleave task policy",
        )
    # Counter-based weighted interleave stays on a node for `weight` allocations before moving
    # on, which is the same walk as the index rule applied to the counter.
    return int(interleave_nodes(policy, np.array([counter], dtype=np.int64), weights)[0])


@dataclass(frozen=True, eq=False)
class AllocPlan:
    """Where each page of a batch comes from.

    ``nodes`` (int16) is the node Z that supplies each page, ``intended`` (int16) the node P
    the policy asked for, ``interleave`` whether the policy was (weighted) interleave.
    """

    nodes: np.ndarray
    intended: np.ndarray
    interleave: bool

    def numastat_deltas(self, cpu_node: int, num_nodes: int) -> dict[str, np.ndarray]:
        """Per-node increments of the six numastat counters, one allocation per page."""
        z = self.nodes.astype(np.int64)
        p = self.intended.astype(np.int64)
        hit = z == p
        local = z == cpu_node

        def count(where: np.ndarray) -> np.ndarray:
            return np.bincount(where, minlength=num_nodes).astype(np.int64)

        # zone_statistics: hit/miss and local/other go to the supplying node Z; foreign goes
        # to the node P that was wanted. interleave_hit: the page landed on its target.
        return {
            "numa_hit": count(z[hit]),
            "numa_miss": count(z[~hit]),
            "numa_foreign": count(p[~hit]),
            "interleave_hit": count(z[hit]) if self.interleave else count(z[:0]),
            "local_node": count(z[local]),
            "other_node": count(z[~local]),
        }


def _by_distance(origin: int, candidates: Iterable[int], distances: np.ndarray) -> list[int]:
    # A node's zonelist starts with the node itself, then the others nearest first; equal
    # distances go to the lower node id.
    return sorted(candidates, key=lambda n: (n != origin, int(distances[origin, n]), n))


def _fill(group: np.ndarray, orders: list[list[int]], free: np.ndarray) -> np.ndarray:
    """Give each page, in page order, the first node of its group's order with a free frame.

    Pages are handed out in runs: between two moments when some node runs dry every group
    keeps its node, so each run is one vectorised step and there are at most one run per node.
    """
    remaining = free.copy()
    out = np.empty(len(group), dtype=np.int16)
    position = [0] * len(orders)
    start = 0
    while start < len(group):
        current = np.empty(len(orders), dtype=np.int64)
        for g, order in enumerate(orders):
            while position[g] < len(order) and remaining[order[position[g]]] <= 0:
                position[g] += 1
            current[g] = order[position[g]] if position[g] < len(order) else -1
        target = current[group[start:]]
        if (target < 0).any():
            raise NumaError(errno.ENOMEM, "no node left with a free frame for this allocation")
        # The run ends at the first page that would take one frame too many from its node.
        stop = len(target)
        for n in arrayops.unique(target):
            takers = np.flatnonzero(target == n)
            if len(takers) > remaining[n]:
                stop = min(stop, int(takers[remaining[n]]))
        out[start : start + stop] = target[:stop]
        remaining -= np.bincount(target[:stop], minlength=len(remaining))
        start += stop
    return out


def plan_allocation(
    policy: MemPolicy | None,
    *,
    cpu_node: int,
    ilx: np.ndarray,
    free: np.ndarray,
    distances: Sequence[Sequence[int]] | np.ndarray,
    weights: Sequence[int] | None = None,
) -> AllocPlan:
    """Choose the node for each page of a batch of new pages under ``policy``.

    ``ilx`` holds each page's interleave index (int64), ``free`` the free frames per node,
    ``distances`` the SLIT matrix, ``weights`` the weighted-interleave weights per node.
    Never uses more than ``free[n]`` frames of node n over the whole batch. ENOMEM, with
    nothing planned, if the nodes the policy may use cannot hold the batch.
    """
    ilx = np.asarray(ilx, dtype=np.int64).ravel()
    free = np.clip(np.asarray(free, dtype=np.int64), 0, None)
    dist = np.asarray(distances, dtype=np.int64)
    num_nodes = len(free)
    if dist.shape != (num_nodes, num_nodes):
        raise ValueError(f"distances must be {num_nodes}x{num_nodes}, not {dist.shape}")
    if not 0 <= cpu_node < num_nodes:
        raise ValueError(f"cpu_node {cpu_node} is not one of the {num_nodes} nodes")
    if policy is not None and any(not 0 <= n < num_nodes for n in policy.nodes):
        raise ValueError(f"policy {policy_text(policy)} names a node beyond the {num_nodes} nodes")

    mode = Mode.LOCAL if policy is None else policy.mode
    interleave = mode in _INTERLEAVE_MODES
    npages = len(ilx)
    every_node = range(num_nodes)
    group = np.zeros(npages, dtype=np.int64)
    usable: Sequence[int] = every_node
    if mode == Mode.LOCAL:
        # No policy or local: the CPU's node, then nearest first.
        orders = [_by_distance(cpu_node, every_node, dist)]
        intended = np.full(npages, cpu_node, dtype=np.int16)
    elif mode == Mode.PREFERRED:
        # The preferred node, then nearest to it (its own zonelist, no nodemask).
        orders = [_by_distance(policy.nodes[0], every_node, dist)]
        intended = np.full(npages, policy.nodes[0], dtype=np.int16)
    elif mode == Mode.BIND:
        # The CPU node's zonelist filtered by S: never a node outside S.
        usable = policy.nodes
        orders = [_by_distance(cpu_node, policy.nodes, dist)]
        intended = np.full(npages, orders[0][0], dtype=np.int16)
    elif mode == Mode.PREFERRED_MANY:
        inside = _by_distance(cpu_node, policy.nodes, dist)
        outside = _by_distance(cpu_node, (n for n in every_node if n not in policy.nodes), dist)
        orders = [inside + outside]
        intended = None  # depends on the pass that served each page, below
    else:
        # Each page wants its interleave target and falls back nearest to that target.
        targets = interleave_nodes(policy, ilx, weights)
        wanted, group = np.unique(targets, return_inverse=True)
        group = group.ravel()
        orders = [_by_distance(int(t), every_node, dist) for t in wanted]
        intended = targets

    capacity = int(free[list(usable)].sum())
    if npages and capacity < npages:
        if mode == Mode.BIND:
            raise NumaError(
                errno.ENOMEM,
                f"MPOL_BIND nodes {format_nodes(policy.nodes)} have {capacity} free frames"
                f" for {npages} pages",
            )
        if capacity == 0:
            raise NumaError(errno.ENOMEM, "no node has a free frame")
        raise NumaError(errno.ENOMEM, f"the machine has {capacity} free frames for {npages} pages")

    nodes = _fill(group, orders, free) if npages else np.empty(0, dtype=np.int16)
    if intended is None:
        # PREFERRED_MANY allocates twice (alloc_pages_preferred_many): first within S, where the
        # wanted node is the nearest node of S; then with no nodemask, where the wanted node is
        # the CPU's own node. numastat charges each page to the pass that served it.
        in_set = arrayops.isin(nodes, policy.nodes)
        intended = np.where(in_set, orders[0][0], cpu_node).astype(np.int16)
    nodes.setflags(write=False)
    intended = np.array(intended, dtype=np.int16)
    intended.setflags(write=False)
    return AllocPlan(nodes=nodes, intended=intended, interleave=interleave)
