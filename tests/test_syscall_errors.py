"""Every way a memory-policy call can fail, end to end, and that failing changes nothing.

The validation matrices of set_mempolicy, get_mempolicy, mbind and move_pages
(linux-semantics sections 1-5 and 12 items 5, 10, 11, 13-15, 19) as they apply to the
Python API, where a nodemask is an iterable of node numbers: something that cannot be read
as one is EFAULT, a node outside ``0..MAX_NUMNODES-1`` is EINVAL, and nodes that do not
exist are dropped unless none is left. Also: malformed wire messages get an EINVAL reply,
and a stopped cluster gives ``ClusterError`` quickly.
"""

from __future__ import annotations

import errno
import itertools
import os
import time

import msgpack
import numpy as np
import pytest
import zmq

import numaemu
from numaemu import (
    MAX_NUMNODES,
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_F_ADDR,
    MPOL_F_MEMS_ALLOWED,
    MPOL_F_NODE,
    MPOL_F_NUMA_BALANCING,
    MPOL_F_RELATIVE_NODES,
    MPOL_F_STATIC_NODES,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_MF_STRICT,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    ClusterError,
    NumaError,
)

PS = numaemu.PAGE_SIZE
NEEDS_NODES = [MPOL_BIND, MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE, MPOL_PREFERRED_MANY]


def expect_errno(err: int, fn, *args, **kwargs) -> NumaError:
    with pytest.raises(NumaError) as exc:
        fn(*args, **kwargs)
    assert exc.value.errno == err, f"{exc.value!r}: wanted {errno.errorcode[err]}"
    assert exc.value.strerror  # the message says what was wrong
    return exc.value


# -- a task with something to lose ----------------------------------------------------------


class Scene:
    """A task with a task policy, two VMAs (one with an mbind policy) and some pages."""

    def __init__(self, task) -> None:
        self.task = task
        task.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
        self.m = task.mmap(4 * PS)
        self.other = task.mmap(2 * PS)
        task.mbind(self.m.page(2), 2 * PS, MPOL_BIND, [1])
        for i in (0, 2):
            task.write(self.m.page(i), b"data")
        task.read(self.m.page(1), 1)  # the zero page
        task.write(self.other.addr, b"x")
        self.pages = self.m.pages + self.other.pages
        # Page 0 interleaves by its (even) page number onto node 0; page 2 is bound to node 1.
        assert task.move_pages(self.m.pages) == [0, -errno.EFAULT, 1, -errno.ENOENT]

    def snapshot(self):
        t = self.task
        return (
            t.get_mempolicy(),
            [t.get_mempolicy(a, MPOL_F_ADDR) for a in self.pages],
            t.numa_maps(),
            t.move_pages(self.pages),
            t.read(self.m.addr, 8),
        )


@pytest.fixture
def scene(task):
    return Scene(task)


def unchanged(scene, err: int, call) -> None:
    """``call(task, m)`` fails with ``err`` and leaves policies, VMAs and pages as they were."""
    before = scene.snapshot()
    expect_errno(err, call, scene.task, scene.m)
    assert scene.snapshot() == before


# -- set_mempolicy -----------------------------------------------------------------------------


SET_MEMPOLICY_ERRORS = [
    ("unknown mode 7", errno.EINVAL, lambda t, m: t.set_mempolicy(7, [0])),
    ("mode -1", errno.EINVAL, lambda t, m: t.set_mempolicy(-1, [0])),
    ("mode 100", errno.EINVAL, lambda t, m: t.set_mempolicy(100)),
    ("mode not an int", errno.EINVAL, lambda t, m: t.set_mempolicy("bind", [0])),
    ("static and relative", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND | MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES, [0])),
    ("balancing with interleave", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_INTERLEAVE | MPOL_F_NUMA_BALANCING, [0])),
    ("balancing with preferred", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_PREFERRED, [0], flags=MPOL_F_NUMA_BALANCING)),
    ("flags that are no mode flags", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND, [0], flags=MPOL_MF_STRICT)),
    ("default with a node", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_DEFAULT, [0])),
    ("local with a node", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_LOCAL, [1])),
    ("local static", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_LOCAL | MPOL_F_STATIC_NODES)),
    ("empty preferred relative", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_PREFERRED | MPOL_F_RELATIVE_NODES, [])),
    *[(f"mode {mode} without nodes", errno.EINVAL, lambda t, m, mode=mode: t.set_mempolicy(mode))
      for mode in NEEDS_NODES],
    ("bind with None", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_BIND, None)),
    ("nodes not iterable", errno.EFAULT, lambda t, m: t.set_mempolicy(MPOL_BIND, 5)),
    ("nodes an object", errno.EFAULT, lambda t, m: t.set_mempolicy(MPOL_BIND, object())),
    ("node a string", errno.EFAULT, lambda t, m: t.set_mempolicy(MPOL_BIND, ["0"])),
    ("node a float", errno.EFAULT, lambda t, m: t.set_mempolicy(MPOL_BIND, [0.0])),
    ("node MAX_NUMNODES", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND, [0, MAX_NUMNODES])),
    ("node negative", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_BIND, [0, -1])),
    ("only nonexistent nodes", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_BIND, [40])),
    ("highest legal node only", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_INTERLEAVE, [MAX_NUMNODES - 1])),
    ("preferred nonexistent", errno.EINVAL, lambda t, m: t.set_mempolicy(MPOL_PREFERRED, [2])),
    ("static without overlap", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND | MPOL_F_STATIC_NODES, [5, 6])),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in SET_MEMPOLICY_ERRORS],
                         ids=[c[0] for c in SET_MEMPOLICY_ERRORS])
