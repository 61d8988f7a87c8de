"""The Ray launcher: a cluster's processes placed on the hosts of a Ray cluster.

``numaemu up --ray [ADDRESS]`` and ``Cluster(topology, launcher="ray")`` run the
supervisor as a Ray driver.  Ray **places, starts, watches and stops** the
cluster's processes and nothing more; they talk numaemu's own protocol to each
other over tcp with CURVE (numaemu/keys.py), exactly as processes started by
hand on several hosts do (docs/distributed.md):

* each emulated node's process is owned by a ``RoleHost`` actor, one per node,
  placed by a placement group (``STRICT_SPREAD``, one node per Ray node, when
  the Ray cluster has as many nodes as the topology; ``SPREAD`` otherwise), or
  pinned where the topology's ``placement`` says (a Ray node id, a host
  address, or a ``key=value`` node label);
* the coordinator's process is owned by a ``RoleHost`` actor pinned to the
  supervisor's own Ray node, so the cluster's address and ``numaemu down``
  live on the host where ``numaemu up`` ran;
* an actor starts its process as ``python -m numaemu.raylaunch ROLE SPEC``
  with a pipe on its stdin: the process stops (SIGTERM, the same clean stop as
  under the local supervisor) when that pipe closes, that is when its actor
  dies, whatever killed it.  Actors belong to the supervisor's Ray job, so
  they die with the supervisor;
* the keys travel to each actor as a ``Keys`` object (through Ray, whose own
  token authentication guards its cluster), and from an actor to its process
  through that stdin pipe: they never touch the disk of the actors' hosts, so
  a killed actor leaves no secret behind.  Client actors get the client
  credential and the cluster's public key only, never the cluster's secret key;
* a dead actor is a dead process: the coordinator sees its node die as it sees
  any node die (docs/design.md, failure table), and the supervisor logs it.

``cluster.spawn(fn, *args, cpu=..., host=...)`` runs a client in a
``ClientHost`` actor: next to the node of its CPU by default, or on ``host``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from .errors import ClusterError
from .keys import Keys

log = logging.getLogger("numaemu.supervisor")

MISSING = ("the Ray launcher needs Ray, an optional extra: pip install -e '.[ray]' "
           "(or pip install 'ray>=2.9')")
#: How long an actor may take to be placed and to start its process.
START_TIMEOUT = 60.0
#: How long a placement group may take to find room on the Ray cluster.
PLACEMENT_TIMEOUT = 60.0
#: The Ray namespace of the actors a cluster's supervisor starts: each is named
#: ``<cluster id>-coordinator`` or ``<cluster id>-node<N>`` (``ray list actors`` shows them).
NAMESPACE = "numaemu"
#: How long a cleanup call to an actor may take before the actor is killed anyway.
CLEANUP_TIMEOUT = 10.0


def require_ray():
    """The ``ray`` module, or a ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(MISSING) from None
    return ray


def init(address: str | None = None):
    """Connect this process to the Ray cluster at ``address`` (None: $RAY_ADDRESS, a Ray
    cluster running on this host, else a new one owned by this process); the ``ray``
    module.  A process already connected stays as it is."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address or None, log_to_driver=False,
                 logging_level=logging.WARNING)
    return ray


def default_listen() -> str:
    """Where a Ray-launched cluster serves by default: this host's Ray node address, on a
    free block of ports."""
    from .rundir import free_port_block

    ip = require_ray().util.get_node_ip_address()
    return f"tcp://{ip}:{free_port_block(ip)}"


def gcs_address() -> str:
    return require_ray().get_runtime_context().gcs_address


def this_host() -> dict[str, str]:
    """Where the calling Ray worker runs: Ray node id, address, host name."""
    ray = require_ray()
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}


# -- actors --------------------------------------------------------------------------------

class RoleHost:
    """Ray actor: owns one process of the cluster (its coordinator or one node) on its host.

    Threaded (``max_concurrency``): ``wait_exit`` blocks one thread until the process
    exits, so the supervisor learns of an exit, or of the actor's death, from one
    outstanding call instead of polling."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, role: str, spec: dict, keys: Keys) -> dict:
        """Start ``role`` (``coordinator`` or ``node``) from ``spec``; where it runs."""
        where = this_host()
        if role == "node":
            spec = dict(spec, data_endpoint=f"tcp://{where['ip']}:*")
            swept = sweep_orphan_segments()
            if swept:
                log.warning("removed segments nobody maps, left by clusters gone: %s",
                            ", ".join(swept))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "numaemu.raylaunch", role, json.dumps(spec)],
            stdin=subprocess.PIPE, start_new_session=True)
        self.proc.stdin.write(json.dumps(keys.to_text()).encode() + b"\n")
        self.proc.stdin.flush()  # and the pipe stays open for as long as this actor lives
        return {"pid": self.proc.pid, **where}

    def wait_exit(self) -> int:
        return self.proc.wait()

    def send_signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def cleanup(self, cluster_id: str) -> list[str]:
        """Kill the process if it still runs and remove the cluster's segments on this
        host; what was removed."""
        from nodes.segment import cluster_segments

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        removed = []
        for seg in cluster_segments(cluster_id):
            try:
                os.unlink(seg)
                removed.append(seg)
            except FileNotFoundError:
                pass
        return removed


