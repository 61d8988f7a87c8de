"""The supervisor: starts a cluster's processes, collects their logs, stops them all.

Lifecycle (like Mininet's build / start / stop):

1. set up logging and install the multiprocessing-logging handler;
2. fork the coordinator and one process per node, *before* this process has
   any zmq context or thread (forking those is unsafe);
3. start the log collector and wait until every node has registered;
4. print one JSON line ``{"address": ...}`` on stdout (the launcher reads it);
5. run until SIGTERM/SIGINT, until stdin closes (the owning ``Cluster``'s
   process went away), or until the coordinator dies;
6. stop: ask the coordinator to shut down (it writes dirty file pages back and
   tells nodes to exit), wait, kill stragglers, remove every segment and the
   run directory.

``numaemu up`` runs this in the foreground; ``Cluster()`` and
``numaemu up --detach`` run it as ``python -m numaemu.supervisor``.

With ``--launcher ray`` (``numaemu up --ray``, ``Cluster(launcher="ray")``) step 2
starts Ray actors instead of forking, and each actor owns one of the processes
on its Ray node (numaemu/raylaunch.py); the rest of the lifecycle is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import select
import signal
import sys
import time
from collections.abc import Sequence

from . import log as numaemu_log
from .keys import Keys
from .rundir import RunDir, start_time, sweep_leftovers
from .topology import Topology

log = logging.getLogger("numaemu.supervisor")

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: After the coordinator died, how long nodes get to notice (heartbeat) and exit by themselves.
ORPHAN_GRACE = 8.0


def _coordinator_main(topology_dict: dict, cluster_id: str, endpoints: dict, sup: int,
                      inject: float | None, keys: str | None) -> None:
    numaemu_log.set_where("coordinator")
    from coordinator.server import run_coordinator

    run_coordinator(Topology.from_dict(topology_dict), cluster_id, endpoints, sup,
                    inject_dilation=inject, keys=keys)


def _node_main(node: int, coordinator: str, cluster_id: str, frames: int, page_size: int,
               data_endpoint: str, keys: str | None, data_path: str) -> None:
    numaemu_log.set_where("node", node)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when nodes stop
    from nodes import run_node

    run_node(node, coordinator, cluster_id, frames, page_size, data_endpoint, keys=keys,
             data_path=data_path)


def setup_logging(level: str, log_path: str, *, stderr: bool = True) -> None:
    """The supervisor's handlers: the cluster log file (INFO and up) and stderr at ``level``."""
    logger = logging.getLogger(numaemu_log.ROOT)
    logger.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
    logger.propagate = False
    fmt = logging.Formatter(numaemu_log.FORMAT)
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    if stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(level.upper())
        err.setFormatter(fmt)
        logger.addHandler(err)
    import multiprocessing_logging

    multiprocessing.set_start_method("fork", force=True)
    multiprocessing_logging.install_mp_handler(logger)
    numaemu_log.set_where("supervisor")


