"""Starting, using and stopping a cluster from Python.

``Cluster`` runs the supervisor (``python -m numaemu.supervisor``) as a child
in its own session and talks to it through a pipe: the supervisor prints one
ready line with the cluster's address, and stops the whole cluster when the
pipe closes, so a crashed or killed owner never leaves a cluster behind.  The
supervisor, not this process, forks the coordinator and the nodes: this
process may already have zmq contexts and threads, and forking those is unsafe.

``Cluster.spawn`` starts client processes with a clean start method
(forkserver, modules preloaded) for the same reason.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .cpuset import Cpuset
from .errors import ClusterError, NumaError
from .profile import profile_array
from .task import Task
from .topology import Topology
from .transport import Connection

START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0

_forkserver = None


def _client_context():
    """A forkserver context with numaemu preloaded: a clean, fast start for client processes."""
    global _forkserver
    if _forkserver is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["numaemu", "numpy", "zmq", "msgpack"])
        _forkserver = ctx
    return _forkserver


class Cluster:
    """An emulated NUMA machine: a coordinator and one process per node.

    Use as a context manager; leaving it (or ``stop()``) stops every process of
    the cluster and removes its shared memory, also after an exception.
    """

    def __init__(self, topology: Topology | None = None, *, log_level: str = "WARNING",
                 listen: str | None = None, inject_delays: float | None = None,
                 start: bool = True, data_path: str | None = None, launcher: str = "local",
                 ray_address: str | None = None) -> None:
        from .remote import data_path_setting

        if launcher not in ("local", "ray"):
            raise ClusterError(f"launcher must be 'local' or 'ray', not {launcher!r}")
        self.topology = topology if topology is not None else Topology.default()
        #: how its tasks (attached and spawned) reach frames: "auto", "local" or "remote"
        #: (numaemu/remote.py); None: $NUMAEMU_DATA_PATH, else "auto".  A cluster started
        #: with "remote" also has its nodes copy migrated pages through each other's data
        #: services instead of mapping each other's segments (nodes/node.py).
        self.data_path = data_path_setting(data_path)
        self.log_level = log_level
        self.listen = listen
        self.inject_delays = inject_delays  # dilation every task injects by default
        #: "local": the supervisor forks every process here; "ray": Ray actors own them, on
        #: the hosts of the Ray cluster at ``ray_address`` (numaemu/raylaunch.py)
        self.launcher = launcher
        self.ray_address = ray_address
        #: Ray launcher: the Ray cluster's address and where each process runs
        #: (``{"address", "coordinator", "nodes": {node: {"node_id", "ip", "host"}}}``)
        self.ray: dict | None = None
        self.address: str | None = None
        self.cluster_id: str | None = None
        self.run_dir: str | None = None
        self.log_path: str | None = None
        self.keys: str | None = None  # tcp: the directory of the cluster's CURVE keys
        self._proc: subprocess.Popen | None = None
        self._owned = start
        self._tasks: list[Task] = []
        self._handles: list[ClientHandle] = []
        if start:
            self.start()

    @classmethod
    def connect(cls, address: str | None = None, keys: str | None = None,
                data_path: str | None = None, ray_address: str | None = None) -> Cluster:
        """A handle on a cluster that is already running (``numaemu up``); ``stop()`` only
        closes what this handle attached or spawned, the cluster keeps running.  A tcp
        cluster needs its keys directory (``keys`` or $NUMAEMU_KEYS).  ``ray_address``:
        spawn clients on that Ray cluster (``numaemu up --ray``)."""
        address = address or os.environ.get("NUMAEMU_ADDRESS")
        if not address:
            raise ClusterError("no cluster address: pass one or set NUMAEMU_ADDRESS")
        with Connection(address, keys=keys) as conn:
            info = conn.call("info")
        cluster = cls(Topology.from_dict(info["topology"]), start=False, data_path=data_path,
                      launcher="ray" if ray_address else "local", ray_address=ray_address)
        cluster.address = address
        cluster.keys = keys
        cluster.cluster_id = info["cluster_id"]
        return cluster

    @property
    def page_size(self) -> int:
        return self.topology.page_size

    def start(self) -> None:
        """Start the supervisor, which starts the coordinator and nodes; wait until ready."""
        if self._proc is not None:
            return
        self._owned = True
        cmd = [sys.executable, "-m", "numaemu.supervisor",
               "--topology", json.dumps(self.topology.to_dict()),
               "--log-level", self.log_level, "--watch-stdin"]
        if self.listen:
            cmd += ["--listen", self.listen]
        if self.inject_delays:
            cmd += ["--inject-delays", str(float(self.inject_delays))]
        if self.launcher == "ray":
            from .raylaunch import require_ray

            require_ray()  # say how to install it before anything starts
            cmd += ["--launcher", "ray"]
            if self.ray_address:
                cmd += ["--ray-address", self.ray_address]
        if self.data_path == "remote":  # the nodes' copies too (numaemu/supervisor.py)
            cmd += ["--data-path", "remote"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      start_new_session=True)
        try:
            ready = self._read_ready()
        except BaseException:
            self.stop()
            raise
        self.address = ready["address"]
        self.cluster_id = ready["cluster_id"]
        self.run_dir = ready["run_dir"]
        self.log_path = ready["log"]
        self.keys = ready.get("keys")
        self.ray = ready.get("ray")

    def _read_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT
        out = self._proc.stdout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([out], [], [], 0.5)
            if readable:
                line = out.readline()
                if not line:
                    raise ClusterError(f"the cluster failed to start (supervisor exit code "
                                       f"{self._proc.wait(5)}); see its log in "
                                       f"{os.environ.get('NUMAEMU_RUN_DIR') or '/tmp'}")
                ready = json.loads(line)
                if "error" in ready:
                    raise ClusterError(f"the cluster failed to start: {ready['error']}")
                return ready
            if self._proc.poll() is not None:
                raise ClusterError(f"the supervisor exited with {self._proc.returncode}")
        raise ClusterError(f"the cluster did not start within {START_TIMEOUT} s")

    def stop(self) -> None:
        """Stop every process of the cluster and remove its shared memory."""
        for handle in self._handles:
            handle.terminate()
        self._handles.clear()
        for task in self._tasks:
            task.close()
        self._tasks.clear()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the supervisor's cue to stop everything
        except OSError:
            pass
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            from .rundir import sweep_leftovers

            sweep_leftovers()
        finally:
            if proc.stdout:
                proc.stdout.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None or getattr(self, "_tasks", None):
            try:
                self.stop()
            except Exception:
                pass

    # -- using it ------------------------------------------------------------------
    def _require(self) -> str:
        if self.address is None or (self._owned and self._proc is None):
            raise ClusterError("the cluster is not running")
        return self.address

    def attach(self, cpu: int | None = None, privileged: bool = False,
               uid: int | None = None, inject: float | None | bool = True,
               data_path: str | None = None) -> Task:
        """A client task in this process, on ``cpu``; closed when the cluster stops.

        ``uid`` is the emulated owner (default: this process's uid); acting on another
        owner's task needs ``privileged=True``, as ptrace access and CAP_SYS_NICE do.  Only
        root may pick another ``uid``; ``privileged=True`` needs root or the cluster's owner
        (the task is bound to this process: docs/design.md, "Identity").  ``data_path``
        overrides the cluster's (numaemu/remote.py)."""
        task = Task(self._require(), cpu=cpu, privileged=privileged, uid=uid, inject=inject,
                    keys=self.keys, data_path=data_path or self.data_path)
        self._tasks.append(task)
        return task

    def spawn(self, fn: Callable[..., Any], *args: Any, cpu: int | None = None,
              privileged: bool = False, uid: int | None = None,
              host: str | None = None) -> ClientHandle:
        """Run ``fn(task, *args)`` in a new client process; ``fn`` must be importable.

        ``uid`` is the task's emulated owner, as for ``attach`` (only root may pick one).
        On a Ray-launched cluster the client is a Ray actor: on ``host`` (a Ray node id or
        a unique prefix of one, a host address, or a ``key=value`` node label), else on
        the Ray node of ``cpu``'s node, else where Ray likes (numaemu/raylaunch.py)."""
        address = self._require()
        if self.launcher == "ray":
            from .raylaunch import RayClientHandle

            options = {"cpu": cpu, "privileged": privileged, "uid": uid,
                       "data_path": self.data_path,
                       "command": getattr(fn, "__name__", "client")}
            handle = RayClientHandle(address, self.keys, fn, args, options,
                                     self._ray_strategy(cpu, host))
        elif host is not None:
            raise ClusterError("host= places a client on a Ray cluster's hosts: start the "
                               "cluster with launcher='ray' (numaemu up --ray)")
        else:
            handle = ClientHandle(address, fn, args, cpu, privileged, uid, self.keys,
                                  self.data_path)
        self._handles.append(handle)
        return handle

    def _ray_strategy(self, cpu: int | None, host: str | None):
        """Where a Ray client runs: ``host``, else next to ``cpu``'s node, else anywhere."""
        from . import raylaunch

        raylaunch.init(self.ray["address"] if self.ray else self.ray_address)
        if host is None and cpu is not None and cpu in self.topology.cpus:
            node = self.topology.node_of_cpu(cpu)
            if self.ray:
                host = self.ray["nodes"][str(node)]["node_id"]
            else:  # a cluster we did not start: the host of the node's data endpoint
                segments = self._call("info")["segments"]
                endpoint = next(s["data_endpoint"] for s in segments if s["node"] == node)
                host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
        if host is None:
            return None
        return raylaunch.pin(host)

    def _call(self, op: str, **fields) -> dict:
        with Connection(self._require(), keys=self.keys) as conn:
            return conn.call(op, **fields)

    def hardware(self) -> str:
        """The machine as ``numactl --hardware`` prints it."""
        from .views import hardware_text

        nodes = self._call("numastat")["nodes"]
        free = [nodes[str(n)]["free"] for n in self.topology.nodes]
        offline = [n for n in self.topology.nodes if nodes[str(n)].get("offline")]
        return hardware_text(self.topology, free, offline)

    # -- cpusets ----------------------------------------------------------------------
    def cpuset_create(self, name: str, cpus: Iterable[int], mems: Iterable[int],
                      memory_migrate: bool = False) -> Cpuset:
        """A new cpuset confining its tasks to ``cpus`` and memory nodes ``mems``."""
        return Cpuset(self, self._call("cpuset_create", name=name, cpus=[int(c) for c in cpus],
                                       mems=[int(n) for n in mems],
                                       memory_migrate=bool(memory_migrate)))

    def cpuset(self, name: str) -> Cpuset:
        """The cpuset ``name`` (``"/"``: the root); ENOENT if there is none."""
        return Cpuset(self, {"name": name, "cpus": (), "mems": (),
                             "memory_migrate": False}).refresh()

    def cpusets(self) -> list[Cpuset]:
        """Every cpuset, the root first."""
        return [Cpuset(self, state) for state in self._call("cpusets")["cpusets"]]

    def coordinator_stats(self) -> dict:
        """The coordinator's own health: ``loop_stall_max_ms`` (the longest its event loop
        was held by one piece of work), ``loop_restarts`` (receive loops restarted by its
        watchdog), ``offline_nodes``."""
        return dict(self._call("numastat")["coordinator"])

    def offline_nodes(self) -> list[int]:
        """Nodes that failed (their process died or fell silent): their pages are poisoned."""
        nodes = self._call("numastat")["nodes"]
        return sorted(int(n) for n, s in nodes.items() if s.get("offline"))

    def numastat(self) -> dict[int, dict[str, int]]:
        """Per-node numastat counters."""
        nodes = self._call("numastat")["nodes"]
        return {int(n): dict(s["numastat"]) for n, s in nodes.items()}

    def vmstat(self) -> dict[str, int]:
        """Cluster-wide counters, named as in /proc/vmstat: pgmigrate_success,
        pgmigrate_fail, numa_pte_updates, numa_hint_faults, numa_hint_faults_local,
        numa_pages_migrated."""
        return dict(self._call("numastat")["vmstat"])

    def sysctl(self, name: str, value: int | None = None) -> int:
        """Read (or set: a privileged caller) a tunable: ``migrate_batch``,
        ``kernel.numa_balancing`` (0 off, 1 on), ``kernel.numa_balancing_scan_delay_ms``,
        ``..._scan_period_min_ms``, ``..._scan_period_max_ms``, ``..._scan_size_mb``, and
        ``numaemu.numa_sampling`` (1: record hinting faults without acting on them)."""
        return self._call("sysctl", name=name, value=value)["value"]

    def access_profile(self, pid: int | None = None, reset: bool = False) -> np.ndarray:
        """What NUMA hinting faults recorded since the last reset (of task ``pid``, or of
        every task), one row per (task, page, page node, accessing node): a structured
        array with fields ``addr``, ``pid``, ``page_node``, ``cpu_node``, ``count`` and
        ``last_ns`` (monotonic time of the last fault).  ``reset`` forgets what it returns.
        Sampling runs with ``kernel.numa_balancing`` or ``numaemu.numa_sampling`` set."""
        reply = self._call("access_profile", pid=pid, reset=reset)
        return profile_array(reply)

    def numa_sched(self, pid: int) -> dict:
        """Task ``pid``'s NUMA balancing state, like /proc/PID/sched: ``numa_preferred_nid``,
        ``numa_faults`` (recent hinting faults per page node), ``numa_scan_period_ms``."""
        for t in self._call("tasks")["tasks"]:
            if t["pid"] == pid:
                return {k: t[k] for k in ("numa_preferred_nid", "numa_faults",
                                          "numa_scan_period_ms", "cpu")}
        raise NumaError(3, f"no task with pid {pid}")

    def node_stats(self) -> dict[int, dict]:
        """Per node: ``frames``, ``free``, ``active``/``inactive`` (LRU sizes), ``offline``,
        and ``copy``, the copy engine's counters (seed step 12): ``frames_copied_mapped``
        (from another node's segment, mapped), ``frames_fetched`` (from another node's data
        service), ``fetch_failures``, ``served_during_fetch`` (data requests this node
        served while one of its own fetches waited)."""
        nodes = self._call("numastat")["nodes"]
        return {int(n): {k: v for k, v in s.items() if k != "numastat"}
                for n, s in nodes.items()}

    def free_frames(self) -> dict[int, int]:
        """Free frames per node."""
        nodes = self._call("numastat")["nodes"]
        return {int(n): s["free"] for n, s in nodes.items()}

    def check(self) -> list[str]:
        """Invariant violations found by the coordinator (empty when all hold); use at rest."""
        return self._call("check")["problems"]

    def processes(self) -> dict[str, int]:
        """OS pids of the cluster's own processes (supervisor, coordinator, nodes)."""
        from .rundir import read_state

        state = read_state(self.run_dir or "") or {}
        return {"supervisor": state.get("supervisor_pid", 0), "children": state.get("pids", [])}


def _client_main(address: str, fn, args, cpu, privileged, uid, keys, conn,
                 data_path: str | None = None) -> None:
    """Body of a spawned client process."""
    try:
        task = Task(address, cpu=cpu, privileged=privileged, uid=uid,
                    command=getattr(fn, "__name__", "client"), keys=keys, data_path=data_path)
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    conn.send(("attached", task.pid))
    try:
        result = fn(task, *args)
        outcome = ("ok", result)
    except BaseException as exc:
        outcome = ("error", _portable(exc))
    finally:
        task.close()
    try:
        conn.send(outcome)
    except Exception as exc:  # an unpicklable result
        conn.send(("error", RuntimeError(f"result of {fn!r} cannot be sent back: {exc}")))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError carrying its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)))