def sweep_orphan_segments(min_age: float = 60.0) -> list[str]:
    """Remove this host's numaemu segments that no process maps and that are older than
    ``min_age`` seconds (a node maps its segment the moment it creates it); the paths.

    A node whose actor was killed may be killed with it (Ray kills a dead worker's
    children) before it removes its segment, and on a host other than the coordinator's
    nobody else would: the next node started on that host sweeps it."""
    import time

    from nodes.segment import PREFIX, SHM_DIR

    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)]
    except FileNotFoundError:
        return []
    now = time.time()
    candidates = set()
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            if now - os.stat(path).st_mtime >= min_age:
                candidates.add(path)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped = {line.split(None, 5)[-1].strip() for line in f if SHM_DIR in line}
        except OSError:
            continue
        candidates -= {m.removesuffix(" (deleted)") for m in mapped}
        if not candidates:
            return []
    removed = []
    for path in sorted(candidates):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone meanwhile, or another user's
            pass
    return removed


class ClientHost:
    """Ray actor: a spawned client, ``fn(task, *args)`` in a task attached from its host."""

    def __init__(self) -> None:
        self.task = None

    def attach(self, address: str, keys: Keys, options: dict) -> tuple[int, int]:
        """Attach a task; its pid and this process's OS pid."""
        from .task import Task

        self.task = Task(address, keys=keys, **options)
        return self.task.pid, os.getpid()

    def run(self, call: bytes, paths: list[str]) -> Any:
        """Run the pickled ``(fn, args)``, after adding the spawner's import ``paths`` that
        exist here (so that ``fn``'s module is found; they are appended: never in front of
        what this interpreter has installed)."""
        from ray import cloudpickle

        try:
            for path in paths:
                if path not in sys.path and os.path.isdir(path):
                    sys.path.append(path)
            fn, args = cloudpickle.loads(call)
            return fn(self.task, *args)
        finally:
            self.task.close()


_actor_classes: dict[str, Any] = {}


def actor_class(cls: type):
    """``cls`` as a Ray actor class (made once: ``ray`` is imported only when used)."""
    made = _actor_classes.get(cls.__name__)
    if made is None:
        ray = require_ray()
        made = ray.remote(max_concurrency=4)(cls)
        _actor_classes[cls.__name__] = made
    return made


# -- placement -----------------------------------------------------------------------------

def resolve_host(selector: str, nodes: list[dict] | None = None) -> str:
    """The id of the live Ray node ``selector`` names: a node id or a unique prefix of one,
    a node address (the first node with it), or a ``key=value`` node label."""
    ray = require_ray()
    live = [n for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive")]
    if "=" in selector:
        key, value = selector.split("=", 1)
        match = [n for n in live if (n.get("Labels") or {}).get(key) == value]
    else:
        match = [n for n in live if n["NodeID"].startswith(selector)]
        if not match:
            match = [n for n in live if n.get("NodeManagerAddress") == selector][:1]
    if len(match) != 1:
        known = ", ".join(f"{n['NodeID'][:12]} ({n.get('NodeManagerAddress')})" for n in live)
        what = "no" if not match else "more than one"
        raise ClusterError(f"{what} live Ray node matches {selector!r} (Ray nodes: {known})")
    return match[0]["NodeID"]


def node_strategies(topology, node_memory: list[int]) -> tuple[list, Any]:
    """One Ray scheduling strategy per emulated node, and the placement group made for
    the nodes the topology does not pin (None if it pins all)."""
    ray = require_ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pinned = list(topology.placement or [""] * topology.num_nodes)
    free = [n for n in topology.nodes if not pinned[n]]
    strategies: list = [None] * topology.num_nodes
    for n in topology.nodes:
        if pinned[n]:
            strategies[n] = pin(pinned[n])
    group = None
    if free:
        hosts = sum(1 for n in ray.nodes() if n.get("Alive"))
        strategy = "STRICT_SPREAD" if hosts >= len(free) else "SPREAD"
        # A bundle asks for the node's memory: Ray puts a node where its segment fits.
        group = placement_group([{"memory": max(1, node_memory[n])} for n in free],
                                strategy=strategy, name="numaemu-nodes")
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT)
        if not ready:
            ray.util.remove_placement_group(group)
            raise ClusterError(f"the Ray cluster has no room for {len(free)} nodes "
                               f"({strategy}) after {PLACEMENT_TIMEOUT} s")
        for i, n in enumerate(free):
            strategies[n] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        log.info("placement group %s: %d nodes, %s over %d Ray nodes", group.id.hex()[:12],
                 len(free), strategy, hosts)
    return strategies, group


