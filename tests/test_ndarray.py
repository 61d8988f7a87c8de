"""Array views of emulated memory: numpy semantics, exact accounting, correct under migration."""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest
from test_migration_concurrent import PS, _pingpong

from numaemu import MPOL_BIND, MPOL_INTERLEAVE, MPOL_MF_MOVE_ALL, NumaError


def _view(task, layout: str):
    """An int32 view of 8 pages, filled with zeros: one slice of frames on one node (numpy
    indexes it directly), or interleaved over both nodes (looked up page by page)."""
    m = task.mmap(8 * PS)
    if layout == "by page":
        task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])
    task.write(m.addr, bytes(m.length))
    a = task.ndarray(m, np.int32)
    with task._access_lock:
        direct = [a._direct(write)[0] is not None for write in (False, True)]
    assert direct == [layout == "direct"] * 2
    return m, a


@pytest.mark.parametrize("layout", ["direct", "by page"])
def test_indexing_and_assignment_follow_numpy(fresh_task, layout):
    task = fresh_task
    m, a = _view(task, layout)
    ref = np.zeros(len(a), dtype=np.int32)
    assert len(a) == 8 * PS // 4 and a[0] == 0
    a[:] = ref[:] = np.arange(len(a), dtype=np.int32)
    a[5] = ref[5] = -1
    a[-1] = ref[-1] = 99
    a[10:20:3] = ref[10:20:3] = 7
    a[30:10:-4] = ref[30:10:-4] = np.arange(5)
    idx = np.array([3, 3, 8191, -2, 100])
    a[idx] += 1  # a repeated index gets one increment, as in numpy
    ref[idx] += 1
    mask = ref % 1000 == 0
    a[mask] = ref[mask] = -5
    a[[7, 8]] = ref[[7, 8]] = [70, 80]  # a list is an index array
    a[np.int64(9)] = ref[9] = 90
    assert (np.asarray(a) == ref).all() and a.sum() == ref.sum()
    assert (a[idx] == ref[idx]).all() and a[-1] == ref[-1] and a[np.int16(-3)] == ref[-3]
    assert (a[1:9] == ref[1:9]).all() and (a[::-7] == ref[::-7]).all()
    assert (a[...] == ref).all() and a[None].shape == (1, len(a))
    assert a[np.array(4)] == ref[4] and a[idx.reshape(5, 1)].shape == (5, 1)
    part = a[100:110]
    a[100:110] = 0
    assert (part == ref[100:110]).all(), "a slice read must be a copy, not a view of frames"
    a[100:110] = ref[100:110]
    where = task.ndarray(m, np.int32, shape=(4,))  # an index that is itself a view
    where[:] = [1, 2, 3, 4]
    ref[:4] = [1, 2, 3, 4]
    assert (a[where] == ref[ref[:4]]).all()
    a[where] = where  # reads its own task's memory: done before the access lock is taken
    ref[ref[:4].copy()] = ref[:4].copy()
    assert (np.asarray(a) == ref).all()
    grid = m.ndarray(np.int32, shape=(8, PS // 4))  # 2-D: one row a page
    assert grid[3, 7] == ref[3 * (PS // 4) + 7] and (grid[2] == ref[2048:3072]).all()
    assert (grid[1:3, ::100] == ref.reshape(8, -1)[1:3, ::100]).all()
    grid[6, [1, 1, 2]] = 5
    ref.reshape(8, -1)[6, [1, 1, 2]] = 5
    assert (np.asarray(grid).ravel() == ref).all()
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(IndexError):
        a[np.array([0, len(a)])]
    with pytest.raises(IndexError):
        a[np.ones(3, dtype=bool)]
    with pytest.raises(NumaError) as info:
        task.ndarray(m, np.int64, offset=4)  # 8-byte elements at a 4-byte offset
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("layout", ["direct", "by page"])
def test_a_gather_is_charged_exactly_as_the_same_reads_one_by_one(fresh_task, layout):
    task = fresh_task
    m = task.mmap(16 * PS)
    if layout == "by page":
        task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])  # local and remote pages
    else:
        task.mbind(m.addr, m.length, MPOL_BIND, [1])  # remote, one slice of frames
    a = task.ndarray(m, np.int64)
    a[:] = np.arange(len(a))
    with task._access_lock:
        assert (a._direct(False)[0] is not None) == (layout == "direct")
    idx = np.random.default_rng(7).integers(0, len(a), 2000)

    def delta(fn):
        """Accesses and bytes by node pair, and modeled ns (to rounding), that fn charged."""
        before = task.stats()
        fn()
        after = task.stats()
        return ({k: np.subtract(after[k], before[k]).tolist()
                 for k in ("accesses_by_pair", "bytes_by_pair")},
                pytest.approx(after["access_ns"] - before["access_ns"], rel=1e-9))

    vector = delta(lambda: a[idx])
    loop = delta(lambda: [task.read(m.addr + 8 * int(i), 8) for i in idx])
    assert vector == loop
    assert vector[0]["accesses_by_pair"][0][1] > 0
    assert delta(lambda: [a[int(i)] for i in idx]) == loop
    assert delta(lambda: a[10:30]) == delta(lambda: [a[i] for i in range(10, 30)])
    writes = delta(lambda: a.__setitem__(idx, 1))
    one_by_one = delta(lambda: [task.write(m.addr + 8 * int(i), b"\1" + bytes(7))
                                for i in idx])
    assert writes == one_by_one
    assert delta(lambda: [a.__setitem__(int(i), 1) for i in idx]) == one_by_one
    grid = m.ndarray(np.int64, shape=(16, PS // 8))
    assert delta(lambda: grid.__setitem__((slice(2, 4), 7), 0)) == \
        delta(lambda: [grid.__setitem__((r, 7), 0) for r in (2, 3)])


def _array_incrementer(task, name: str, slot: int, clients: int, pages: int, rounds: int):
    """``a[mine] += 1`` over every page of a shared object, on this client's own slots."""
    m = task.mmap(pages * PS, shared=name)
    a = task.ndarray(m, np.int64)
    mine = np.arange(slot, len(a), clients)  # disjoint from the other clients' slots
    waits = 0
    for _ in range(rounds):
        a[mine] += 1
    waits = task.stats()["migration_waits"]
    return int(a[mine].min()), int(a[mine].max()), waits


def test_concurrent_array_increments_lose_nothing_while_their_pages_move(cluster):
    pages, clients, rounds = 8, 2, 150
    root = cluster.attach(cpu=1, privileged=True)
    mine = root.mmap(pages * PS, shared="arrays")
    root.write(mine.addr, bytes(pages * PS))
    for node in (0, 1):  # slow copies: the clients surely meet pages under migration
        root._sync_call("inject_fault", node=node, request="copy_in", count=10000, delay=0.005)
    try:
        workers = [cluster.spawn(_array_incrementer, "arrays", slot, clients, pages, rounds,
                                 cpu=2 * slot) for slot in range(clients)]
        moves, failures = _pingpong(root, root.pid, mine.pages,
                                    lambda: all(w.done() for w in workers),
                                    flags=MPOL_MF_MOVE_ALL)
        results = [w.join(60) for w in workers]
    finally:
        for node in (0, 1):
            root._sync_call("inject_fault", node=node, request="copy_in", count=0, delay=0.01)
    assert all(lo == hi == rounds for lo, hi, _ in results)
    total = np.frombuffer(root.read(mine.addr, pages * PS), dtype=np.int64)
    assert (total == rounds).all()
    assert moves > 0 and failures == 0
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("arrays")
    root.close()
    time.sleep(0.05)
    assert cluster.check() == []


def _generation_reader(task, name: str, pages: int, final: int):
    """Gather every element until all show generation ``final``; generations never go back."""
    m = task.mmap(pages * PS, shared=name)
    a = task.ndarray(m, np.int64)
    seen = np.zeros(len(a), dtype=np.int64)
    end = time.monotonic() + 30
    gathers = 0
    while time.monotonic() < end:
        now = a[:]
        gathers += 1
        assert (now >= seen).all(), "a generation went back: a stale or freed frame was read"
        seen = now
        if (now == final).all():
            return gathers
    raise AssertionError(f"never saw generation {final}: stuck at {sorted(set(seen))[:4]}")


def test_gathers_follow_pages_that_move_and_never_read_a_stale_frame(cluster):
    pages, final = 4, 30
    root = cluster.attach(cpu=1, privileged=True)
    mine = root.mmap(pages * PS, shared="generations")
    root.write(mine.addr, bytes(pages * PS))
    reader = cluster.spawn(_generation_reader, "generations", pages, final, cpu=2)
    time.sleep(0.2)  # the reader has mapped the pages and cached their translations
    target = 1
    for generation in range(1, final + 1):
        assert root.move_pages(mine.pages, [target] * pages, MPOL_MF_MOVE_ALL) == \
            [target] * pages
        root.write(mine.addr, np.full(pages * PS // 8, generation, dtype=np.int64).tobytes())
        target ^= 1
    assert reader.join(60) > 0
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("generations")
    root.close()
    assert cluster.check() == []


def _path_switching_incrementer(task, name: str, slot: int, clients: int, pages: int,
                                seconds: float):
    """``a[mine] += 1`` for ``seconds``, counting how often the view could be indexed
    directly (one slice of frames) and how often it went page by page."""
    m = task.mmap(pages * PS, shared=name)
    a = task.ndarray(m, np.int64)
    mine = np.arange(slot, len(a), clients)
    rounds, paths = 0, {"direct": 0, "by page": 0}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with task._access_lock:
            direct = a._direct(write=True)[0] is not None
        paths["direct" if direct else "by page"] += 1
        a[mine] += 1
        rounds += 1
    return rounds, paths, task.stats()["migration_waits"]


def test_array_updates_are_exact_while_moves_switch_them_between_paths(fresh_cluster):
    """Moving all the pages at once (one run of fresh frames), then the even ones back, then
    the odd ones, flips the clients' views between direct indexing and the page-by-page
    lookup (two nodes, then one node in two runs); no update is lost on either path."""
    cluster = fresh_cluster
    pages, clients = 8, 2
    root = cluster.attach(cpu=1, privileged=True)
    mine = root.mmap(pages * PS, shared="switching")
    root.write(mine.addr, bytes(mine.length))
    for node in (0, 1):
        root._sync_call("inject_fault", node=node, request="copy_in", count=10000, delay=0.002)
    try:
        workers = [cluster.spawn(_path_switching_incrementer, "switching", slot, clients,
                                 pages, 2.5, cpu=2 * slot) for slot in range(clients)]
        plan = [(mine.pages, 1), (mine.pages[::2], 0), (mine.pages[1::2], 0)]
        moves = 0
        while not all(w.done() for w in workers):
            addrs, target = plan[moves % len(plan)]
            assert root.move_pages(addrs, [target] * len(addrs),
                                   MPOL_MF_MOVE_ALL).not_migrated == 0
            moves += 1
            time.sleep(0.01)
        results = [w.join(60) for w in workers]
    finally:
        for node in (0, 1):
            root._sync_call("inject_fault", node=node, request="copy_in", count=0, delay=0.01)
    total = np.frombuffer(root.read(mine.addr, mine.length), dtype=np.int64)
    for slot, (rounds, paths, _) in enumerate(results):
        assert (total[slot::clients] == rounds).all()
        assert paths["direct"] > 0 and paths["by page"] > 0, paths
    assert moves > 8
    assert sum(waits for _, _, waits in results) > 0
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("switching")
    root.close()
    assert cluster.check() == []