def test_bad_set_mempolicy_fails_and_changes_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_bind_without_nodes_is_einval(task):
    expect_errno(errno.EINVAL, task.set_mempolicy, MPOL_BIND, [])
    assert task.get_mempolicy() == (MPOL_DEFAULT, set())


def test_nonexistent_nodes_below_max_numnodes_are_dropped_silently(task):
    task.set_mempolicy(MPOL_BIND, [1, 40, MAX_NUMNODES - 1])
    assert task.get_mempolicy() == (MPOL_BIND, {1})
    task.set_mempolicy(MPOL_INTERLEAVE, iter([0, 1, 2, 3]))
    assert task.get_mempolicy() == (MPOL_INTERLEAVE, {0, 1})


def test_numa_balancing_is_accepted_with_bind(task):
    task.set_mempolicy(MPOL_BIND | MPOL_F_NUMA_BALANCING, [1])
    assert task.get_mempolicy() == (MPOL_BIND | MPOL_F_NUMA_BALANCING, {1})


def test_node_list_may_be_any_iterable_of_ints(task):
    import numpy as np

    for nodes in ((1,), {1}, range(1, 2), np.array([1], dtype=np.int16), (n for n in [1])):
        task.set_mempolicy(MPOL_DEFAULT)
        task.set_mempolicy(MPOL_BIND, nodes)
        assert task.get_mempolicy() == (MPOL_BIND, {1})


# -- get_mempolicy -----------------------------------------------------------------------------


GET_MEMPOLICY_ERRORS = [
    ("flags -1", errno.EINVAL, lambda t, m: t.get_mempolicy(flags=-1)),
    ("flags 8", errno.EINVAL, lambda t, m: t.get_mempolicy(flags=8)),
    ("flags 16 with addr", errno.EINVAL, lambda t, m: t.get_mempolicy(m.addr, 16 | MPOL_F_ADDR)),
    ("mems_allowed with node", errno.EINVAL,
     lambda t, m: t.get_mempolicy(flags=MPOL_F_MEMS_ALLOWED | MPOL_F_NODE)),
    ("mems_allowed with addr", errno.EINVAL,
     lambda t, m: t.get_mempolicy(m.addr, MPOL_F_MEMS_ALLOWED | MPOL_F_ADDR)),
    ("addr without f_addr", errno.EINVAL, lambda t, m: t.get_mempolicy(m.addr)),
    ("addr with only f_node", errno.EINVAL, lambda t, m: t.get_mempolicy(m.addr, MPOL_F_NODE)),
    ("f_addr on NULL", errno.EFAULT, lambda t, m: t.get_mempolicy(0, MPOL_F_ADDR)),
    ("f_addr without address", errno.EFAULT, lambda t, m: t.get_mempolicy(None, MPOL_F_ADDR)),
    ("f_addr below every mapping", errno.EFAULT,
     lambda t, m: t.get_mempolicy(m.addr - PS, MPOL_F_ADDR)),
    ("f_addr on the guard page", errno.EFAULT,
     lambda t, m: t.get_mempolicy(m.addr + m.length, MPOL_F_ADDR)),
    ("f_node f_addr unmapped", errno.EFAULT,
     lambda t, m: t.get_mempolicy(m.addr + m.length, MPOL_F_NODE | MPOL_F_ADDR)),
    ("addr not an int", errno.EINVAL, lambda t, m: t.get_mempolicy("0x1000", MPOL_F_ADDR)),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in GET_MEMPOLICY_ERRORS],
                         ids=[c[0] for c in GET_MEMPOLICY_ERRORS])
def test_bad_get_mempolicy_fails_and_changes_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_f_node_without_f_addr_needs_an_interleave_task_policy(task):
    m = task.mmap(PS)
    for mode, nodes in ((MPOL_DEFAULT, []), (MPOL_BIND, [1]), (MPOL_PREFERRED, [0]),
                        (MPOL_LOCAL, []), (MPOL_PREFERRED_MANY, [0, 1])):
        task.set_mempolicy(mode, nodes)
        expect_errno(errno.EINVAL, task.get_mempolicy, flags=MPOL_F_NODE)
    # A VMA interleave policy does not count: it is the task policy that matters.
    task.set_mempolicy(MPOL_DEFAULT)
    task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])
    expect_errno(errno.EINVAL, task.get_mempolicy, flags=MPOL_F_NODE)
    task.set_mempolicy(MPOL_WEIGHTED_INTERLEAVE, [1])
    assert task.get_mempolicy(flags=MPOL_F_NODE) == (1, set())


def test_f_addr_after_munmap_is_efault(task):
    m = task.mmap(2 * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [1])
    task.munmap(m.addr, PS)
    expect_errno(errno.EFAULT, task.get_mempolicy, m.addr, MPOL_F_ADDR)
    assert task.get_mempolicy(m.page(1), MPOL_F_ADDR) == (MPOL_BIND, {1})


# -- mbind -------------------------------------------------------------------------------------


