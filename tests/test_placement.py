"""Where pages land, end to end: real faults in real clusters under every memory policy.

Placement is checked twice for every page: with ``move_pages`` in query mode and with
``get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)``. The rules are linux-semantics sections 2, 3, 8
and 10: first touch on the faulting CPU's node, the policy of the VMA before the task's,
interleave by virtual page number, PREFERRED falling back and BIND not, numastat counting
every allocation once.
"""

from __future__ import annotations

import errno
import os

import pytest

import numaemu
from numaemu import (
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_F_ADDR,
    MPOL_F_MEMS_ALLOWED,
    MPOL_F_NODE,
    MPOL_F_RELATIVE_NODES,
    MPOL_F_STATIC_NODES,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    NumaError,
)

PS = numaemu.PAGE_SIZE
NOT_PRESENT = -errno.ENOENT
FAULT = -errno.EFAULT


# -- helpers ---------------------------------------------------------------------------


def touch(task, m, pages=None) -> None:
    """Write one byte to each page (one fault per page, like a program's first stores)."""
    for i in range(m.length // task.page_size) if pages is None else pages:
        task.write(m.page(i), b"\x01")


def nodes_of(task, m) -> list[int]:
    """Each page's node by move_pages, checked against get_mempolicy(F_NODE|F_ADDR)."""
    status = task.move_pages(m.pages)
    for addr, st in zip(m.pages, status):
        if st >= 0:
            assert task.get_mempolicy(addr, MPOL_F_NODE | MPOL_F_ADDR) == (st, set())
    return status


def vpn(addr: int) -> int:
    return addr // PS


def interleave_target(addr: int, nodes) -> int:
    """The (v mod |S|)-th lowest node of S for the page at virtual page number v."""
    s = sorted(nodes)
    return s[vpn(addr) % len(s)]


def numastat_delta(cluster, before) -> dict[int, dict[str, int]]:
    after = cluster.numastat()
    return {n: {k: after[n][k] - before[n][k] for k in after[n]} for n in after}


def fill_node(cluster, task, node: int, leave: int):
    """Allocate all but ``leave`` free frames of ``node`` (BIND, populated); return the mapping."""
    free = cluster.free_frames()[node] - leave
    assert free > 0
    old = task.get_mempolicy()
    task.set_mempolicy(MPOL_BIND, [node])
    m = task.mmap(free * PS, populate=True)
    task.set_mempolicy(*old) if old[0] else task.set_mempolicy(MPOL_DEFAULT)
    assert cluster.free_frames()[node] == leave
    return m


# -- first touch and the task policy -----------------------------------------------------


@pytest.mark.parametrize(("cpu", "node"), [(0, 0), (1, 0), (2, 1), (3, 1)])
def test_first_touch_goes_to_the_faulting_cpus_node(cluster, cpu, node):
    with cluster.attach(cpu=cpu) as t:
        assert (t.cpu, t.node) == (cpu, node)
        m = t.mmap(4 * PS)
        touch(t, m)
        assert nodes_of(t, m) == [node] * 4


def test_first_touch_follows_the_task_after_sched_setaffinity(cluster, task):
    m = task.mmap(4 * PS)
    touch(task, m, [0, 1])
    task.sched_setaffinity([2])
    touch(task, m, [2, 3])
    assert nodes_of(task, m) == [0, 0, 1, 1]


def test_set_mempolicy_bind_places_every_new_page_on_the_bound_node(task):
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(16 * PS)
    touch(task, m)
    assert nodes_of(task, m) == [1] * 16


def test_set_mempolicy_affects_only_pages_allocated_after_it(task):
    m = task.mmap(4 * PS)
    touch(task, m, [0, 1])
    task.set_mempolicy(MPOL_BIND, [1])
    touch(task, m, [2, 3])
    assert nodes_of(task, m) == [0, 0, 1, 1]


def test_set_mempolicy_preferred_places_pages_on_the_preferred_node(task):
    task.set_mempolicy(MPOL_PREFERRED, [1])
    m = task.mmap(16 * PS)
    touch(task, m)
    assert nodes_of(task, m) == [1] * 16


def test_set_mempolicy_local_places_pages_on_the_cpu_node(cluster):
    with cluster.attach(cpu=2) as t:
        t.set_mempolicy(MPOL_BIND, [0])
        t.set_mempolicy(MPOL_LOCAL)
        m = t.mmap(4 * PS)
        touch(t, m)
        assert nodes_of(t, m) == [1] * 4


def test_set_mempolicy_default_removes_the_task_policy(task):
    task.set_mempolicy(MPOL_BIND, [1])
    task.set_mempolicy(MPOL_DEFAULT)
    m = task.mmap(4 * PS)
    touch(task, m)
    assert nodes_of(task, m) == [0] * 4


def test_bind_to_several_nodes_takes_the_nearest_to_the_cpu(cluster4):
    # cluster4 distances from node 0: 1 at 16, 2 at 21, 3 at 32; from node 2: 3 at 16, 1 at 21.
    with cluster4.attach(cpu=0) as t0, cluster4.attach(cpu=4) as t2:
        for t, expect in ((t0, 1), (t2, 3)):
            t.set_mempolicy(MPOL_BIND, [1, 3])
            m = t.mmap(4 * PS)
            touch(t, m)
            assert nodes_of(t, m) == [expect] * 4


def test_preferred_many_takes_the_nearest_node_of_its_set(cluster4):
    with cluster4.attach(cpu=0) as t:
        t.set_mempolicy(MPOL_PREFERRED_MANY, [2, 3])
        m = t.mmap(4 * PS)
        touch(t, m)
        assert nodes_of(t, m) == [2] * 4


def test_memory_only_node_gets_pages_when_bound(cluster4, task4):
    task4.set_mempolicy(MPOL_BIND, [3])
    m = task4.mmap(4 * PS)
    touch(task4, m)
    assert nodes_of(task4, m) == [3] * 4


# -- VMA policy before task policy ----------------------------------------------------------


def test_mbind_vma_policy_overrides_the_task_policy(task):
    task.set_mempolicy(MPOL_BIND, [0])
    bound = task.mmap(4 * PS)
    plain = task.mmap(4 * PS)
    task.mbind(bound.addr, bound.length, MPOL_BIND, [1])
    touch(task, bound)
    touch(task, plain)
    assert nodes_of(task, bound) == [1] * 4
    assert nodes_of(task, plain) == [0] * 4


def test_mbind_of_a_subrange_applies_only_to_that_subrange(task):
    m = task.mmap(6 * PS)
    task.mbind(m.page(2), 2 * PS, MPOL_PREFERRED, [1])
    touch(task, m)
    assert nodes_of(task, m) == [0, 0, 1, 1, 0, 0]


def test_mbind_default_hands_the_range_back_to_the_task_policy(task):
    m = task.mmap(4 * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [0])
    task.set_mempolicy(MPOL_BIND, [1])
    task.mbind(m.addr, m.length, MPOL_DEFAULT)
    touch(task, m)
    assert nodes_of(task, m) == [1] * 4


def test_mbind_length_is_rounded_up_to_whole_pages(task):
    m = task.mmap(3 * PS)
    task.mbind(m.addr, PS + 1, MPOL_BIND, [1])
    touch(task, m)
    assert nodes_of(task, m) == [1, 1, 0]


# -- interleave ------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [(0, 1), (0, 1, 3), (1, 2, 3), (0, 1, 2, 3)])
def test_interleave_task_policy_puts_page_v_on_the_v_mod_s_th_node(cluster4, task4, nodes):
    task4.set_mempolicy(MPOL_INTERLEAVE, nodes)
    k = 3
    m = task4.mmap(k * len(nodes) * PS)
    touch(task4, m)
    got = nodes_of(task4, m)
    assert got == [interleave_target(a, nodes) for a in m.pages]
    assert all(got.count(n) == k for n in nodes)


@pytest.mark.parametrize("nodes", [(0, 1), (0, 2, 3)])
def test_interleave_vma_policy_puts_page_v_on_the_v_mod_s_th_node(task4, nodes):
    task4.set_mempolicy(MPOL_BIND, [1])  # must not matter: the VMA policy wins
    m = task4.mmap(2 * len(nodes) * PS)
    task4.mbind(m.addr, m.length, MPOL_INTERLEAVE, nodes)
    touch(task4, m)
    got = nodes_of(task4, m)
    assert got == [interleave_target(a, nodes) for a in m.pages]
    assert all(got.count(n) == 2 for n in nodes)


def test_interleave_depends_on_the_address_not_on_the_order_of_faults(task4):
    nodes = (0, 1, 2)
    task4.set_mempolicy(MPOL_INTERLEAVE, nodes)
    m = task4.mmap(9 * PS)
    touch(task4, m, [8, 3, 5, 0, 1, 7, 2, 6, 4])
    assert nodes_of(task4, m) == [interleave_target(a, nodes) for a in m.pages]


def test_interleave_one_big_write_spreads_like_page_by_page_faults(task4):
    nodes = (1, 2, 3)
    task4.set_mempolicy(MPOL_INTERLEAVE, nodes)
    m = task4.mmap(12 * PS)
    task4.write(m.addr, b"\x02" * m.length)
    got = nodes_of(task4, m)
    assert got == [interleave_target(a, nodes) for a in m.pages]
    assert [got.count(n) for n in nodes] == [4, 4, 4]


def test_interleave_survives_a_vma_split_by_mbind_of_a_subrange(task4):
    nodes = (0, 1, 2)
    m = task4.mmap(12 * PS)
    task4.mbind(m.addr, m.length, MPOL_INTERLEAVE, nodes)
    # Split where the tail's first page is not a multiple of |S|: a rule based on the offset
    # inside the VMA would then disagree with the absolute-address rule.
    cut = next(i for i in range(3, 7) if vpn(m.page(i)) % 3 != 0)
    task4.mbind(m.page(cut), 2 * PS, MPOL_INTERLEAVE, [1, 3])
    assert task4.numa_maps().count("\n") >= 3  # the mbind really split the VMA
    touch(task4, m)
    got = nodes_of(task4, m)
    for i, addr in enumerate(m.pages):
        want = interleave_target(addr, (1, 3) if cut <= i < cut + 2 else nodes)
        assert got[i] == want, f"page {i}"


def test_weighted_interleave_with_default_weights_is_plain_interleave(task4):
    nodes = (0, 1, 3)
    task4.set_mempolicy(MPOL_WEIGHTED_INTERLEAVE, nodes)
    m = task4.mmap(6 * PS)
    touch(task4, m)
    assert nodes_of(task4, m) == [interleave_target(a, nodes) for a in m.pages]


@pytest.fixture(scope="module")
def weighted_cluster():
    """Two nodes with weighted-interleave weights 3 and 1."""
    topo = numaemu.Topology(distances=[[10, 21], [21, 10]], frames_per_node=256,
                            cpus_per_node=1, interleave_weights=[3, 1])
    with numaemu.Cluster(topo) as c:
        yield c


def weighted_target(addr: int) -> int:
    return 0 if vpn(addr) % 4 < 3 else 1


def test_weighted_interleave_three_one_puts_indexes_0_to_2_mod_4_on_node_0(weighted_cluster):
    with weighted_cluster.attach(cpu=1) as t:
        t.set_mempolicy(MPOL_WEIGHTED_INTERLEAVE, [0, 1])
        m = t.mmap(8 * PS)
        touch(t, m)
        got = nodes_of(t, m)
        assert got == [weighted_target(a) for a in m.pages]
        assert (got.count(0), got.count(1)) == (6, 2)


def test_weighted_interleave_vma_policy_follows_the_weights(weighted_cluster):
    with weighted_cluster.attach(cpu=0) as t:
        m = t.mmap(8 * PS)
        t.mbind(m.addr, m.length, MPOL_WEIGHTED_INTERLEAVE, [0, 1])
        touch(t, m)
        assert nodes_of(t, m) == [weighted_target(a) for a in m.pages]


def test_get_mempolicy_f_node_under_weighted_interleave_starts_at_the_lowest_node(
        weighted_cluster):
    with weighted_cluster.attach(cpu=0) as t:
        t.set_mempolicy(MPOL_WEIGHTED_INTERLEAVE, [0, 1])
        assert t.get_mempolicy(flags=MPOL_F_NODE) == (0, set())


def test_weighted_interleave_page_cache_stays_on_a_node_for_its_weight(weighted_cluster,
                                                                     tmp_path):
    path = tmp_path / "weighted.bin"
    path.write_bytes(bytes(5 * PS))
    with weighted_cluster.attach(cpu=1) as t:
        t.set_mempolicy(MPOL_WEIGHTED_INTERLEAVE, [0, 1])
        m = t.mmap(5 * PS, file=path)
        got = []
        for i in range(5):
            assert t.get_mempolicy(flags=MPOL_F_NODE) == ([0, 0, 0, 1, 0][i], set())
            touch(t, m, [i])
            got += t.move_pages([m.page(i)])
        assert got == [0, 0, 0, 1, 0]


def test_get_mempolicy_f_node_under_interleave_is_the_lowest_node_after_set(task4):
    task4.set_mempolicy(MPOL_INTERLEAVE, [1, 3])
    assert task4.get_mempolicy(flags=MPOL_F_NODE) == (1, set())
    # Anonymous faults interleave by address and do not advance the task's counter.
    m = task4.mmap(4 * PS)
    touch(task4, m)
    assert task4.get_mempolicy(flags=MPOL_F_NODE) == (1, set())
    # A new set_mempolicy restarts the counter at the lowest node.
    task4.set_mempolicy(MPOL_INTERLEAVE, [2, 3])
    assert task4.get_mempolicy(flags=MPOL_F_NODE) == (2, set())


def test_page_cache_interleaves_by_the_task_counter(task4, tmp_path):
    path = tmp_path / "pc.bin"
    path.write_bytes(bytes(4 * PS))
    task4.set_mempolicy(MPOL_INTERLEAVE, [1, 3])
    m = task4.mmap(4 * PS, file=path)
    touch(task4, m, [2])
    assert task4.move_pages([m.page(2)]) == [1]  # first counter-based page: lowest node
    assert task4.get_mempolicy(flags=MPOL_F_NODE) == (3, set())
    touch(task4, m, [0])
    assert task4.move_pages([m.page(0)]) == [3]
    assert task4.get_mempolicy(flags=MPOL_F_NODE) == (1, set())


# -- full nodes ------------------------------------------------------------------------------


def test_preferred_falls_back_to_another_node_when_its_node_is_full(cluster, task):
    filler = fill_node(cluster, task, 1, leave=2)
    try:
        before = cluster.numastat()
        task.set_mempolicy(MPOL_PREFERRED, [1])
        m = task.mmap(6 * PS)
        touch(task, m)
        got = nodes_of(task, m)
        assert got == [1, 1, 0, 0, 0, 0]
        d = numastat_delta(cluster, before)
        # Fallback pages are misses on the node that gave them, foreign on the wanted node.
        assert d[1]["numa_hit"] == 2 and d[1]["numa_foreign"] == 4
        assert d[0]["numa_miss"] == 4 and d[0]["numa_hit"] == 0
        assert d[0]["local_node"] == 4 and d[1]["other_node"] == 2
        task.munmap(m.addr, m.length)
    finally:
        task.munmap(filler.addr, filler.length)
    assert cluster.free_frames()[1] == cluster.topology.frames_per_node[1]


def test_bind_fails_with_enomem_when_its_nodes_are_full_and_allocates_nothing(cluster, task):
    filler = fill_node(cluster, task, 1, leave=0)
    try:
        task.set_mempolicy(MPOL_BIND, [1])
        m = task.mmap(4 * PS)
        free = cluster.free_frames()
        before = cluster.numastat()
        with pytest.raises(NumaError) as exc:
            task.write(m.addr, b"\x01")
        assert exc.value.errno == errno.ENOMEM
        with pytest.raises(NumaError) as exc:
            task.write(m.addr, b"\x01" * m.length)
        assert exc.value.errno == errno.ENOMEM
        assert task.move_pages(m.pages) == [NOT_PRESENT] * 4
        assert cluster.free_frames() == free
        assert cluster.numastat() == before
        # Memory comes back: the same fault succeeds once the node has room.
        task.munmap(filler.addr, filler.length)
        filler = None
        touch(task, m)
        assert nodes_of(task, m) == [1] * 4
    finally:
        if filler is not None:
            task.munmap(filler.addr, filler.length)


def test_local_falls_back_to_the_nearest_node_when_the_cpu_node_is_full(cluster4, task4):
    # From node 0 the nearest other node is 1 (distance 16).
    filler = fill_node(cluster4, task4, 0, leave=1)
    try:
        m = task4.mmap(3 * PS)
        touch(task4, m)
        assert nodes_of(task4, m) == [0, 1, 1]
    finally:
        task4.munmap(filler.addr, filler.length)


# -- policy read-back ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "nodes", "expected"),
    [
        (MPOL_BIND, [1], (MPOL_BIND, {1})),
        (MPOL_BIND, [0, 1], (MPOL_BIND, {0, 1})),
        (MPOL_INTERLEAVE, [0, 1], (MPOL_INTERLEAVE, {0, 1})),
        (MPOL_WEIGHTED_INTERLEAVE, [0, 1], (MPOL_WEIGHTED_INTERLEAVE, {0, 1})),
        (MPOL_PREFERRED_MANY, [0, 1], (MPOL_PREFERRED_MANY, {0, 1})),
        (MPOL_PREFERRED, [1], (MPOL_PREFERRED, {1})),
        (MPOL_PREFERRED, [1, 0], (MPOL_PREFERRED, {0})),
        (MPOL_PREFERRED, [], (MPOL_LOCAL, set())),
        (MPOL_LOCAL, [], (MPOL_LOCAL, set())),
        (MPOL_DEFAULT, [], (MPOL_DEFAULT, set())),
        (MPOL_BIND, [1, 40], (MPOL_BIND, {1})),
        (MPOL_BIND | MPOL_F_STATIC_NODES, [1, 5], (MPOL_BIND | MPOL_F_STATIC_NODES, {1, 5})),
        (MPOL_INTERLEAVE | MPOL_F_RELATIVE_NODES, [0, 7],
         (MPOL_INTERLEAVE | MPOL_F_RELATIVE_NODES, {0, 7})),
    ],
)
def test_policy_reads_back_after_set_mempolicy_and_after_mbind(task, mode, nodes, expected):
    task.set_mempolicy(mode, nodes)
    assert task.get_mempolicy() == expected
    task.set_mempolicy(MPOL_DEFAULT)
    m = task.mmap(2 * PS)
    task.mbind(m.addr, m.length, mode, nodes)
    assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == expected
    assert task.get_mempolicy(m.page(1), MPOL_F_ADDR) == expected
    assert task.get_mempolicy() == (MPOL_DEFAULT, set())


