"""Page migration through real processes: move_pages, migrate_pages, mbind MOVE.

Cases follow reference/linux-semantics.md section 12 (items 1-12 and 24); each
test also checks that the data survived the move.
"""

from __future__ import annotations

import errno
import os

import pytest

from numaemu import (
    MPOL_BIND,
    MPOL_F_ADDR,
    MPOL_F_NODE,
    MPOL_INTERLEAVE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_MF_STRICT,
    MPOL_PREFERRED,
    NumaError,
)

PS = 4096


def fill(task, m, seed: int = 0) -> bytes:
    data = bytes((seed + i) % 251 for i in range(m.length))
    task.write(m.addr, data)
    return data


def node_counts(numa_maps: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in numa_maps.splitlines():
        for field in line.split()[2:]:
            if field.startswith("N") and "=" in field:
                n, c = field[1:].split("=")
                counts[int(n)] = counts.get(int(n), 0) + int(c)
    return counts


@pytest.fixture
def root(cluster):
    """A privileged task (CAP_SYS_NICE) on node 0."""
    t = cluster.attach(cpu=1, privileged=True)
    yield t
    t.close()


# -- move_pages ------------------------------------------------------------------------


def test_move_pages_moves_private_pages_and_keeps_their_data(task, cluster):
    m = task.mmap(8 * PS)
    data = fill(task, m)
    assert task.move_pages(m.pages) == [0] * 8
    status = task.move_pages(m.pages, [1] * 8, MPOL_MF_MOVE)
    assert status == [1] * 8 and status.not_migrated == 0
    assert task.move_pages(m.pages) == [1] * 8
    assert task.get_mempolicy(m.page(3), MPOL_F_NODE | MPOL_F_ADDR)[0] == 1
    assert task.read(m.addr, m.length) == data
    task.write(m.addr + 5, b"after")  # the new frames are writable
    assert task.read(m.addr, 10) == data[:5] + b"after"
    assert cluster.check() == []


def test_move_pages_to_the_node_a_page_is_on_succeeds_without_moving(task):
    m = task.mmap(2 * PS)
    fill(task, m)
    status = task.move_pages(m.pages, [0, 0], MPOL_MF_MOVE)
    assert status == [0, 0] and status.not_migrated == 0


def test_move_pages_statuses_for_untouched_zero_and_unmapped_pages(task):
    m = task.mmap(4 * PS)
    task.write(m.page(0), b"x")
    task.read(m.page(2), 1)  # the zero page
    gone = task.mmap(PS)
    task.munmap(gone.addr, PS)
    status = task.move_pages([m.page(0), m.page(1), m.page(2), gone.addr], [1] * 4,
                             MPOL_MF_MOVE)
    assert list(status) == [1, -errno.ENOENT, -errno.EFAULT, -errno.EFAULT]


def test_shared_page_is_eacces_with_move_and_moves_for_everyone_with_move_all(cluster,
                                                                              root):
    a = cluster.attach(cpu=0)
    b = cluster.attach(cpu=2)
    try:
        ma, mb = a.mmap(2 * PS, shared="mig-shared"), b.mmap(2 * PS, shared="mig-shared")
        a.write(ma.addr, b"shared data" + bytes(PS))
        assert b.read(mb.addr, 11) == b"shared data"  # both map the first page now
        a.write(ma.page(1), b"private to the object, mapped once")
        status = a.move_pages(ma.pages, [1, 1], MPOL_MF_MOVE)
        assert status[0] == -errno.EACCES and status[1] == 1
        with pytest.raises(NumaError) as e:
            a.move_pages([ma.addr], [1], MPOL_MF_MOVE_ALL)
        assert e.value.errno == errno.EPERM
        status = root.move_pages([ma.addr], [1], MPOL_MF_MOVE_ALL, pid=a.pid)
        assert list(status) == [1]
        assert b.move_pages([mb.addr]) == [1] and a.move_pages([ma.addr]) == [1]
        assert b.read(mb.addr, 11) == b"shared data"
        b.write(mb.addr, b"SHARED")
        assert a.read(ma.addr, 11) == b"SHARED data"
        assert "mapmax=2" in b.numa_maps()
        a.shm_unlink("mig-shared")
    finally:
        a.close()
        b.close()
    assert cluster.check() == []


def test_move_pages_call_errors(task, cluster):
    m = task.mmap(PS)
    task.write(m.addr, b"x")
    for flags, err in ((MPOL_MF_STRICT, errno.EINVAL), (MPOL_MF_MOVE_ALL, errno.EPERM)):
        with pytest.raises(NumaError) as e:
            task.move_pages([m.addr], [1], flags)
        assert e.value.errno == err
    for node in (2, -1, 5000):
        with pytest.raises(NumaError) as e:
            task.move_pages([m.addr], [node], MPOL_MF_MOVE)
        assert e.value.errno == errno.ENODEV
    with pytest.raises(NumaError) as e:
        task.move_pages([m.addr], [1], MPOL_MF_MOVE, pid=999999)
    assert e.value.errno == errno.ESRCH
    stranger = cluster.attach(cpu=0, uid=os.getuid() + 1)
    try:
        with pytest.raises(NumaError) as e:
            stranger.move_pages([m.addr], [1], MPOL_MF_MOVE, pid=task.pid)
        assert e.value.errno == errno.EPERM
    finally:
        stranger.close()
    assert task.move_pages([m.addr]) == [0]  # nothing moved by the failed calls


def test_move_pages_stops_at_a_batch_with_failures_and_counts_the_rest(task):
    m = task.mmap(4 * PS)
    data = fill(task, m)
    with task.pin(m.page(1), PS):  # a held reference: step 7 backs out
        status = task.move_pages(m.pages, [1, 1, 0, 1], MPOL_MF_MOVE)
        # batch {0, 1} -> node 1 leaves one page behind; entries 2 and 3 are never examined
        assert status.not_migrated == 1 + 2
        assert list(status) == [1, 0, 0, 0]
    assert task.read(m.addr, m.length) == data


def test_pinned_page_moves_only_after_release(task, cluster):
    m = task.mmap(PS)
    task.write(m.addr, b"pinned")
    with task.pin(m.addr, PS):
        assert task.move_pages([m.addr], [1], MPOL_MF_MOVE).not_migrated == 1
        assert task.move_pages([m.addr]) == [0]
        assert task.read(m.addr, 6) == b"pinned"
        assert cluster.check() == []
    assert list(task.move_pages([m.addr], [1], MPOL_MF_MOVE)) == [1]
    assert task.read(m.addr, 6) == b"pinned"
    assert cluster.check() == []


def test_failed_copy_backs_the_batch_out_and_the_retry_succeeds(task, cluster):
    m = task.mmap(4 * PS)
    data = fill(task, m, 7)
    with cluster.attach(cpu=1, privileged=True) as root:  # fault injection is privileged
        root._sync_call("inject_fault", node=1, request="copy_in", count=1)
        status = task.move_pages(m.pages, [1] * 4, MPOL_MF_MOVE)
        assert list(status) == [1] * 4  # the next pass copied again
        assert task.read(m.addr, m.length) == data
        root._sync_call("inject_fault", node=0, request="copy_in", count=100)
        status = task.move_pages(m.pages, [0] * 4, MPOL_MF_MOVE)
        assert status.not_migrated == 4 and list(status) == [1] * 4
        root._sync_call("inject_fault", node=0, request="copy_in", count=0)
    assert task.read(m.addr, m.length) == data
    assert cluster.check() == []


# -- migrate_pages ------------------------------------------------------------------------


def test_migrate_pages_moves_only_pages_on_the_old_nodes(task4, cluster4):
    m = task4.mmap(8 * PS)
    task4.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1, 2, 3])
    data = fill(task4, m, 3)
    before = list(task4.move_pages(m.pages))
    assert sorted(set(before)) == [0, 1, 2, 3]
    assert task4.migrate_pages(None, [1], [2]) == 0
    after = list(task4.move_pages(m.pages))
    assert after == [2 if n == 1 else n for n in before]
    assert task4.migrate_pages(None, [3], [3]) == 0
    assert task4.read(m.addr, m.length) == data
    assert cluster4.check() == []


