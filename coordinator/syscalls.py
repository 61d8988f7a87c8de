"""The syscall dispatcher: one handler per request op.

Each handler validates in the kernel's order and raises ``NumaError`` before it
changes anything, so a failed call leaves no trace.  Handlers take the decoded
request dataclass (see ``numaemu.protocol``) and return the reply fields.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import time
from contextlib import asynccontextmanager

import numpy as np

from numaemu import argcheck, arrayops
from numaemu import protocol as P
from numaemu.constants import (
    MAX_NUMNODES,
    MAX_REQUEST_PAGES,
    MPOL_MODE_FLAGS,
    TASK_SIZE,
    GetFlag,
    Mode,
    MoveFlag,
)
from numaemu.errors import NumaError

from . import cpuset, creds, filemap, movepages, numa_balancing, procfs, procwatch
from .memory import handle_fault, zap_vma
from .mempolicy import (
    check_mbind_flags,
    get_policy_readback,
    new_policy,
    next_interleave_node,
    read_nodes,
    sanitize_mode_flags,
    validate_get_flags,
)
from .mm import MMAP_BASE, Task, Vma, check_range
from .pages import pte_node

log = logging.getLogger("numaemu.coordinator")

#: The number (per task) of the request being handled, set by the server for each request.
CURRENT_REQUEST: contextvars.ContextVar[int] = contextvars.ContextVar("request", default=0)


class Syscalls:
    """Request handlers bound to the coordinator's ``Kernel``."""

    def __init__(self, kernel, server) -> None:
        self.k = kernel
        self.server = server
        self.handlers = {
            "ping": self.ping,
            "info": self.info,
            "attach": self.attach,
            "detach": self.detach,
            "mmap": self.mmap,
            "munmap": self.munmap,
            "fault": self.fault,
            "set_mempolicy": self.set_mempolicy,
            "get_mempolicy": self.get_mempolicy,
            "mbind": self.mbind,
            "move_pages": self.move_pages,
            "migrate_pages": self.migrate_pages,
            "pin": self.pin,
            "unpin": self.unpin,
            "inject_fault": self.inject_fault,
            "msync": self.msync,
            "shm_unlink": self.shm_unlink,
            "sched_setaffinity": self.sched_setaffinity,
            "numa_maps": self.numa_maps,
            "numastat": self.numastat,
            "tasks": self.tasks,
            "check": self.check,
            "sysctl": self.sysctl,
            "node_free_map": self.node_free_map,
            "shutdown": self.shutdown,
            "access_profile": self.access_profile,
            "cpusets": self.cpusets,
            "cpuset_create": self.cpuset_create,
            "cpuset_update": self.cpuset_update,
            "cpuset_attach": self.cpuset_attach,
            "cpuset_remove": self.cpuset_remove,
        }

    # -- cluster -------------------------------------------------------------
    async def ping(self, req: P.Ping) -> dict:
        return {}

    async def info(self, req: P.Info) -> dict:
        k = self.k
        return {
            "cluster_id": k.cluster_id,
            "topology": k.topology.to_dict(),
            "page_size": k.page_size,
            "endpoints": self.server.endpoints,
            "log_endpoint": self.server.endpoints.get("log", ""),
            "segments": [{"node": n.node, "path": n.path, "frames": n.frames, "host": n.host,
                          "data_endpoint": n.data_endpoint} for n in k.nodes.values()
                         if n.node not in k.offline],
            "offline": sorted(k.offline),
            "supervisor_pid": self.server.supervisor_pid,
            "inject_dilation": self.server.inject_dilation,
        }

    async def attach(self, req: P.Attach) -> dict:
        """A new task, bound to the connection it attached on (coordinator/creds.py)."""
        k = self.k
        topo = k.topology
        caller = creds.CALLER.get()
        creds.check_attach(req, caller, k.host)
        # A task starts in the root cpuset, or in the one it names (numaemu run --cpuset: the
        # cpuset its parent would have handed down).
        cs = cpuset.lookup(k, req.cpuset or cpuset.ROOT)
        if not cs.cpus or not cs.mems:
            raise NumaError(errno.ENOSPC, f"cpuset {cs.name!r} has no CPUs or no nodes")
        cpu = req.cpu if req.cpu is not None else cs.cpus[0]
        if cpu not in cs.cpus:
            raise NumaError(errno.EINVAL, f"no CPU {cpu} in cpuset {cs.name!r} (CPUs "
                                          f"{list(cs.cpus)})")
        pid = k.new_pid(req.os_pid, req.host)
        task = Task(pid=pid, os_pid=req.os_pid, host=req.host, uid=req.uid,
                    privileged=req.privileged, command=req.command or f"task{pid}", cpu=cpu,
                    cpus_allowed=cs.cpus, cpuset=cs, next_vpn=MMAP_BASE // k.page_size,
                    mmap_base=MMAP_BASE // k.page_size,
                    last_seen=time.monotonic(), conn_id=caller.conn_id, cred=caller.cred,
                    numa_faults=np.zeros(k.num_nodes, dtype=np.int64))
        if req.host == k.host:
            task.pidfd = procwatch.pidfd_open(req.os_pid)
            if task.pidfd is None:
                raise NumaError(errno.ESRCH, f"no local process {req.os_pid}")
            # The process sentinel: a client that exits without detaching is reaped at once.
            procwatch.watch(task.pidfd, lambda: k.schedule_reap(task))
        k.tasks[pid] = task
        log.info("task %d attached (os pid %d on %s, cpu %d%s)", pid, req.os_pid, req.host, cpu,
                 ", privileged" if req.privileged else "")
        info = await self.info(P.Info())
        return {"pid": pid, "cpu": cpu, "node": topo.node_of_cpu(cpu),
                "mmap_base": MMAP_BASE, **info}

    async def detach(self, req: P.Detach) -> dict:
        task = self.k.task(req.pid)
        await exit_task(self.k, task)
        return {}

    async def shutdown(self, req: P.Shutdown) -> dict:
        """Stop the cluster: a privileged task's request, or a privileged peer's."""
        caller = creds.CALLER.get()
        if caller is None or not caller.privileged:
            raise NumaError(errno.EPERM, "shutdown needs a privileged caller")
        log.info("shutdown requested by %s", caller.task.pid if caller.task else caller.cred)
        self.server.request_stop("shutdown request")
        return {}

    # -- address space -------------------------------------------------------
    async def mmap(self, req: P.Mmap) -> dict:
        k = self.k
        task = k.task(req.pid)
        if req.length <= 0:
            raise NumaError(errno.EINVAL, "mmap length must be positive")
        if req.shared is not None and req.file is not None:
            raise NumaError(errno.EINVAL, "a mapping is either shared=NAME or file=PATH")
        if req.shared is not None:
            argcheck.shm_name(req.shared)  # EINVAL, ENAMETOOLONG as shm_open
        if req.file is not None:
            argcheck.check_path(req.file)  # EINVAL, ENAMETOOLONG as open
        npages = -(-req.length // k.page_size)
        # Heuristic overcommit (vm.overcommit_memory=0) refuses one mapping larger than all
        # of memory; here it also keeps a huge length from sizing page tables by it.
        total = sum(k.topology.frames_per_node)
        if npages > total:
            raise NumaError(errno.ENOMEM, f"{npages} pages is more than the machine's "
                                          f"{total} pages of memory")
        async with task.mmap_lock.write():
            # No address space left is ENOMEM, checked before anything changes: a huge length
            # used to fail in np.zeros *after* get_unmapped_area had moved next_vpn past it.
            if task.find_unmapped_area(npages) + npages > TASK_SIZE // k.page_size:
                raise NumaError(errno.ENOMEM, f"no room for {npages} pages in the address space")
            obj = None
            if req.shared is not None or req.file is not None:
                obj = filemap.open_object(k, shared=req.shared, file=req.file, npages=npages,
                                          uid=task.uid)
            start = task.get_unmapped_area(npages)
            vma = Vma(start, start + npages, np.zeros(npages, dtype=np.int64), obj=obj)
            if obj is not None:
                obj.maps += 1
            task.insert_vma(vma)
        if req.populate:
            # MAP_POPULATE is best effort (mm_populate's result is ignored): the mapping stays
            # even if allocation fails, and file pages past EOF are simply not populated.
            # Failing here used to leave a VMA the caller never got an address for.
            end = start + npages
            if obj is not None and obj.kind == "file":
                end = min(end, start + -(-obj.size // k.page_size))
            try:
                # In slices, yielding between them: a huge MAP_POPULATE must not hold the loop.
                for lo in range(start, end, MAX_REQUEST_PAGES):
                    await handle_fault(k, task, np.arange(lo, min(end, lo + MAX_REQUEST_PAGES)),
                                       obj is None)
                    await asyncio.sleep(0)
            except NumaError as exc:
                log.info("task %d: populating %d pages failed: %s", task.pid, end - start, exc)
        return {"addr": start * k.page_size, "length": npages * k.page_size}

    async def munmap(self, req: P.Munmap) -> dict:
        k = self.k
        task = k.task(req.pid)
        start, end = check_range(k.page_size, req.addr, req.length)
        if req.length == 0:
            raise NumaError(errno.EINVAL, "munmap length must be positive")
        if end > TASK_SIZE // k.page_size:
            raise NumaError(errno.EINVAL, "munmap range goes past the end of the address space")
        async with task.mmap_lock.write():
            await unmap_range(k, task, start, end)
        return {}

    async def fault(self, req: P.Fault) -> dict:
        task = self.k.task(req.pid)
        _check_request_pages(len(req.vpns))
        vpns, nodes, pfns, prot, waits = await handle_fault(self.k, task, req.vpns, req.write)
        return {"vpns": vpns.astype(P.VPN), "nodes": nodes, "pfns": pfns, "prot": prot,
                "waits": waits}

    # -- memory policy ---------------------------------------------------------
    async def set_mempolicy(self, req: P.SetMempolicy) -> dict:
        task = self.k.task(req.pid)
        # ``flags`` may only carry mode flags: OR-ing anything else into the mode would turn
        # e.g. BIND|1 into INTERLEAVE silently (the kernel has one mode argument, no flags).
        if req.flags & ~MPOL_MODE_FLAGS:
            raise NumaError(errno.EINVAL, f"set_mempolicy: flags {req.flags:#x} hold bits "
                                          "other than MPOL_F_STATIC_NODES|RELATIVE_NODES|"
                                          "NUMA_BALANCING")
        policy = new_policy(req.mode | req.flags, req.nodes,
                            node_set=self.k.mems_allowed(task))
        task.policy = policy
        task.il_count = 0  # the interleave counter restarts at the lowest node
        return {}

    async def get_mempolicy(self, req: P.GetMempolicy) -> dict:
        k = self.k
        task = k.task(req.pid)
        flags = req.flags
        addr = req.addr or 0
        interleave = task.policy is not None and task.policy.mode in (
            Mode.INTERLEAVE, Mode.WEIGHTED_INTERLEAVE)
        validate_get_flags(flags, addr != 0, interleave)
        if flags & GetFlag.MEMS_ALLOWED:
            return {"mode": 0, "nodes": sorted(k.mems_allowed(task))}
        if flags & GetFlag.ADDR:
            vpn = addr // k.page_size
            vma = task.find_vma(vpn)
            if vma is None:
                raise NumaError(errno.EFAULT, f"address {addr:#x} is not mapped")
            if flags & GetFlag.NODE:
                # The node of the page at addr; the kernel faults it in as a read first.
                _, nodes, _, prot, _ = await handle_fault(k, task, np.array([vpn]), False)
                node = 0 if prot[0] & P.PROT_ZERO else int(nodes[0])
                return {"mode": node, "nodes": []}
            policy = vma.policy
            if vma.obj is not None and vma.obj.kind == "shm":
                policy = vma.obj.policy_at(vpn - vma.start + vma.pgoff)
            mode, nodes = get_policy_readback(policy)
            return {"mode": mode, "nodes": list(nodes)}
        if flags & GetFlag.NODE:
            node = next_interleave_node(task.policy, task.il_count, k.weights)
            return {"mode": node, "nodes": []}
        mode, nodes = get_policy_readback(task.policy)
        return {"mode": mode, "nodes": list(nodes)}

    async def mbind(self, req: P.Mbind) -> dict:
        k = self.k
        task = k.task(req.pid)
        # Kernel order: mode flags, nodemask copy, mbind flags, privilege, range, len == 0,
        # then the mode-versus-nodes rules and the node-set intersection (new_policy).
        sanitize_mode_flags(req.mode, for_mbind=True)
        user_nodes = read_nodes(req.nodes, for_mbind=True)
        check_mbind_flags(req.flags)
        if req.flags & MoveFlag.MOVE_ALL and not task.privileged:
            raise NumaError(errno.EPERM, "MPOL_MF_MOVE_ALL needs CAP_SYS_NICE (privileged=True)")
        start, end = check_range(k.page_size, req.addr, req.length)
        if req.length == 0:
            return {}
        policy = new_policy(req.mode, req.nodes, node_set=k.mems_allowed(task),
                            for_mbind=True)
        move = bool(req.flags & (MoveFlag.MOVE | MoveFlag.MOVE_ALL))
        strict = bool(req.flags & MoveFlag.STRICT) and policy is not None  # DEFAULT clears it
        async with task.mmap_lock.write():
            vmas = task.vmas_in(start, end)
            if not vmas or (policy is not None and not task.covered(start, end)):
                raise NumaError(errno.EFAULT, "the range has unmapped holes")
            if strict and not move:
                # queue_pages_range judges pages by the caller's nodemask, not the effective
                # nodes: PREFERRED {0,1} keeps only node 0 but a page on node 1 is no failure.
                allowed = set(user_nodes)
                for vma in vmas:
                    lo, hi = max(start, vma.start) - vma.start, min(end, vma.end) - vma.start
                    ptes = vma.pte[lo:hi]
                    present = ptes[(ptes & (1 << 62)) != 0]
                    if any(int(n) not in allowed for n in arrayops.unique(pte_node(present))):
                        raise NumaError(errno.EIO, "MPOL_MF_STRICT: pages already sit on "
                                                   "nodes outside the new policy")
            for vma in task.split_at(start, end):
                vma.policy = policy
                if vma.obj is not None and vma.obj.kind == "shm":
                    # shared policy of the object's pages under this VMA: every mapper sees it
                    vma.obj.set_policy(vma.pgoff, vma.pgoff + vma.end - vma.start, policy)
        if move:
            # The policy is installed; now misplaced pages move (shared ones only with
            # MOVE_ALL, skipped silently otherwise).  STRICT turns failures into EIO.
            async with self_flushed(task, (start, end) if req.flushed else None):
                failed = await movepages.mbind_move(k, task, start, end, policy, user_nodes,
                                                    bool(req.flags & MoveFlag.MOVE_ALL))
            if failed and strict:
                raise NumaError(errno.EIO, f"MPOL_MF_STRICT: {failed} pages could not be "
                                           "moved")
        return {}

    async def move_pages(self, req: P.MovePages) -> dict:
        k = self.k
        caller = k.task(req.pid)
        if req.flags & ~int(MoveFlag.MOVE | MoveFlag.MOVE_ALL) or req.flags < 0:
            raise NumaError(errno.EINVAL, "move_pages accepts only MPOL_MF_MOVE and MOVE_ALL")
        if req.flags & MoveFlag.MOVE_ALL and not caller.privileged:
            raise NumaError(errno.EPERM, "MPOL_MF_MOVE_ALL needs CAP_SYS_NICE (privileged=True)")
        _check_request_pages(len(req.pages))
        if isinstance(req.nodes, (list, tuple)):
            _check_request_pages(len(req.nodes))
        task = caller if req.target in (None, 0) else k.task(req.target)
        check_access(caller, task)
        if req.nodes is None:
            vpns = (req.pages // k.page_size).astype(np.int64)
            return {"status": movepages.query_status(k, task, vpns).astype(P.STATUS)}
        nodes = req.nodes
        if not isinstance(nodes, (list, tuple)) or any(
                isinstance(n, bool) or not isinstance(n, int) for n in nodes):
            raise NumaError(errno.EFAULT, "cannot read the nodes array")
        if len(nodes) != len(req.pages):
            raise NumaError(errno.EINVAL, "nodes must give one node per page")
        # Any number no node has is ENODEV when its batch comes: keep it invalid, in int64.
        nodes = [min(max(n, -1), MAX_NUMNODES) for n in nodes]
        flushed = (req.pages // k.page_size).astype(np.uint64) if req.flushed else None
        async with self_flushed(caller if task is caller else None, flushed):
            status, not_migrated = await movepages.do_pages_move(
                k, caller, task, req.pages, list(nodes), bool(req.flags & MoveFlag.MOVE_ALL))
        return {"status": status.astype(P.STATUS), "not_migrated": not_migrated}

    async def migrate_pages(self, req: P.MigratePages) -> dict:
        k = self.k
        caller = k.task(req.pid)
        old = _node_list(req.old_nodes)
        new = _node_list(req.new_nodes)
        task = caller if req.target in (None, 0) else k.task(req.target)
        check_access(caller, task)
        if not caller.privileged and not set(new) <= k.mems_allowed(task):
            raise NumaError(errno.EPERM, f"new nodes {new} lie outside task {task.pid}'s "
                                         "cpuset (CAP_SYS_NICE needed)")
        # Nodes without memory, or outside the caller's cpuset, are dropped.
        new = [n for n in new if n in k.mems_allowed(caller)]
        if not new:
            raise NumaError(errno.EINVAL, "new_nodes holds no allowed node with memory")
        # A failed node is still a source: its pages fail with -EIO (memory_failure.py).
        old = [n for n in old if n in k.node_set or n in k.offline]
        async with self_flushed(caller if task is caller and req.flushed else None, True):
            not_migrated = await movepages.do_migrate_pages(k, caller, task, old, new,
                                                            caller.privileged)
        return {"not_migrated": not_migrated}

    async def pin(self, req: P.Pin) -> dict:
        k = self.k
        task = k.task(req.pid)
        start, end = check_range(k.page_size, req.addr, req.length)
        if end == start:
            raise NumaError(errno.EINVAL, "nothing to pin")
        if not task.covered(start, end):  # before anything is sized by the range
            raise NumaError(errno.EFAULT, "the range to pin has unmapped holes")
        if end - start > MAX_REQUEST_PAGES:
            raise NumaError(errno.ENOMEM, f"cannot pin more than {MAX_REQUEST_PAGES} pages "
                                          "at once")
        return {"pin": await movepages.pin_pages(k, task, start, end)}

    async def unpin(self, req: P.Unpin) -> dict:
        await movepages.unpin_pages(self.k, self.k.task(req.pid), req.pin)
        return {}

    async def inject_fault(self, req: P.InjectFault) -> dict:
        if not self.k.task(req.pid).privileged:
            raise NumaError(errno.EPERM, "inject_fault needs a privileged task")
        step = req.request.removeprefix("migrate_step_")
        if step != req.request:  # the coordinator's own: the migration engine's steps
            if not step.isdigit() or not 1 <= int(step) <= 20 or not 0 <= req.count <= 1 << 20:
                raise NumaError(errno.EINVAL, f"no migration step {step!r} (1..20)")
            self.k.inject_steps[int(step)] = req.count
            return {}
        await self.k.node(req.node).peer.call(P.Inject(request=req.request, count=req.count,
                                                           delay=req.delay))
        return {}

    async def msync(self, req: P.Msync) -> dict:
        k = self.k
        task = k.task(req.pid)
        start, end = check_range(k.page_size, req.addr, req.length)
        if not task.covered(start, end):
            raise NumaError(errno.ENOMEM, "msync range is not fully mapped")
        written = 0
        for vma in task.vmas_in(start, end):
            if vma.obj is None or vma.obj.kind != "file":
                continue
            lo, hi = max(start, vma.start), min(end, vma.end)
            idx = np.arange(lo - vma.start, hi - vma.start) + vma.pgoff
            written += await filemap.writeback(k, vma.obj, idx)
        return {"written": written}

    async def shm_unlink(self, req: P.ShmUnlink) -> dict:
        k = self.k
        task = k.task(req.pid)
        argcheck.shm_name(req.name)
        obj = k.shm_names.get(req.name)
        if obj is None:
            raise NumaError(errno.ENOENT, f"no shared object named {req.name!r}")
        if obj.uid != task.uid and not task.privileged:
            # /dev/shm is a sticky directory: only the object's owner (or root) removes it.
            raise NumaError(errno.EPERM, f"{req.name!r} belongs to uid {obj.uid}, not "
                                         f"{task.uid}")
        obj.unlinked = True
        k.shm_names.pop(req.name, None)
        await filemap.release_object(k, obj)
        return {}

    async def sched_setaffinity(self, req: P.SchedSetaffinity) -> dict:
        k = self.k
        task = k.task(req.pid)
        # The mask is intersected with the task's cpuset; nothing left is EINVAL.
        cpus = sorted(set(req.cpus) & set(task.cpuset.cpus))
        if not cpus:
            raise NumaError(errno.EINVAL, f"CPU set {sorted(set(req.cpus))} names no CPU of "
                                          f"task {task.pid}'s cpuset {task.cpuset.name!r} "
                                          f"(CPUs {list(task.cpuset.cpus)})")
        cpuset.confine_cpus(self.k, task, cpus)  # the scheduler moves the task onto an allowed CPU
        return {"cpu": task.cpu, "node": k.topology.node_of_cpu(task.cpu)}

    # -- cpusets ----------------------------------------------------------------
    async def cpusets(self, req: P.Cpusets) -> dict:
        return {"cpusets": [cs.describe(self.k) for cs in self.k.cpusets.values()]}

    def _cpuset_admin(self, op: str) -> None:
        """Changing cpusets is for a privileged caller (the cgroup files are root's)."""
        caller = creds.CALLER.get()
        if caller is None or not caller.privileged:
            raise NumaError(errno.EPERM, f"{op} needs a privileged caller")

    async def cpuset_create(self, req: P.CpusetCreate) -> dict:
        self._cpuset_admin("cpuset_create")
        cs = cpuset.create(self.k, req.name, req.cpus, req.mems, req.memory_migrate)
        return cs.describe(self.k)

    async def cpuset_update(self, req: P.CpusetUpdate) -> dict:
        self._cpuset_admin("cpuset_update")
        cs = cpuset.lookup(self.k, req.name)
        not_moved = await cpuset.update(self.k, cs, req.cpus, req.mems, req.memory_migrate)
        return {**cs.describe(self.k), "not_migrated": not_moved}

    async def cpuset_attach(self, req: P.CpusetAttach) -> dict:
        self._cpuset_admin("cpuset_attach")
        cs = cpuset.lookup(self.k, req.name)
        not_moved = await cpuset.attach(self.k, cs, self.k.task(req.target))
        return {**cs.describe(self.k), "not_migrated": not_moved}

    async def cpuset_remove(self, req: P.CpusetRemove) -> dict:
        self._cpuset_admin("cpuset_remove")
        cpuset.remove(self.k, req.name)
        return {}

    # -- views -----------------------------------------------------------------
    async def numa_maps(self, req: P.NumaMaps) -> dict:
        """``/proc/<pid>/numa_maps``: ``pid`` is the target; the caller is the connection's
        task or peer, and needs the target's owner or privilege (EACCES, as Linux)."""
        task = self.k.task(req.pid)
        caller = creds.CALLER.get()
        if caller is None or not caller.may_read(task):
            raise NumaError(errno.EACCES, f"may not read the numa_maps of task {task.pid}")
        return {"text": await procfs.numa_maps(self.k, task), "command": task.command}

    async def numastat(self, req: P.Numastat) -> dict:
        stats = await procfs.node_stats(self.k)
        vmstat = {"pgmigrate_success": self.k.vmstat.pgmigrate_success,
                  "pgmigrate_fail": self.k.vmstat.pgmigrate_fail, **self.k.numa.counters}
        loop = {"loop_stall_max_ms": round(self.k.loop_stall_max * 1000, 3),
                "loop_restarts": self.k.loop_restarts, "offline_nodes": sorted(self.k.offline)}
        return {"nodes": {str(n): s for n, s in stats.items()}, "vmstat": vmstat,
                "coordinator": loop}

    async def node_free_map(self, req: P.NodeFreeMap) -> dict:
        self.k.task(req.pid)
        reply = await self.k.node(req.node).peer.call(P.FreeMap())
        return {"bits": reply["bits"], "nr_free": reply["nr_free"]}

    async def sysctl(self, req: P.Sysctl) -> dict:
        """Read or (privileged caller) set a tunable: ``migrate_batch`` (vm) and NUMA
        balancing's (coordinator/numa_balancing.py ``TUNABLES``)."""
        k = self.k
        if req.pid is not None:
            k.task(req.pid)
        names = sorted(["migrate_batch", *numa_balancing.TUNABLES])
        if req.name not in names:
            raise NumaError(errno.ENOENT, f"no tunable {req.name!r} (have: {names})")
        if req.value is not None:
            caller = creds.CALLER.get()
            if caller is None or not caller.privileged:
                raise NumaError(errno.EPERM, "setting a tunable needs a privileged caller")
            if req.name == "migrate_batch":
                if not 1 <= req.value <= 1 << 20:
                    raise NumaError(errno.EINVAL, f"migrate_batch must be in 1..{1 << 20}")
                k.migrate_batch = req.value
            else:
                k.numa.set(req.name, req.value)
        if req.name == "migrate_batch":
            return {"value": k.migrate_batch}
        return {"value": k.numa.get(req.name)}

    async def access_profile(self, req: P.AccessProfile) -> dict:
        """What NUMA hinting faults recorded, as packed columns; ``pid`` None: every task the
        caller may see (its own owner's, or all for a privileged caller)."""
        caller = creds.CALLER.get()
        k = self.k
        if req.pid is not None:
            target = k.task(req.pid)
            if caller is not None and not caller.may_read(target):
                raise NumaError(errno.EACCES, f"task {req.pid} belongs to another owner")
        rows = k.numa.profile(req.pid, req.reset)
        if req.pid is None and caller is not None and not caller.privileged:
            visible = [t.pid for t in k.tasks.values() if caller.may_read(t)]
            rows = rows[np.isin(rows["pid"], visible)]
        return {"rows": rows.tobytes(), "dtype": numa_balancing.PROFILE_DTYPE.descr,
                "page_size": k.page_size}

    async def check(self, req: P.Check) -> dict:
        from .invariants import check

        return {"problems": await check(self.k)}

    async def tasks(self, req: P.Tasks) -> dict:
        return {"tasks": [{"pid": t.pid, "os_pid": t.os_pid, "host": t.host, "cpu": t.cpu,
                           "command": t.command, "privileged": t.privileged,
                           "cpuset": t.cpuset.name,
                           "numa_preferred_nid": t.numa_preferred_nid,
                           "numa_faults": t.numa_faults.tolist(),
                           "numa_scan_period_ms": round(t.numa_scan_period * 1000)}
                          for t in self.k.tasks.values() if not t.exiting]}


@asynccontextmanager
async def self_flushed(task: Task | None, vpns):
    """While a syscall runs: ``task`` (its caller) holds no translation of ``vpns`` (an
    array, a (start, end) range, or True: none at all), since its client dropped them and
    cannot fault them back in meanwhile (a task's client sends one request at a time)."""
    if task is None or vpns is None or task.requests != CURRENT_REQUEST.get():
        # (a later request of the task arrived while this one waited, e.g. for the mmap
        # lock: the client stopped waiting, so its promise no longer holds)
        yield
        return
    task.self_flushed = vpns
    try:
        yield
    finally:
        task.self_flushed = None


def _check_request_pages(count: int) -> None:
    if count > MAX_REQUEST_PAGES:
        raise NumaError(errno.EINVAL, f"{count} pages in one request (at most "
                                      f"{MAX_REQUEST_PAGES}; the client library splits calls)")


def _node_list(nodes) -> list[int]:
    """A node list argument: unreadable is EFAULT, out-of-range numbers EINVAL."""
    if not isinstance(nodes, (list, tuple)) or any(
            isinstance(n, bool) or not isinstance(n, int) for n in nodes):
        raise NumaError(errno.EFAULT, "cannot read the node list")
    if len(nodes) > MAX_NUMNODES:
        raise NumaError(errno.EINVAL, f"a node list names at most {MAX_NUMNODES} nodes")
    for n in nodes:
        if n < 0 or n >= MAX_NUMNODES:
            raise NumaError(errno.EINVAL, f"node {n} is outside 0..{MAX_NUMNODES - 1}")
    return sorted(set(nodes))


def check_access(caller: Task, task: Task) -> None:
    """Acting on another task needs the same owner or privilege (ptrace read check)."""
    if task is not caller and task.uid != caller.uid and not caller.privileged:
        raise NumaError(errno.EPERM, f"task {caller.pid} may not act on task {task.pid}")


async def unmap_range(k, task: Task, start: int, end: int) -> None:
    """Remove ``[start, end)`` from a task (caller holds the mmap lock for write)."""
    for vma in task.split_at(start, end):
        task.vmas.remove(vma)
        await zap_vma(k, vma)
        if vma.obj is not None:
            vma.obj.maps -= 1
            await filemap.release_object(k, vma.obj)


async def exit_task(k, task: Task) -> None:
    """exit_mmap: unmap everything and forget the task (also for dead clients)."""
    if task.exiting:
        return
    task.exiting = True
    if task.tlb is not None:
        task.tlb.fail(f"task {task.pid} exited")  # shootdowns waiting for its ack go on
    task.tlb = None
    try:
        async with task.mmap_lock.write():
            # Under the write lock: a pin whose fault held the read lock has finished.
            await movepages.drop_pins(k, task)
            for vma in list(task.vmas):
                await unmap_range(k, task, vma.start, vma.end)
    finally:
        k.tasks.pop(task.pid, None)
        k.numa.forget(task.pid)
        procwatch.close(task.pidfd)
        task.pidfd = None
        log.info("task %d exited", task.pid)
