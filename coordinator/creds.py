"""Who is at the other end of a coordinator connection, and what it may do.

The coordinator never takes a peer's word for who it is (ARCHITECTURE.md,
failure model: "peer claims another identity").  Three things are bound:

    connection  a DEALER connected to one of the coordinator's ROUTER sockets.  The
                ROUTER names it by a routing id it generates per connection.
    peer        the process behind a connection.  Over ``ipc://`` the kernel says who
                it is: libzmq reads SO_PEERCRED at connect time and attaches it to
                every message as the "Peer-Address" property, ``host:uid:gid:pid``.
                Over ``tcp://`` only the peer's address is known, but every tcp peer
                has proven in the CURVE handshake that it holds the cluster's client
                credential (numaemu/keys.py; the ZAP handler refuses anyone else), so
                it speaks for the cluster's owner: its claims are believed.
    task        bound at ``attach`` to the connection that attached it: its routing id
                and its peer credentials (``Task.conn_id``, ``Task.cred``).  Over ipc
                the attach itself is checked against the credentials: ``os_pid`` must
                be the peer's pid, ``uid`` the peer's uid (root may emulate any owner),
                and ``privileged=True`` needs a privileged owner (root or the user who
                runs the cluster).

Every request that names its caller by ``pid`` must come from the connection that
pid is bound to (EPERM otherwise; a pid that names no task is ESRCH as before).
Requests without a caller pid (``numa_maps``' pid is its *target*, ``shutdown``
has none) act as the task bound to the connection, or on a bare connection (the
CLI) as the peer: its uid, privileged when it is root or the cluster's owner.

``CredRouter`` records each message's peer credentials by routing id as it
receives them, so the receive loops need not know about any of this; a routing
id that shows up again from another peer (a client may choose its own routing
id once the original connection is gone) is dropped.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import zmq

from numaemu.errors import NumaError

from .zloop import LoopSocket

log = logging.getLogger("numaemu.coordinator")

#: Requests whose ``pid`` names a target, not the caller.
TARGET_PID_OPS = frozenset({"numa_maps", "access_profile"})
#: Requests without a caller pid whose caller is the task bound to the connection.
CONNECTION_TASK_OPS = frozenset({"numa_maps", "shutdown", "cpuset_create", "cpuset_update",
                                 "cpuset_attach", "cpuset_remove", "sysctl",
                                 "access_profile"})
#: Peer records not refreshed for this long may be forgotten (a bound task's record is
#: kept on the task; a live shootdown thread or node refreshes its own every second).
PEER_IDLE = 600.0
PEERS_PRUNE_MIN = 1024


@dataclass(frozen=True)
class PeerCred:
    """What the kernel (not the peer) says about the process behind a connection."""

    transport: str  # "ipc", "tcp", or "" (unknown)
    address: str  # libzmq's Peer-Address, verbatim
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None

    @property
    def verified(self) -> bool:
        """The kernel vouches for uid and pid (ipc with SO_PEERCRED)."""
        return self.transport == "ipc" and self.uid is not None and self.pid is not None

    @property
    def trusted(self) -> bool:
        """Holds the cluster's client credential (tcp: CURVE-authenticated, numaemu/keys.py)."""
        return self.transport == "tcp"

    def __str__(self) -> str:
        if self.verified:
            return f"pid {self.pid} uid {self.uid}"
        return f"{self.transport or 'unknown'} peer {self.address or '?'}"


UNKNOWN = PeerCred("", "")


def parse_peer_address(transport: str, address: str | None) -> PeerCred:
    """Credentials from a "Peer-Address" property: ``host:uid:gid:pid`` for ipc (host may
    itself hold colons), the peer's IP for tcp.  Anything unreadable is unknown."""
    if not address:
        return PeerCred(transport, "") if transport == "tcp" else UNKNOWN
    if transport != "ipc":
        return PeerCred(transport, address)
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return PeerCred("ipc", address)  # no SO_PEERCRED: not verified, refused where it counts
    try:
        uid, gid, pid = (int(p) for p in parts[1:])
    except ValueError:
        return PeerCred("ipc", address)
    return PeerCred("ipc", address, uid, gid, pid)


def owner_uid() -> int:
    """The uid the cluster runs as (the coordinator's): its owner."""
    return os.getuid()


def privileged_peer(cred: PeerCred) -> bool:
    """Root or the cluster's owner (over ipc), or a tcp peer (it holds the owner's keys)."""
    if cred.trusted:
        return True
    return cred.verified and cred.uid in (0, owner_uid())


class CredRouter(LoopSocket):
    """A ROUTER socket that remembers each routing id's peer credentials.

    ``recv_multipart`` behaves as usual (bytes frames) but receives without copying
    first, to read the "Peer-Address" property of the message; ``peer(ident)`` then
    tells who sent it.  Messages from a routing id that an earlier, different peer used
    are dropped (logged): a routing id is never served to two peers.
    """

    transport: str = ""
    peers: dict[bytes, PeerCred]
    _seen: dict[bytes, float]
    _prune_at: int = PEERS_PRUNE_MIN

    def bind(self, addr: str) -> Any:
        result = super().bind(addr)
        self.transport = addr.split("://", 1)[0]
        self.peers = {}
        self._seen = {}
        return result

    async def recv_multipart(self, flags: int = 0, copy: bool = True,
                             track: bool = False) -> list:
        while True:
            frames = await super().recv_multipart(flags, copy=False, track=track)
            ident = frames[0].bytes
            try:
                address = frames[-1].get("Peer-Address")
            except zmq.ZMQError:
                address = None
            known = self.peers.get(ident)
            if known is None:
                self.peers[ident] = parse_peer_address(self.transport, address)
                if len(self.peers) > self._prune_at:
                    self._prune()
            elif known.address != (address or ""):
                log.warning("routing id %s of %s reused by %s: message dropped", ident.hex(),
                            known, parse_peer_address(self.transport, address))
                continue
            self._seen[ident] = time.monotonic()
            return [f.bytes for f in frames] if copy else frames

    def peer(self, ident: bytes) -> PeerCred:
        """The credentials of the peer that sent the last message with routing id ``ident``."""
        return self.peers.get(ident, UNKNOWN)

    def _prune(self) -> None:
        cutoff = time.monotonic() - PEER_IDLE
        for ident in [i for i, seen in self._seen.items() if seen < cutoff]:
            self.peers.pop(ident, None)
            self._seen.pop(ident, None)
        self._prune_at = max(PEERS_PRUNE_MIN, 2 * len(self.peers))


