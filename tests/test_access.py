"""Multi-page reads and writes: every frame layout, exact data and per-page charges, and
the layout a task remembers for a range forgotten as soon as a shootdown changes it."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_migration_concurrent import PS, _pingpong

from numaemu import MPOL_BIND, MPOL_INTERLEAVE, MPOL_MF_MOVE_ALL

PAGES = 12


def _scattered(task, pages: int):
    """A mapping on node 0 whose frames are not consecutive: another mapping took every
    other frame as both were touched page by page."""
    m, other = task.mmap(pages * PS), task.mmap(pages * PS)
    for p in range(pages):
        task.write(m.page(p), b"\0")
        task.write(other.page(p), b"\0")
    return m


def _layouts(task):
    """(name, mapping, which path a whole-mapping access takes) for each frame layout."""
    contiguous = task.mmap(PAGES * PS)
    task.write(contiguous.addr, bytes(contiguous.length))
    interleaved = task.mmap(PAGES * PS)
    task.mbind(interleaved.addr, interleaved.length, MPOL_INTERLEAVE, [0, 1])
    task.write(interleaved.addr, bytes(interleaved.length))
    with_zero_pages = task.mmap(PAGES * PS)
    task.read(with_zero_pages.addr, with_zero_pages.length)  # the zero page, read-only
    for p in range(0, PAGES, 3):
        task.write(with_zero_pages.page(p), b"\0")
    return [("contiguous", contiguous, "one slice"),
            ("scattered", _scattered(task, PAGES), "one node"),
            ("interleaved", interleaved, "several nodes"),
            ("with zero pages", with_zero_pages, "one node")]


def _path(task, m) -> str:
    i0 = (m.addr >> task._shift) - task._base_vpn
    with task._access_lock:
        node, first = task._placement(i0, i0 + m.length // PS)
    return "one slice" if first >= 0 else "one node" if node >= 0 else "several nodes"


def _charges(task, fn, calls) -> tuple[list, list, float]:
    """What ``fn(*args)`` for each args of ``calls`` charged: by node pair, and in ns."""
    before = task.stats()
    for args in calls:
        fn(*args)
    after = task.stats()
    return (np.subtract(after["accesses_by_pair"], before["accesses_by_pair"]).tolist(),
            np.subtract(after["bytes_by_pair"], before["bytes_by_pair"]).tolist(),
            after["access_ns"] - before["access_ns"])


def test_multi_page_accesses_read_back_exactly_whatever_the_frame_layout(fresh_task):
    task = fresh_task
    rng = np.random.default_rng(5)
    for name, m, path in _layouts(task):
        assert _path(task, m) == path, name
        ref = bytearray(task.read(m.addr, m.length))
        for _ in range(40):
            start = int(rng.integers(0, m.length - 1))
            n = int(rng.integers(1, m.length - start + 1))
            if rng.random() < 0.5:
                data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                task.write(m.addr + start, data if rng.random() < 0.5 else bytearray(data))
                ref[start : start + n] = data
            assert task.read(m.addr + start, n) == ref[start : start + n], name
        # A write from a numpy array and a read of everything, at the end.
        data = rng.integers(0, 256, m.length - 3, dtype=np.uint8)
        task.write(m.addr + 3, data)
        ref[3:] = data.tobytes()
        assert task.read(m.addr, m.length) == ref, name


def test_a_multi_page_access_is_charged_as_its_pages_one_by_one(fresh_task):
    task = fresh_task
    for name, m, _ in _layouts(task):
        task.write(m.addr, bytes(m.length))  # every page writable now
        start, n = 100, m.length - 150
        pieces = [(a, min(PS - a % PS, m.addr + start + n - a))
                  for a in [m.addr + start, *range(m.page(1), m.addr + start + n, PS)]]
        assert sum(size for _, size in pieces) == n
        whole = _charges(task, task.read, [(m.addr + start, n)])
        one_by_one = _charges(task, task.read, pieces)
        assert whole[:2] == one_by_one[:2], name
        assert whole[2] == pytest.approx(one_by_one[2], rel=1e-12), name
        whole = _charges(task, task.write, [(m.addr + start, bytes(n))])
        one_by_one = _charges(task, task.write, [(a, bytes(size)) for a, size in pieces])
        assert whole[:2] == one_by_one[:2], name


def test_a_remembered_layout_is_dropped_when_pages_move(cluster, task):
    """The task remembers where a range's frames are; another task moving the pages (a
    shootdown) must make it forget, or its next access would touch the old frames."""
    m = task.mmap(PAGES * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [0])
    task.write(m.addr, b"a" * m.length)
    assert task.read(m.addr, m.length) == b"a" * m.length  # remembered: node 0, one slice
    root = cluster.attach(cpu=1, privileged=True)
    try:
        for target, fill in ((1, b"b"), (0, b"c")):
            status = root.move_pages(m.pages, [target] * PAGES, MPOL_MF_MOVE_ALL,
                                     pid=task.pid)
            assert status.not_migrated == 0
            task.write(m.addr, fill * m.length)
            assert task.read(m.addr, m.length) == fill * m.length
            before = task.stats()
            task.read(m.addr, m.length)
            after = task.stats()
            assert after["accesses_by_pair"][0][target] - \
                before["accesses_by_pair"][0][target] == PAGES
        assert root.move_pages(m.pages, pid=task.pid) == [0] * PAGES
    finally:
        root.close()


def _bulk_writer(task, name: str, pages: int, seconds: float):
    """Write generation g over every page of a shared object with one call and read it back
    with one call, g = 1, 2, ... for ``seconds``: the pages move all along (their layout
    changes).  Returns the last generation and the waits on migrating pages."""
    m = task.mmap(pages * PS, shared=name)
    g, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        g += 1
        data = np.full(pages * PS // 8, g, dtype=np.int64)
        data[0] = -g  # two writes: the first page is a partial copy in the second one
        task.write(m.addr + 8, data[1:].tobytes())
        task.write(m.addr, data[:1].tobytes())
        back = np.frombuffer(task.read(m.addr, m.length), dtype=np.int64)
        if not (back == data).all():
            raise AssertionError(f"round {g}: read back {sorted(set(back.tolist()))[:4]}")
    return g, task.stats()["migration_waits"]


def test_bulk_writes_and_reads_are_exact_while_their_pages_keep_moving(cluster):
    """A client's multi-page writes and reads, whatever path they take, never touch a frame
    its page has left: the other task sees the last generation on the new frames."""
    pages = 16
    root = cluster.attach(cpu=1, privileged=True)
    mine = root.mmap(pages * PS, shared="bulk")
    root.write(mine.addr, bytes(mine.length))
    for node in (0, 1):  # slow copies: the writer surely meets pages under migration
        root._sync_call("inject_fault", node=node, request="copy_in", count=10000, delay=0.002)
    try:
        writer = cluster.spawn(_bulk_writer, "bulk", pages, 2.5, cpu=2)
        # All pages, then every other one: the writer's range is on one node (one slice of
        # frames or not) or on both.
        plan = [(mine.pages, 1), (mine.pages[::2], 0), (mine.pages, 0), (mine.pages[::2], 1)]
        moves = 0
        while not writer.done():
            addrs, target = plan[moves % len(plan)]
            status = root.move_pages(addrs, [target] * len(addrs), MPOL_MF_MOVE_ALL)
            assert status.not_migrated == 0
            moves += 1
        rounds, waits = writer.join(60)
    finally:
        for node in (0, 1):
            root._sync_call("inject_fault", node=node, request="copy_in", count=0, delay=0.01)
    final = np.frombuffer(root.read(mine.addr, mine.length), dtype=np.int64)
    assert final[0] == -rounds and (final[1:] == rounds).all()
    assert moves > 8 and rounds > moves
    assert waits > 0, "the writer never met a page under migration"
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("bulk")
    root.close()
    assert cluster.check() == []


def test_bulk_reads_follow_a_private_mapping_that_moves(cluster, task):
    """Move a private mapping of another task back and forth while it reads it whole."""
    reader = cluster.spawn(_private_bulk_reader, PAGES, 2.0, cpu=2)
    deadline = time.monotonic() + 10
    addrs = [0x7F0000000000 + p * PS for p in range(PAGES)]
    root = cluster.attach(cpu=1, privileged=True)
    try:
        while root.move_pages(addrs, pid=reader.pid)[0] < 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        moves, failures = _pingpong(root, reader.pid, addrs, reader.done)
        reads = reader.join(30)
    finally:
        root.close()
    assert reads > 0 and moves > 0 and failures == 0


def _private_bulk_reader(task, pages: int, seconds: float):
    m = task.mmap(pages * PS)
    pattern = bytes(range(251)) * (m.length // 251) + bytes(m.length % 251)
    task.write(m.addr, pattern)
    reads, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        if task.read(m.addr + 1, m.length - 2) != pattern[1:-1]:
            raise AssertionError(f"read {reads} differs")
        reads += 1
    return reads


def test_8_byte_reads_take_the_same_answers_and_errors_as_any_read(task):
    """8-byte reads have a route of their own (struct checks the page bounds): across a page
    boundary, on the zero page, on a miss, with a numpy length, or with a length that is no
    integer, they answer as any read does."""
    import errno

    from numaemu import NumaError

    m = task.mmap(3 * PS)
    data = bytes(range(256)) * (2 * PS // 256)
    task.write(m.addr, data)  # pages 0 and 1; page 2 untouched
    faults = task.stats()["faults"]
    assert task.read(m.addr + 16, 8) == data[16:24]
    assert task.read(m.addr + PS - 3, 8) == data[PS - 3 : PS + 5]  # crosses into page 1
    assert task.read(m.page(1) + PS - 8, 8) == data[-8:]
    assert task.read(m.addr + 5, np.int64(8)) == data[5:13]
    assert task.stats()["faults"] == faults
    assert task.read(m.page(2) + 8, 8) == bytes(8)  # a miss, then the zero page
    assert task.read(m.page(2) + PS - 8, 8) == bytes(8)
    assert task.read(m.page(1) + PS - 4, 8) == data[-4:] + bytes(4)
    for bad in (8.0, np.float64(8)):
        with pytest.raises(NumaError) as info:
            task.read(m.addr, bad)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(NumaError) as info:
        task.read(m.addr - PS, 8)  # below the mapping
    assert info.value.errno == errno.EFAULT
    before = task.stats()
    task.read(m.addr + PS - 3, 8)
    after = task.stats()
    assert after["local_accesses"] - before["local_accesses"] == 2
    assert after["local_bytes"] - before["local_bytes"] == 8