MBIND_ERRORS = [
    ("default with a node", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_DEFAULT, [0])),
    ("bind without nodes", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [])),
    ("interleave without nodes", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_INTERLEAVE, None)),
    ("weighted without nodes", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_WEIGHTED_INTERLEAVE, ())),
    ("preferred many without nodes", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_PREFERRED_MANY)),
    ("local with a node", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_LOCAL, [0])),
    ("mode -1", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, -1, [0])),
    ("mode 7", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, 7, [0])),
    ("static and relative", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND | MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES,
                          [0])),
    ("balancing with preferred", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_PREFERRED | MPOL_F_NUMA_BALANCING, [0])),
    ("flags -1", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [0], flags=-1)),
    ("flags lazy", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [0], flags=8)),
    ("nodes not iterable", errno.EFAULT, lambda t, m: t.mbind(m.addr, PS, MPOL_PREFERRED, 1)),
    ("node not an int", errno.EFAULT,
     lambda t, m: t.mbind(m.addr, PS, MPOL_PREFERRED, [None])),
    ("node MAX_NUMNODES", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [MAX_NUMNODES])),
    ("node negative", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [-3])),
    ("only nonexistent nodes", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_INTERLEAVE, [2, 3])),
    ("move_all unprivileged", errno.EPERM,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [1], flags=MPOL_MF_MOVE_ALL)),
    ("move_all before alignment", errno.EPERM,
     lambda t, m: t.mbind(m.addr + 1, PS, MPOL_BIND, [1], flags=MPOL_MF_MOVE_ALL)),
    ("move_all before mode versus mask", errno.EPERM,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [], flags=MPOL_MF_MOVE_ALL)),
    ("unaligned addr", errno.EINVAL, lambda t, m: t.mbind(m.addr + 8, PS, MPOL_BIND, [1])),
    ("unaligned addr, len 0", errno.EINVAL, lambda t, m: t.mbind(m.addr + 8, 0, MPOL_BIND, [1])),
    ("addr + len wraps", errno.EINVAL,
     lambda t, m: t.mbind((1 << 64) - PS, 2 * PS, MPOL_BIND, [1])),
    ("negative length", errno.EINVAL, lambda t, m: t.mbind(m.addr, -PS, MPOL_BIND, [1])),
    ("hole between two mappings", errno.EFAULT,
     lambda t, m: t.mbind(m.addr, m.length + 3 * PS, MPOL_BIND, [1])),
    ("range past the end", errno.EFAULT,
     lambda t, m: t.mbind(m.page(3), 2 * PS, MPOL_PREFERRED, [1])),
    ("range entirely unmapped", errno.EFAULT,
     lambda t, m: t.mbind(m.addr - 4 * PS, 2 * PS, MPOL_BIND, [1])),
    ("default on an unmapped range", errno.EFAULT,
     lambda t, m: t.mbind(m.addr + m.length, PS, MPOL_DEFAULT)),
    ("strict with a misplaced page", errno.EIO,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [1], flags=MPOL_MF_STRICT)),
    ("strict over two VMAs", errno.EIO,
     lambda t, m: t.mbind(m.addr, 3 * PS, MPOL_INTERLEAVE, [0], flags=MPOL_MF_STRICT)),
    ("strict local", errno.EIO,
     lambda t, m: t.mbind(m.page(2), PS, MPOL_LOCAL, flags=MPOL_MF_STRICT)),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in MBIND_ERRORS],
                         ids=[c[0] for c in MBIND_ERRORS])
def test_bad_mbind_fails_and_changes_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_mbind_error_order_mode_then_nodes_then_flags_then_privilege(task):
    m = task.mmap(PS)
    expect_errno(errno.EINVAL, task.mbind, m.addr, PS, -1, [MAX_NUMNODES], flags=-1)
    expect_errno(errno.EINVAL, task.mbind, m.addr, PS, MPOL_BIND, [MAX_NUMNODES],
                 flags=MPOL_MF_MOVE_ALL)
    expect_errno(errno.EFAULT, task.mbind, m.addr, PS, MPOL_BIND, 3, flags=-1)
    expect_errno(errno.EINVAL, task.mbind, m.addr, PS, MPOL_BIND, [0], flags=-1 & ~0xFF)
    expect_errno(errno.EPERM, task.mbind, m.addr + 1, PS, MPOL_BIND, [5], flags=MPOL_MF_MOVE_ALL)


def test_mbind_unknown_mode_is_einval_even_with_an_unreadable_node_list(task):
    m = task.mmap(PS)
    expect_errno(errno.EINVAL, task.mbind, m.addr, PS, -1, 5)


def test_mbind_len_zero_returns_without_effect(scene):
    t, m = scene.task, scene.m
    before = scene.snapshot()
    t.mbind(m.addr, 0, MPOL_BIND, [1])
    t.mbind(m.page(1), 0, MPOL_BIND, [])  # mode versus mask comes after the len 0 return
    t.mbind(m.addr + m.length, 0, MPOL_INTERLEAVE, [0])  # no VMA needed either
    t.mbind(m.addr, 0, MPOL_BIND, [1], flags=MPOL_MF_STRICT)
    assert scene.snapshot() == before
    # ... but the mode and nodemask checks run before it.
    expect_errno(errno.EINVAL, t.mbind, m.addr, 0, -1, [0])
    expect_errno(errno.EINVAL, t.mbind, m.addr, 0, MPOL_BIND, [MAX_NUMNODES])
    expect_errno(errno.EPERM, t.mbind, m.addr, 0, MPOL_BIND, [1], flags=MPOL_MF_MOVE_ALL)
    assert scene.snapshot() == before


def test_mbind_default_over_a_hole_succeeds_when_some_vma_is_in_range(task):
    a = task.mmap(2 * PS)
    b = task.mmap(2 * PS)
    task.mbind(a.addr, a.length, MPOL_BIND, [1])
    task.mbind(b.addr, b.length, MPOL_BIND, [1])
    assert b.addr > a.addr + a.length  # a guard page lies between them
    task.mbind(a.addr, b.addr + b.length - a.addr, MPOL_DEFAULT)
    assert task.get_mempolicy(a.addr, MPOL_F_ADDR) == (MPOL_DEFAULT, set())
    assert task.get_mempolicy(b.page(1), MPOL_F_ADDR) == (MPOL_DEFAULT, set())


def test_mbind_strict_without_faulted_pages_installs_the_policy(task):
    m = task.mmap(4 * PS)
    task.read(m.addr, 1)  # the zero page is no page of a node
    task.mbind(m.addr, m.length, MPOL_BIND, [1], flags=MPOL_MF_STRICT)
    assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_BIND, {1})
    task.write(m.addr, b"x" * m.length)
    assert task.move_pages(m.pages) == [1] * 4