def test_mode_flag_passed_as_flags_reads_back_ored_into_the_mode(task):
    task.set_mempolicy(MPOL_BIND, [0, 1], flags=MPOL_F_STATIC_NODES)
    assert task.get_mempolicy() == (MPOL_BIND | MPOL_F_STATIC_NODES, {0, 1})


def test_relative_nodes_place_pages_on_the_mapped_node(task):
    # Relative node 3 folds onto the (3 mod 2)-th node of {0, 1}: node 1.
    task.set_mempolicy(MPOL_BIND | MPOL_F_RELATIVE_NODES, [3])
    assert task.get_mempolicy() == (MPOL_BIND | MPOL_F_RELATIVE_NODES, {3})
    m = task.mmap(2 * PS)
    touch(task, m)
    assert nodes_of(task, m) == [1, 1]


def test_f_addr_on_a_vma_without_policy_is_default_not_the_task_policy(task):
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(2 * PS)
    assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_DEFAULT, set())
    assert task.get_mempolicy() == (MPOL_BIND, {1})


def test_mems_allowed_reports_every_node_with_memory(task, task4):
    assert task.get_mempolicy(flags=MPOL_F_MEMS_ALLOWED) == (0, {0, 1})
    task4.set_mempolicy(MPOL_BIND, [2])
    assert task4.get_mempolicy(flags=MPOL_F_MEMS_ALLOWED) == (0, {0, 1, 2, 3})


