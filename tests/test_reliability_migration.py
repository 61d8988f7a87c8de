"""Migration is a transaction: a failure at any step leaves every page mapped and intact.

A privileged task moves pages that client processes keep read-modify-writing, and the
coordinator is told to fail the migration engine at one step (``inject_fault`` with
``migrate_step_N``), step after step.  After each failure the pages are where they were,
mapped, with every increment in place; the next move succeeds (nothing stayed locked or
half-moved); and at the end the invariant check is clean and no frame leaked.
"""

from __future__ import annotations

import time

import pytest
from test_migration_concurrent import (
    GO,
    PS,
    STOP,
    _incrementer,
    assert_increments,
    private_incrementer,
)

from numaemu import MPOL_MF_MOVE_ALL

#: Every step the engine can fail at; 16 is the commit point (a failure right after it
#: leaves the pages moved).
STEPS = list(range(1, 17))


@pytest.fixture
def root(cluster):
    t = cluster.attach(cpu=1, privileged=True)
    yield t
    t.close()


def _inject_step(task, step: int, count: int) -> None:
    task._sync_call("inject_fault", node=0, request=f"migrate_step_{step}", count=count)


def test_a_failure_at_any_step_backs_out_shared_pages_under_concurrent_increments(cluster,
                                                                                   root):
    pages, clients = 4, 2
    free_before = cluster.free_frames()
    mine = root.mmap(pages * PS, shared="txn")
    root.write(mine.addr, bytes(pages * PS))
    workers = [cluster.spawn(_incrementer, "txn", slot, pages, cpu=2 * slot)
               for slot in range(clients)]
    root.write(mine.addr + GO, b"\1")
    target = 1  # the pages start on node 0, and are back there after each step
    try:
        for step in STEPS:
            _inject_step(root, step, 1)
            status = root.move_pages(mine.pages, [target] * pages, MPOL_MF_MOVE_ALL)
            _inject_step(root, step, 0)
            stayed = [node for node in status if node != target]
            assert set(status) <= {0, 1}, f"step {step}: {list(status)}"
            if step < 16:  # the failed batch stayed; a page held back by its waiters moves
                assert status.not_migrated == len(stayed) >= 1, f"step {step}: {list(status)}"
            else:  # the failure came after the commit: the pages moved
                assert status.not_migrated == 0 and not stayed, f"step {step}: {list(status)}"
            # Nothing stayed locked, isolated or half-moved: the next moves go through.
            for node in (target, 1 - target):
                status = root.move_pages(mine.pages, [node] * pages, MPOL_MF_MOVE_ALL)
                assert list(status) == [node] * pages and status.not_migrated == 0, step
    finally:
        root.write(mine.addr + STOP, b"\1")
    results = [w.join(60) for w in workers]
    assert_increments(root, mine, [rounds for rounds, _ in results])
    assert all(rounds > 0 for rounds, _ in results)
    assert cluster.check() == []
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("txn")
    assert cluster.free_frames() == free_before, "a frame leaked"


@pytest.mark.parametrize("step", [1, 5, 7, 12, 13, 15])
def test_a_failure_mid_migrate_pages_leaves_private_pages_with_their_owner(cluster, root,
                                                                           step):
    pages = 8
    worker = cluster.spawn(private_incrementer, pages, 1.5, cpu=0)
    deadline = time.monotonic() + 10
    base = 0x7F0000000000
    while root.move_pages([base + (pages - 1) * PS], pid=worker.pid)[0] < 0:
        assert time.monotonic() < deadline, "the client never touched its pages"
        time.sleep(0.01)
    _inject_step(root, step, 1)
    not_moved = root.migrate_pages(worker.pid, [0], [1])
    _inject_step(root, step, 0)
    assert not_moved == pages
    assert root.move_pages([base + p * PS for p in range(pages)], pid=worker.pid) == [0] * pages
    assert root.migrate_pages(worker.pid, [0], [1]) == 0
    assert worker.join(30)[0] > 0  # the worker checked every counter and its pattern
    assert cluster.check() == []


def test_unknown_migration_steps_are_einval(root):
    import errno

    from numaemu import NumaError

    for bad in ("migrate_step_0", "migrate_step_21", "migrate_step_x"):
        with pytest.raises(NumaError) as info:
            root._sync_call("inject_fault", node=0, request=bad, count=1)
        assert info.value.errno == errno.EINVAL