def supervise(topology: Topology, *, log_level: str = "WARNING", listen: str | None = None,
              watch_stdin: bool = False, ready_out=None, stderr_logs: bool = True,
              inject_delays: float | None = None, launcher: str = "local",
              ray_address: str | None = None, external_nodes: Sequence[int] = (),
              data_path: str = "auto") -> int:
    """Run a cluster until told to stop; return the exit status.

    ``launcher="local"`` forks the coordinator and the nodes here, except
    ``external_nodes``, which join by themselves (``numaemu node`` on other hosts: a line
    ``{"waiting": [...], "address": ...}`` tells the launcher how to reach the cluster
    meanwhile, and the wait has no deadline); ``"ray"`` makes this process a Ray driver
    whose actors own them, on the Ray cluster's hosts (numaemu/raylaunch.py).  A Ray
    cluster is always served on tcp, with CURVE keys.  ``data_path`` "remote": nodes copy
    pages from each other through their data services, never by mapping each other's
    segments (what nodes on different hosts do), so one machine runs that path."""
    external = sorted(set(external_nodes))
    sweep_leftovers()
    if launcher == "ray":
        # If the Ray cluster itself goes away, Ray ends this driver once it gives up on its
        # GCS: after 10 s instead of Ray's 60 (the next start sweeps what that leaves).
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
        try:
            from . import raylaunch

            raylaunch.init(ray_address)
            listen = listen or raylaunch.default_listen()
        except Exception as exc:
            _announce(ready_out, {"error": str(exc)})
            return 1
    run = RunDir.create(listen)
    setup_logging(log_level, run.log_path, stderr=stderr_logs)
    endpoints = run.endpoints()
    # tcp: every endpoint authenticates its peers with the cluster's CURVE keys (keys.py).
    keys = Keys.create(run.keys_dir) if listen else None
    keys_dir = keys.directory if keys is not None else None
    stop_reason: list[str] = []

    def on_signal(signum, _frame):
        stop_reason.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: dict = {}
    collector = None
    placement = None
    status = 0
    try:
        if launcher == "ray":
            collector = numaemu_log.Collector(endpoints["log"], keys)
            collector.start_and_wait()
            placement = _start_on_ray(topology, run, endpoints, inject_delays, keys_dir, procs,
                                      data_path)
        else:
            _fork(topology, run, endpoints, inject_delays, keys_dir, procs, external,
                  data_path)
            # Only now may this process create zmq sockets and threads.
            collector = numaemu_log.Collector(endpoints["log"], keys)
            collector.start_and_wait()
        local = launcher == "local"  # Ray owns its processes: no pids for the sweep to kill
        run.write_state(supervisor_pid=os.getpid(), address=endpoints["rpc"], keys=keys_dir,
                        pids=[p.pid for p in procs.values()] if local else [],
                        starts=[start_time(p.pid) for p in procs.values()] if local else [],
                        log=run.log_path, launcher=launcher)
        if external:
            _announce(ready_out, {"waiting": external, "address": endpoints["rpc"],
                                  "cluster_id": run.cluster_id, "keys": keys_dir,
                                  "log": run.log_path})
        _wait_ready(endpoints["rpc"], topology.num_nodes, procs, stop_reason, keys_dir,
                    deadline=not external)
        if stop_reason:
            return 1
        ready = {"address": endpoints["rpc"], "cluster_id": run.cluster_id,
                 "run_dir": run.path, "log": run.log_path, "supervisor_pid": os.getpid(),
                 "keys": keys_dir, "launcher": launcher}
        if launcher == "ray":
            from . import raylaunch

            ready["ray"] = {"address": raylaunch.gcs_address(),
                            "coordinator": procs["coordinator"].where,
                            "nodes": {str(n): procs[f"node{n}"].where for n in topology.nodes}}
        log.info("cluster %s up: %d nodes, address %s", run.cluster_id, topology.num_nodes,
                 endpoints["rpc"])
        _announce(ready_out, ready)
        status = _run_until_stopped(procs, stop_reason, watch_stdin)
    except Exception as exc:
        log.error("cluster failed: %s", exc)
        _announce(ready_out, {"error": str(exc)})
        status = 1
    finally:
        _stop(procs)
        if launcher == "ray":
            _release_ray(procs, placement, run.cluster_id)
        if collector is not None:
            collector.stop()
        _remove_segments(run.cluster_id)
        run.remove()
        log.info("cluster %s stopped", run.cluster_id)
        logging.shutdown()
    return status


def _announce(ready_out, message: dict) -> None:
    """A line for the launcher: the cluster's address, the nodes it waits for, or why it
    failed.  A launcher that stopped listening (``up --detach`` reads only the first line)
    does not stop the cluster."""
    if ready_out is None:
        return
    try:
        ready_out.write(json.dumps(message) + "\n")
        ready_out.flush()
    except OSError:
        pass


def _fork(topology: Topology, run: RunDir, endpoints: dict, inject: float | None,
          keys_dir: str | None, procs: dict, external: Sequence[int] = (),
          data_path: str = "auto") -> None:
    """Fork the coordinator and one process per node but the ``external`` ones
    (``launcher="local"``)."""
    ctx = multiprocessing.get_context("fork")
    procs["coordinator"] = ctx.Process(
        target=_coordinator_main, name="numaemu-coordinator",
        args=(topology.to_dict(), run.cluster_id, endpoints, os.getpid(), inject, keys_dir))
    procs["coordinator"].start()
    for node in topology.nodes:
        if node in external:
            continue
        procs[f"node{node}"] = ctx.Process(
            target=_node_main, name=f"numaemu-node{node}",
            args=(node, endpoints["nodes"], run.cluster_id, topology.frames_per_node[node],
                  topology.page_size, run.node_data_endpoint(node), keys_dir, data_path))
        procs[f"node{node}"].start()


def _start_on_ray(topology: Topology, run: RunDir, endpoints: dict, inject: float | None,
                  keys_dir: str, procs: dict, data_path: str = "auto"):
    """Start the coordinator next to this process and the nodes where the placement says,
    each owned by a Ray actor (``launcher="ray"``); the nodes' placement group."""
    from . import raylaunch

    server_keys = Keys.load(keys_dir)
    cid = run.cluster_id
    procs["coordinator"] = raylaunch.ActorProcess(
        f"{cid}-coordinator", "coordinator",
        {"topology": topology.to_dict(), "cluster_id": run.cluster_id, "endpoints": endpoints,
         "supervisor_pid": os.getpid(), "inject": inject},
        server_keys, raylaunch.here_strategy())
    procs["coordinator"].start()
    memory = [f * topology.page_size for f in topology.frames_per_node]
    strategies, group = raylaunch.node_strategies(topology, memory)
    try:
        for node in topology.nodes:  # all started at once, then waited for
            procs[f"node{node}"] = raylaunch.ActorProcess(
                f"{cid}-node{node}", "node",
                {"node": node, "coordinator": endpoints["rpc"], "cluster_id": cid,
                 "data_path": data_path},
                server_keys, strategies[node], memory[node])
            procs[f"node{node}"].launch()
        for node in topology.nodes:
            procs[f"node{node}"].started()
    except BaseException:
        if group is not None:
            _release_ray({}, group, run.cluster_id)
        raise
    return group


