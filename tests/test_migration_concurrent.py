"""Migration while other client processes use the pages (ARCHITECTURE.md invariants 2-5).

Readers and writers run in their own OS processes (``cluster.spawn``); a privileged
task in the test process keeps moving their pages.  Every test ends with the
coordinator's invariant check.
"""

from __future__ import annotations

import errno
import time

import pytest

from numaemu import MPOL_MF_MOVE_ALL, NumaError

PS = 4096
MMAP_BASE = 0x7F0000000000  # a fresh task's first mapping starts here
GO = PS - 1  # the start flag of the incrementers, in the last byte of the first page
STOP = PS - 2  # and their stop flag


def _reader(task, name: str | None, seconds: float, pattern: bytes):
    """Map the page (shared object or private), fill it, read it in a loop; check it."""
    m = task.mmap(PS, shared=name)
    if name is None:
        task.write(m.addr, pattern)
    else:
        while task.read(m.addr, len(pattern)) != pattern:  # the parent fills it
            time.sleep(0.001)
    reads, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        data = task.read(m.addr, PS)
        if data != pattern:
            raise AssertionError(f"read {data[:16]!r}... after {reads} reads")
        reads += 1
    return reads, task.stats()["migration_waits"]


def _incrementer(task, name: str, slot: int, pages: int):
    """Read-modify-write this client's own 8-byte slot on each page until told to stop;
    return how many increments it made and how often it waited on a migrating page."""
    m = task.mmap(pages * PS, shared=name)
    while task.read(m.addr + GO, 1) != b"\1":  # start together, once the mover is ready
        time.sleep(0.001)
    rounds = 0
    while task.read(m.addr + STOP, 1) != b"\1":
        for p in range(pages):
            addr = m.addr + p * PS + slot * 8
            value = int.from_bytes(task.read(addr, 8), "little")
            task.write(addr, (value + 1).to_bytes(8, "little"))
        rounds += 1
    return rounds, task.stats()["migration_waits"]


def private_incrementer(task, pages: int, seconds: float):
    """Read-modify-write counters in the task's own private pages for ``seconds`` (a pattern
    beside each counter must survive too); check them all; return (rounds, nodes at the
    end)."""
    m = task.mmap(pages * PS)
    for p in range(pages):
        task.write(m.page(p) + 8, b"pattern!" * 16)
    rounds, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for p in range(pages):
            value = int.from_bytes(task.read(m.page(p), 8), "little")
            task.write(m.page(p), (value + 1).to_bytes(8, "little"))
        rounds += 1
    for p in range(pages):
        assert int.from_bytes(task.read(m.page(p), 8), "little") == rounds
        assert task.read(m.page(p) + 8, 128) == b"pattern!" * 16
    return rounds, sorted(set(task.move_pages(m.pages)))


