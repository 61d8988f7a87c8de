"""cpusets: the cgroup-v1 cpuset controller, with ``memory_migrate`` (kernel/cgroup/cpuset.c).

A cpuset confines its tasks to a set of CPUs and a set of memory nodes (``mems``).
The root cpuset ``/`` holds every CPU and every node with memory; every task starts
there (or in the cpuset its attach names: ``numaemu run --cpuset``).  The set is flat:
other cpusets are children of the root, named without a slash.

What confinement means, as in Linux (reference/kernel-and-numactl.md section 8,
linux-semantics.md):

* a task's allowed memory (``mems_allowed``) is its cpuset's ``mems`` that are online:
  every allocation stays inside it (a node outside counts as full), policy masks are
  intersected with it (EINVAL when nothing is left), ``get_mempolicy(MPOL_F_MEMS_ALLOWED)``
  returns it, ``move_pages`` to a node outside the target's is EACCES, and
  ``migrate_pages`` to nodes outside the target's is EPERM without privilege;
* a task's CPU affinity is its cpuset's CPUs (attach resets it; ``sched_setaffinity`` is
  intersected with them, EINVAL when nothing is left);
* changing ``mems``, or attaching a task, rebinds the task's memory policies to the new
  nodes (``mpol_rebind_mm``: plain masks are remapped by position, STATIC_NODES masks are
  re-intersected with the user's nodes, RELATIVE_NODES masks are re-folded), and with
  ``memory_migrate`` the pages on the old nodes move to the new ones with the relative
  placement of ``migrate_pages`` (``cpuset_migrate_mm``); the call returns once they have.

Lock order: a change of ``mems`` takes each task's mmap lock for write while it rebinds
the task's policies, then migrates (which takes it for read): never both at once.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from numaemu import protocol as P
from numaemu.constants import Mode, ModeFlag
from numaemu.errors import NumaError

from .mempolicy import MemPolicy, _relative_nodes
from .movepages import do_migrate_pages, node_remap

_STATIC = int(ModeFlag.STATIC_NODES)
_RELATIVE = int(ModeFlag.RELATIVE_NODES)

log = logging.getLogger("numaemu.coordinator")

ROOT = "/"
NAME_MAX = 255


@dataclass(eq=False)
class Cpuset:
    """One cpuset: its CPUs, its memory nodes and whether tasks' pages follow them."""

    name: str
    cpus: tuple[int, ...]
    mems: tuple[int, ...]
    memory_migrate: bool = False

    def describe(self, kernel) -> dict:
        return {"name": self.name, "cpus": list(self.cpus), "mems": list(self.mems),
                "memory_migrate": self.memory_migrate,
                "tasks": sorted(t.pid for t in tasks_of(kernel, self))}


def root_cpuset(topology) -> Cpuset:
    return Cpuset(ROOT, tuple(topology.cpus), tuple(sorted(topology.nodes_with_memory)))


def tasks_of(kernel, cs: Cpuset) -> list:
    return [t for t in kernel.tasks.values() if t.cpuset is cs and not t.exiting]


def lookup(kernel, name: str) -> Cpuset:
    cs = kernel.cpusets.get(name)
    if cs is None:
        raise NumaError(errno.ENOENT, f"no cpuset {name!r}")
    return cs


def check_sets(kernel, cpus, mems) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a CPU list and a node list against the machine (EINVAL otherwise)."""
    out = []
    for what, values, valid in (("CPU", cpus, set(kernel.topology.cpus)),
                                ("node", mems, set(kernel.topology.nodes_with_memory))):
        bad = sorted(set(values) - valid)
        if bad:
            raise NumaError(errno.EINVAL, f"{what} {bad[0]} is not one of this machine's "
                                          f"{what}s{' with memory' if what == 'node' else ''}")
        out.append(tuple(sorted(set(values))))
    return out[0], out[1]


def create(kernel, name: str, cpus, mems, memory_migrate: bool) -> Cpuset:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise NumaError(errno.EINVAL, f"bad cpuset name {name!r}")
    if len(name.encode()) > NAME_MAX:
        raise NumaError(errno.ENAMETOOLONG, f"cpuset name longer than {NAME_MAX} bytes")
    if name in kernel.cpusets:
        raise NumaError(errno.EEXIST, f"cpuset {name!r} exists")
    cpus, mems = check_sets(kernel, cpus, mems)
    cs = Cpuset(name, cpus, mems, memory_migrate)
    kernel.cpusets[name] = cs
    log.info("cpuset %s created: cpus %s mems %s%s", name, list(cpus), list(mems),
             ", memory_migrate" if memory_migrate else "")
    return cs


def remove(kernel, name: str) -> None:
    cs = lookup(kernel, name)
    if cs.name == ROOT:
        raise NumaError(errno.EBUSY, "the root cpuset cannot be removed")
    if tasks_of(kernel, cs):
        raise NumaError(errno.EBUSY, f"cpuset {name!r} still has tasks")
    del kernel.cpusets[name]


def confine_cpus(kernel, task, cpus) -> None:
    """The task's affinity becomes ``cpus``; the scheduler moves it if its CPU is not there,
    and tells its client (``resched``), whose latency accounting follows the CPU's node."""
    task.cpus_allowed = tuple(cpus)
    if task.cpu not in cpus:
        task.cpu = cpus[0]
        if task.tlb is not None:
            kernel.spawn(task.tlb.post(P.Resched(cpu=task.cpu)))