@pytest.mark.parametrize("old, new, remap", [
    ([0, 1, 2], [1, 2, 3], {0: 1, 1: 2, 2: 3, 3: 3}),  # shift up by one, no page moves twice
    ([0, 1], [2, 3], {0: 2, 1: 3, 2: 2, 3: 3}),
    ([0, 1, 2, 3], [1], {0: 1, 1: 1, 2: 1, 3: 1}),  # pages on 1 stay
    ([0], [0, 1], {0: 0, 1: 1, 2: 2, 3: 3}),  # 0 is in new and the sizes differ: nothing
])
def test_migrate_pages_relative_placement(task4, cluster4, old, new, remap):
    m = task4.mmap(8 * PS)
    task4.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1, 2, 3])
    data = fill(task4, m, 11)
    before = list(task4.move_pages(m.pages))
    assert task4.migrate_pages(None, old, new) == 0
    assert list(task4.move_pages(m.pages)) == [remap[n] for n in before]
    assert task4.read(m.addr, m.length) == data
    total = node_counts(task4.numa_maps())
    assert sum(total.values()) == 8  # page-count conservation (item 24)


def test_migrate_pages_of_another_task_and_its_errors(cluster, task, root):
    m = task.mmap(4 * PS)
    fill(task, m)
    assert root.migrate_pages(task.pid, [0], [1]) == 0
    assert task.move_pages(m.pages) == [1] * 4
    # A node the target's cpuset lacks (node 7 does not exist) is EPERM for an unprivileged
    # caller (kernel_migrate_pages checks the cpuset first), EINVAL for a privileged one.
    with pytest.raises(NumaError) as e:
        root.migrate_pages(task.pid, [0], [7])
    assert e.value.errno == errno.EINVAL
    for args, err in (((999999, [0], [1]), errno.ESRCH), ((None, [0], [7]), errno.EPERM),
                      ((None, [0], []), errno.EINVAL), ((None, [-1], [1]), errno.EINVAL),
                      ((None, object(), [1]), errno.EFAULT)):
        with pytest.raises(NumaError) as e:
            task.migrate_pages(*args)
        assert e.value.errno == err, args
    stranger = cluster.attach(cpu=0, uid=os.getuid() + 1)
    try:
        with pytest.raises(NumaError) as e:
            stranger.migrate_pages(task.pid, [1], [0])
        assert e.value.errno == errno.EPERM
    finally:
        stranger.close()


