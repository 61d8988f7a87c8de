"""Regressions from a concurrency review: each test reproduced a real bug, now fixed.

(a pin that finishes while its task is reaped; a file mapped again while its last
mapping's writeback runs; mbind MOVE over a huge range; a retried fault mapping a page
twice.)  Each test runs on a cluster of its own: such bugs leave the coordinator's state
wrong (leaked frames, an orphaned page cache, a half-applied mbind), which must not leak
into the session-wide ``cluster`` the rest of the suite shares.
"""

from __future__ import annotations

import _thread
import errno
import os
import signal
import subprocess
import threading
import time

import pytest

import numaemu
from nodes.segment import cluster_segments
from numaemu import MPOL_DEFAULT, MPOL_MF_MOVE, NumaError

PS = 4096


def _gone(cluster_id: str) -> bool:
    if cluster_segments(cluster_id):
        return False
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return cluster_id not in out


@pytest.fixture
def own_cluster():
    """A 2-node cluster like ``cluster`` (CPUs 0-1 on node 0, 2-3 on node 1), for one test."""
    c = numaemu.Cluster(numaemu.Topology.symmetric(nodes=2, frames_per_node=4096,
                                                   cpus_per_node=2))
    try:
        yield c
    finally:
        c.stop()
    assert _gone(c.cluster_id)


def _wait_file(path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# -- a pin that completes while its task is being reaped is never dropped --------------------


def _pin_and_hold(task, ready: str, pages: int):
    m = task.mmap(pages * PS)
    open(ready, "w").close()
    with task.pin(m.addr, m.length):  # its fault waits for node 0's (late) frames
        time.sleep(60)


def test_a_client_killed_during_pin_leaves_no_frame_behind(own_cluster, tmp_path):
    cluster = own_cluster
    # Privileged: fault injection needs it.  It allocates nothing: the victim's request is
    # node 0's first.
    root = cluster.attach(cpu=1, privileged=True)
    before = cluster.free_frames()
    root._sync_call("inject_fault", node=0, request="alloc", count=1, delay=3.0)
    ready = str(tmp_path / "ready")
    victim = cluster.spawn(_pin_and_hold, ready, 100, cpu=0)
    _wait_file(ready, 10)
    time.sleep(0.5)  # the pin's fault waits for its frames
    victim.kill()  # reaped within ~1 s, while the pin's fault still waits
    deadline = time.monotonic() + 15
    while victim.pid in [t["pid"] for t in cluster._call("tasks")["tasks"]]:
        assert time.monotonic() < deadline, "the dead client was never reaped"
        time.sleep(0.1)
    # exit_task goes on once the pin's fault (3 s) is over: give it time, then compare.
    deadline = time.monotonic() + 8
    while cluster.free_frames() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.free_frames() == before
    assert cluster.check() == []


# -- the last munmap of a file tears down a page cache that a new mmap just picked up ---------


def test_a_file_mapped_while_its_last_mapping_goes_away_stays_coherent(own_cluster, tmp_path):
    cluster = own_cluster
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(PS))
    a = cluster.attach(cpu=0, privileged=True)  # privileged: it injects a fault
    b, c = (cluster.attach(cpu=cpu) for cpu in (1, 2))
    ma = a.mmap(PS, file=path)
    a.write(ma.addr, b"AAAA")  # dirty: the last munmap writes it back (and awaits the node)
    a._sync_call("inject_fault", node=0, request="read_frames", count=1, delay=2.0)
    t = threading.Thread(target=a.munmap, args=(ma.addr, PS))
    t.start()
    time.sleep(0.5)
    mb = b.mmap(PS, file=path)  # while the release of the page cache waits for its writeback
    t.join(10)
    b.write(mb.addr, b"BBBB")
    mc = c.mmap(PS, file=path)
    assert c.read(mc.addr, 4) == b"BBBB"


# -- mbind(MPOL_MF_MOVE)'s "flushed" range is materialised as an array -----------------------


def test_mbind_move_of_a_long_default_range_is_not_an_internal_error(own_cluster):
    t = own_cluster.attach(cpu=0)
    m = t.mmap(PS)
    t.write(m.addr, b"x")
    try:
        t.mbind(m.addr, 1 << 56, MPOL_DEFAULT, flags=MPOL_MF_MOVE)
    except NumaError as exc:
        assert exc.errno != errno.EIO, exc
    assert t.read(m.addr, 1) == b"x"


# -- a fault abandoned by its client (Ctrl-C) runs on next to the client's retry -------------


def test_a_fault_retried_after_ctrl_c_maps_the_page_once(own_cluster):
    cluster = own_cluster
    c = cluster.attach(cpu=0, privileged=True)  # privileged: it injects a fault
    m = c.mmap(PS, shared="retried")
    # Node 0's first allocation (this fault's) is 2 s late.
    c._sync_call("inject_fault", node=0, request="alloc", count=1, delay=2.0)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    interrupted = False
    try:
        timer.start()
        try:
            c.read(m.addr, 4)
        except KeyboardInterrupt:
            interrupted = True
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert interrupted
    assert c.read(m.addr, 4) == bytes(4)  # the retry, while the first fault still runs
    time.sleep(0.5)
    assert cluster.check() == []