def test_mbind_strict_with_pages_already_inside_the_mask_succeeds(task):
    m = task.mmap(2 * PS)
    task.write(m.addr, b"x")  # node 0
    task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1], flags=MPOL_MF_STRICT)
    assert task.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_INTERLEAVE, {0, 1})
    assert task.move_pages(m.pages) == [0, -errno.ENOENT]


def test_mbind_strict_checks_pages_against_the_callers_whole_mask(cluster):
    # PREFERRED keeps only the lowest node, but STRICT judges pages by the mask passed in.
    with cluster.attach(cpu=2) as t:
        m = t.mmap(PS)
        t.write(m.addr, b"x")  # node 1
        t.mbind(m.addr, m.length, MPOL_PREFERRED, [0, 1], flags=MPOL_MF_STRICT)
        assert t.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_PREFERRED, {0})
        expect_errno(errno.EIO, t.mbind, m.addr, m.length, MPOL_PREFERRED, [0],
                     flags=MPOL_MF_STRICT)
        assert t.get_mempolicy(m.addr, MPOL_F_ADDR) == (MPOL_PREFERRED, {0})


def test_mbind_strict_is_ignored_with_default(scene):
    t, m = scene.task, scene.m
    t.mbind(m.page(2), 2 * PS, MPOL_DEFAULT, flags=MPOL_MF_STRICT)
    assert t.get_mempolicy(m.page(2), MPOL_F_ADDR) == (MPOL_DEFAULT, set())


def test_mbind_strict_eio_does_not_split_the_vma(scene):
    t, m = scene.task, scene.m
    lines = t.numa_maps().count("\n")
    expect_errno(errno.EIO, t.mbind, m.addr, PS, MPOL_BIND, [1], flags=MPOL_MF_STRICT)
    assert t.numa_maps().count("\n") == lines
    t.mbind(m.page(1), PS, MPOL_BIND, [1], flags=MPOL_MF_STRICT)  # only the zero page there
    assert t.numa_maps().count("\n") == lines + 1


# -- move_pages --------------------------------------------------------------------------------


MOVE_PAGES_ERRORS = [
    ("flags strict", errno.EINVAL, lambda t, m: t.move_pages(m.pages, flags=MPOL_MF_STRICT)),
    ("flags strict with move", errno.EINVAL,
     lambda t, m: t.move_pages(m.pages, [1] * 4, flags=MPOL_MF_STRICT | MPOL_MF_MOVE)),
    ("flags 8", errno.EINVAL, lambda t, m: t.move_pages(m.pages, flags=8)),
    ("flags -1", errno.EINVAL, lambda t, m: t.move_pages(m.pages, flags=-1)),
    ("move_all unprivileged", errno.EPERM,
     lambda t, m: t.move_pages(m.pages, [1] * 4, flags=MPOL_MF_MOVE_ALL)),
    ("move_all unprivileged, query", errno.EPERM,
     lambda t, m: t.move_pages(m.pages, flags=MPOL_MF_MOVE_ALL)),
    ("move_all before the pid lookup", errno.EPERM,
     lambda t, m: t.move_pages(m.pages, flags=MPOL_MF_MOVE_ALL, pid=1 << 30)),
    ("unknown pid", errno.ESRCH, lambda t, m: t.move_pages(m.pages, pid=1 << 30)),
    ("unknown pid, move", errno.ESRCH,
     lambda t, m: t.move_pages(m.pages, [0] * 4, flags=MPOL_MF_MOVE, pid=1 << 30)),
    ("nodes shorter than pages", errno.EINVAL, lambda t, m: t.move_pages(m.pages, [1])),
    ("pages not a list", errno.EFAULT, lambda t, m: t.move_pages(7)),
    ("node not an int", errno.EFAULT, lambda t, m: t.move_pages(m.pages[:1], ["1"])),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in MOVE_PAGES_ERRORS],
                         ids=[c[0] for c in MOVE_PAGES_ERRORS])
def test_bad_move_pages_fails_and_changes_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_move_pages_of_an_exited_task_is_esrch(cluster, task):
    other = cluster.attach(cpu=2)
    m = other.mmap(PS)
    other.write(m.addr, b"x")
    assert task.move_pages([m.addr], pid=other.pid) == [1]
    pid = other.pid
    other.close()
    expect_errno(errno.ESRCH, task.move_pages, [m.addr], pid=pid)


def test_move_pages_pid_zero_is_the_caller(task):
    m = task.mmap(PS)
    task.write(m.addr, b"x")
    assert task.move_pages([m.addr], pid=0) == [0]
    assert task.move_pages([], pid=task.pid) == []


def test_move_pages_move_all_is_allowed_when_privileged(cluster):
    with cluster.attach(cpu=0, privileged=True) as t:
        m = t.mmap(PS)
        t.write(m.addr, b"x")
        assert t.move_pages([m.addr], flags=MPOL_MF_MOVE_ALL) == [0]


# -- mmap, munmap, msync and friends ------------------------------------------------------------