def test_task_policy_is_per_task(cluster):
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=0) as b:
        a.set_mempolicy(MPOL_BIND, [1])
        assert b.get_mempolicy() == (MPOL_DEFAULT, set())
        mb = b.mmap(2 * PS)
        touch(b, mb)
        assert nodes_of(b, mb) == [0, 0]


# -- shared objects and files ----------------------------------------------------------------


def write_shared(task, name: str, npages: int, tag: bytes) -> int:
    """Client process body: fill every page of shared object ``name`` with ``tag``."""
    m = task.mmap(npages * task.page_size, shared=name)
    for i in range(npages):
        task.write(m.page(i), tag + bytes([i]))
    return task.node


def read_shared(task, name: str, npages: int) -> list[bytes]:
    m = task.mmap(npages * task.page_size, shared=name)
    return [task.read(m.page(i), 4) for i in range(npages)]


def test_named_shared_object_written_by_one_process_is_read_by_others(cluster, task):
    name = f"placement-shm-{os.getpid()}"
    try:
        writer = cluster.spawn(write_shared, name, 3, b"abc", cpu=2)
        assert writer.join(timeout=30) == 1
        reader = cluster.spawn(read_shared, name, 3, cpu=1)
        expect = [b"abc" + bytes([i]) for i in range(3)]
        assert reader.join(timeout=30) == expect
        m = task.mmap(3 * PS, shared=name)
        assert [task.read(m.page(i), 4) for i in range(3)] == expect
        # The pages were allocated by the writer, on its CPU's node, and are still there.
        assert task.move_pages(m.pages) == [1, 1, 1]
    finally:
        task.shm_unlink(name)


