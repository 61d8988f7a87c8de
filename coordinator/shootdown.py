"""TLB shootdown: the emulated flush IPI.

Clients copy straight from frames using translations they cache, so before the
coordinator changes a translation that a client may hold (write-protect for
writeback now; migration entries in seed step 5 next) it sends that client's
shootdown thread an ``invalidate`` and waits for the ack.  The client acks only
after taking its access lock, i.e. when no access to those frames is in flight.

Invalidations are batched: one message per client per flush, with all its pages.
A slow ack is not a dead client (a GIL-holding C call can delay it by 100s of
ms): we wait in ``ACK_SLICE`` steps and give up when the client's process is
gone or its task exited, then reap it like an exited task.  A local client that
is alive but has not acked within ``LEASE`` is fenced (killed) first: it still
maps the frames, so nothing it maps may be reused while it could wake up.  A
task that exits fails the shootdowns waiting for it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P

from . import procwatch
from .links import PeerGone

log = logging.getLogger("numaemu.coordinator")

ACK_SLICE = 0.25
#: A client that misses heartbeats for this long is considered dead.
LEASE = 10.0
#: How long a fenced (SIGKILLed) client may take to be gone.
FENCE_WAIT = 5.0


async def flush_tlb(kernel, targets: dict, *, write_only: bool = False) -> None:
    """Invalidate ``targets`` ({task: [vpn arrays]}) in every client, in parallel."""
    waits = []
    for task, chunks in targets.items():
        if task.tlb is None or task.exiting:
            continue  # it never registered a TLB, so it caches nothing
        vpns = arrayops.unique(np.concatenate(chunks)).astype(P.VPN)
        # The caller of the running syscall flushed its own TLB before asking (the kernel's
        # local flush): no IPI to it for those pages.
        flushed = task.self_flushed
        if flushed is True:
            continue
        if isinstance(flushed, tuple):
            vpns = vpns[(vpns < flushed[0]) | (vpns >= flushed[1])]
        elif flushed is not None:
            vpns = vpns[~arrayops.isin(vpns, flushed)]
        if len(vpns) == 0:
            continue
        waits.append(_invalidate(kernel, task, task.tlb, vpns, write_only))
    if waits:
        await asyncio.gather(*waits)


async def _invalidate(kernel, task, peer, vpns: np.ndarray, write_only: bool) -> None:
    # ``peer`` was taken when the flush started: the task may exit (task.tlb = None) before
    # this coroutine runs, and then its failed peer ends the wait below.
    req = P.Invalidate(vpns=vpns, write_only=write_only)
    try:
        if peer.gone:
            raise PeerGone(f"task {task.pid} exited during a TLB shootdown")
        seq = peer.next_seq()
        fut = asyncio.get_running_loop().create_future()
        peer.pending[seq] = fut
        try:
            await peer.send(req, seq)
            sent = time.monotonic()
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), ACK_SLICE)
                    return
                except asyncio.TimeoutError:
                    if not client_alive(kernel, task):
                        raise PeerGone(f"task {task.pid} died during a TLB shootdown") from None
                    if time.monotonic() - sent > LEASE:
                        await fence(kernel, task)
                        raise PeerGone(f"task {task.pid} did not ack a shootdown in {LEASE} s "
                                       "and was fenced") from None
                    log.debug("task %d slow to ack a shootdown of %d pages", task.pid, len(vpns))
        finally:
            peer.pending.pop(seq, None)
    except PeerGone as exc:
        log.warning("%s; reaping it", exc)
        task.tlb = None  # a dead client caches nothing any more
        kernel.schedule_reap(task)


def client_alive(kernel, task) -> bool:
    """Whether a client may still touch memory through its translations.

    A local client is alive while its process exists (its pidfd says so, zombies count as
    dead), whatever its heartbeats say: a stopped process (Ctrl-Z, a debugger) or one stuck
    in a long C call still holds its translations, and reaping it would hand its frames to
    others under its feet.  A client on another host cannot map frames at all, so its lease
    decides.
    """
    if task.exiting:
        return False
    if task.pidfd is not None:
        return not procwatch.exited(task.pidfd)
    if task.host == kernel.host:
        return False  # local, but its process could not be watched: it was gone at attach
    return time.monotonic() - task.last_seen < LEASE


async def fence(kernel, task) -> None:
    """Make sure a client that will not ack can never touch memory again: kill it (STONITH).

    Only a shootdown that must go on needs this; the process keeps its frames mapped until
    it is gone, so it is killed (through its pidfd: never an unrelated process that reused
    the pid) and awaited, without blocking the loop, before anything it maps is reused.
    A client on another host cannot map frames, so its lease alone fences it."""
    log.error("task %d (os pid %d) has not acknowledged a TLB shootdown for %.0f s; killing "
              "it so that migration can go on safely", task.pid, task.os_pid, LEASE)
    if task.pidfd is None:
        return
    if not await procwatch.kill_and_wait(task.pidfd, FENCE_WAIT):
        log.error("task %d (os pid %d) is still there %.0f s after SIGKILL", task.pid,
                  task.os_pid, FENCE_WAIT)