async def attach(kernel, cs: Cpuset, task) -> int:
    """Move ``task`` into ``cs``; with memory_migrate its pages follow (the call returns once
    they have).  Returns the pages that could not be moved."""
    if not cs.cpus or not cs.mems:
        raise NumaError(errno.ENOSPC, f"cpuset {cs.name!r} has no CPUs or no memory nodes")
    old = task.cpuset
    old_mems = kernel.mems_allowed(task)
    task.cpuset = cs
    confine_cpus(kernel, task, cs.cpus)
    new_mems = kernel.mems_allowed(task)
    await rebind_task(task, old_mems, new_mems)
    log.info("task %d moved from cpuset %s to %s", task.pid, old.name, cs.name)
    if cs.memory_migrate and old_mems != new_mems:
        return await migrate_mm(kernel, task, old_mems, new_mems)
    return 0


async def update(kernel, cs: Cpuset, cpus, mems, memory_migrate) -> int:
    """Change a cpuset; returns the pages memory_migrate could not move."""
    new_cpus, new_mems = check_sets(kernel, cs.cpus if cpus is None else cpus,
                                    cs.mems if mems is None else mems)
    tasks = tasks_of(kernel, cs)
    if tasks and (not new_cpus or not new_mems):
        raise NumaError(errno.ENOSPC, f"cpuset {cs.name!r} has tasks: it needs CPUs and nodes")
    if cs.name == ROOT and (cpus is not None or mems is not None):
        raise NumaError(errno.EACCES, "the root cpuset's CPUs and nodes are the machine's")
    if memory_migrate is not None:
        cs.memory_migrate = memory_migrate
    old = {t.pid: kernel.mems_allowed(t) for t in tasks}
    cs.cpus, cs.mems = new_cpus, new_mems
    not_moved = 0
    for task in tasks:
        confine_cpus(kernel, task, new_cpus)
        await rebind_task(task, old[task.pid], kernel.mems_allowed(task))
    if cs.memory_migrate:
        for task in tasks:
            if not task.exiting and old[task.pid] != kernel.mems_allowed(task):
                not_moved += await migrate_mm(kernel, task, old[task.pid],
                                              kernel.mems_allowed(task))
    return not_moved


async def migrate_mm(kernel, task, old_mems, new_mems) -> int:
    """cpuset_migrate_mm: do_migrate_pages from the old nodes to the new ones, MOVE_ALL."""
    return await do_migrate_pages(kernel, task, task, sorted(old_mems), sorted(new_mems), True)


async def rebind_task(task, old_mems: frozenset, new_mems: frozenset) -> None:
    """mpol_rebind_mm: the task policy and every VMA policy follow the new nodes."""
    if old_mems == new_mems:
        return
    async with task.mmap_lock.write():
        task.policy = rebind(task.policy, old_mems, new_mems)
        for vma in task.vmas:
            vma.policy = rebind(vma.policy, old_mems, new_mems)


def rebind(policy: MemPolicy | None, old_mems, new_mems) -> MemPolicy | None:
    """One policy rebound from ``old_mems`` to ``new_mems`` (mpol_rebind_policy)."""
    if policy is None or policy.mode == Mode.LOCAL or not new_mems:
        return policy
    old, new = sorted(old_mems), sorted(new_mems)
    if policy.flags & _STATIC:
        nodes = tuple(n for n in policy.user_nodes if n in new_mems)
        if policy.mode == Mode.PREFERRED:  # its node gone: local allocation (mpol_rebind_preferred)
            return (MemPolicy(Mode.PREFERRED, nodes[:1], policy.flags, policy.user_nodes)
                    if nodes else MemPolicy(Mode.LOCAL, (), policy.flags & ~_STATIC, ()))
    elif policy.flags & _RELATIVE:
        nodes = _relative_nodes(policy.user_nodes, new)
    else:
        nodes = tuple(sorted({remap(n, old, new) for n in policy.nodes} & set(new)))
    if not nodes:
        nodes = tuple(new)  # nothing of the mask is left: every allowed node
    if policy.mode == Mode.PREFERRED:
        nodes = nodes[:1]
    return MemPolicy(policy.mode, nodes, policy.flags, policy.user_nodes)


def remap(node: int, old: list[int], new: list[int]) -> int:
    """node_remap for a policy's node; one that was not in ``old`` stays itself."""
    return node_remap(node, old, new) if node in old else node
