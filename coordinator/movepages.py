"""The migration system calls: move_pages, migrate_pages, mbind's MPOL_MF_MOVE, pins.

Each collects the pages to move (the kernel's queue_pages / add_page_for_migration),
isolates them, and hands them to the engine (``coordinator.migrate``):

* ``do_pages_move`` (move_pages(2)): consecutive entries with the same target
  node form one batch; a batch that leaves pages unmigrated ends the call with
  "that many + the entries never examined";
* ``do_migrate_pages`` (migrate_pages(2)): every page of the task on each source
  node moves to its remapped node, in the kernel's order (a destination that is
  still a pending source is moved out first);
* ``mbind_move``: after mbind installs a policy, pages in the range that do not
  satisfy it move to where the policy would place them.

Shared pages (mapcount > 1) move only with MPOL_MF_MOVE_ALL (CAP_SYS_NICE).
"""

from __future__ import annotations

import errno

import numpy as np

from numaemu import arrayops
from numaemu.constants import MAX_NUMNODES
from numaemu.errors import NumaError

from .memory import handle_fault
from .memory_failure import poisoned
from .mempolicy import MemPolicy, plan_allocation
from .migrate import isolate_pages, migrate_pages
from .mm import Task
from .pages import PTE_MIGRATION, PTE_PRESENT, PTE_ZERO, pte_node, pte_pfn


def _lookup(kernel, task: Task, vpns: np.ndarray):
    """Per vpn: (status, node, pfn, mapcount-shared?) of what the task maps there.

    status is 0 for a present page, else -EFAULT (no VMA, zero page), -ENOENT (never
    touched) or -EBUSY (being migrated right now).
    """
    n = len(vpns)
    status = np.full(n, -errno.EFAULT, dtype=np.int32)
    ptes = np.zeros(n, dtype=np.int64)
    where = task.locate(vpns)
    vmas = task.vmas
    for vi in arrayops.values(where[where >= 0]):
        sel = np.flatnonzero(where == vi)
        vma = vmas[vi]
        ptes[sel] = vma.pte[vpns[sel] - vma.start]
        status[sel] = -errno.ENOENT
    status[(ptes & PTE_PRESENT) != 0] = 0
    status[ptes == PTE_ZERO] = -errno.EFAULT
    status[(ptes & PTE_MIGRATION) != 0] = -errno.EBUSY
    nodes = pte_node(ptes)
    status[(status == 0) & poisoned(kernel, nodes)] = -errno.EIO  # its node died
    return status, nodes, pte_pfn(ptes)


