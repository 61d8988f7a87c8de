"""NUMA balancing: hinting faults recorded, misplaced pages and tasks moved, profiles read.

Workloads run in client processes on a 2-node machine of this module (CPUs 0-1 on node 0,
2-3 on node 1); the scanner is set to scan at once and often, so each test sees a few scan
periods within seconds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from test_migration_concurrent import GO, PS, STOP, _incrementer, assert_increments

from numaemu import MPOL_BIND, NumaError


@pytest.fixture(scope="module")
def machine(scanning_machine):
    return scanning_machine


@pytest.fixture
def balancing(machine):
    """Sets NUMA balancing sysctls for one test; everything off again after it."""
    def set_(**values):
        for name, value in values.items():
            machine.sysctl(name.replace("__", "."), value)

    yield set_
    machine.sysctl("kernel.numa_balancing", 0)
    machine.sysctl("numaemu.numa_sampling", 0)
    machine.access_profile(reset=True)
    assert machine.check() == []


def _reader(task, pages: int, node: int, seconds: float):
    """Pages bound to ``node`` (the policy then dropped), read again and again."""
    m = task.mmap(pages * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [node])
    for p in range(pages):
        task.write(m.page(p), b"data" + bytes([p]))
    task.mbind(m.addr, m.length, 0, [])
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in range(pages):
            assert task.read(m.page(p), 5) == b"data" + bytes([p])
    return sorted(set(task.move_pages(m.pages))), task.cpu


def wait_for(what, timeout: float = 15.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(step)


def test_sampling_records_hinting_faults_without_acting(machine, balancing):
    balancing(numaemu__numa_sampling=1)
    before = machine.vmstat()
    worker = machine.spawn(_reader, 16, 0, 2.0, cpu=2)
    wait_for(lambda: len(machine.access_profile(worker.pid)) >= 16)
    nodes, cpu = worker.join(30)
    assert nodes == [0] and cpu == 2  # nothing moved: sampling only records
    after = machine.vmstat()
    assert after["numa_hint_faults"] > before["numa_hint_faults"]
    assert after["numa_pte_updates"] >= after["numa_hint_faults"] - before["numa_hint_faults"]
    assert after["numa_pages_migrated"] == before["numa_pages_migrated"]


def test_the_profile_says_who_touched_which_page_from_where(machine, balancing):
    balancing(numaemu__numa_sampling=1)
    task = machine.attach(cpu=2)  # node 1
    m = task.mmap(8 * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [0])
    task.write(m.addr, b"p" * m.length)
    wait_for(lambda: [task.read(m.page(p), 1) for p in range(8)] and
             len(machine.access_profile(task.pid)) >= 8)
    rows = machine.access_profile(task.pid)
    assert set(rows["pid"]) == {task.pid}
    assert set(rows["addr"]) <= set(m.pages) and len(set(rows["addr"])) == 8
    assert set(rows["page_node"]) == {0} and set(rows["cpu_node"]) == {1}
    assert (rows["count"] >= 1).all() and (rows["last_ns"] > 0).all()
    assert len(machine.access_profile(task.pid, reset=True)) == len(rows)
    assert len(machine.access_profile(task.pid)) <= 8  # only what came after the reset
    stranger = machine.attach(cpu=0, uid=os.getuid() + 1)
    with pytest.raises(NumaError) as info:
        stranger._conn.call("access_profile", pid=task.pid)
    assert info.value.errno == errno.EACCES
    assert stranger._conn.call("access_profile")["rows"] == b""  # sees nobody else's
    stranger.close()
    task.close()


def test_the_kernel_moves_misplaced_pages_to_the_accessing_node(machine, balancing):
    job = machine.cpuset_create("pinned", cpus=[2, 3], mems=[0, 1])  # the task cannot move
    try:
        before = machine.vmstat()["numa_pages_migrated"]
        balancing(kernel__numa_balancing=1)
        worker = machine.spawn(_reader, 16, 0, 4.0, cpu=2)
        job.attach(worker.pid)
        nodes, cpu = worker.join(30)
        assert nodes == [1] and cpu in (2, 3)  # every page followed the task's accesses
        assert machine.vmstat()["numa_pages_migrated"] - before >= 16
    finally:
        job.remove()


def test_the_kernel_moves_a_task_to_the_node_of_its_memory(machine, balancing):
    balancing(kernel__numa_balancing=1)
    worker = machine.spawn(_reader, 32, 0, 4.0, cpu=2)
    nodes, cpu = worker.join(30)
    # The task went to its memory (or, had the pages moved first, its memory came to it).
    assert machine.topology.node_of_cpu(cpu) in nodes


def test_increments_stay_exact_while_numa_balancing_moves_shared_pages(machine, balancing):
    pages, clients = 4, 2
    root = machine.attach(cpu=0, privileged=True)
    mine = root.mmap(pages * PS, shared="balanced")
    root.mbind(mine.addr, mine.length, MPOL_BIND, [0])
    root.write(mine.addr, bytes(pages * PS))
    job = machine.cpuset_create("far", cpus=[2, 3], mems=[0, 1])
    try:
        before = machine.vmstat()["numa_pages_migrated"]
        balancing(kernel__numa_balancing=1)
        workers = [machine.spawn(_incrementer, "balanced", slot, pages, cpu=2 + slot)
                   for slot in range(clients)]
        for w in workers:
            job.attach(w.pid)
        root.write(mine.addr + GO, b"\1")
        wait_for(lambda: set(root.move_pages(mine.pages)) == {1})  # moved under the clients
        time.sleep(0.3)
        root.write(mine.addr + STOP, b"\1")
        results = [w.join(60) for w in workers]
        assert_increments(root, mine, [rounds for rounds, _ in results])
        assert machine.vmstat()["numa_pages_migrated"] - before >= pages
    finally:
        job.remove()
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("balanced")
    root.close()


def test_numa_balancing_tunables_and_their_errors(machine, balancing):
    assert machine.sysctl("kernel.numa_balancing") == 0
    for name, value, err in (("kernel.numa_balancing", 2, errno.EINVAL),
                             ("kernel.numa_balancing", 5, errno.EINVAL),
                             ("kernel.numa_balancing_scan_size_mb", 0, errno.EINVAL),
                             ("kernel.no_such_knob", 1, errno.ENOENT)):
        with pytest.raises(NumaError) as info:
            machine.sysctl(name, value)
        assert info.value.errno == err, name
    task = machine.attach(cpu=0)
    assert task.sysctl("kernel.numa_balancing_scan_period_min_ms") == 100
    with pytest.raises(NumaError) as info:
        task.sysctl("kernel.numa_balancing", 1)
    assert info.value.errno == errno.EPERM
    task.close()


def test_the_cli_reads_tunables_counters_and_profiles(machine, balancing):
    env = dict(os.environ, NUMAEMU_ADDRESS=machine.address)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "numaemu", *args], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert cli("sysctl", "numaemu.numa_sampling", "1") == "numaemu.numa_sampling = 1\n"
    task = machine.attach(cpu=2)
    m = task.mmap(4 * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [0])
    task.write(m.addr, b"c" * m.length)
    wait_for(lambda: [task.read(m.page(p), 1) for p in range(4)] and
             len(machine.access_profile(task.pid)) >= 4)
    rows = json.loads(cli("profile", str(task.pid), "--json"))
    assert {r["addr"] for r in rows} == set(m.pages)
    assert "numa_hint_faults" in cli("vmstat")
    assert "hinting faults" in cli("profile")
    task.close()