MEMORY_CALL_ERRORS = [
    ("mmap length 0", errno.EINVAL, lambda t, m: t.mmap(0)),
    ("mmap negative length", errno.EINVAL, lambda t, m: t.mmap(-PS)),
    ("mmap length not an int", errno.EINVAL, lambda t, m: t.mmap(1.5)),
    ("mmap beyond the address space", errno.ENOMEM, lambda t, m: t.mmap(1 << 62)),
    ("mmap shared and file", errno.EINVAL, lambda t, m: t.mmap(PS, shared="x", file="/tmp")),
    ("mmap empty shared name", errno.EINVAL, lambda t, m: t.mmap(PS, shared="")),
    ("mmap shared name with a slash", errno.EINVAL, lambda t, m: t.mmap(PS, shared="a/b")),
    ("mmap missing file", errno.ENOENT,
     lambda t, m: t.mmap(PS, file="/nonexistent/numaemu-test-file")),
    ("mmap a directory", errno.ENODEV, lambda t, m: t.mmap(PS, file="/tmp")),
    ("munmap unaligned", errno.EINVAL, lambda t, m: t.munmap(m.addr + 1, PS)),
    ("munmap length 0", errno.EINVAL, lambda t, m: t.munmap(m.addr, 0)),
    ("msync unaligned", errno.EINVAL, lambda t, m: t.msync(m.addr + 1, PS)),
    ("msync over a hole", errno.ENOMEM, lambda t, m: t.msync(m.addr, m.length + PS)),
    ("shm_unlink unknown name", errno.ENOENT, lambda t, m: t.shm_unlink("numaemu-no-such")),
    ("sched_setaffinity no such cpu", errno.EINVAL, lambda t, m: t.sched_setaffinity([9])),
    ("sched_setaffinity empty", errno.EINVAL, lambda t, m: t.sched_setaffinity([])),
    ("write beyond the mapping", errno.EFAULT,
     lambda t, m: t.write(m.addr + m.length, b"x")),
    ("read below every mapping", errno.EFAULT, lambda t, m: t.read(m.addr - PS, 1)),
    ("numa_maps of no such pid", errno.ESRCH, lambda t, m: t.numa_maps(pid=1 << 40)),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in MEMORY_CALL_ERRORS],
                         ids=[c[0] for c in MEMORY_CALL_ERRORS])
def test_bad_memory_calls_fail_and_change_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_a_failed_huge_mmap_leaves_the_address_space_usable(task):
    expect_errno(errno.ENOMEM, task.mmap, 1 << 60)
    m = task.mmap(2 * PS)
    task.write(m.addr, b"fine")
    assert task.read(m.addr, 4) == b"fine"
    assert task.move_pages(m.pages) == [0, -errno.ENOENT]
    assert task.numa_maps().count("\n") == 1


def test_munmap_of_an_unmapped_range_succeeds_without_effect(scene):
    t, m = scene.task, scene.m
    before = scene.snapshot()
    t.munmap(m.addr + m.length, PS)  # the guard page
    t.munmap(m.addr - 16 * PS, 8 * PS)
    assert scene.snapshot() == before


# -- values the kernel's types cannot hold (numaemu.argcheck) ----------------------------------


def _pin(t, addr, length):
    with t.pin(addr, length):
        pass


