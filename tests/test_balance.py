"""The user-space placement daemon: each built-in policy fixes a misplaced workload, a user
policy plugs in, a raising policy is skipped, the rate limit holds.

The workload and the daemon each run in client processes of their own; the daemon reads
profiles and moves pages only through the public API.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_migration_concurrent import PS
from test_numa_balancing import _reader

from numaemu import balance

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")


@pytest.fixture(scope="module")
def machine(scanning_machine):
    return scanning_machine


@pytest.fixture(autouse=True)
def _clean(machine):
    yield
    assert machine.sysctl("numaemu.numa_sampling") == 0  # the daemon put the knob back
    assert machine.check() == []


def _daemon(task, policy, seconds: float, rate_limit_mbps=None, interval_ms=200):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    stats = balance.run(task, policy, interval_ms=interval_ms, duration=seconds,
                        rate_limit_mbps=rate_limit_mbps)
    return dataclasses.asdict(stats)


def _mover(task, pages: int, seconds: float):
    """Pages on this task's node; halfway, the task moves to the other node's CPUs."""
    m = task.mmap(pages * PS)
    task.write(m.addr, b"m" * m.length)
    start = sorted(set(task.move_pages(m.pages)))
    end = time.monotonic() + seconds
    moved = False
    while time.monotonic() < end:
        if not moved and time.monotonic() > end - seconds / 2:
            task.sched_setaffinity([2, 3])  # the batch scheduler moves the job's CPUs
            moved = True
        for p in range(pages):
            assert task.read(m.page(p), 1) == b"m"
    return start, sorted(set(task.move_pages(m.pages)))


@pytest.mark.parametrize("policy", ["follow-accesses", "hot-local", "my_policy:ToMyCpu"])
def test_a_policy_brings_misplaced_pages_to_the_node_that_reads_them(machine, policy):
    worker = machine.spawn(_reader, 16, 0, 5.0, cpu=2)
    daemon = machine.spawn(_daemon, policy, 4.0, privileged=True)
    nodes, cpu = worker.join(30)
    stats = daemon.join(30)
    assert cpu == 2 and nodes == [1]
    assert stats["pages_moved"] >= 16 and stats["policy_errors"] == 0


def test_follow_task_moves_a_jobs_pages_after_its_cpus(machine):
    worker = machine.spawn(_mover, 16, 4.0, cpu=0)
    daemon = machine.spawn(_daemon, "follow-task", 4.0, privileged=True)
    start, end = worker.join(30)
    stats = daemon.join(30)
    assert start == [0] and end == [1]
    assert stats["migrations"] >= 1


class Flaky:
    """Raises in every other window; follows accesses in the others."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0
        self.inner = balance.FollowAccesses()

    def decide(self, profile, topology, tasks):
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("a policy bug")
        return self.inner.decide(profile, topology, tasks)


def test_a_raising_policy_is_reported_and_the_daemon_goes_on(machine):
    worker = machine.spawn(_reader, 16, 0, 5.0, cpu=2)
    daemon = machine.spawn(_daemon, "test_balance:Flaky", 4.0, privileged=True)
    nodes, _ = worker.join(30)
    stats = daemon.join(30)
    assert stats["policy_errors"] >= 2 and stats["windows"] > stats["policy_errors"]
    assert nodes == [1]


def test_the_rate_limit_caps_pages_per_window(machine):
    worker = machine.spawn(_reader, 64, 0, 3.0, cpu=2)
    # 0.1 MB/s at 200 ms windows: 5 pages a window.
    daemon = machine.spawn(_daemon, "hot-local", 2.0, 0.1, privileged=True)
    worker.join(30)
    stats = daemon.join(30)
    assert 0 < stats["pages_moved"] <= 5 * stats["windows"]
    assert stats["rate_limited"] > 0


def test_numaemu_balance_runs_from_the_command_line(machine):
    env = dict(os.environ, NUMAEMU_ADDRESS=machine.address)
    worker = machine.spawn(_reader, 8, 0, 4.0, cpu=2)
    out = subprocess.run([sys.executable, "-m", "numaemu", "balance", "--interval-ms", "200",
                          "--duration", "3"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pages moved" in out.stdout
    nodes, _ = worker.join(30)
    assert nodes == [1]
    bad = subprocess.run([sys.executable, "-m", "numaemu", "balance", "--policy", "nope"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "built-ins" in bad.stderr