def test_shared_object_stores_are_visible_to_another_task_immediately(cluster):
    name = f"placement-shm2-{os.getpid()}"
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=3) as b:
        try:
            ma = a.mmap(PS, shared=name)
            mb = b.mmap(PS, shared=name)
            a.write(ma.addr + 100, b"hello")
            assert b.read(mb.addr + 100, 5) == b"hello"
            b.write(mb.addr + 100, b"HE")
            assert a.read(ma.addr + 100, 5) == b"HEllo"
        finally:
            a.shm_unlink(name)


def test_mbind_of_part_of_a_shared_mapping_sets_the_policy_of_that_part_only(cluster):
    name = f"placement-shm-part-{os.getpid()}"
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=0) as b:
        try:
            ma = a.mmap(4 * PS, shared=name)
            a.mbind(ma.page(1), 2 * PS, MPOL_BIND, [1])
            mb = b.mmap(4 * PS, shared=name)
            # The shared policy belongs to the object's pages 1-2, for every task mapping them.
            want = [(MPOL_DEFAULT, set()), (MPOL_BIND, {1}), (MPOL_BIND, {1}),
                    (MPOL_DEFAULT, set())]
            assert [a.get_mempolicy(p, MPOL_F_ADDR) for p in ma.pages] == want
            assert [b.get_mempolicy(p, MPOL_F_ADDR) for p in mb.pages] == want
            b.write(mb.addr, b"\x01" * mb.length)  # one fault spanning both policies
            assert b.move_pages(mb.pages) == [0, 1, 1, 0]
            # mbind DEFAULT on page 2 removes the shared policy there only.
            a.mbind(ma.page(2), PS, MPOL_DEFAULT)
            assert b.get_mempolicy(mb.page(1), MPOL_F_ADDR) == (MPOL_BIND, {1})
            assert b.get_mempolicy(mb.page(2), MPOL_F_ADDR) == (MPOL_DEFAULT, set())
        finally:
            a.shm_unlink(name)