def pin(host: str):
    """A scheduling strategy that puts an actor on the Ray node ``host`` names (the
    selectors of ``resolve_host``), and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(resolve_host(host), soft=False)


def here_strategy():
    """Pin an actor to the calling process's own Ray node."""
    return pin(require_ray().get_runtime_context().get_node_id())


class ActorProcess:
    """One cluster process owned by a ``RoleHost`` actor, seen by the supervisor through
    the part of ``multiprocessing.Process``'s interface it uses (``start``, ``pid``,
    ``is_alive``, ``join``, ``terminate``, ``kill``, ``exitcode``)."""

    def __init__(self, name: str, role: str, spec: dict, keys: Keys, strategy,
                 memory: int = 0) -> None:
        self.name = name
        self.role, self.spec, self.keys = role, spec, keys
        self.strategy, self.memory = strategy, memory
        self.pid = 0
        self.where: dict = {}
        self.actor = None
        self._exit = None

    def start(self) -> None:
        self.launch()
        self.started()

    def launch(self) -> None:
        """Create the actor and ask it to start the process (without waiting)."""
        options: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": self.strategy,
                                   "name": self.name, "namespace": NAMESPACE}
        if self.memory:
            options["memory"] = self.memory
        self.actor = actor_class(RoleHost).options(**options).remote()
        self._started = self.actor.start.remote(self.role, self.spec, self.keys)

    def started(self) -> None:
        """Wait until the process runs; where it runs."""
        ray = require_ray()
        try:
            self.where = ray.get(self._started, timeout=START_TIMEOUT)
        except Exception as exc:
            raise RuntimeError(f"{self.name}'s Ray actor did not start: {exc}") from None
        self.pid = self.where["pid"]
        self._exit = self.actor.wait_exit.remote()
        log.info("%s: pid %d on Ray node %s (%s)", self.name, self.pid,
                 self.where["node_id"][:12], self.where["ip"])

    def is_alive(self) -> bool:
        if self._exit is None:
            return False
        ready, _ = require_ray().wait([self._exit], timeout=0)
        return not ready

    def join(self, timeout: float | None = None) -> None:
        if self._exit is not None:
            require_ray().wait([self._exit], timeout=timeout)

    @property
    def exitcode(self) -> int | None:
        if self.is_alive():
            return None
        ray = require_ray()
        try:
            return ray.get(self._exit)
        except ray.exceptions.RayError:
            return -signal.SIGKILL  # the actor itself died, and its process with it

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.actor is not None and self.is_alive():
            ray = require_ray()
            try:
                ray.get(self.actor.send_signal.remote(signum), timeout=CLEANUP_TIMEOUT)
            except ray.exceptions.RayError:
                pass

    def release(self, cluster_id: str) -> list[str]:
        """Clean up on the actor's host (process, segments, keys), then kill the actor."""
        if self.actor is None:
            return []
        ray = require_ray()
        removed: list[str] = []
        try:
            removed = ray.get(self.actor.cleanup.remote(cluster_id), timeout=CLEANUP_TIMEOUT)
        except ray.exceptions.RayError:
            pass  # a dead actor's process died with it (its stdin pipe closed)
        ray.kill(self.actor)
        self.actor = None
        return removed


