"""TLB shootdown: an invalidation is acknowledged only when no access is in flight."""

from __future__ import annotations

import threading
import time

import numaemu


def test_invalidation_waits_for_the_access_in_flight_and_the_next_write_faults(cluster,
                                                                              tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(2 * 4096))
    a = cluster.attach(cpu=0)
    b = cluster.attach(cpu=2)
    try:
        ma = a.mmap(2 * 4096, file=path)
        mb = b.mmap(2 * 4096, file=path)
        a.write(ma.addr, b"dirty page")  # a now caches a writable translation
        faults = a.stats()["faults"]

        # An access of a's is in flight: it holds a's access lock.
        a._access_lock.acquire()
        done = threading.Event()
        result = {}

        def writeback():
            result["written"] = b.msync(mb.addr, mb.length)  # write-protects a's mapping
            done.set()

        t = threading.Thread(target=writeback)
        t.start()
        try:
            assert not done.wait(1.0), "msync finished while a's access was still in flight"
        finally:
            a._access_lock.release()
        assert done.wait(10), "msync did not finish after the access ended"
        t.join()
        assert result["written"] == 1
        assert a.stats()["invalidations"] >= 1
        assert path.read_bytes()[:10] == b"dirty page"

        # Reads still hit (write-protect only), the next write faults and re-dirties the page.
        assert a.read(ma.addr, 10) == b"dirty page"
        assert a.stats()["faults"] == faults
        a.write(ma.addr, b"DIRTY")
        assert a.stats()["faults"] == faults + 1
        assert b.msync(mb.addr, mb.length) == 1
        assert path.read_bytes()[:10] == b"DIRTY page"
    finally:
        a.close()
        b.close()


def _writer(task, name, rounds):
    m = task.mmap(4096, shared=name)
    for i in range(rounds):
        task.write(m.addr, i.to_bytes(8, "little"))
    return rounds


def test_writes_of_other_clients_are_seen_through_a_shared_object(cluster):
    reader = cluster.attach(cpu=1)
    try:
        m = reader.mmap(4096, shared="counter")
        h = cluster.spawn(_writer, "counter", 2000, cpu=2)
        seen = []
        while not h.done():
            seen.append(int.from_bytes(reader.read(m.addr, 8), "little"))
            time.sleep(0.001)
        assert h.join(30) == 2000
        assert int.from_bytes(reader.read(m.addr, 8), "little") == 1999
        assert seen == sorted(seen), "a later read saw an older value"
        reader.shm_unlink("counter")
    finally:
        reader.close()


def test_invalidation_during_a_fault_in_flight_is_not_lost(cluster, tmp_path):
    """A fault reply racing an invalidation must not install a stale translation."""
    path = tmp_path / "race.bin"
    path.write_bytes(bytes(4096))
    a = cluster.attach(cpu=0)
    b = cluster.attach(cpu=2)
    try:
        ma = a.mmap(4096, file=path)
        mb = b.mmap(4096, file=path)
        stop = threading.Event()

        def flusher():
            while not stop.is_set():
                b.msync(mb.addr, mb.length)

        t = threading.Thread(target=flusher)
        t.start()
        try:
            for i in range(300):
                a.write(ma.addr, i.to_bytes(4, "little"))
        finally:
            stop.set()
            t.join()
        # A stale writable translation would let a store skip the dirtying fault, and the
        # last msync would then miss it.
        b.msync(mb.addr, mb.length)
        assert int.from_bytes(path.read_bytes()[:4], "little") == 299
        assert a.stats()["invalidations"] > 0
    finally:
        a.close()
        b.close()


def test_numaemu_exports_the_api_names():
    for name in ("Cluster", "Topology", "Task", "Mapping", "NumaError", "ClusterError",
                 "attach", "parse_nodes", "MPOL_BIND", "MPOL_MF_MOVE_ALL", "PAGE_SIZE"):
        assert hasattr(numaemu, name)


def test_invariants_hold_after_mixed_activity(cluster, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(3 * 4096))
    a = cluster.attach(cpu=0)
    b = cluster.attach(cpu=3)
    try:
        m1 = a.mmap(40 * 4096)
        a.write(m1.addr, bytes(m1.length))
        a.munmap(m1.addr + 8 * 4096, 8 * 4096)
        s1, s2 = a.mmap(2 * 4096, shared="inv"), b.mmap(2 * 4096, shared="inv")
        a.write(s1.addr, b"x")
        b.read(s2.addr, 2 * 4096)
        f1, f2 = a.mmap(3 * 4096, file=path), b.mmap(3 * 4096, file=path)
        b.write(f2.addr + 4096, b"y")
        a.read(f1.addr, 3 * 4096)
        a.msync(f1.addr, f1.length)
        assert cluster.check() == []
        a.munmap(s1.addr, s1.length)
        a.shm_unlink("inv")
        b.close()
        assert cluster.check() == []
    finally:
        a.close()
        b.close()
    assert cluster.check() == []