def peer_of(sock: Any, ident: bytes) -> PeerCred:
    """Who sent the message with routing id ``ident`` on ``sock`` (unknown on a plain socket)."""
    peer = getattr(sock, "peer", None)
    return peer(ident) if peer is not None else UNKNOWN


# -- the caller of a syscall ------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """The connection a request came on, and the task making it (if any).

    ``task`` is the task named by the request's caller pid (checked to be bound to this
    connection), or for requests without one the task bound to the connection; ``None``
    on a bare connection (the CLI, ``Cluster`` queries) or for a pid that names no task.
    """

    conn_id: bytes
    cred: PeerCred
    task: Any = None

    @property
    def privileged(self) -> bool:
        """CAP_SYS_ADMIN-like: a privileged task, or on a bare connection a privileged peer."""
        if self.task is not None:
            return bool(self.task.privileged)
        return privileged_peer(self.cred)

    def may_read(self, target) -> bool:
        """ptrace-read access to ``target`` (/proc/<pid>/numa_maps): same owner or privilege."""
        if self.task is not None:
            return self.task is target or self.task.uid == target.uid or self.task.privileged
        if self.cred.verified and self.cred.uid == target.uid:
            return True
        return privileged_peer(self.cred)


#: The caller of the request being handled, set by the server for each request.
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def bound(task, conn_id: bytes, cred: PeerCred) -> bool:
    """Whether ``task`` was attached on this connection, by this peer."""
    return task.conn_id == conn_id and task.cred == cred


def identify(kernel, conn_id: bytes, cred: PeerCred, req: Any) -> Caller:
    """Who makes ``req``: EPERM if it names as its caller a task bound to another connection.

    Runs before the handler with no await in between, so the pid cannot change hands
    between this check and the handler's lookup."""
    pid = getattr(req, "pid", None)
    if req.op not in TARGET_PID_OPS and isinstance(pid, int):
        task = kernel.tasks.get(pid)
        if task is not None and not bound(task, conn_id, cred):
            raise NumaError(errno.EPERM, f"{req.op}: pid {pid} is not the task of this "
                                         "connection")
        return Caller(conn_id, cred, task)
    if req.op in CONNECTION_TASK_OPS:
        return Caller(conn_id, cred, connection_task(kernel, conn_id, cred))
    return Caller(conn_id, cred)


def connection_task(kernel, conn_id: bytes, cred: PeerCred):
    """The (first) live task attached on this connection, or None for a bare connection."""
    for task in kernel.tasks.values():
        if not task.exiting and bound(task, conn_id, cred):
            return task
    return None


def check_attach(req: Any, caller: Caller | None, host: str) -> None:
    """An attach over ipc must describe its own process: EPERM for another pid, another
    owner (unless the peer is root), or privilege the owner does not have."""
    if caller is None:
        raise NumaError(errno.EPERM, "attach without a connection")
    cred = caller.cred
    if cred.trusted:
        return  # tcp: authenticated by CURVE as the owner's; its claims are believed
    if not cred.verified:
        raise NumaError(errno.EPERM, f"attach: cannot tell who the peer is ({cred.address!r})")
    if req.os_pid != cred.pid:
        raise NumaError(errno.EPERM, f"attach: os_pid {req.os_pid} is not the caller's "
                                     f"pid {cred.pid}")
    if req.host != host:
        raise NumaError(errno.EPERM, f"attach: an ipc peer runs on {host}, not {req.host}")
    if req.uid != cred.uid and cred.uid != 0:
        raise NumaError(errno.EPERM, f"attach: uid {req.uid} is not the caller's uid "
                                     f"{cred.uid} (only root may emulate other owners)")
    if req.privileged and not privileged_peer(cred):
        raise NumaError(errno.EPERM, f"attach: uid {cred.uid} may not attach privileged "
                                     f"tasks (root or the cluster owner {owner_uid()} may)")


def check_tlb_peer(task, cred: PeerCred) -> str | None:
    """Why this peer may not speak for ``task``'s shootdown thread (None: it may).

    Over ipc it must be the task's own process; over tcp (CURVE-authenticated) it is
    believed."""
    if task.cred is not None and task.cred.trusted and cred.trusted:
        return None
    if cred.verified and cred.pid == task.os_pid:
        return None
    return f"{cred} is not the process of task {task.pid} (os pid {task.os_pid})"


def check_register(req: Any, cred: PeerCred) -> str | None:
    """Why this peer may not register as a node (None: it may): over ipc only a process of
    the cluster's owner (or root) registering its own pid."""
    if cred.trusted:
        return None
    if not cred.verified:
        return f"cannot tell who the peer is ({cred.address!r})"
    if cred.pid != req.os_pid:
        return f"os_pid {req.os_pid} is not the registering process (pid {cred.pid})"
    if cred.uid not in (0, owner_uid()):
        return f"uid {cred.uid} does not own this cluster (uid {owner_uid()})"
    return None