class RayClientHandle:
    """A client spawned in a ``ClientHost`` actor, with ``cluster.ClientHandle``'s interface
    (``pid``, ``os_pid``, ``done``, ``join``, ``kill``, ``terminate``)."""

    def __init__(self, address: str, keys_dir: str | None, fn, args: tuple, options: dict,
                 strategy=None) -> None:
        ray = require_ray()
        if keys_dir is None:
            raise ClusterError("a Ray client reaches the cluster over tcp: the cluster needs "
                               "keys (start it with launcher='ray' or --listen tcp://...)")
        actor_options: dict[str, Any] = {"num_cpus": 0}
        if strategy is not None:
            actor_options["scheduling_strategy"] = strategy
        self.actor = actor_class(ClientHost).options(**actor_options).remote()
        self._outcome: tuple | None = None
        try:
            self.pid, self.os_pid = ray.get(
                self.actor.attach.remote(address, Keys.load(keys_dir).for_client(), options),
                timeout=START_TIMEOUT)
        except BaseException as exc:
            self._release()
            raise _unwrap(ray, exc, "the client actor did not attach") from None
        # Pickled here, unpickled by the actor once it has our import paths: a runtime
        # environment would do the same, but costs a fresh worker process per client.
        call = ray.cloudpickle.dumps((fn, tuple(args)))
        self._ref = self.actor.run.remote(call, _import_paths())

    def done(self) -> bool:
        """Whether ``fn`` has finished (or its actor died)."""
        if self._outcome is not None:
            return True
        ready, _ = require_ray().wait([self._ref], timeout=0)
        return bool(ready)

    def join(self, timeout: float | None = None) -> Any:
        """``fn``'s return value; re-raises its exception; TimeoutError if still running."""
        if self._outcome is None:
            ray = require_ray()
            ready, _ = ray.wait([self._ref], timeout=timeout)
            if not ready:
                raise TimeoutError(f"client {self.pid} still running after {timeout} s")
            try:
                self._outcome = ("ok", ray.get(self._ref))
            except Exception as exc:
                self._outcome = ("error", _unwrap(ray, exc, f"client {self.pid}"))
            self._release()
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    def kill(self) -> None:
        """Kill the client's actor, and its process with it (what a dying client leaves
        behind is the coordinator's to clean up, as for any client)."""
        self._release()

    terminate = kill

    def _release(self) -> None:
        if self.actor is not None:
            require_ray().kill(self.actor)
            self.actor = None


def _unwrap(ray, exc: BaseException, what: str) -> BaseException:
    """The exception a client raised, out of Ray's wrapping; a ClusterError for an actor
    that died or did not answer."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        return getattr(exc, "cause", None) or exc
    if isinstance(exc, ray.exceptions.GetTimeoutError):
        return ClusterError(f"{what}: no answer in {START_TIMEOUT} s")
    if isinstance(exc, ray.exceptions.RayError):
        return ClusterError(f"{what}: its Ray actor died ({type(exc).__name__})")
    return exc


def _import_paths() -> list[str]:
    """This process's own import paths (those outside the interpreter's), for a client actor
    to unpickle ``fn`` (on other hosts the same paths must hold the same code)."""
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    paths: list[str] = []
    for p in sys.path:
        p = os.path.abspath(p or os.getcwd())
        if os.path.isdir(p) and not p.startswith(prefixes) and p not in paths:
            paths.append(p)
    return paths


# -- the processes the actors start ------------------------------------------------------------

def _keys_then_stop_with_owner() -> Keys:
    """The keys, the first line on stdin; then stop this process (SIGTERM: a clean stop)
    when its owner's pipe on stdin closes."""
    line = sys.stdin.buffer.readline()
    keys = Keys.from_text(json.loads(line))

    def watch() -> None:
        try:
            while sys.stdin.buffer.read1(4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="numaemu-owner-watch", daemon=True).start()
    return keys


def _run_coordinator(spec: dict, keys: Keys) -> None:
    from coordinator.server import run_coordinator

    from . import log as numaemu_log
    from .keys import find as find_keys
    from .topology import Topology

    endpoints = spec["endpoints"]
    numaemu_log.setup_forwarding(endpoints["log"], role="coordinator",
                                 keys=find_keys(endpoints["log"], keys))
    run_coordinator(Topology.from_dict(spec["topology"]), spec["cluster_id"], endpoints,
                    spec.get("supervisor_pid", 0), inject_dilation=spec.get("inject"),
                    keys=keys)


def main(argv: list[str] | None = None) -> int:
    """``python -m numaemu.raylaunch ROLE SPEC``: a process a ``RoleHost`` actor owns."""
    argv = sys.argv[1:] if argv is None else argv
    role, spec = argv[0], json.loads(argv[1])
    keys = _keys_then_stop_with_owner()
    if role == "coordinator":
        _run_coordinator(spec, keys)
    elif role == "node":
        from nodes.main import join

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when nodes stop
        join(spec["coordinator"], spec["node"], spec["data_endpoint"], keys,
             data_path=spec.get("data_path", "auto"))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