def test_migrate_pages_leaves_shared_pages_unless_privileged(cluster, root):
    a = cluster.attach(cpu=0)
    b = cluster.attach(cpu=0)
    try:
        ma, mb = a.mmap(PS, shared="mig-mp"), b.mmap(PS, shared="mig-mp")
        a.write(ma.addr, b"both")
        b.read(mb.addr, 4)
        private = a.mmap(PS)
        a.write(private.addr, b"mine")
        assert a.migrate_pages(None, [0], [1]) == 0  # the shared page is not counted
        assert a.move_pages([ma.addr, private.addr]) == [0, 1]
        assert root.migrate_pages(a.pid, [0], [1]) == 0
        assert a.move_pages([ma.addr]) == [1] and b.move_pages([mb.addr]) == [1]
        assert b.read(mb.addr, 4) == b"both"
        a.shm_unlink("mig-mp")
    finally:
        a.close()
        b.close()


# -- mbind MOVE ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [MPOL_BIND, MPOL_PREFERRED, MPOL_INTERLEAVE])
@pytest.mark.parametrize("flags", [MPOL_MF_MOVE, MPOL_MF_MOVE_ALL])
def test_mbind_move_relocates_faulted_pages(cluster, root, mode, flags):
    m = root.mmap(PS)
    root.write(m.addr, b"relocate me")
    assert root.move_pages([m.addr]) == [0]
    root.mbind(m.addr, PS, mode, [1], flags)
    assert root.move_pages([m.addr]) == [1]
    assert root.get_mempolicy(m.addr, MPOL_F_ADDR) == (mode, {1})
    assert root.read(m.addr, 11) == b"relocate me"
    root.munmap(m.addr, PS)


def test_mbind_move_strict_is_eio_when_a_page_cannot_move(task):
    m = task.mmap(2 * PS)
    fill(task, m)
    with task.pin(m.page(0), PS):
        with pytest.raises(NumaError) as e:
            task.mbind(m.addr, m.length, MPOL_BIND, [1], MPOL_MF_MOVE | MPOL_MF_STRICT)
        assert e.value.errno == errno.EIO
        assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_BIND, {1})  # installed
        assert task.move_pages(m.pages) == [0, 1]
        task.mbind(m.addr, m.length, MPOL_BIND, [1], MPOL_MF_MOVE)  # silent without STRICT


def test_mbind_interleave_move_leaves_pages_already_on_a_mask_node(task4):
    m = task4.mmap(4 * PS)
    task4.mbind(m.addr, m.length, MPOL_BIND, [1])
    fill(task4, m)
    task4.mbind(m.addr, m.length, MPOL_INTERLEAVE, [1, 2], MPOL_MF_MOVE)
    assert task4.move_pages(m.pages) == [1] * 4  # already on a node of the mask


# -- page cache -----------------------------------------------------------------------------


def test_dirty_file_pages_migrate_and_msync_writes_the_new_frames(cluster, tmp_path):
    path = tmp_path / "mig.bin"
    path.write_bytes(b"\0" * 4 * PS)
    t = cluster.attach(cpu=0)
    other = cluster.attach(cpu=2)
    try:
        m = t.mmap(4 * PS, file=path)
        mo = other.mmap(4 * PS, file=path)
        data = bytes((i * 7) % 256 for i in range(4 * PS))
        t.write(m.addr, data)
        assert "dirty=4" in t.numa_maps()
        status = t.move_pages(m.pages, [1] * 4, MPOL_MF_MOVE)
        assert list(status) == [1] * 4
        assert other.read(mo.addr, 4 * PS) == data  # other maps it now: finds the new page
        assert t.msync(m.addr, m.length) in (0, 4)  # the flusher may have been first
        assert path.read_bytes() == data
        assert cluster.check() == []
    finally:
        t.close()
        other.close()


def test_a_task_moving_its_own_pages_gets_no_shootdown(task):
    """The caller flushes its own TLB (the kernel's local flush): no invalidation reaches
    it for its own move_pages, migrate_pages or mbind MOVE, and its data stays intact."""
    m = task.mmap(4 * PS)
    data = fill(task, m, 5)
    for k in range(3):
        assert list(task.move_pages(m.pages, [(k + 1) % 2] * 4, MPOL_MF_MOVE)) == [(k + 1) % 2] * 4
    assert task.migrate_pages(None, [1], [0]) == 0
    task.mbind(m.addr, m.length, MPOL_BIND, [1], MPOL_MF_MOVE)
    assert task.move_pages(m.pages) == [1] * 4
    assert task.stats()["invalidations"] == 0
    assert task.read(m.addr, m.length) == data