def _release_ray(procs: dict, group, cluster_id: str) -> None:
    """Clean up on every actor's host, kill the actors, remove the placement group."""
    from . import raylaunch

    ray = raylaunch.require_ray()
    for name, p in procs.items():
        removed = p.release(cluster_id)
        if removed:
            log.warning("removed segment(s) %s left by %s", ", ".join(removed), name)
    if group is not None:
        ray.util.remove_placement_group(group)


def _wait_ready(address: str, num_nodes: int, procs: dict, stop_reason: list,
                keys: str | None, *, deadline: bool = True) -> None:
    from .transport import Connection

    give_up = time.monotonic() + READY_TIMEOUT if deadline else float("inf")
    with Connection(address, connect_timeout=READY_TIMEOUT, keys=keys) as conn:
        while not stop_reason:
            dead = [name for name, p in procs.items() if not p.is_alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start (see the log)")
            info = conn.call("info", timeout=READY_TIMEOUT)
            if len(info["segments"]) == num_nodes:
                return
            if time.monotonic() > give_up:
                raise RuntimeError(f"only {len(info['segments'])} of {num_nodes} nodes "
                                   f"registered in {READY_TIMEOUT} s")
            time.sleep(0.02 if deadline else 0.2)


def _run_until_stopped(procs: dict, stop_reason: list, watch_stdin: bool) -> int:
    coordinator = procs["coordinator"]
    reported: set[str] = set()
    while not stop_reason:
        if watch_stdin:
            readable, _, _ = select.select([sys.stdin], [], [], 0.2)
            if readable and not sys.stdin.buffer.read1(4096):
                stop_reason.append("owner went away")
                break
        else:
            time.sleep(0.2)
        if not coordinator.is_alive():
            log.error("the coordinator died (exit code %s); nodes will exit when its "
                      "heartbeats stop", coordinator.exitcode)
            _wait_all([p for n, p in procs.items() if n != "coordinator"], ORPHAN_GRACE)
            return 1
        for name, p in procs.items():
            if name not in reported and not p.is_alive():
                reported.add(name)  # the coordinator takes the node offline (its heartbeat)
                log.error("%s exited (exit code %s)", name, p.exitcode)
    log.info("stopping: %s", stop_reason[0])
    return 0


def _stop(procs: dict) -> None:
    coordinator = procs.get("coordinator")
    if coordinator is not None and coordinator.is_alive():
        coordinator.terminate()  # SIGTERM: it writes back and tells the nodes to exit
    _wait_all(list(procs.values()), STOP_TIMEOUT)
    for name, p in procs.items():
        if p.is_alive():
            log.warning("%s did not stop; killing it", name)
            p.kill()
            p.join(2)


def _wait_all(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _remove_segments(cluster_id: str) -> None:
    from nodes.segment import cluster_segments

    for seg in cluster_segments(cluster_id):
        try:
            os.unlink(seg)
            log.warning("removed segment %s left by a node", seg)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m numaemu.supervisor``: the form ``Cluster`` and ``up --detach`` run."""
    parser = argparse.ArgumentParser(prog="numaemu.supervisor")
    parser.add_argument("--topology", required=True, help="topology as JSON")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--listen", default=None)
    parser.add_argument("--watch-stdin", action="store_true")
    parser.add_argument("--no-stderr", action="store_true")
    parser.add_argument("--inject-delays", type=float, default=None)
    parser.add_argument("--launcher", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--external-nodes", default="", help="comma-separated node ids")
    parser.add_argument("--data-path", choices=("auto", "local", "remote"), default="auto")
    args = parser.parse_args(argv)
    topology = Topology.from_dict(json.loads(args.topology))
    ready_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    # stdout may be a pipe the launcher stops reading: keep logs and prints off it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return supervise(topology, log_level=args.log_level, listen=args.listen,
                     watch_stdin=args.watch_stdin, ready_out=ready_out,
                     stderr_logs=not args.no_stderr, inject_delays=args.inject_delays,
                     launcher=args.launcher, ray_address=args.ray_address,
                     external_nodes=[int(n) for n in args.external_nodes.split(",") if n],
                     data_path=args.data_path)


if __name__ == "__main__":
    raise SystemExit(main())