class ClientHandle:
    """A spawned client process running ``fn(task, *args)``."""

    def __init__(self, address: str, fn, args, cpu, privileged, uid=None,
                 keys: str | None = None, data_path: str | None = None) -> None:
        ctx = _client_context()
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_client_main, name=f"numaemu-client-{fn.__name__}",
                                 args=(address, fn, args, cpu, privileged, uid, keys, child,
                                       data_path),
                                 daemon=True)
        self._proc.start()
        child.close()
        self._outcome: tuple | None = None
        if not self._conn.poll(START_TIMEOUT):
            self.terminate()
            raise ClusterError("the client process did not attach in time")
        kind, value = self._recv()
        if kind != "attached":
            self._proc.join(5)
            raise value
        self.pid: int = value
        self.os_pid = self._proc.pid

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.join(5)
            return ("error", ClusterError(
                f"client process died (exit code {self._proc.exitcode})"))

    def done(self) -> bool:
        """Whether ``fn`` has finished (or the process died)."""
        return self._outcome is not None or self._conn.poll(0) or not self._proc.is_alive()

    def join(self, timeout: float | None = None) -> Any:
        """``fn``'s return value; re-raises its exception; TimeoutError if still running."""
        if self._outcome is None:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"client {self.pid} still running after {timeout} s")
            self._outcome = self._recv()
            self._proc.join(10)
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    def kill(self) -> None:
        """SIGKILL the client process (to test what a dying client leaves behind)."""
        if self._proc.is_alive():
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.join(5)

    def terminate(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)