def assert_increments(task, mapping, rounds: list[int]) -> None:
    """Each page of ``mapping`` holds every incrementer's count in its slot, and nothing
    else changed (the flags live in the first page)."""
    clients = len(rounds)
    for p in range(mapping.length // PS):
        page = task.read(mapping.page(p), PS)
        for slot, count in enumerate(rounds):
            assert int.from_bytes(page[slot * 8 : slot * 8 + 8], "little") == count
        rest = page[clients * 8 : STOP] if p == 0 else page[clients * 8 :]
        assert rest == bytes(len(rest)), "a byte nobody wrote changed"


def _pingpong(task_, pid, addrs, until, flags=MPOL_MF_MOVE_ALL):
    """Move ``addrs`` of task ``pid`` between nodes 0 and 1 until ``until()``; return
    (moves, failures)."""
    moves = failures = 0
    target = 1
    while not until():
        try:
            status = task_.move_pages(addrs, [target] * len(addrs), flags, pid=pid)
        except NumaError as exc:
            if exc.errno == errno.ESRCH:  # the page's owner finished its run and exited
                break
            raise
        if status.not_migrated:
            failures += 1
        else:
            assert list(status) == [target] * len(addrs)
            moves += 1
        target ^= 1
    return moves, failures


@pytest.fixture
def root(cluster):
    t = cluster.attach(cpu=1, privileged=True)
    yield t
    t.close()


@pytest.mark.parametrize("shared", [False, True], ids=["private_anon", "shared_anon"])
def test_page_ping_pongs_between_nodes_while_other_processes_read_it(cluster, root, shared):
    """The kernel selftest's shape: no failed migration, no reader error, data unchanged."""
    pattern = bytes(range(256)) * (PS // 256)
    name = "pingpong" if shared else None
    if shared:
        mine = root.mmap(PS, shared=name)
        root.write(mine.addr, pattern)
    readers = [cluster.spawn(_reader, name, 3.0, pattern, cpu=c) for c in (0, 2)]
    if shared:
        pid, addr = root.pid, mine.addr
    else:
        pid, addr = readers[0].pid, MMAP_BASE
        deadline = time.monotonic() + 10
        while root.move_pages([addr], pid=pid)[0] < 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    moves, failures = _pingpong(root, pid, [addr], lambda: all(r.done() for r in readers))
    results = [r.join(30) for r in readers]
    assert failures == 0
    assert moves >= 10
    assert all(reads > 0 for reads, _ in results)
    if shared:
        assert root.read(mine.addr, PS) == pattern
        root.munmap(mine.addr, PS)
        root.shm_unlink(name)
    assert cluster.check() == []


def increments_under_moves(cluster, root, name: str, moves_wanted: int,
                           pages: int = 4, clients: int = 3) -> list:
    """Client processes increment their own slots across shared pages ``name`` while
    ``root`` moves the pages ``moves_wanted`` times; checks every count and that every move
    succeeded; returns the clients' (rounds, migration waits)."""
    mine = root.mmap(pages * PS, shared=name)
    root.write(mine.addr, bytes(pages * PS))
    workers = [cluster.spawn(_incrementer, name, slot, pages, cpu=slot % 4)
               for slot in range(clients)]
    # Slow the copies down so that the clients surely meet pages under migration.
    for node in (0, 1):
        root._sync_call("inject_fault", node=node, request="copy_in", count=10000, delay=0.005)
    root.write(mine.addr + GO, b"\1")
    try:
        count = iter(range(moves_wanted))
        moves, failures = _pingpong(root, root.pid, mine.pages,
                                    lambda: next(count, None) is None, flags=MPOL_MF_MOVE_ALL)
    finally:
        root.write(mine.addr + STOP, b"\1")
        for node in (0, 1):
            root._sync_call("inject_fault", node=node, request="copy_in", count=0, delay=0.01)
    results = [w.join(60) for w in workers]
    assert_increments(root, mine, [rounds for rounds, _ in results])
    assert moves == moves_wanted and failures == 0
    assert all(rounds > 0 for rounds, _ in results)
    root.munmap(mine.addr, mine.length)
    root.shm_unlink(name)
    return results


def test_increments_are_exact_while_their_pages_keep_moving(cluster, root):
    """Several processes increment their own slots across shared pages that a privileged
    task keeps moving: no lost update, no torn page, and the clients met migration entries."""
    copied = [s["copy"] for s in cluster.node_stats().values()]
    results = increments_under_moves(cluster, root, "stress", 40)
    assert sum(waits for _, waits in results) > 0, "no client waited on a migrating page"
    # On one host nodes copy by mapping each other's segments (test_remote_data.py forces
    # the other way, through their data services).
    after = [s["copy"] for s in cluster.node_stats().values()]
    assert sum(x["frames_copied_mapped"] - y["frames_copied_mapped"]
               for x, y in zip(after, copied)) == 40 * 4
    assert sum(x["frames_fetched"] for x in after) == sum(y["frames_fetched"] for y in copied)
    assert cluster.check() == []


def _hold(task, name: str, pin: bool):
    m = task.mmap(2 * PS, shared=name)
    task.read(m.addr, 2 * PS)  # caches both translations
    if pin:
        with task.pin(m.addr, PS):
            time.sleep(60)
    time.sleep(60)


@pytest.mark.parametrize("pin", [False, True], ids=["caching", "pinning"])
def test_a_client_killed_mid_run_does_not_wedge_migration(cluster, root, pin):
    mine = root.mmap(2 * PS, shared="victim")
    root.write(mine.addr, b"survives" * 1024)
    victim = cluster.spawn(_hold, "victim", pin, cpu=2)
    time.sleep(0.5)  # it has mapped (and pinned) the pages
    if pin:
        assert root.move_pages([mine.addr], [1], MPOL_MF_MOVE_ALL).not_migrated == 1
    victim.kill()
    t0 = time.monotonic()
    status = root.move_pages(mine.pages, [1, 1], MPOL_MF_MOVE_ALL)
    # The shootdown to the dead client, or its pin, is cleared once it is found dead.
    while status.not_migrated and time.monotonic() - t0 < 15:
        status = root.move_pages(mine.pages, [1, 1], MPOL_MF_MOVE_ALL)
    assert list(status) == [1, 1]
    assert time.monotonic() - t0 < 15
    assert root.read(mine.addr, 16) == b"survives" * 2
    deadline = time.monotonic() + 15
    while victim.pid in [t["pid"] for t in cluster._call("tasks")["tasks"]]:
        assert time.monotonic() < deadline, "the dead client was never reaped"
        time.sleep(0.1)
    root.munmap(mine.addr, mine.length)
    root.shm_unlink("victim")
    assert cluster.check() == []


def test_faults_during_a_long_migration_wait_and_then_see_the_new_page(cluster, root):
    """A big move keeps pages under migration for a while; a reader in another process
    faults on migration entries and reads the data unchanged from the new frames."""
    pages = 1024
    m = root.mmap(pages * PS, shared="big")
    data = bytes(i % 253 for i in range(pages * PS))
    root.write(m.addr, data)
    reader = cluster.spawn(_reader_big, "big", pages, data[:64], cpu=2)
    for target in (1, 0, 1):
        status = root.move_pages(m.pages, [target] * pages, MPOL_MF_MOVE_ALL)
        assert status.not_migrated == 0
    assert reader.join(60) is True
    assert root.read(m.addr, pages * PS) == data
    root.munmap(m.addr, m.length)
    root.shm_unlink("big")
    assert cluster.check() == []


def _reader_big(task, name, pages, head):
    m = task.mmap(pages * PS, shared=name)
    for _ in range(20):
        if task.read(m.addr, 64) != head:
            return False
        task.read(m.addr, pages * PS)
    return True


def test_a_task_moving_its_own_pages_while_another_of_its_threads_writes_them(cluster):
    """move_pages on its own pages skips the shootdown to the caller (it drops its own
    translations first): a second thread of the same task must still lose no store, as
    another task, which reads through translations of its own, checks at the end."""
    import threading

    task = cluster.attach(cpu=0, privileged=True)
    checker = cluster.attach(cpu=2)
    try:
        m = task.mmap(2 * PS, shared="selfmove")
        task.write(m.addr, bytes(2 * PS))
        view = checker.mmap(2 * PS, shared="selfmove")
        stop, counts = threading.Event(), [0]

        def increment():
            while not stop.is_set():
                for p in range(2):
                    addr = m.addr + p * PS
                    value = int.from_bytes(task.read(addr, 8), "little")
                    task.write(addr, (value + 1).to_bytes(8, "little"))
                counts[0] += 1

        writer = threading.Thread(target=increment)
        writer.start()
        try:
            for k in range(60):
                status = task.move_pages(m.pages, [(k + 1) % 2] * 2, MPOL_MF_MOVE_ALL)
                assert status.not_migrated == 0
        finally:
            stop.set()
            writer.join()
        for p in range(2):
            assert int.from_bytes(checker.read(view.addr + p * PS, 8), "little") == counts[0]
        assert counts[0] > 0
        task.munmap(m.addr, m.length)
        task.shm_unlink("selfmove")
    finally:
        task.close()
        checker.close()
    assert cluster.check() == []


def _map_read_unmap(task, name: str, pages: int, pattern: bytes, cycles: int):
    """Map the shared object, read every page (so this task maps them all), unmap it: each
    munmap zaps more than one slice of pages, yielding the coordinator's loop between."""
    for _ in range(cycles):
        m = task.mmap(pages * PS, shared=name)
        data = task.read(m.addr, pages * PS)
        assert data == pattern * pages, "a shared page changed under a reader"
        task.munmap(m.addr, m.length)
    return cycles


def test_unmapping_a_huge_mapping_while_its_pages_migrate(tmp_path):
    """munmap of more than ZAP_CHUNK pages yields between slices; a migration of pages still
    counted as mapped meanwhile backs out or completes, never corrupts: data and refcounts
    stay exact."""
    import numaemu
    from coordinator.memory import ZAP_CHUNK

    pages = ZAP_CHUNK + 2048
    pattern = bytes(range(256)) * (PS // 256)
    topo = numaemu.Topology.symmetric(nodes=2, frames_per_node=pages + 4096, cpus_per_node=2)
    with numaemu.Cluster(topo) as cluster:
        root = cluster.attach(cpu=1, privileged=True)
        mine = root.mmap(pages * PS, shared="huge")
        root.write(mine.addr, pattern * pages)
        worker = cluster.spawn(_map_read_unmap, "huge", pages, pattern, 4, cpu=0)
        tail = [mine.page(p) for p in range(pages - 64, pages)]  # in the last slice
        moves, _ = _pingpong(root, root.pid, tail, worker.done, flags=MPOL_MF_MOVE_ALL)
        assert worker.join(120) == 4
        assert moves > 0
        assert root.read(mine.addr, pages * PS) == pattern * pages
        root.munmap(mine.addr, mine.length)
        root.shm_unlink("huge")
        assert cluster.check() == []
        root.close()