VALUE_ERRORS = [
    # lengths: beyond size_t is "more than the address space", as the call says it
    ("mmap length 2**70", errno.ENOMEM, lambda t, m: t.mmap(2**70)),
    ("mmap length 2**64-1", errno.ENOMEM, lambda t, m: t.mmap(2**64 - 1)),
    ("mmap more than all memory", errno.ENOMEM, lambda t, m: t.mmap(1 << 40)),
    ("mmap length a float", errno.EINVAL, lambda t, m: t.mmap(float(PS))),
    ("mmap length True", errno.EINVAL, lambda t, m: t.mmap(True)),
    ("mmap populate not a bool", errno.EINVAL, lambda t, m: t.mmap(PS, populate="yes")),
    ("munmap length 2**64", errno.EINVAL, lambda t, m: t.munmap(m.addr, 2**64)),
    ("munmap addr 2**64", errno.EINVAL, lambda t, m: t.munmap(2**64, PS)),
    ("munmap past TASK_SIZE", errno.EINVAL, lambda t, m: t.munmap(m.addr, 1 << 63)),
    ("munmap addr a float", errno.EINVAL, lambda t, m: t.munmap(float(m.addr), PS)),
    ("msync length 2**64", errno.EINVAL, lambda t, m: t.msync(m.addr, 2**64)),
    ("mbind length 2**64", errno.EINVAL, lambda t, m: t.mbind(m.addr, 2**64, MPOL_BIND, [0])),
    ("mbind addr a float", errno.EINVAL,
     lambda t, m: t.mbind(m.addr + 0.0, PS, MPOL_BIND, [0])),
    ("mbind node 2**70", errno.EINVAL, lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [2**70])),
    ("mbind more nodes than MAX_NUMNODES", errno.EINVAL,
     lambda t, m: t.mbind(m.addr, PS, MPOL_BIND, [0] * (MAX_NUMNODES + 1))),
    ("set_mempolicy endless node list", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND, itertools.count())),
    ("set_mempolicy mode 2**64", errno.EINVAL, lambda t, m: t.set_mempolicy(2**64, [0])),
    ("set_mempolicy flags 2**70", errno.EINVAL,
     lambda t, m: t.set_mempolicy(MPOL_BIND, [0], flags=2**70)),
    ("set_mempolicy mode a float", errno.EINVAL, lambda t, m: t.set_mempolicy(2.0, [0])),
    ("get_mempolicy addr 2**64", errno.EINVAL, lambda t, m: t.get_mempolicy(2**64, MPOL_F_ADDR)),
    ("get_mempolicy addr a float", errno.EINVAL,
     lambda t, m: t.get_mempolicy(m.addr + 0.0, MPOL_F_ADDR)),
    ("get_mempolicy addr True", errno.EINVAL, lambda t, m: t.get_mempolicy(True, MPOL_F_ADDR)),
    # move_pages: pages is an array of pointers; something else in it makes it unreadable
    ("move_pages address 2**64", errno.EFAULT, lambda t, m: t.move_pages([2**64])),
    ("move_pages address a float", errno.EFAULT, lambda t, m: t.move_pages([m.addr + 0.5], [1])),
    ("move_pages address True", errno.EFAULT, lambda t, m: t.move_pages([True])),
    ("move_pages address a decimal string", errno.EFAULT,
     lambda t, m: t.move_pages([str(m.addr)])),
    ("move_pages node 2**70", errno.ENODEV, lambda t, m: t.move_pages([m.addr], [2**70])),
    ("move_pages node a float", errno.EFAULT, lambda t, m: t.move_pages([m.addr], [1.0])),
    ("move_pages pid 2**70", errno.EINVAL, lambda t, m: t.move_pages([m.addr], pid=2**70)),
    ("move_pages pid a float", errno.EINVAL, lambda t, m: t.move_pages([m.addr], pid=1.0)),
    ("migrate_pages pid 2**70", errno.EINVAL, lambda t, m: t.migrate_pages(2**70, [0], [1])),
    ("migrate_pages new node 2**70", errno.EINVAL,
     lambda t, m: t.migrate_pages(None, [0], [2**70])),
    ("migrate_pages old unreadable before new too big", errno.EFAULT,
     lambda t, m: t.migrate_pages(None, ["0"], [2**70])),
    ("migrate_pages more nodes than MAX_NUMNODES", errno.EINVAL,
     lambda t, m: t.migrate_pages(None, range(MAX_NUMNODES + 1), [1])),
    ("pin length 2**64", errno.EINVAL, lambda t, m: _pin(t, m.addr, 2**64)),
    ("pin past the mapping", errno.EFAULT, lambda t, m: _pin(t, m.addr, 1 << 40)),
    ("pin length a float", errno.EINVAL, lambda t, m: _pin(t, m.addr, 1.5)),
    # read/write: bad types EINVAL (also on the TLB-hit fast path), out of the space EFAULT
    ("read length 2**70", errno.EFAULT, lambda t, m: t.read(m.addr, 2**70)),
    ("read length 2**40", errno.EFAULT, lambda t, m: t.read(m.addr, 1 << 40)),
    ("read length a float, TLB hit", errno.EINVAL, lambda t, m: t.read(m.addr, 1.0)),
    ("read length True, TLB hit", errno.EINVAL, lambda t, m: t.read(m.addr, True)),
    ("read addr a float", errno.EINVAL, lambda t, m: t.read(float(m.addr), 1)),
    ("write addr a float, TLB hit", errno.EINVAL, lambda t, m: t.write(float(m.addr), b"x")),
    ("write addr True", errno.EINVAL, lambda t, m: t.write(True, b"x")),
    ("write addr 2**70", errno.EFAULT, lambda t, m: t.write(2**70, b"x")),
    ("write data a str", errno.EINVAL, lambda t, m: t.write(m.addr, "x")),
    ("sched_setaffinity cpu 2**70", errno.EINVAL, lambda t, m: t.sched_setaffinity([2**70])),
    ("sched_setaffinity more than CPU_SETSIZE cpus", errno.EINVAL,
     lambda t, m: t.sched_setaffinity([0] * 1025)),
    ("numa_maps pid 2**70", errno.EINVAL, lambda t, m: t.numa_maps(pid=2**70)),
    ("numa_maps pid a str", errno.EINVAL, lambda t, m: t.numa_maps(pid="1")),
    ("sysctl value 2**70", errno.EINVAL, lambda t, m: t.sysctl("migrate_batch", 2**70)),
    ("sysctl value a float", errno.EINVAL, lambda t, m: t.sysctl("migrate_batch", 8.0)),
    ("sysctl name not a str", errno.EINVAL, lambda t, m: t.sysctl(b"migrate_batch")),
    ("inject_delays negative", errno.EINVAL, lambda t, m: t.inject_delays(-1.0)),
    ("inject_delays nan", errno.EINVAL, lambda t, m: t.inject_delays(float("nan"))),
    ("inject_delays a str", errno.EINVAL, lambda t, m: t.inject_delays("2")),
    # names: shm_open's rules
    ("shared name of 1 MB", errno.ENAMETOOLONG, lambda t, m: t.mmap(PS, shared="x" * 10**6)),
    ("shared name of 256 bytes in 128 characters", errno.ENAMETOOLONG,
     lambda t, m: t.mmap(PS, shared="\u00e9" * 128)),
    ("shared name with a NUL", errno.EINVAL, lambda t, m: t.mmap(PS, shared="a\0b")),
    ("shared name ..", errno.EINVAL, lambda t, m: t.mmap(PS, shared="..")),
    ("shared name bytes", errno.EINVAL, lambda t, m: t.mmap(PS, shared=b"name")),
    ("shared name a lone surrogate", errno.EINVAL, lambda t, m: t.mmap(PS, shared="\ud800")),
    ("shm_unlink name of 1 MB", errno.ENAMETOOLONG, lambda t, m: t.shm_unlink("x" * 10**6)),
    ("shm_unlink name with a slash", errno.EINVAL, lambda t, m: t.shm_unlink("a/b")),
    ("shm_unlink name not a str", errno.EINVAL, lambda t, m: t.shm_unlink(5)),
    ("file not a path", errno.EINVAL, lambda t, m: t.mmap(PS, file=5)),
    ("file path with a NUL", errno.EINVAL, lambda t, m: t.mmap(PS, file="/tmp/a\0b")),
    ("file name over NAME_MAX", errno.ENAMETOOLONG,
     lambda t, m: t.mmap(PS, file="/tmp/" + "x" * 256)),
    ("file path over PATH_MAX", errno.ENAMETOOLONG,
     lambda t, m: t.mmap(PS, file="/tmp/" + "a/" * 2100 + "f")),
    ("file under a regular file", errno.ENOTDIR,
     lambda t, m: t.mmap(PS, file=__file__ + "/x")),
]


