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
              inject_delays: float | None = None, data_path: str = "auto") -> int:
    """Run a cluster until told to stop; return the exit status.  ``data_path`` "remote":
    nodes copy pages from each other through their data services, never by mapping each
    other's segments (what nodes on different hosts do), so one machine runs that path."""
    sweep_leftovers()
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
    ctx = multiprocessing.get_context("fork")
    procs: dict[str, multiprocessing.Process] = {}
    collector = None
    status = 0
    try:
        procs["coordinator"] = ctx.Process(
            target=_coordinator_main, name="numaemu-coordinator",
            args=(topology.to_dict(), run.cluster_id, endpoints, os.getpid(), inject_delays,
                  keys_dir))
        procs["coordinator"].start()
        for node in topology.nodes:
            procs[f"node{node}"] = ctx.Process(
                target=_node_main, name=f"numaemu-node{node}",
                args=(node, endpoints["nodes"], run.cluster_id,
                      topology.frames_per_node[node], topology.page_size,
                      run.node_data_endpoint(node), keys_dir, data_path))
            procs[f"node{node}"].start()
        # Only now may this process create zmq sockets and threads.
        collector = numaemu_log.Collector(endpoints["log"], keys)
        collector.start_and_wait()
        run.write_state(supervisor_pid=os.getpid(), address=endpoints["rpc"], keys=keys_dir,
                        pids=[p.pid for p in procs.values()],
                        starts=[start_time(p.pid) for p in procs.values()], log=run.log_path)
        _wait_ready(endpoints["rpc"], topology.num_nodes, procs, stop_reason, keys_dir)
        if stop_reason:
            return 1
        ready = {"address": endpoints["rpc"], "cluster_id": run.cluster_id,
                 "run_dir": run.path, "log": run.log_path, "supervisor_pid": os.getpid(),
                 "keys": keys_dir}
        log.info("cluster %s up: %d nodes, address %s", run.cluster_id, topology.num_nodes,
                 endpoints["rpc"])
        if ready_out is not None:
            ready_out.write(json.dumps(ready) + "\n")
            ready_out.flush()
        status = _run_until_stopped(procs, stop_reason, watch_stdin)
    except Exception as exc:
        log.error("cluster failed: %s", exc)
        if ready_out is not None:
            ready_out.write(json.dumps({"error": str(exc)}) + "\n")
            ready_out.flush()
        status = 1
    finally:
        _stop(procs, endpoints)
        if collector is not None:
            collector.stop()
        _remove_segments(run.cluster_id)
        run.remove()
        log.info("cluster %s stopped", run.cluster_id)
        logging.shutdown()
    return status


def _wait_ready(address: str, num_nodes: int, procs: dict, stop_reason: list,
                keys: str | None) -> None:
    from .transport import Connection

    deadline = time.monotonic() + READY_TIMEOUT
    with Connection(address, connect_timeout=READY_TIMEOUT, keys=keys) as conn:
        while not stop_reason:
            dead = [name for name, p in procs.items() if not p.is_alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start (see the log)")
            info = conn.call("info", timeout=READY_TIMEOUT)
            if len(info["segments"]) == num_nodes:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(info['segments'])} of {num_nodes} nodes "
                                   f"registered in {READY_TIMEOUT} s")
            time.sleep(0.02)


def _run_until_stopped(procs: dict, stop_reason: list, watch_stdin: bool) -> int:
    coordinator = procs["coordinator"]
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
    log.info("stopping: %s", stop_reason[0])
    return 0


def _stop(procs: dict, endpoints: dict) -> None:
    coordinator = procs.get("coordinator")
    if coordinator is not None and coordinator.is_alive():
        os.kill(coordinator.pid, signal.SIGTERM)  # it writes back and tells the nodes to exit
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
                     data_path=args.data_path)


if __name__ == "__main__":
    raise SystemExit(main())
