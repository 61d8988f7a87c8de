"""The views of a running cluster: numa_maps of live tasks and ``cluster.hardware()``.

linux-semantics section 9 gives the numa_maps line format; these tests build real VMAs and
pages and read the lines the coordinator prints for them, and check that the per-node counts
agree with what move_pages reports.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

import numaemu
from numaemu import (
    MPOL_BIND,
    MPOL_F_STATIC_NODES,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    NumaError,
)

PS = numaemu.PAGE_SIZE
# The kernel prints active= only when fewer pages are active than counted; its value depends
# on LRU aging, so the tests accept the field wherever the format allows it.
ACTIVE = r"(?: active=\d+)?"


def maps_line(task, addr: int, pid: int | None = None) -> str:
    """The numa_maps line of the VMA starting at ``addr``."""
    text = task.numa_maps(pid)
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.split(" ", 1)[0] == f"{addr:08x}":
            return line
    raise AssertionError(f"no numa_maps line for {addr:#x} in:\n{text}")


def node_counts(text: str) -> dict[int, int]:
    total: dict[int, int] = {}
    for n, c in re.findall(r"\bN(\d+)=(\d+)", text):
        total[int(n)] = total.get(int(n), 0) + int(c)
    return total


def test_numa_maps_line_of_bound_anonymous_pages(task):
    m = task.mmap(6 * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [1])
    task.write(m.addr, b"\x01" * 4 * PS)
    line = maps_line(task, m.addr)
    assert re.fullmatch(rf"{m.addr:08x} bind:1 anon=4 dirty=4{ACTIVE} N1=4 kernelpagesize_kB=4",
                        line), line


def test_numa_maps_lines_are_in_address_order_one_per_vma(task):
    maps = [task.mmap(2 * PS) for _ in range(3)]
    task.mbind(maps[1].page(1), PS, MPOL_PREFERRED, [1])  # splits the second mapping in two
    starts = [int(line.split()[0], 16) for line in task.numa_maps().splitlines()]
    assert starts == [maps[0].addr, maps[1].addr, maps[1].page(1), maps[2].addr]
    assert all(re.fullmatch(r"[0-9a-f]{8,}", line.split()[0])
               for line in task.numa_maps().splitlines())


def test_numa_maps_bare_line_for_a_vma_without_pages(task):
    m = task.mmap(3 * PS)
    assert maps_line(task, m.addr) == f"{m.addr:08x} default"
    task.read(m.addr, 3 * PS)  # zero pages are not counted
    assert maps_line(task, m.addr) == f"{m.addr:08x} default"


@pytest.mark.parametrize(
    ("mode", "nodes", "text"),
    [
        (MPOL_INTERLEAVE, [0, 1], "interleave:0-1"),
        (MPOL_WEIGHTED_INTERLEAVE, [0, 1], "weighted interleave:0-1"),
        (MPOL_PREFERRED_MANY, [1], "prefer (many):1"),
        (MPOL_PREFERRED, [1], "prefer:1"),
        (MPOL_PREFERRED, [], "local"),
        (MPOL_LOCAL, [], "local"),
        (MPOL_BIND | MPOL_F_STATIC_NODES, [0, 1, 5], "bind=static:0-1"),
    ],
)
def test_numa_maps_prints_the_vma_policy(task, mode, nodes, text):
    m = task.mmap(PS)
    task.mbind(m.addr, m.length, mode, nodes)
    assert maps_line(task, m.addr) == f"{m.addr:08x} {text}"


def test_numa_maps_prints_the_task_policy_for_vmas_without_their_own(task):
    m = task.mmap(4 * PS)
    own = task.mmap(PS)
    task.mbind(own.addr, own.length, MPOL_BIND, [0])
    task.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
    task.write(m.addr, b"\x01" * m.length)
    line = maps_line(task, m.addr)
    assert re.fullmatch(
        rf"{m.addr:08x} interleave:0-1 anon=4 dirty=4{ACTIVE} N0=2 N1=2 kernelpagesize_kB=4",
        line), line
    assert maps_line(task, own.addr) == f"{own.addr:08x} bind:0"


def test_numa_maps_file_mapping(task, tmp_path):
    path = tmp_path / "mapped file.bin"  # the space is escaped as \040
    path.write_bytes(os.urandom(3 * PS))
    m = task.mmap(3 * PS, file=path)
    assert maps_line(task, m.addr) == f"{m.addr:08x} default file={tmp_path}/mapped\\040file.bin"
    task.read(m.addr, 2 * PS)
    line = maps_line(task, m.addr)
    # Clean page-cache pages: not anonymous, not dirty, so mapped= shows the count.
    assert re.fullmatch(rf"{m.addr:08x} default file=\S+ mapped=2{ACTIVE} N0=2 "
                        r"kernelpagesize_kB=4", line), line
    task.write(m.page(2), b"dirty")
    line = maps_line(task, m.addr)
    assert re.fullmatch(rf"{m.addr:08x} default file=\S+ dirty=1 mapped=3{ACTIVE} N0=3 "
                        r"kernelpagesize_kB=4", line), line
    task.msync(m.addr, m.length)  # written back: clean again
    line = maps_line(task, m.addr)
    assert re.fullmatch(rf"{m.addr:08x} default file=\S+ mapped=3{ACTIVE} N0=3 "
                        r"kernelpagesize_kB=4", line), line


def test_numa_maps_shared_object_and_mapmax(cluster):
    name = f"views-shm-{os.getpid()}"
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=2) as b:
        try:
            ma = a.mmap(2 * PS, shared=name)
            a.write(ma.addr, b"a" * 2 * PS)
            line = maps_line(a, ma.addr)
            assert re.fullmatch(rf"{ma.addr:08x} default file=/dev/shm/{name} dirty=2{ACTIVE} "
                                r"N0=2 kernelpagesize_kB=4", line), line
            mb = b.mmap(2 * PS, shared=name)
            assert b.read(mb.addr, 1) == b"a"  # b now maps page 0 too
            for task, m, pages in ((a, ma, 2), (b, mb, 1)):
                line = maps_line(task, m.addr)
                assert re.fullmatch(rf"{m.addr:08x} default file=/dev/shm/{name} "
                                    rf"dirty={pages} mapmax=2{ACTIVE} N0={pages} "
                                    r"kernelpagesize_kB=4", line), line
            # One task may read another's numa_maps (same owner).
            assert maps_line(a, mb.addr, pid=b.pid) == maps_line(b, mb.addr)
            b.munmap(mb.addr, mb.length)
            assert "mapmax" not in maps_line(a, ma.addr)
        finally:
            a.shm_unlink(name)


def test_numa_maps_shared_object_shows_its_shared_policy(cluster):
    name = f"views-shm-policy-{os.getpid()}"
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=0) as b:
        try:
            ma = a.mmap(PS, shared=name)
            mb = b.mmap(PS, shared=name)
            a.mbind(ma.addr, ma.length, MPOL_BIND, [1])
            # The policy of a shared object is seen by every task that maps it.
            assert maps_line(b, mb.addr).startswith(f"{mb.addr:08x} bind:1 file=/dev/shm/")
            b.write(mb.addr, b"x")
            assert b.move_pages([mb.addr]) == [1]
            # a has not faulted the page into its own page table yet.
            assert a.move_pages([ma.addr]) == [-errno.ENOENT]
            assert a.read(ma.addr, 1) == b"x"
            assert a.move_pages([ma.addr]) == [1]
        finally:
            a.shm_unlink(name)


def test_numa_maps_of_an_unknown_pid_is_esrch(task):
    with pytest.raises(NumaError) as exc:
        task.numa_maps(pid=1 << 40)
    assert exc.value.errno == errno.ESRCH


def test_numa_maps_counts_match_move_pages(task4):
    task4.set_mempolicy(MPOL_INTERLEAVE, [0, 1, 2, 3])
    a = task4.mmap(13 * PS)
    b = task4.mmap(5 * PS)
    task4.mbind(b.addr, b.length, MPOL_BIND, [3])
    task4.write(a.addr, b"\x01" * 9 * PS)
    task4.read(a.page(10), PS)  # a zero page: neither counted nor reported as a node
    for i in (0, 2, 4):
        task4.write(b.page(i), b"\x02")
    status = task4.move_pages(a.pages + b.pages)
    present = [s for s in status if s >= 0]
    assert len(present) == 9 + 3
    by_node = {n: present.count(n) for n in set(present)}
    assert node_counts(task4.numa_maps()) == by_node
    # And after part of it is unmapped, both views still agree.
    task4.munmap(a.page(2), 4 * PS)
    status = task4.move_pages(a.pages + b.pages)
    present = [s for s in status if s >= 0]
    assert len(present) == 9 + 3 - 4
    assert node_counts(task4.numa_maps()) == {n: present.count(n) for n in set(present)}


def hardware_lines(topo: numaemu.Topology, free_mb: list[str]) -> list[str]:
    nodes = topo.nodes
    out = [f"available: {len(nodes)} nodes (0-{len(nodes) - 1})"]
    for n in nodes:
        out.append(f"node {n} cpus:" + "".join(f" {c}" for c in topo.cpus_of(n)))
        out.append(f"node {n} size: {topo.frames_per_node[n] * topo.page_size >> 20} MB")
        out.append(f"node {n} free: {free_mb[n]} MB")
    out.append("node distances:")
    out.append("node  " + "".join(f"{n:4d} " for n in nodes))
    out.extend(f"{a:4d}: " + "".join(f"{d:4d} " for d in topo.distances[a]) for a in nodes)
    return out


def test_hardware_matches_numactl_layout_for_the_two_node_cluster(cluster):
    text = cluster.hardware()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[:4] == ["available: 2 nodes (0-1)", "node 0 cpus: 0 1", "node 0 size: 16 MB",
                         lines[3]]
    free = [re.fullmatch(r"node (\d) free: (\d+) MB", lines[i]) for i in (3, 6)]
    assert all(f is not None for f in free)
    assert lines == hardware_lines(cluster.topology, [f.group(2) for f in free])
    assert lines[-3:] == ["node     0    1 ", "   0:   10   21 ", "   1:   21   10 "]


def test_hardware_shows_the_memory_only_node_and_the_distance_matrix(cluster4):
    lines = cluster4.hardware().splitlines()
    assert lines[0] == "available: 4 nodes (0-3)"
    assert "node 3 cpus:" in lines
    assert "node 3 size: 8 MB" in lines
    assert lines[-4:] == ["   0:   10   16   21   32 ", "   1:   16   10   21   21 ",
                          "   2:   21   21   10   16 ", "   3:   32   21   16   10 "]


def test_hardware_free_memory_drops_as_pages_are_allocated(cluster, task):
    def free_mb(node: int) -> int:
        text = cluster.hardware()
        return int(re.search(rf"^node {node} free: (\d+) MB$", text, re.M).group(1))

    before = free_mb(1)
    assert before * (1 << 20) <= cluster.free_frames()[1] * PS
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(1024 * PS, populate=True)  # 4 MiB
    assert free_mb(1) <= before - 4
    task.munmap(m.addr, m.length)
    assert free_mb(1) == before