def _shared(kernel, nodes: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    shared = np.zeros(len(pfns), dtype=bool)
    for n in arrayops.values(nodes):
        sel = nodes == n
        shared[sel] = kernel.tables[n].mapcount[pfns[sel]] > 1
    return shared


async def _move(kernel, nodes, pfns, targets, cpu_node: int) -> np.ndarray:
    """Isolate and migrate; rc per page (-EBUSY where isolation failed)."""
    rc = np.full(len(pfns), -errno.EBUSY, dtype=np.int32)
    ok = await isolate_pages(kernel, nodes, pfns)
    if ok.any():
        rc[ok] = await migrate_pages(kernel, nodes[ok], pfns[ok], targets[ok],
                                     cpu_node=cpu_node)
    return rc


def check_target_nodes(kernel, nodes: list) -> np.ndarray:
    """move_pages target nodes: each must be a node with memory, else ENODEV."""
    arr = np.asarray(nodes, dtype=np.int64)
    for node in arr.tolist():
        if node < 0 or node >= MAX_NUMNODES:
            raise NumaError(errno.ENODEV, f"node {node} is outside 0..{MAX_NUMNODES - 1} "
                                          "(MAX_NUMNODES)")
        if node not in kernel.node_set:
            raise NumaError(errno.ENODEV, f"node {node} does not exist or has no memory")
    return arr


async def do_pages_move(kernel, caller: Task, task: Task, pages: np.ndarray, nodes: list,
                        move_all: bool) -> tuple[np.ndarray, int]:
    """move_pages(2) with target nodes; returns (status per page, pages not migrated)."""
    if len(nodes) != len(pages):
        raise NumaError(errno.EINVAL, "nodes must give one node per page")
    targets_all = np.asarray(nodes, dtype=np.int64)
    vpns_all = (pages // kernel.page_size).astype(np.int64)
    status = np.zeros(len(pages), dtype=np.int32)
    cpu_node = kernel.cpu_node(caller)
    start = 0
    while start < len(pages):
        target = int(targets_all[start])
        end = start + 1
        while end < len(pages) and targets_all[end] == target:
            end += 1
        # An invalid node ends the call with ENODEV, one outside the target's cpuset with
        # EACCES; earlier batches stay migrated.
        check_target_nodes(kernel, [target])
        if target not in kernel.mems_allowed(task):
            raise NumaError(errno.EACCES, f"node {target} is outside task {task.pid}'s cpuset")
        async with task.mmap_lock.read():
            st, pnodes, ppfns = _lookup(kernel, task, vpns_all[start:end])
        st = np.where((st == 0) & (pnodes == target), target, st)
        cand = st == 0
        if not move_all:
            shared = cand & _shared(kernel, pnodes, ppfns)
            st[shared] = -errno.EACCES
            cand &= ~shared
        idx = np.flatnonzero(cand)
        if len(idx):
            ok = await isolate_pages(kernel, pnodes[idx], ppfns[idx])
            st[idx[~ok]] = -errno.EBUSY  # already being migrated (or listed twice)
            idx = idx[ok]
        if len(idx):
            rc = await migrate_pages(kernel, pnodes[idx], ppfns[idx],
                                     np.full(len(idx), target, dtype=np.int64),
                                     cpu_node=cpu_node)
            failed = int(np.count_nonzero(rc != 0))
            if failed:
                # The call stops here.  Linux leaves the statuses of this batch and of later
                # entries unwritten; we report each page's current state instead.
                status[start:] = query_status(kernel, task, vpns_all[start:])
                return status, failed + (len(pages) - end)
            st[idx] = target
        status[start:end] = st
        start = end
    return status, 0


def query_status(kernel, task: Task, vpns: np.ndarray) -> np.ndarray:
    """move_pages query mode: node, -ENOENT (never touched) or -EFAULT per page."""
    st, nodes, _ = _lookup(kernel, task, vpns)
    # A page under migration still answers with its (old) node.
    return np.where((st == 0) | (st == -errno.EBUSY), nodes, st).astype(np.int32)


def node_remap(source: int, old: list[int], new: list[int]) -> int:
    """The kernel's node_remap: the k-th node of ``old`` maps to the (k mod |new|)-th of new."""
    return new[old.index(source) % len(new)]


async def do_migrate_pages(kernel, caller: Task, task: Task, old: list[int], new: list[int],
                           move_all: bool) -> int:
    """migrate_pages(2): move every page on ``old`` nodes to its remapped ``new`` node."""
    old, new = sorted(set(old)), sorted(set(new))
    pending = set(old)
    busy = 0
    cpu_node = kernel.cpu_node(caller)
    while pending:
        s = d = -1
        for source in sorted(pending):
            dest = node_remap(source, old, new)
            if len(old) != len(new) and source in new:
                continue  # sizes differ and the node is also a destination: it stays
            if source == dest:
                continue
            s, d = source, dest
            if dest not in pending:
                break  # prefer a pair whose destination is no longer a source
        if s < 0:
            break
        pending.discard(s)
        busy += await migrate_to_node(kernel, task, s, d, move_all, cpu_node)
    return busy


async def migrate_to_node(kernel, task: Task, src: int, dst: int, move_all: bool,
                          cpu_node: int) -> int:
    """Move all of ``task``'s pages on ``src`` to ``dst``; return how many did not move."""
    async with task.mmap_lock.read():
        found = []
        for vma in task.vmas:
            ptes = vma.pte[(vma.pte & PTE_PRESENT) != 0]
            ptes = ptes[pte_node(ptes) == src]
            found.append(pte_pfn(ptes))
    pfns = arrayops.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    nodes = np.full(len(pfns), src, dtype=np.int16)
    if not move_all:
        pfns = pfns[~_shared(kernel, nodes, pfns)]  # shared pages stay, and do not count
        nodes = nodes[: len(pfns)]
    if len(pfns) == 0:
        return 0
    rc = await _move(kernel, nodes, pfns, np.full(len(pfns), dst, dtype=np.int64), cpu_node)
    return int(np.count_nonzero(rc != 0))


async def mbind_move(kernel, task: Task, start: int, end: int, policy: MemPolicy | None,
                     user_nodes: tuple[int, ...], move_all: bool) -> int:
    """Move pages of ``[start, end)`` that sit outside the new policy's nodes to where the
    policy places them; return how many could not be moved (shared ones are skipped)."""
    cpu_node = kernel.cpu_node(task)
    allowed = set(user_nodes)
    nodes_l, pfns_l, ilx_l = [], [], []
    async with task.mmap_lock.read():
        for vma in task.vmas_in(start, end):
            lo, hi = max(start, vma.start) - vma.start, min(end, vma.end) - vma.start
            offs = np.arange(lo, hi)
            ptes = vma.pte[offs]
            present = (ptes & PTE_PRESENT) != 0
            offs, ptes = offs[present], ptes[present]
            nodes = pte_node(ptes)
            misplaced = (~arrayops.isin(nodes, list(allowed)) if allowed
                         else np.ones(len(ptes), bool))
            offs, ptes = offs[misplaced], ptes[misplaced]
            nodes_l.append(pte_node(ptes))
            pfns_l.append(pte_pfn(ptes))
            # The interleave index of the page, as a fault at that address would use it.
            ilx_l.append(offs + vma.start if vma.obj is None else offs + vma.pgoff + vma.obj.oid)
    if not nodes_l:
        return 0
    nodes, pfns, ilx = np.concatenate(nodes_l), np.concatenate(pfns_l), np.concatenate(ilx_l)
    if not move_all:
        keep = ~_shared(kernel, nodes, pfns)  # skipped silently, not failures
        nodes, pfns, ilx = nodes[keep], pfns[keep], ilx[keep]
    if len(pfns) == 0:
        return 0
    # new_page by the policy: where a fault at each address would allocate now.
    effective = policy if policy is not None else task.policy
    mems = kernel.mems_allowed(task)
    plan = plan_allocation(effective, cpu_node=cpu_node, ilx=ilx, free=kernel.free_within(mems),
                           distances=kernel.distances, weights=kernel.weights)
    # Where the policy wants each page, unless the cpuset forbids it: then where it fell back.
    targets = np.where(arrayops.isin(plan.intended, list(mems)), plan.intended, plan.nodes)
    targets = targets.astype(np.int64)
    move = nodes != targets
    if not move.any():
        return 0
    rc = await _move(kernel, nodes[move], pfns[move], targets[move], cpu_node)
    return int(np.count_nonzero(rc != 0))


async def pin_pages(kernel, task: Task, start: int, end: int) -> int:
    """get_user_pages: fault the range in and hold a reference on every page."""
    vpns = np.arange(start, end, dtype=np.int64)
    _, nodes, pfns, _, _ = await handle_fault(kernel, task, vpns, True)
    if task.exiting:  # reaped while faulting: its pins would never be dropped
        raise NumaError(errno.ESRCH, f"task {task.pid} has exited")
    for n in arrayops.values(nodes):
        arrayops.add_at(kernel.tables[n].refcount, pfns[nodes == n], 1)
    pin = kernel._next_pin
    kernel._next_pin += 1
    kernel.pins[pin] = (task.pid, nodes.astype(np.int16), pfns.astype(np.int64))
    return pin


async def unpin_pages(kernel, task: Task, pin: int) -> None:
    """put_page on every page of a pin."""
    held = kernel.pins.get(pin)
    if held is None or held[0] != task.pid:
        raise NumaError(errno.EINVAL, f"task {task.pid} holds no pin {pin}")
    del kernel.pins[pin]
    await kernel.put_pages(held[1], held[2])


async def drop_pins(kernel, task: Task) -> None:
    for pin, (pid, nodes, pfns) in list(kernel.pins.items()):
        if pid == task.pid:
            del kernel.pins[pin]
            await kernel.put_pages(nodes, pfns)
