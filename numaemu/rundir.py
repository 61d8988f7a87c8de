"""Per-cluster run directories, endpoints, and the sweep of crashed clusters' leftovers.

Each cluster gets ``<base>/<cluster id>/`` (mode 0700) holding its ``ipc://``
sockets and ``cluster.json`` (supervisor, coordinator and node pids, address).
``base`` is ``$NUMAEMU_RUN_DIR`` or ``/tmp/numaemu-<uid>``.  Node segments are
``/dev/shm/numaemu-<cluster id>-node<N>``, so everything a cluster leaves
behind can be found by its id.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from dataclasses import dataclass

from nodes.segment import cluster_segments

log = logging.getLogger("numaemu.supervisor")

STATE_FILE = "cluster.json"


def base_dir() -> str:
    base = os.environ.get("NUMAEMU_RUN_DIR") or f"/tmp/numaemu-{os.getuid()}"
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.chmod(base, 0o700)
    return base


def logs_dir() -> str:
    path = os.path.join(base_dir(), "logs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def free_port_block(host: str = "127.0.0.1", n: int = 4) -> int:
    """A base port with ``n`` consecutive ports free on ``host`` (a tcp cluster binds its
    rpc, tlb, nodes and log endpoints on consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no block of {n} free ports on {host}")


def new_cluster_id() -> str:
    return secrets.token_hex(4)


@dataclass(frozen=True)
class RunDir:
    """Where one cluster keeps its sockets and state."""

    cluster_id: str
    path: str
    listen: str | None = None  # "tcp://HOST:PORT" base, or None for ipc

    @classmethod
    def create(cls, listen: str | None = None) -> RunDir:
        cid = new_cluster_id()
        path = os.path.join(base_dir(), cid)
        os.mkdir(path, 0o700)
        return cls(cid, path, listen)

    def endpoints(self) -> dict[str, str]:
        """Bind addresses of the cluster's sockets: rpc, tlb, nodes, log."""
        names = ("rpc", "tlb", "nodes", "log")
        if self.listen:
            host, port = self.listen.removeprefix("tcp://").rsplit(":", 1)
            return {name: f"tcp://{host}:{int(port) + i}" for i, name in enumerate(names)}
        return {name: f"ipc://{self.path}/{name}.sock" for name in names}

    def node_data_endpoint(self, node: int) -> str:
        """Where node ``node`` serves frame reads/writes (tcp: any free port)."""
        if self.listen:
            host = self.listen.removeprefix("tcp://").rsplit(":", 1)[0]
            return f"tcp://{host}:*"
        return f"ipc://{self.path}/node{node}-data.sock"

    @property
    def keys_dir(self) -> str:
        """Where a tcp cluster keeps its CURVE keys (numaemu/keys.py)."""
        return os.path.join(self.path, "keys")

    @property
    def log_path(self) -> str:
        return os.path.join(logs_dir(), f"{self.cluster_id}.log")

    def write_state(self, **state) -> None:
        tmp = os.path.join(self.path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"cluster_id": self.cluster_id, **state}, f)
        os.replace(tmp, os.path.join(self.path, STATE_FILE))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_state(path: str) -> dict | None:
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def live_clusters() -> list[dict]:
    """State of every cluster of this user whose supervisor is running."""
    found = []
    base = base_dir()
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        state = read_state(path)
        if state and pid_alive(state.get("supervisor_pid", 0)):
            found.append(state)
    return found


def sweep_leftovers() -> list[str]:
    """Remove what crashed clusters left: processes, segments, run directories."""
    removed = []
    base = base_dir()
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name == "logs" or not os.path.isdir(path):
            continue
        state = read_state(path)
        if state is None:
            # Being created right now, or a crash before the state was written.
            if time.time() - os.stat(path).st_mtime < 60:
                continue
        elif pid_alive(state.get("supervisor_pid", 0)):
            continue
        state = state or {}
        pids, starts = state.get("pids", []), state.get("starts", [])
        for pid, start in zip(pids, starts):
            # Only the very process the cluster recorded: same pid *and* start time, so a
            # pid reused since by an unrelated process is never killed.
            if pid_alive(pid) and start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for seg in cluster_segments(name):
            os.unlink(seg)
            removed.append(seg)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed leftovers of crashed clusters: %s", ", ".join(removed))
    return removed


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with
    the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
