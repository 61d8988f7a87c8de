"""Watching and fencing local processes through pidfds (``os.pidfd_open``, Linux 5.3+).

A pidfd names one process, not a number: it cannot be fooled by pid reuse (a
bare ``kill(pid)`` after the client died can hit an unrelated process that got
the same pid), it becomes readable as soon as the process exits, zombie or
not (``kill(pid, 0)`` calls a zombie alive), and the event loop can wait on it
like on a socket.  The coordinator opens one for every local client at attach
and every local node at registration:

* ``exited(fd)``: has the process ended (a poll with no wait);
* ``watch(fd, callback)``: call back from the event loop when it ends (the
  process sentinel that notices a dead node within milliseconds);
* ``kill_and_wait(fd, timeout)``: SIGKILL it and await its end without
  blocking the loop (fencing a client that stopped acking shootdowns).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
from collections.abc import Callable

log = logging.getLogger("numaemu.coordinator")


def pidfd_open(pid: int) -> int | None:
    """A pidfd for local process ``pid``; None if it does not exist (or pidfds are missing)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def exited(fd: int | None) -> bool:
    """Whether the process behind ``fd`` has ended (None: unknown, treated as alive)."""
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def watch(fd: int, callback: Callable[[], None]) -> None:
    """Run ``callback`` once, from the event loop, when the process behind ``fd`` ends."""
    loop = asyncio.get_running_loop()

    def fire() -> None:
        loop.remove_reader(fd)
        callback()

    loop.add_reader(fd, fire)


def unwatch(fd: int | None) -> None:
    if fd is None:
        return
    try:
        asyncio.get_running_loop().remove_reader(fd)
    except (RuntimeError, ValueError, OSError):
        pass


async def kill_and_wait(fd: int, timeout: float) -> bool:
    """SIGKILL the process behind ``fd``; await its end (at most ``timeout`` s), never
    blocking the loop.  Returns whether it is gone."""
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except OSError as exc:
        log.error("cannot kill the process behind pidfd %d: %s", fd, exc)
        return exited(fd)
    if exited(fd):
        return True
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except asyncio.TimeoutError:
        return exited(fd)
    finally:
        loop.remove_reader(fd)


def close(fd: int | None) -> None:
    if fd is not None:
        unwatch(fd)
        try:
            os.close(fd)
        except OSError:
            pass
