"""cpusets (cgroup v1) with memory_migrate: confinement, errnos, rebinding, page migration.

A 4-node machine of its own (CPUs 0-1, 2-3, 4-5 on nodes 0-2; node 3 memory only), real
client processes where pages must move while a task runs, and the invariant check after
every test.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import cluster_is_gone
from test_migration_concurrent import private_incrementer

import numaemu
from numaemu import (
    MPOL_BIND,
    MPOL_F_ADDR,
    MPOL_F_MEMS_ALLOWED,
    MPOL_F_RELATIVE_NODES,
    MPOL_F_STATIC_NODES,
    MPOL_INTERLEAVE,
    MPOL_MF_MOVE,
    NumaError,
)

PS = 4096
DISTANCES = [[10, 16, 21, 32], [16, 10, 21, 21], [21, 21, 10, 16], [32, 21, 16, 10]]


@pytest.fixture(scope="module")
def machine():
    topo = numaemu.Topology(distances=DISTANCES, frames_per_node=2048,
                            cpus=[[0, 1], [2, 3], [4, 5], []])
    with numaemu.Cluster(topo) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture
def sets(machine):
    """Cpusets made by a test; removed after it (their tasks are closed by then)."""
    made: list = []

    def make(name, cpus, mems, memory_migrate=False):
        cs = machine.cpuset_create(name, cpus=cpus, mems=mems, memory_migrate=memory_migrate)
        made.append(cs)
        return cs

    yield make
    root = machine.cpuset("/")
    for cs in made:
        for pid in cs.tasks:  # a test that failed midway left its tasks behind
            root.attach(pid)
        cs.remove()
    assert machine.check() == []


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(NumaError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def placed(task, pages: int, node: int, tag: bytes = b"page"):
    """A mapping of ``pages`` pages bound to ``node`` and touched there (then unbound)."""
    m = task.mmap(pages * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [node])
    for p in range(pages):
        task.write(m.page(p), tag + bytes([p]))
    task.mbind(m.addr, m.length, 0, [])  # MPOL_DEFAULT: the pages stay, the policy goes
    return m


def test_the_root_cpuset_holds_the_machine_and_every_new_task(machine):
    root = machine.cpuset("/")
    assert root.cpus == (0, 1, 2, 3, 4, 5) and root.mems == (0, 1, 2, 3)
    task = machine.attach(cpu=2)
    assert task.pid in root.tasks
    assert task.get_mempolicy(flags=MPOL_F_MEMS_ALLOWED) == (0, {0, 1, 2, 3})
    assert errno_of(root.remove) == errno.EBUSY
    assert errno_of(root.update, mems=[0]) == errno.EACCES
    task.close()


def test_cpuset_administration_errors(machine, sets):
    sets("admin", cpus=[0], mems=[0])
    assert errno_of(machine.cpuset_create, "admin", cpus=[0], mems=[0]) == errno.EEXIST
    assert errno_of(machine.cpuset_create, "bad", cpus=[9], mems=[0]) == errno.EINVAL
    assert errno_of(machine.cpuset_create, "bad", cpus=[0], mems=[7]) == errno.EINVAL
    assert errno_of(machine.cpuset_create, "a/b", cpus=[0], mems=[0]) == errno.EINVAL
    assert errno_of(machine.cpuset_create, "x" * 256, cpus=[0], mems=[0]) == errno.ENAMETOOLONG
    assert errno_of(machine.cpuset, "nothing") == errno.ENOENT
    empty = sets("empty", cpus=[], mems=[])
    task = machine.attach(cpu=0)
    assert errno_of(empty.attach, task.pid) == errno.ENOSPC
    busy = sets("busy", cpus=[0, 1], mems=[0])
    busy.attach(task.pid)
    assert errno_of(busy.remove) == errno.EBUSY
    assert errno_of(busy.update, mems=[]) == errno.ENOSPC
    # An unprivileged task's connection may read cpusets but not change them.
    assert errno_of(task._conn.call, "cpuset_create", name="mine", cpus=[0], mems=[0]) == \
        errno.EPERM
    assert errno_of(task._conn.call, "cpuset_attach", name="admin", target=task.pid) == \
        errno.EPERM
    assert [c["name"] for c in task._conn.call("cpusets")["cpusets"]][:1] == ["/"]
    task.close()


def test_a_task_in_a_cpuset_is_confined_to_its_cpus_and_nodes(machine, sets):
    job = sets("job", cpus=[2, 3], mems=[1, 3])
    task = machine.attach(cpu=0)
    job.attach(task.pid)
    assert task.pid in job.tasks and task.pid not in machine.cpuset("/").tasks
    deadline = time.monotonic() + 5  # the scheduler's word reaches the client (resched)
    while task.cpu != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert task.node == 1
    assert task.get_mempolicy(flags=MPOL_F_MEMS_ALLOWED) == (0, {1, 3})
    # CPU affinity is intersected with the cpuset's CPUs.
    assert errno_of(task.sched_setaffinity, [0, 1]) == errno.EINVAL
    task.sched_setaffinity([0, 3])
    assert task.cpu == 3
    # Policies are intersected with the cpuset's nodes; nothing left is EINVAL.
    assert errno_of(task.set_mempolicy, MPOL_BIND, [0, 2]) == errno.EINVAL
    task.set_mempolicy(MPOL_INTERLEAVE, [0, 1, 3])
    assert task.get_mempolicy() == (MPOL_INTERLEAVE, {1, 3})
    task.set_mempolicy(0, [])
    # Every allocation stays inside: first touch from node 1's CPU, and under pressure.
    m = task.mmap(8 * PS)
    task.write(m.addr, b"z" * m.length)
    assert set(task.move_pages(m.pages)) <= {1, 3}
    # move_pages to a node outside the target's cpuset: EACCES for the whole call.
    assert errno_of(task.move_pages, m.pages[:1], [0], MPOL_MF_MOVE) == errno.EACCES
    assert task.move_pages(m.pages[:1], [3], MPOL_MF_MOVE) == [3]
    # migrate_pages to nodes outside the target's cpuset: EPERM without privilege.
    assert errno_of(task.migrate_pages, None, [1], [0]) == errno.EPERM
    root = machine.attach(cpu=0, privileged=True)
    assert root.migrate_pages(task.pid, [1, 3], [3]) == 0
    assert set(task.move_pages(m.pages)) == {3}
    root.close()
    task.close()


def test_memory_migrate_on_attach_keeps_relative_placement_and_zero_leaves_pages(machine,
                                                                                 sets):
    follow = sets("follow", cpus=[4, 5], mems=[2, 3], memory_migrate=True)
    stay = sets("stay", cpus=[4, 5], mems=[2, 3])
    moved, kept = machine.attach(cpu=0), machine.attach(cpu=0)
    for task, cs in ((moved, follow), (kept, stay)):
        a, b = placed(task, 3, 0, b"first"), placed(task, 3, 1, b"second")
        assert cs.attach(task.pid) == 0
        # memory_migrate: node 0 (1st of the old set) -> 2 (1st of the new), 1 -> 3.
        want = ([2] * 3, [3] * 3) if cs is follow else ([0] * 3, [1] * 3)
        assert (task.move_pages(a.pages), task.move_pages(b.pages)) == want
        assert [task.read(p, 6) for p in a.pages] == [b"first" + bytes([i]) for i in range(3)]
        assert [task.read(p, 7) for p in b.pages] == [b"second" + bytes([i]) for i in range(3)]
        fresh = task.mmap(2 * PS)  # new allocations follow the new nodes either way
        task.write(fresh.addr, b"new" * 2000)
        assert set(task.move_pages(fresh.pages)) <= {2, 3}
    moved.close()
    kept.close()


def test_changing_mems_rebinds_policies_as_linux_does(machine, sets):
    job = sets("rebind", cpus=[0, 1], mems=[0, 1])
    task = machine.attach(cpu=0)
    job.attach(task.pid)
    plain, static, relative = (task.mmap(PS) for _ in range(3))
    task.mbind(plain.addr, PS, MPOL_BIND, [1])
    task.mbind(static.addr, PS, MPOL_BIND | MPOL_F_STATIC_NODES, [1, 2])
    task.mbind(relative.addr, PS, MPOL_INTERLEAVE | MPOL_F_RELATIVE_NODES, [0])
    task.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
    static_mode = MPOL_BIND | MPOL_F_STATIC_NODES
    assert task.get_mempolicy(static.addr, MPOL_F_ADDR) == (static_mode, {1, 2})  # user mask
    job.update(mems=[2, 3])
    # Plain masks move by position (1, the 2nd old node, becomes 3, the 2nd new one).
    assert task.get_mempolicy(plain.addr, MPOL_F_ADDR) == (MPOL_BIND, {3})
    assert task.get_mempolicy() == (MPOL_INTERLEAVE, {2, 3})
    # STATIC_NODES re-intersects the user's nodes: now node 2 (reported as the user mask).
    assert task.get_mempolicy(static.addr, MPOL_F_ADDR) == (static_mode, {1, 2})
    task.write(static.addr, b"s")
    assert task.move_pages([static.addr]) == [2]
    # RELATIVE_NODES folds bit 0 onto the first node of the new set.
    task.write(relative.addr, b"r")
    assert task.move_pages([relative.addr]) == [2]
    task.write(plain.addr, b"p")
    assert task.move_pages([plain.addr]) == [3]
    task.close()


def test_memory_migrate_moves_a_running_tasks_pages_when_mems_change(machine, sets):
    job = sets("moving", cpus=[0, 1], mems=[0], memory_migrate=True)
    worker = machine.spawn(private_incrementer, 16, 3.0, cpu=0)
    job.attach(worker.pid)
    base = 0x7F0000000000
    deadline = time.monotonic() + 10
    root = machine.attach(cpu=1, privileged=True)
    while root.move_pages([base + 15 * PS], pid=worker.pid)[0] < 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    changes = 0
    for mems in ([1], [3], [0], [2], [0]):
        if worker.done():
            break
        assert job.update(mems=mems) == 0  # returns once the pages have moved
        assert set(root.move_pages([base + p * PS for p in range(16)], pid=worker.pid)) == \
            set(mems)
        changes += 1
    rounds, nodes = worker.join(30)
    assert changes >= 2 and rounds > 0 and nodes == [0]  # the worker checked every count
    root.close()


def test_numaemu_run_starts_a_task_in_a_cpuset_and_the_cli_manages_them(machine, sets):
    env = dict(os.environ, NUMAEMU_ADDRESS=machine.address)
    cli = [sys.executable, "-m", "numaemu"]

    def run(*args):
        return subprocess.run(cli + list(args), env=env, capture_output=True, text=True,
                              timeout=60)

    made = run("cpuset", "create", "cli", "--cpus", "4-5", "--mems", "2", "--memory-migrate")
    assert made.returncode == 0, made.stderr
    sets_cli = machine.cpuset("cli")
    assert (sets_cli.cpus, sets_cli.mems, sets_cli.memory_migrate) == ((4, 5), (2,), True)
    script = ("import json, numaemu; t = numaemu.attach(); "
              "print(json.dumps([t.cpu, sorted(t.get_mempolicy(flags=4)[1])])); t.close()")
    out = run("run", "--cpuset", "cli", "--", sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [4, [2]]
    assert run("cpuset", "set", "cli", "--mems", "3", "--memory-migrate", "0").returncode == 0
    listing = run("cpuset", "list").stdout
    assert "cli" in listing and "4-5" in listing
    assert run("run", "--cpuset", "nothing", "--", "true").returncode == 1
    assert run("cpuset", "remove", "cli").returncode == 0
    assert "cli" not in [c.name for c in machine.cpusets()]