def test_shared_object_interleave_gives_k_pages_per_node(cluster4, task4):
    name = f"placement-shm-il-{os.getpid()}"
    try:
        task4.set_mempolicy(MPOL_INTERLEAVE, [0, 2, 3])
        m = task4.mmap(9 * PS, shared=name)
        touch(task4, m)
        got = nodes_of(task4, m)
        assert [got.count(n) for n in (0, 2, 3)] == [3, 3, 3]
        # Consecutive object pages take consecutive nodes of the set.
        assert all(got[i + 1] == {0: 2, 2: 3, 3: 0}[got[i]] for i in range(8))
    finally:
        task4.shm_unlink(name)


def test_shm_unlink_keeps_the_pages_until_the_last_unmap(cluster, task):
    name = f"placement-shm-unlink-{os.getpid()}"
    free = cluster.free_frames()
    m = task.mmap(3 * PS, shared=name)
    task.write(m.addr, b"old" * PS)
    task.shm_unlink(name)
    assert task.read(m.addr, 3) == b"old"  # still mapped: still there
    fresh = task.mmap(3 * PS, shared=name)  # the name now starts a new, empty object
    assert task.read(fresh.addr, 3) == bytes(3)
    task.write(fresh.addr, b"new")
    assert task.read(m.addr, 3) == b"old"
    task.shm_unlink(name)
    task.munmap(m.addr, m.length)
    task.munmap(fresh.addr, fresh.length)
    assert cluster.free_frames() == free
    with pytest.raises(NumaError) as exc:
        task.shm_unlink(name)
    assert exc.value.errno == errno.ENOENT


