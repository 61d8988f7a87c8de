"""The ``numaemu`` command line: numactl's tools for an emulated cluster.

Commands that act on a running cluster find it through ``--address``, then
``$NUMAEMU_ADDRESS``, then the only cluster of this user that is running.
Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import ClusterError, NumaError
from .keys import KEYS_ENV
from .topology import Topology, TopologyError


def _topology_from_args(args) -> Topology:
    if args.topology:
        return Topology.load(args.topology)
    default = Topology.default()
    if args.distance:
        # Flags not given take the built-in cluster's per-node values, as with --nodes.
        return Topology(Topology.parse_distances(args.distance),
                        frames_per_node=args.frames_per_node or default.frames_per_node[0],
                        cpus_per_node=args.cpus_per_node if args.cpus_per_node is not None
                        else 2)
    if args.nodes is None and args.frames_per_node is None and args.cpus_per_node is None:
        return default
    return Topology.symmetric(
        nodes=args.nodes or default.num_nodes,
        frames_per_node=args.frames_per_node or default.frames_per_node[0],
        cpus_per_node=args.cpus_per_node if args.cpus_per_node is not None else 2)


def _add_topology_args(p: argparse.ArgumentParser) -> None:
    """The machine to build, as ``numaemu up`` and ``numaemu bench latency`` take it."""
    p.add_argument("--nodes", type=int)
    p.add_argument("--frames-per-node", type=int)
    p.add_argument("--cpus-per-node", type=int)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--distance", help='distance matrix, rows split by ";": "10,21;21,10"')
    g.add_argument("--topology", help="a topology file (.toml or .json)")


def resolve_address(explicit: str | None = None) -> str:
    """The cluster to talk to: explicit, $NUMAEMU_ADDRESS, or the only one running."""
    if explicit:
        return explicit
    env = os.environ.get("NUMAEMU_ADDRESS")
    if env:
        return env
    from .rundir import live_clusters

    live = live_clusters()
    if len(live) == 1:
        if live[0].get("keys"):  # a tcp cluster of ours: its keys are in its run directory
            os.environ.setdefault(KEYS_ENV, live[0]["keys"])
        return live[0]["address"]
    if not live:
        raise ClusterError("no cluster is running (start one with `numaemu up --detach`)")
    addrs = ", ".join(c["address"] for c in live)
    raise ClusterError(f"several clusters are running ({addrs}); set NUMAEMU_ADDRESS")


def _call(args, op: str, **fields) -> dict:
    from .transport import Connection

    with Connection(resolve_address(args.address)) as conn:
        return conn.call(op, **fields)


# -- commands -------------------------------------------------------------------------


def cmd_up(args) -> int:
    topology = _topology_from_args(args)
    stray = [n for n in args.external_nodes if n >= topology.num_nodes]
    if stray:
        raise ClusterError(f"--external-nodes: the machine has no node {stray[0]} "
                           f"(nodes 0-{topology.num_nodes - 1})")
    if args.ray is not None and args.external_nodes:
        raise ClusterError("--external-nodes and --ray do not mix: Ray starts every node")
    if args.ray is not None:
        from .raylaunch import require_ray

        require_ray()  # says how to install it
    if args.detach:
        return _up_detached(args, topology)
    from .supervisor import supervise

    class _Announce:
        def write(self, line: str) -> None:
            ready = json.loads(line)
            if "waiting" in ready:
                print(_join_instructions(ready), flush=True)
            elif "address" in ready:
                print(f"numaemu cluster {ready['cluster_id']} up: {topology.num_nodes} nodes")
                print(f"address: {ready['address']}")
                print(f"log:     {ready['log']}")
                print(f"export NUMAEMU_ADDRESS={ready['address']}")
                if ready.get("keys"):
                    print(f"keys:    {ready['keys']} (tcp peers need them)")
                    print(f"export {KEYS_ENV}={ready['keys']}")
                if ready.get("ray"):
                    print(f"ray:     {ready['ray']['address']}")
                    for node, where in sorted(ready["ray"]["nodes"].items(), key=_by_int):
                        print(f"  node {node}: Ray node {where['node_id'][:12]} "
                              f"({where['ip']}, pid {where['pid']})")
                print("Ctrl-C stops it.", flush=True)

        def flush(self) -> None:
            sys.stdout.flush()

    return supervise(topology, log_level=args.log_level, listen=args.listen,
                     ready_out=_Announce(), inject_delays=args.inject_delays,
                     launcher="local" if args.ray is None else "ray",
                     ray_address=args.ray or None, external_nodes=args.external_nodes)


def _join_instructions(waiting: dict) -> str:
    """What to run where, for the nodes a cluster waits for (``up --external-nodes``)."""
    keys = f" --keys {waiting['keys']}" if waiting.get("keys") else ""
    lines = [f"numaemu cluster {waiting['cluster_id']} waits for node(s) "
             f"{', '.join(map(str, waiting['waiting']))} to join; on their hosts run:"]
    lines += [f"  numaemu --address {waiting['address']}{keys} node --node {n}"
              for n in waiting["waiting"]]
    if keys:
        lines.append(f"(copy {waiting['keys']} to those hosts first, kept private: it holds "
                     "the cluster's secret key)")
    return "\n".join(lines)


def _by_int(item: tuple) -> int:
    return int(item[0])


def _up_detached(args, topology: Topology) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "numaemu.supervisor", "--topology",
           json.dumps(topology.to_dict()), "--log-level", args.log_level, "--no-stderr"]
    if args.listen:
        cmd += ["--listen", args.listen]
    if args.inject_delays:
        cmd += ["--inject-delays", str(args.inject_delays)]
    if args.ray is not None:
        cmd += ["--launcher", "ray"] + (["--ray-address", args.ray] if args.ray else [])
    if args.external_nodes:
        cmd += ["--external-nodes", ",".join(map(str, args.external_nodes))]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    line = proc.stdout.readline()
    proc.stdout.close()
    try:
        ready = json.loads(line)
    except ValueError:
        ready = {"error": f"supervisor exited with {proc.wait()}"}
    if "error" in ready:
        print(f"numaemu up: {ready['error']}", file=sys.stderr)
        return 1
    if "waiting" in ready:
        print(_join_instructions(ready), file=sys.stderr)
    print(ready["address"])
    if ready.get("keys"):  # stdout stays the address alone, for $(numaemu up --detach)
        print(f"keys: {ready['keys']}; export {KEYS_ENV}={ready['keys']}", file=sys.stderr)
    return 0


def cmd_down(args) -> int:
    import signal
    import time

    from .rundir import pid_alive

    info = _call(args, "info")
    pid = info["supervisor_pid"]
    if not pid:
        print("numaemu down: that cluster has no supervisor to stop", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        print(f"numaemu down: supervisor {pid} did not stop", file=sys.stderr)
        return 1
    print(f"cluster {info['cluster_id']} stopped")
    return 0


def cmd_hardware(args) -> int:
    from .views import hardware_text

    info = _call(args, "info")
    stats = _call(args, "numastat")["nodes"]
    topo = Topology.from_dict(info["topology"])
    offline = [n for n in topo.nodes if stats[str(n)].get("offline")]
    print(hardware_text(topo, [stats[str(n)]["free"] for n in topo.nodes], offline), end="")
    return 0


def cmd_balance(args) -> int:
    """numaemu balance: run the placement daemon in a privileged task until Ctrl-C."""
    from . import balance
    from .task import Task

    try:
        policy = balance.load_policy(args.policy)
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"numaemu balance: {exc}", file=sys.stderr)
        return 2
    with Task(resolve_address(args.address), privileged=True, command="numaemu-balance") as task:
        stats = balance.run(task, policy, interval_ms=args.interval_ms,
                            rate_limit_mbps=args.rate_limit_mbps, pid=args.pid,
                            duration=args.duration)
    print(f"{stats.windows} windows: {stats.pages_moved} pages moved, {stats.pages_failed} "
          f"failed, {stats.migrations} migrations, {stats.policy_errors} policy errors")
    return 0


def cmd_sysctl(args) -> int:
    value = _call(args, "sysctl", name=args.name, value=args.value)["value"]
    print(f"{args.name} = {value}")
    return 0


def cmd_vmstat(args) -> int:
    for name, value in _call(args, "numastat")["vmstat"].items():
        print(f"{name} {value}")
    return 0


def cmd_profile(args) -> int:
    """numaemu profile [PID] [--seconds S] [--json | --csv FILE]."""
    import time

    from .profile import profile_array

    if args.seconds is not None:
        _call(args, "access_profile", pid=args.pid, reset=True)
        time.sleep(args.seconds)
    rows = profile_array(_call(args, "access_profile", pid=args.pid))
    names = rows.dtype.names
    if args.json:
        print(json.dumps([dict(zip(names, (int(v) for v in row))) for row in rows]))
    elif args.csv:
        with open(args.csv, "w") as f:
            f.write(",".join(names) + "\n")
            for row in rows:
                f.write(",".join(str(int(v)) for v in row) + "\n")
    else:
        print(f"{'PID':>8} {'ADDRESS':>14} {'PAGE':>4} {'CPU':>4} {'COUNT':>7}")
        for row in rows[np.argsort(-rows["count"], kind="stable")]:
            print(f"{row['pid']:>8} {int(row['addr']):>14x} N{row['page_node']:<3} "
                  f"N{row['cpu_node']:<3} {row['count']:>7}")
        local = rows["count"][rows["page_node"] == rows["cpu_node"]].sum()
        total = rows["count"].sum()
        print(f"{len(rows)} rows, {total} hinting faults, "
              f"{100 * local / total if total else 0:.0f}% local")
    return 0


def cmd_numastat(args) -> int:
    from .views import numastat_from_numa_maps, numastat_process_text, numastat_text

    if args.p is None:
        stats = _call(args, "numastat")["nodes"]
        print(numastat_text({int(n): s["numastat"] for n, s in stats.items()}), end="")
        return 0
    info = _call(args, "info")
    topo = Topology.from_dict(info["topology"])
    reply = _call(args, "numa_maps", pid=args.p)
    pages = numastat_from_numa_maps(reply["text"])
    print(numastat_process_text(args.p, reply["command"], pages, topo.nodes, topo.page_size),
          end="")
    return 0


def cmd_numa_maps(args) -> int:
    print(_call(args, "numa_maps", pid=args.pid)["text"], end="")
    return 0


def cmd_tasks(args) -> int:
    tasks = _call(args, "tasks")["tasks"]
    print(f"{'PID':>8} {'CPU':>4} {'OS PID':>8}  COMMAND")
    for t in sorted(tasks, key=lambda t: t["pid"]):
        print(f"{t['pid']:>8} {t['cpu']:>4} {t['os_pid']:>8}  {t['command']}")
    return 0


def cmd_run(args) -> int:
    from .constants import Mode
    from .nodelist import parse_cpus, parse_nodes

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("numaemu run: no command given", file=sys.stderr)
        return 2
    address = resolve_address(args.address)
    info = _call(args, "info")
    topo = Topology.from_dict(info["topology"])
    policies = [p for p in ("membind", "interleave", "preferred", "localalloc",
                            "weighted_interleave", "preferred_many") if getattr(args, p)]
    if len(policies) > 1:
        print("numaemu run: Conflicting policies", file=sys.stderr)
        return 1
    run: dict = {}
    try:
        if args.cpunodebind:
            nodes = parse_nodes(args.cpunodebind, topo.nodes)
            run["cpus"] = sorted(c for n in nodes for c in topo.cpus_of(n))
            if not run["cpus"]:
                raise ValueError(f"{args.cpunodebind} is invalid: those nodes have no CPUs")
        elif args.physcpubind:
            run["cpus"] = list(parse_cpus(args.physcpubind, topo.cpus))
        if args.membind:
            run.update(mode=int(Mode.BIND), nodes=list(parse_nodes(args.membind, topo.nodes)))
        elif args.interleave:
            run.update(mode=int(Mode.INTERLEAVE),
                       nodes=list(parse_nodes(args.interleave, topo.nodes)))
        elif args.weighted_interleave:
            run.update(mode=int(Mode.WEIGHTED_INTERLEAVE),
                       nodes=list(parse_nodes(args.weighted_interleave, topo.nodes)))
        elif args.preferred_many:
            run.update(mode=int(Mode.PREFERRED_MANY),
                       nodes=list(parse_nodes(args.preferred_many, topo.nodes)))
        elif args.preferred is not None:
            nodes = parse_nodes(args.preferred, topo.nodes)
            if len(nodes) != 1:
                raise ValueError(f"{args.preferred} is invalid: --preferred takes one node")
            run.update(mode=int(Mode.PREFERRED), nodes=list(nodes))
        elif args.localalloc:
            run.update(mode=int(Mode.LOCAL), nodes=[])
        if args.cpuset:
            names = [c["name"] for c in _call(args, "cpusets")["cpusets"]]
            if args.cpuset not in names:
                raise ValueError(f"no cpuset {args.cpuset!r} (have: {', '.join(names)})")
            run["cpuset"] = args.cpuset
    except ValueError as exc:
        print(f"numaemu run: {exc}", file=sys.stderr)
        return 1
    env = dict(os.environ, NUMAEMU_ADDRESS=address, NUMAEMU_RUN=json.dumps(run))
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"numaemu run: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def cmd_cpuset(args) -> int:
    """numaemu cpuset create|set|attach|list|remove."""
    from .nodelist import format_nodes, parse_cpus, parse_nodes

    topo = Topology.from_dict(_call(args, "info")["topology"])
    try:
        cpus = parse_cpus(args.cpus, topo.cpus) if getattr(args, "cpus", None) else None
        mems = parse_nodes(args.mems, topo.nodes) if getattr(args, "mems", None) else None
    except ValueError as exc:
        print(f"numaemu cpuset: {exc}", file=sys.stderr)
        return 1
    if args.action == "create":
        _call(args, "cpuset_create", name=args.name, cpus=list(cpus), mems=list(mems),
              memory_migrate=args.memory_migrate)
    elif args.action == "set":
        migrate = None if args.memory_migrate is None else bool(args.memory_migrate)
        reply = _call(args, "cpuset_update", name=args.name,
                      cpus=None if cpus is None else list(cpus),
                      mems=None if mems is None else list(mems), memory_migrate=migrate)
        if reply["not_migrated"]:
            print(f"{reply['not_migrated']} pages could not be moved", file=sys.stderr)
    elif args.action == "attach":
        reply = _call(args, "cpuset_attach", name=args.name, target=args.pid)
        if reply["not_migrated"]:
            print(f"{reply['not_migrated']} pages could not be moved", file=sys.stderr)
    elif args.action == "remove":
        _call(args, "cpuset_remove", name=args.name)
    else:
        print(f"{'NAME':<16} {'CPUS':<10} {'MEMS':<8} {'MIGRATE':<8} TASKS")
        for cs in _call(args, "cpusets")["cpusets"]:
            print(f"{cs['name']:<16} {format_nodes(cs['cpus']) or '-':<10} "
                  f"{format_nodes(cs['mems']) or '-':<8} {int(cs['memory_migrate']):<8} "
                  f"{' '.join(map(str, cs['tasks'])) or '-'}")
    return 0


def cmd_migratepages(args) -> int:
    """numactl's migratepages: move a task's pages from some nodes to others."""
    from .nodelist import parse_nodes
    from .task import Task

    address = resolve_address(args.address)
    info = _call(args, "info")
    topo = Topology.from_dict(info["topology"])
    try:
        old = parse_nodes(args.from_nodes, topo.nodes)
        new = parse_nodes(args.to_nodes, topo.nodes)
    except ValueError as exc:
        print(f"numaemu migratepages: {exc}", file=sys.stderr)
        return 1
    # Like migratepages run by root: the caller has CAP_SYS_NICE, so shared pages move too.
    with Task(address, privileged=True, command="migratepages") as task:
        task.migrate_pages(args.pid, old, new)  # a positive count is ignored, as numactl does
    return 0


def cmd_node(args) -> int:
    from nodes.main import main as node_main

    argv = ["--coordinator", resolve_address(args.address), "--node", str(args.node),
            "--log-level", args.log_level]
    if args.data_endpoint:
        argv += ["--data-endpoint", args.data_endpoint]
    return node_main(argv)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, plot=args.plot or None)


def cmd_bench(args) -> int:
    from .bench import run_bench

    topology = _topology_from_args(args) if args.what in ("latency", "all") else None
    return run_bench(args.what, json_out=args.json, pages=args.pages, repeat=args.repeat,
                     batch=args.batch, topology=topology, dilation=args.dilation,
                     steps=args.steps, seconds=args.seconds, plot=args.plot,
                     cycles=args.cycles, transport=args.transport)


# -- parser ------------------------------------------------------------------------------


def _positive(kind: type):
    """An argparse type: ``kind`` values above zero."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _node_list(text: str) -> list[int]:
    """An argparse type: comma-separated node ids."""
    try:
        nodes = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of node ids: {text}") from None
    if any(n < 0 for n in nodes):
        raise argparse.ArgumentTypeError(f"node ids are not negative: {text}")
    return nodes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numaemu", description="An emulated NUMA machine "
                                     "made of real processes.")
    parser.add_argument("--address", help="the cluster to use (default: $NUMAEMU_ADDRESS, or "
                        "the only one running)")
    parser.add_argument("--keys", help="a tcp cluster's CURVE key directory (default: "
                        f"${KEYS_ENV}; `numaemu up --listen` prints it)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="start the built-in cluster and show placement at work")
    p.add_argument("--quick", action="store_true", help="fewer pages, shorter phases")
    p.add_argument("--plot", default="numaemu-demo.png",
                   help="where to write the latency plot (PNG); empty: no plot")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("up", help="start a cluster (foreground until Ctrl-C, or --detach)")
    _add_topology_args(p)
    p.add_argument("--detach", action="store_true", help="run in the background; print the "
                   "address")
    p.add_argument("--listen", help="tcp://HOST:PORT to serve on tcp (4 consecutive ports and "
                   "node data ports) instead of ipc")
    p.add_argument("--inject-delays", type=float, metavar="DILATION", default=None,
                   help="tasks busy-wait each access's modeled latency x DILATION")
    p.add_argument("--external-nodes", type=_node_list, default=[], metavar="LIST",
                   help="nodes that join from other hosts (numaemu node), e.g. 2,3: the "
                   "cluster waits for them; use with --listen")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="place the coordinator and nodes on a Ray cluster (default: "
                   "$RAY_ADDRESS or the one on this host); needs pip install -e '.[ray]'")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop a cluster")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("hardware", help="like numactl --hardware")
    p.set_defaults(func=cmd_hardware)

    p = sub.add_parser("numastat", help="per-node allocation counters, like numastat")
    p.add_argument("-p", type=int, metavar="PID", help="per-node memory of one task")
    p.set_defaults(func=cmd_numastat)

    p = sub.add_parser("numa-maps", help="/proc/PID/numa_maps of a task")
    p.add_argument("pid", type=int)
    p.set_defaults(func=cmd_numa_maps)

    p = sub.add_parser("tasks", help="list the tasks attached to the cluster")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("sysctl", help="read or set a tunable (kernel.numa_balancing, ...)")
    p.add_argument("name")
    p.add_argument("value", nargs="?", type=int)
    p.set_defaults(func=cmd_sysctl)

    p = sub.add_parser("vmstat", help="migration and NUMA balancing counters, as /proc/vmstat")
    p.set_defaults(func=cmd_vmstat)

    p = sub.add_parser("balance", help="a user-space placement daemon (numad-like) with a "
                       "pluggable policy")
    p.add_argument("--policy", default="follow-accesses",
                   help="follow-accesses, hot-local, follow-task, or module:Class")
    p.add_argument("--interval-ms", type=int, default=500)
    p.add_argument("--rate-limit-mbps", type=float, default=None)
    p.add_argument("--pid", type=int, default=None, help="balance this task only")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser("profile", help="the access profile NUMA hinting faults recorded")
    p.add_argument("pid", nargs="?", type=int)
    p.add_argument("--seconds", type=float, default=None,
                   help="forget what was recorded, wait this long, then report")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--csv", metavar="FILE")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("run", help="run COMMAND with a CPU binding and memory policy, like "
                       "numactl; its numaemu.attach() gets them")
    p.add_argument("--cpunodebind", "-N")
    p.add_argument("--physcpubind", "-C")
    p.add_argument("--membind", "-m")
    p.add_argument("--interleave", "-i")
    p.add_argument("--weighted-interleave", "-w", dest="weighted_interleave")
    p.add_argument("--preferred", "-p")
    p.add_argument("--preferred-many", "-P", dest="preferred_many")
    p.add_argument("--localalloc", "-l", action="store_true")
    p.add_argument("--cpuset", help="start the task in this cpuset (numaemu cpuset create)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("cpuset", help="cpusets (cgroup v1): confine tasks' CPUs and nodes")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("create", help="create a cpuset")
    c.add_argument("name")
    c.add_argument("--cpus", required=True, help="CPU list, e.g. 2-3")
    c.add_argument("--mems", required=True, help="node list in numactl's syntax, e.g. 1")
    c.add_argument("--memory-migrate", action="store_true",
                   help="tasks' pages follow the cpuset's nodes")
    c = csub.add_parser("set", help="change a cpuset's CPUs, nodes or memory_migrate")
    c.add_argument("name")
    c.add_argument("--cpus")
    c.add_argument("--mems")
    c.add_argument("--memory-migrate", type=int, choices=(0, 1))
    c = csub.add_parser("attach", help="move a task into a cpuset")
    c.add_argument("name")
    c.add_argument("pid", type=int)
    csub.add_parser("list", help="every cpuset, its CPUs, nodes and tasks")
    c = csub.add_parser("remove", help="remove an empty cpuset")
    c.add_argument("name")
    p.set_defaults(func=cmd_cpuset)

    p = sub.add_parser("migratepages", help="move a task's pages between nodes, like "
                       "numactl's migratepages")
    p.add_argument("pid", type=int)
    p.add_argument("from_nodes", metavar="FROM-NODES")
    p.add_argument("to_nodes", metavar="TO-NODES")
    p.set_defaults(func=cmd_migratepages)

    p = sub.add_parser("node", help="join a cluster as one node (e.g. from another host)")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--data-endpoint")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("bench", help="measure the emulator against same-run baselines",
                       description="Every figure is printed beside a baseline measured in "
                       "the same run; --json prints one JSON object per benchmark, one a line.")
    p.add_argument("what", choices=["startup", "fault", "access", "migrate", "latency",
                                    "placement", "array", "scale", "ping", "remote", "memory",
                                    "all"],
                   help="all: startup, fault, access, migrate, latency, array and ping")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="placement: seconds per policy run (default 6)")
    p.add_argument("--plot", default=None,
                   help="placement, scale: where to write the plot (PNG; default "
                   "numaemu-placement.png, numaemu-scale.png); empty: none")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pages", type=_positive(int), default=None,
                   help="the size: pages to move (migrate: default 16384 = 64 MiB); pages per "
                   "buffer (latency: 256); largest fault batch (fault: 4096); pages of the "
                   "array (array: 2048 = 1M int64); largest size of both sweeps (scale: "
                   "262144 = 1 GiB); pages to touch (memory: 1048576 = 4 GiB)")
    p.add_argument("--repeat", type=_positive(int), default=5)
    p.add_argument("--batch", type=int, default=None,
                   help="migration batch size (default: the cluster's, 4096)")
    p.add_argument("--dilation", type=_positive(float), default=None,
                   help="latency: wall-clock ns injected per modeled ns (default 50)")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="latency: timed dependent reads per cell and run (default 20000); "
                   "ping: round trips per run (default 2000); remote: 4 KiB reads per run "
                   "(default 1000)")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                   help="remote: the link, for the cluster and the bare baseline alike "
                   "(tcp: loopback, CURVE-authenticated and encrypted as every tcp endpoint)")
    p.add_argument("--cycles", type=_positive(int), default=None,
                   help="memory: rounds of mmap/touch/munmap in the client (default 10)")
    # The latency bench's machine, given as to `numaemu up` (default: the built-in cluster).
    _add_topology_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numaemu`` console script."""
    args = build_parser().parse_args(argv)
    if args.keys:  # every connection this command (and what it runs) makes uses them
        os.environ[KEYS_ENV] = os.path.abspath(args.keys)
    try:
        return args.func(args) or 0
    except NumaError as exc:
        print(f"numaemu {args.cmd}: {exc.strerror} ({exc.errname})", file=sys.stderr)
        return 1
    except (ClusterError, TopologyError, OSError) as exc:
        print(f"numaemu {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