def attach(address: str | None = None, cpu: int | None = None,
           privileged: bool = False, keys: str | None = None,
           data_path: str | None = None) -> Task:
    """Attach this process to a running cluster (``address`` defaults to $NUMAEMU_ADDRESS;
    a tcp cluster's ``keys`` directory to $NUMAEMU_KEYS).  ``data_path``: "auto" (map the
    nodes' memory where it can, else use their data services), "local" or "remote"
    (numaemu/remote.py); None: $NUMAEMU_DATA_PATH, else "auto".

    Under ``numaemu run`` the CPU binding and memory policy given on its command
    line are applied to the new task.
    """
    address = address or os.environ.get("NUMAEMU_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass address= or set NUMAEMU_ADDRESS "
                           "(numaemu up --detach prints it)")
    run = json.loads(os.environ.get("NUMAEMU_RUN", "{}") or "{}")
    cpus = run.get("cpus")
    if cpu is None and cpus:
        cpu = cpus[0]
    task = Task(address, cpu=cpu, privileged=privileged, keys=keys, cpuset=run.get("cpuset"),
                data_path=data_path)
    try:
        if cpus:
            task.sched_setaffinity(cpus)
        if run.get("mode") is not None:
            task.set_mempolicy(run["mode"], run.get("nodes", ()))
    except BaseException:
        task.close()
        raise
    return task