def test_page_cache_ignores_the_vma_policy_of_a_shared_file_mapping(task, tmp_path):
    path = tmp_path / "vma-policy.bin"
    path.write_bytes(bytes(2 * PS))
    m = task.mmap(2 * PS, file=path)
    task.mbind(m.addr, m.length, MPOL_BIND, [1])
    assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_BIND, {1})  # stored ...
    touch(task, m, [0])
    assert nodes_of(task, m)[0] == 0  # ... but the page cache follows the task policy
    task.set_mempolicy(MPOL_PREFERRED, [1])
    touch(task, m, [1])
    assert nodes_of(task, m) == [0, 1]


def test_mmap_populate_allocates_by_policy(task):
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(4 * PS, populate=True)
    assert nodes_of(task, m) == [1] * 4


def test_mmap_populate_is_best_effort_and_the_mapping_stays_usable(cluster, task):
    task.set_mempolicy(MPOL_BIND, [1])
    too_big = cluster.free_frames()[1] + 10
    m = task.mmap(too_big * PS, populate=True)  # cannot be populated under BIND {1}
    assert m.length == too_big * PS
    assert task.move_pages([m.addr, m.page(too_big - 1)]) == [NOT_PRESENT] * 2
    touch(task, m, [0, too_big - 1])
    assert task.move_pages([m.addr, m.page(too_big - 1)]) == [1, 1]
    assert task.numa_maps().splitlines()[0].startswith(f"{m.addr:08x} bind:1 ")
    assert task.numa_maps().count("\n") == 1  # one VMA: the failed populate left no other


def test_mmap_populate_of_a_file_stops_at_eof(task, tmp_path):
    path = tmp_path / "populate.bin"
    path.write_bytes(b"p" * (PS + 1))
    m = task.mmap(4 * PS, file=path, populate=True)
    assert task.move_pages(m.pages) == [0, 0, NOT_PRESENT, NOT_PRESENT]
    assert task.read(m.page(1), 2) == b"p\x00"