@pytest.mark.parametrize(("err", "call"), [c[1:] for c in VALUE_ERRORS],
                         ids=[c[0] for c in VALUE_ERRORS])
def test_values_the_kernel_types_cannot_hold_fail_and_change_nothing(scene, err, call):
    unchanged(scene, err, call)


def test_mmap_of_a_length_beyond_64_bits_is_enomem(task):
    expect_errno(errno.ENOMEM, task.mmap, 2**70)
    assert task.numa_maps() == ""


def test_munmap_of_a_length_beyond_64_bits_is_einval(scene):
    unchanged(scene, errno.EINVAL, lambda t, m: t.munmap(m.addr, 2**64))


def test_move_pages_of_an_address_beyond_64_bits_is_efault(scene):
    unchanged(scene, errno.EFAULT, lambda t, m: t.move_pages([m.addr, 2**64]))


def test_move_pages_rejects_a_float_address_and_moves_nothing(scene):
    t, m = scene.task, scene.m
    expect_errno(errno.EFAULT, t.move_pages, [m.addr + 0.5], [1])
    assert t.move_pages([m.addr]) == [0]


def test_shared_name_longer_than_name_max_is_enametoolong(task):
    expect_errno(errno.ENAMETOOLONG, task.mmap, PS, shared="x" * 10**6)
    expect_errno(errno.ENAMETOOLONG, task.mmap, PS, shared="x" * 256)
    m = task.mmap(PS, shared="x" * 255)  # NAME_MAX itself is fine
    task.write(m.addr, b"ok")
    task.munmap(m.addr, m.length)
    task.shm_unlink("x" * 255)
    expect_errno(errno.ENAMETOOLONG, task.shm_unlink, "x" * 256)


