"""Array views of emulated memory: numpy semantics, exact accounting, correct under migration."""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest
from test_migration_concurrent import PS, _pingpong

from numaemu import MPOL_INTERLEAVE, MPOL_MF_MOVE_ALL, NumaError


def test_indexing_and_assignment_follow_numpy(task):
    m = task.mmap(8 * PS)
    a = task.ndarray(m, np.int32)
    ref = np.zeros(len(a), dtype=np.int32)
    assert len(a) == 8 * PS // 4 and a[0] == 0  # untouched memory reads as zeros
    a[:] = ref[:] = np.arange(len(a), dtype=np.int32)
    a[5] = ref[5] = -1
    a[-1] = ref[-1] = 99
    a[10:20:3] = ref[10:20:3] = 7
    idx = np.array([3, 3, 8191, -2, 100])
    a[idx] += 1  # a repeated index gets one increment, as in numpy
    ref[idx] += 1
    mask = ref % 1000 == 0
    a[mask] = ref[mask] = -5
    assert (np.asarray(a) == ref).all() and a.sum() == ref.sum()
    assert (a[idx] == ref[idx]).all() and a[-1] == ref[-1]
    assert (a[1:9] == ref[1:9]).all()
    grid = m.ndarray(np.int32, shape=(8, PS // 4))  # 2-D: one row a page
    assert grid[3, 7] == ref[3 * (PS // 4) + 7] and (grid[2] == ref[2048:3072]).all()
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(IndexError):
        a[np.array([0, len(a)])]
    with pytest.raises(NumaError) as info:
        task.ndarray(m, np.int64, offset=4)  # 8-byte elements at a 4-byte offset
    assert info.value.errno == errno.EINVAL


def test_a_gather_is_charged_exactly_as_the_same_reads_one_by_one(task):
    m = task.mmap(16 * PS)
    task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])  # local and remote pages
    a = task.ndarray(m, np.int64)
    a[:] = np.arange(len(a))
    idx = np.random.default_rng(7).integers(0, len(a), 2000)

    def delta(fn):
        before = task.stats()
        fn()
        after = task.stats()
        return {k: np.subtract(after[k], before[k]).tolist()
                for k in ("accesses_by_pair", "bytes_by_pair", "access_ns")}

    vector = delta(lambda: a[idx])
    loop = delta(lambda: [task.read(m.addr + 8 * int(i), 8) for i in idx])
    assert vector == loop
    assert vector["accesses_by_pair"][0][1] > 0 and vector["accesses_by_pair"][0][0] > 0
    writes = delta(lambda: a.__setitem__(idx, 1))
    one_by_one = delta(lambda: [task.write(m.addr + 8 * int(i), b"\1" + bytes(7))
                                for i in idx])
    assert writes == one_by_one


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