def test_file_mapping_reads_the_files_bytes(task, tmp_path):
    data = os.urandom(2 * PS + 100)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    m = task.mmap(len(data), file=path)
    assert m.length == 3 * PS
    assert task.read(m.addr, len(data)) == data
    # The tail of the last page past EOF reads as zeros.
    assert task.read(m.addr + len(data), PS - 100) == bytes(PS - 100)


def test_msync_writes_exactly_the_written_bytes_back(task, tmp_path):
    data = bytes(range(256)) * (3 * PS // 256)
    path = tmp_path / "rw.bin"
    path.write_bytes(data)
    m = task.mmap(len(data), file=path)
    assert task.read(m.page(1), 4) == data[PS : PS + 4]
    task.write(m.addr + 10, b"HELLO")
    task.write(m.page(2) + PS - 3, b"END")
    task.msync(m.addr, m.length)
    expect = bytearray(data)
    expect[10:15] = b"HELLO"
    expect[3 * PS - 3 :] = b"END"
    with open(path, "rb") as f:
        assert f.read() == bytes(expect)
    # A second store after msync is caught too (the page was write-protected by writeback).
    task.write(m.addr + 10, b"J")
    task.msync(m.addr, m.length)
    expect[10:11] = b"J"
    assert path.read_bytes() == bytes(expect)


def test_msync_never_extends_the_file(task, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    m = task.mmap(PS, file=path)
    task.write(m.addr + 50, b"y" * 100)  # half of it past EOF, inside the last page
    task.msync(m.addr, m.length)
    assert path.read_bytes() == b"x" * 50 + b"y" * 50


def test_munmap_of_a_file_mapping_writes_its_dirty_pages_back(task, tmp_path):
    path = tmp_path / "unmap.bin"
    path.write_bytes(b"." * 2 * PS)
    m = task.mmap(2 * PS, file=path)
    task.write(m.page(1) + 1, b"bye")
    task.munmap(m.addr, m.length)
    assert path.read_bytes() == b"." * (PS + 1) + b"bye" + b"." * (PS - 4)


def test_pieces_of_a_split_file_mapping_share_one_page_cache(task, tmp_path):
    path = tmp_path / "split.bin"
    path.write_bytes(b"." * 3 * PS)
    m = task.mmap(3 * PS, file=path)
    task.write(m.addr, b"A")
    task.munmap(m.page(1), PS)  # the mapping is now two pieces of one file
    task.write(m.page(2), b"C")
    other = task.mmap(3 * PS, file=path)
    # Every mapping of the file sees the same pages, whichever piece wrote them.
    assert task.read(other.addr, 1) == b"A" and task.read(other.page(2), 1) == b"C"
    task.write(other.page(2), b"D")
    assert task.read(m.page(2), 1) == b"D"
    assert task.move_pages([m.page(2)]) == task.move_pages([other.page(2)])
    task.msync(m.page(2), PS)
    assert path.read_bytes()[2 * PS : 2 * PS + 1] == b"D"
    task.munmap(m.addr, m.length)
    task.munmap(other.addr, other.length)
    assert path.read_bytes() == b"A" + b"." * (2 * PS - 1) + b"D" + b"." * (PS - 1)


def test_file_mapping_past_eof_is_efault_on_access(task, tmp_path):
    path = tmp_path / "one.bin"
    path.write_bytes(b"z" * PS)
    m = task.mmap(3 * PS, file=path)
    assert task.read(m.addr, 1) == b"z"
    for addr in (m.page(1), m.page(2) + 7):
        with pytest.raises(NumaError) as exc:
            task.read(addr, 1)
        assert exc.value.errno == errno.EFAULT
        with pytest.raises(NumaError) as exc:
            task.write(addr, b"!")
        assert exc.value.errno == errno.EFAULT
    assert path.read_bytes() == b"z" * PS


# -- numastat ----------------------------------------------------------------------------------


def test_numastat_local_first_touch_is_one_hit_and_one_local_per_page(cluster, task):
    before = cluster.numastat()
    m = task.mmap(5 * PS)
    touch(task, m)
    d = numastat_delta(cluster, before)
    assert d[0] == {"numa_hit": 5, "numa_miss": 0, "numa_foreign": 0, "interleave_hit": 0,
                    "local_node": 5, "other_node": 0}
    assert all(v == 0 for v in d[1].values())


def test_numastat_bind_to_a_remote_node_is_a_hit_there_and_other_node(cluster, task):
    before = cluster.numastat()
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(3 * PS)
    touch(task, m)
    d = numastat_delta(cluster, before)
    assert d[1] == {"numa_hit": 3, "numa_miss": 0, "numa_foreign": 0, "interleave_hit": 0,
                    "local_node": 0, "other_node": 3}
    assert all(v == 0 for v in d[0].values())


def test_numastat_interleave_hits_on_the_targets(cluster, task):
    before = cluster.numastat()
    task.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
    m = task.mmap(6 * PS)
    touch(task, m)
    d = numastat_delta(cluster, before)
    for n in (0, 1):
        assert d[n]["interleave_hit"] == 3 and d[n]["numa_hit"] == 3
    assert (d[0]["local_node"], d[1]["other_node"]) == (3, 3)


def test_numastat_read_of_untouched_memory_allocates_nothing(cluster, task):
    before = cluster.numastat()
    m = task.mmap(4 * PS)
    assert task.read(m.addr, m.length) == bytes(m.length)
    assert numastat_delta(cluster, before) == {n: dict.fromkeys(before[n], 0) for n in before}


def test_numastat_every_page_counts_once_and_misses_equal_foreigns(cluster):
    before = cluster.numastat()
    with cluster.attach(cpu=0) as a, cluster.attach(cpu=2) as b:
        a.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
        ma = a.mmap(4 * PS)
        touch(a, ma)
        b.set_mempolicy(MPOL_PREFERRED, [0])
        mb = b.mmap(3 * PS)
        touch(b, mb)
        mc = b.mmap(2 * PS)
        b.mbind(mc.addr, mc.length, MPOL_BIND, [1])
        touch(b, mc)
        d = numastat_delta(cluster, before)
    total = 4 + 3 + 2
    assert sum(d[n]["numa_hit"] + d[n]["numa_miss"] for n in d) == total
    assert sum(d[n]["local_node"] + d[n]["other_node"] for n in d) == total
    assert sum(d[n]["numa_miss"] for n in d) == sum(d[n]["numa_foreign"] for n in d)
    # Local/other is judged against the allocating CPU: a runs on node 0, b on node 1.
    assert (d[0]["local_node"], d[0]["other_node"]) == (2, 3)
    assert (d[1]["local_node"], d[1]["other_node"]) == (2, 2)


# -- move_pages query mode ---------------------------------------------------------------------


def test_new_pages_read_as_zeros_even_when_their_frames_were_used_before(cluster, task):
    task.set_mempolicy(MPOL_BIND, [1])
    for _ in range(3):
        m = task.mmap(64 * PS)
        assert task.read(m.addr, m.length) == bytes(m.length)  # zero pages
        task.write(m.page(5), b"\x01")  # a real frame now: still zero apart from the store
        assert task.read(m.page(5), PS) == b"\x01" + bytes(PS - 1)
        task.write(m.addr, b"\xff" * m.length)
        task.munmap(m.addr, m.length)


def test_move_pages_query_reports_node_enoent_and_efault(task):
    m = task.mmap(4 * PS)
    gone = task.mmap(2 * PS)
    task.write(m.page(0), b"w")
    task.write(m.page(2) + 5, b"w")
    assert task.read(m.page(1), 8) == bytes(8)  # read-only touch: the zero page
    task.munmap(gone.addr, gone.length)
    status = task.move_pages([m.page(0), m.page(1), m.page(2), m.page(3),
                              gone.addr, gone.page(1), m.addr - PS, PS])
    assert status == [0, FAULT, 0, NOT_PRESENT, FAULT, FAULT, FAULT, FAULT]


def test_move_pages_query_accepts_addresses_inside_a_page(task):
    m = task.mmap(2 * PS)
    task.write(m.page(1), b"w")
    assert task.move_pages([m.addr + 123, m.page(1) + PS - 1]) == [NOT_PRESENT, 0]


def test_move_pages_query_after_a_write_to_the_zero_page_reports_the_node(task):
    task.set_mempolicy(MPOL_BIND, [1])
    m = task.mmap(PS)
    task.read(m.addr, 1)
    assert task.move_pages([m.addr]) == [FAULT]
    task.write(m.addr, b"x")
    assert task.move_pages([m.addr]) == [1]
    assert task.read(m.addr, 2) == b"x\x00"


def test_get_mempolicy_f_node_on_an_untouched_page_faults_it_in_as_a_read(task):
    m = task.mmap(PS)
    task.set_mempolicy(MPOL_BIND, [1])
    # The kernel reads the page in first: the zero page, which is counted as node 0 here.
    assert task.get_mempolicy(m.addr, MPOL_F_NODE | MPOL_F_ADDR) == (0, set())
    assert task.move_pages([m.addr]) == [FAULT]