def test_mapping_a_fifo_is_enodev_and_does_not_block(task, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    expect_errno(errno.ENODEV, task.mmap, PS, file=fifo)
    assert time.monotonic() - start < 5.0
    assert task.numa_maps() == ""


def test_numpy_integers_are_integers(scene):
    t, m = scene.task, scene.m
    addr = np.uint64(m.addr)
    assert t.read(addr, np.int64(4)) == b"data"
    t.write(np.int64(m.page(3)), b"np")
    assert t.read(m.page(3), 2) == b"np"
    assert t.move_pages(np.array(m.pages[:1], dtype=np.int64)) == [0]
    assert t.get_mempolicy(np.int32(m.addr) if m.addr < 2**31 else np.int64(m.addr),
                           MPOL_F_ADDR) == (MPOL_DEFAULT, set())


# -- malformed wire messages -------------------------------------------------------------------


def exchange(sock, payloads: list[bytes], timeout: float = 5.0) -> list[dict]:
    """Send each payload on ``sock`` and collect one reply per payload."""
    replies = []
    for raw in payloads:
        sock.send(raw)
        assert sock.poll(timeout * 1000), f"no reply to {raw[:40]!r}"
        replies.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
    return replies


def raw_exchange(address: str, payloads: list[bytes], timeout: float = 5.0) -> list[dict]:
    """``exchange`` from a bare DEALER."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        return exchange(sock, payloads, timeout)
    finally:
        sock.close(0)


def own_exchange(task, payloads: list[bytes], timeout: float = 5.0) -> list[dict]:
    """``exchange`` on ``task``'s own connection (the only one its pid is served on:
    coordinator/creds.py)."""
    with task._req_lock:
        return exchange(task._conn.sock, payloads, timeout)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_malformed_messages_get_einval_and_the_cluster_keeps_working(cluster, scene):
    pid = scene.task.pid
    before = scene.snapshot()
    payloads = {
        "invalid msgpack byte": b"\xc1",
        "truncated msgpack": pack({"op": "ping", "seq": 1})[:-2],
        "empty frame": b"",
        "a list": pack(["op", "ping"]),
        "an int": pack(42),
        "unknown op": pack({"op": "reboot", "seq": 3}),
        "op not a string": pack({"op": 7, "seq": 4}),
        "no op": pack({"seq": 5}),
        "node op on the syscall socket": pack({"op": "alloc", "seq": 6, "count": 1}),
        "missing field": pack({"op": "mbind", "seq": 7, "pid": pid, "addr": scene.m.addr}),
        "pid a string": pack({"op": "get_mempolicy", "seq": 8, "pid": "me"}),
        "addr a string": pack({"op": "munmap", "seq": 9, "pid": pid, "addr": "0", "length": PS}),
        "bool for int": pack({"op": "set_mempolicy", "seq": 10, "pid": pid, "mode": True}),
        "list for bool": pack({"op": "fault", "seq": 11, "pid": pid,
                               "vpns": b"\0" * 8, "write": [1]}),
        "partial array item": pack({"op": "fault", "seq": 12, "pid": pid,
                                    "vpns": b"\0" * 5, "write": True}),
        "array as a list": pack({"op": "move_pages", "seq": 13, "pid": pid, "target": None,
                                 "pages": [scene.m.addr]}),
        "cpus not a list": pack({"op": "sched_setaffinity", "seq": 14, "pid": pid, "cpus": 2}),
    }
    replies = raw_exchange(cluster.address, list(payloads.values()))
    for name, reply in zip(payloads, replies):
        assert reply.get("ok") is False, name
        assert reply.get("errno") == errno.EINVAL, (name, reply)
        assert reply.get("error"), name
    # Replies carry the request's seq when there was one to read.
    assert replies[5]["re"] == 3
    # A well-formed raw request still works, and so does everything else.
    (pong,) = raw_exchange(cluster.address, [pack({"op": "ping", "seq": 99})])
    assert pong == {"re": 99, "ok": True}
    assert scene.snapshot() == before
    with cluster.attach(cpu=2) as t:
        m = t.mmap(PS)
        t.write(m.addr, b"ok")
        assert t.read(m.addr, 2) == b"ok"
        assert t.move_pages([m.addr]) == [1]


def test_values_beyond_the_kernel_types_on_the_wire_get_errno_replies(cluster, scene):
    """A raw client's values reach no handler unchecked: each gets its errno, none the
    generic "coordinator error", and nothing changes."""
    pid, m = scene.task.pid, scene.m
    top = 2**64 - 1  # the largest integer msgpack carries
    cases = {
        "addr negative": (errno.EINVAL, {"op": "munmap", "addr": -PS, "length": PS}),
        "pid beyond int64": (errno.EINVAL, {"op": "numa_maps", "pid": top}),
        "mode beyond int64": (errno.EINVAL, {"op": "set_mempolicy", "mode": top}),
        "mmap length 2**64-1": (errno.ENOMEM, {"op": "mmap", "length": top}),
        "mmap shared name of 300 bytes": (errno.ENAMETOOLONG,
                                          {"op": "mmap", "length": PS, "shared": "x" * 300}),
        "mmap shared name with a NUL": (errno.EINVAL,
                                        {"op": "mmap", "length": PS, "shared": "a\0"}),
        "mmap relative file": (errno.EINVAL, {"op": "mmap", "length": PS, "file": "f"}),
        "munmap length 2**64-1": (errno.EINVAL, {"op": "munmap", "addr": m.addr, "length": top}),
        "mbind node 2**64-1": (errno.EINVAL, {"op": "mbind", "addr": m.addr, "length": PS,
                                              "mode": MPOL_BIND, "nodes": [top]}),
        "mbind 1025 nodes": (errno.EINVAL, {"op": "mbind", "addr": m.addr, "length": PS,
                                            "mode": MPOL_BIND, "nodes": [0] * 1025}),
        "set_mempolicy nodes a map": (errno.EFAULT, {"op": "set_mempolicy", "mode": MPOL_BIND,
                                                     "nodes": {"0": 1}}),
        "move_pages node 2**64-1": (errno.ENODEV, {
            "op": "move_pages", "target": None, "pages": np.array(m.pages, "<u8").tobytes(),
            "nodes": [top] * 4, "flags": MPOL_MF_MOVE}),
        "move_pages nodes too few": (errno.EINVAL, {
            "op": "move_pages", "target": None, "pages": np.array(m.pages, "<u8").tobytes(),
            "nodes": [1], "flags": MPOL_MF_MOVE}),
        "migrate_pages 1025 nodes": (errno.EINVAL, {"op": "migrate_pages", "target": None,
                                                    "old_nodes": [0] * 1025, "new_nodes": [1]}),
        "pin far past the mapping": (errno.EFAULT, {"op": "pin", "addr": m.addr,
                                                    "length": 1 << 46}),
        "cpus 1025 entries": (errno.EINVAL, {"op": "sched_setaffinity", "cpus": [0] * 1025}),
        "shm_unlink name of 300 bytes": (errno.ENAMETOOLONG,
                                         {"op": "shm_unlink", "name": "x" * 300}),
        "inject_fault delay nan": (errno.EINVAL, {"op": "inject_fault", "node": 0,
                                                  "request": "alloc", "delay": float("nan")}),
        "command of 1 MB": (errno.EINVAL, {"op": "attach", "os_pid": 1, "host": "h", "uid": 0,
                                           "command": "x" * 10**6}),
    }
    before = scene.snapshot()
    payloads = [pack({"seq": i, "pid": pid, **body})
                for i, (_, body) in enumerate(cases.values())]
    for (name, (err, _)), reply in zip(cases.items(), own_exchange(scene.task, payloads)):
        assert (reply["ok"], reply.get("errno")) == (False, err), (name, reply)
        assert "coordinator error" not in reply["error"], (name, reply)
    assert scene.snapshot() == before


def test_syscall_for_an_unknown_pid_on_the_wire_is_esrch(cluster):
    (reply,) = raw_exchange(cluster.address, [pack({"op": "get_mempolicy", "seq": 1,
                                                    "pid": 1 << 40})])
    assert (reply["ok"], reply["errno"]) == (False, errno.ESRCH)


# -- a stopped cluster -------------------------------------------------------------------------


def test_requests_to_a_stopped_cluster_raise_cluster_error_quickly():
    topo = numaemu.Topology.symmetric(nodes=1, frames_per_node=64, cpus_per_node=1)
    cluster = numaemu.Cluster(topo)
    loose = None
    try:
        owned = cluster.attach(cpu=0)
        loose = numaemu.Task(cluster.address, cpu=0)  # not closed by the cluster's stop
        m = loose.mmap(PS)
        loose.write(m.addr, b"x")
        address = cluster.address
    finally:
        cluster.stop()
    calls = [
        lambda: owned.get_mempolicy(),
        lambda: loose.get_mempolicy(),
        lambda: loose.read(m.addr + PS - 1, 2),  # not in the TLB: needs the coordinator
        lambda: loose.mmap(PS),
        lambda: loose.numa_maps(),
    ]
    try:
        for call in calls:
            start = time.monotonic()
            with pytest.raises(ClusterError):
                call()
            assert time.monotonic() - start < 5.0
        start = time.monotonic()
        with pytest.raises(ClusterError):
            numaemu.attach(address, cpu=0)
        assert time.monotonic() - start < 8.0  # the connect timeout is 5 s
        with pytest.raises(ClusterError):
            cluster.numastat()
    finally:
        start = time.monotonic()
        loose.close()
        assert time.monotonic() - start < 5.0
