"""A user-space placement daemon with pluggable policies (numad, or the seed's profiler tool).

The daemon is an ordinary client: a privileged task that, every interval, reads the
access profile NUMA hinting faults recorded since its last look (``Task.access_profile``
with ``reset``), asks a policy what to move, and moves it with ``move_pages`` and
``migrate_pages`` through the public API, as a real daemon would.  It turns on sampling
(``numaemu.numa_sampling``) if the kernel's own balancing is off, and puts the knob back
when it stops.

A policy is any object with ``decide(profile, topology, tasks) -> iterable of actions``:

* ``profile``: the window's rows (``numaemu.profile.PROFILE_FIELDS``: addr, pid, page_node,
  cpu_node, count, last_ns);
* ``topology``: the machine (``numaemu.Topology``);
* ``tasks``: ``{pid: {"cpu": .., "node": .., "cpuset": ..}}`` of the tasks now attached;
* actions: ``Move(pid, addrs, node)`` (these pages of that task to ``node``) and
  ``Migrate(pid, from_nodes, to_nodes)`` (all its pages on those nodes, relative placement).

The daemon rate-limits what it moves (``rate_limit_mbps``; actions are taken in the order
the policy gives them, the rest dropped for that window), logs every decision to the
cluster log, and never stops for a policy that raises (reported, the window skipped) or
a move that fails (a task that exited meanwhile, a full node: counted, logged).

Built-in policies (``POLICIES``): ``follow-accesses``, ``hot-local``, ``follow-task``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .constants import MoveFlag
from .errors import ClusterError, NumaError

log = logging.getLogger("numaemu.balance")


@dataclass(frozen=True)
class Move:
    """Move pages ``addrs`` of task ``pid`` to ``node``."""

    pid: int
    addrs: Sequence[int]
    node: int


@dataclass(frozen=True)
class Migrate:
    """Move every page of task ``pid`` on ``from_nodes`` to ``to_nodes`` (migrate_pages)."""

    pid: int
    from_nodes: tuple[int, ...]
    to_nodes: tuple[int, ...]


def _pages_by_best_node(profile: np.ndarray):
    """Per (pid, page): total accesses, and the accessing node with most of them, and the
    page's node.  Vectorised: one sort, no Python loop per page."""
    if len(profile) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.astype(np.uint64), empty, empty, empty, empty
    pid = profile["pid"].astype(np.int64)
    addr = profile["addr"]
    keys = np.stack([pid, addr.astype(np.int64)])
    uniq, inverse = np.unique(keys, axis=1, return_inverse=True)
    inverse = inverse.ravel()
    total = np.bincount(inverse, weights=profile["count"]).astype(np.int64)
    # The accessing node with most accesses, per page: sort by (page, count), take the last.
    order = np.lexsort((profile["count"], inverse))
    last = np.flatnonzero(np.diff(inverse[order], append=-1) != 0)
    best_row = order[last]
    best_node = profile["cpu_node"][best_row].astype(np.int64)
    best_count = profile["count"][best_row].astype(np.int64)
    page_node = profile["page_node"][best_row].astype(np.int64)
    return uniq[0], uniq[1].astype(np.uint64), total, best_node, best_count, page_node


def _moves(pids, addrs, nodes, order) -> list[Move]:
    """Moves grouped per (pid, node), in ``order`` (most accessed first)."""
    out: list[Move] = []
    pids, addrs, nodes = pids[order], addrs[order], nodes[order]
    for pid, node in dict.fromkeys(zip(pids.tolist(), nodes.tolist())):
        sel = (pids == pid) & (nodes == node)
        out.append(Move(pid, addrs[sel].tolist(), node))
    return out


@dataclass
class FollowAccesses:
    """Move a page to the node that accessed it most in the window, when that node made at
    least ``threshold`` accesses and ``share`` of them: one stray access moves nothing,
    which damps ping-pong between nodes that share a page."""

    threshold: int = 2
    share: float = 0.6
    name: str = "follow-accesses"

    def decide(self, profile, topology, tasks):
        pid, addr, total, best, count, where = _pages_by_best_node(profile)
        go = (best != where) & (count >= self.threshold) & (count >= self.share * total)
        go &= np.isin(pid, list(tasks))
        return _moves(pid[go], addr[go], best[go], np.argsort(-count[go], kind="stable"))


@dataclass
class HotLocal:
    """HeMem-style hot pages: each page's accesses accumulate as heat that cools by half
    every window (``cooling``); a page whose heat reaches ``hot`` goes to the node that
    accessed it most, cold pages stay.  Heat is kept across windows in numpy arrays keyed
    by (pid, page number)."""

    hot: float = 3.0
    cooling: float = 0.5
    name: str = "hot-local"
    _keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _heat: np.ndarray = field(default_factory=lambda: np.empty(0))

    def decide(self, profile, topology, tasks):
        pid, addr, total, best, count, where = _pages_by_best_node(profile)
        now = (pid << 36) | (addr // np.uint64(topology.page_size)).astype(np.int64)
        keys = np.concatenate((self._keys, now))
        heat = np.concatenate((self._heat * self.cooling, total.astype(float)))
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._heat = np.bincount(inverse.ravel(), weights=heat, minlength=len(self._keys))
        keep = np.isin(self._keys >> 36, list(tasks)) & (self._heat >= 0.05)
        self._keys, self._heat = self._keys[keep], self._heat[keep]  # exited tasks, cold pages
        page_heat = np.zeros(len(now))
        at = np.searchsorted(self._keys, now)
        found = at < len(self._keys)
        found[found] = self._keys[at[found]] == now[found]
        page_heat[found] = self._heat[at[found]]
        go = (page_heat >= self.hot) & (best != where) & np.isin(pid, list(tasks))
        return _moves(pid[go], addr[go], best[go], np.argsort(-page_heat[go], kind="stable"))


@dataclass
class FollowTask:
    """The seed's batch scheduler: when a task's CPU moves to another node, its pages move
    after it (every page on the other nodes, relative placement as migrate_pages keeps)."""

    name: str = "follow-task"
    _last: dict = field(default_factory=dict)

    def decide(self, profile, topology, tasks):
        actions = []
        for pid, info in tasks.items():
            node, before = info["node"], self._last.get(pid)
            self._last[pid] = node
            if before is not None and before != node:
                others = tuple(n for n in topology.nodes_with_memory if n != node)
                actions.append(Migrate(pid, others, (node,)))
        for pid in set(self._last) - set(tasks):
            del self._last[pid]
        return actions


POLICIES = {"follow-accesses": FollowAccesses, "hot-local": HotLocal, "follow-task": FollowTask}


def load_policy(spec: str):
    """A built-in policy by name, or ``module:Class`` (instantiated without arguments)."""
    if spec in POLICIES:
        return POLICIES[spec]()
    if ":" not in spec:
        raise ValueError(f"no policy {spec!r}: built-ins are {', '.join(POLICIES)}, or give "
                         "module:Class")
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


@dataclass
class Stats:
    """What a daemon run did."""

    windows: int = 0
    pages_moved: int = 0
    pages_failed: int = 0
    migrations: int = 0
    policy_errors: int = 0
    rate_limited: int = 0


def run(task, policy, *, interval_ms: int = 500, rate_limit_mbps: float | None = None,
        pid: int | None = None, duration: float | None = None, stop=None) -> Stats:
    """Run the daemon in ``task`` (a privileged task) until ``duration`` seconds have passed
    or ``stop()`` is true; return what it did.  ``pid``: balance that task only."""
    if isinstance(policy, str):
        policy = load_policy(policy)
    name = getattr(policy, "name", type(policy).__name__)
    stats = Stats()
    sampling_was = task.sysctl("numaemu.numa_sampling")
    if not task.sysctl("kernel.numa_balancing"):
        task.sysctl("numaemu.numa_sampling", 1)
    task.access_profile(pid, reset=True)  # the first window starts now
    end = None if duration is None else time.monotonic() + duration
    page_budget = None
    if rate_limit_mbps:
        page_budget = max(1, int(rate_limit_mbps * (1 << 20) * interval_ms / 1000
                                 / task.page_size))
    log.info("balance: policy %s, every %d ms%s", name, interval_ms,
             f", at most {rate_limit_mbps} MB/s" if rate_limit_mbps else "")
    try:
        while (end is None or time.monotonic() < end) and not (stop and stop()):
            time.sleep(interval_ms / 1000)
            stats.windows += 1
            try:
                profile = task.access_profile(pid, reset=True)
                tasks = {t["pid"]: {"cpu": t["cpu"], "node": task.topology.node_of_cpu(t["cpu"]),
                                    "cpuset": t.get("cpuset")}
                         for t in task.cluster_tasks()
                         if t["pid"] != task.pid and (pid is None or t["pid"] == pid)}
            except (NumaError, ClusterError) as exc:
                log.warning("balance: cannot read the profile: %s", exc)
                continue
            try:
                actions = list(policy.decide(profile, task.topology, tasks))
            except Exception:
                stats.policy_errors += 1
                log.exception("balance: policy %s raised; window %d skipped", name,
                              stats.windows)
                continue
            _act(task, actions, page_budget, stats)
    finally:
        task.sysctl("numaemu.numa_sampling", sampling_was)
        log.info("balance: policy %s stopped after %d windows: %d pages moved, %d failed, "
                 "%d migrations, %d policy errors", name, stats.windows, stats.pages_moved,
                 stats.pages_failed, stats.migrations, stats.policy_errors)
    return stats


def _act(task, actions: Iterable, budget: int | None, stats: Stats) -> None:
    """Carry out a window's actions within the page budget."""
    left = budget
    for action in actions:
        try:
            if isinstance(action, Move):
                addrs = list(action.addrs)
                if left is not None:
                    if left <= 0:
                        stats.rate_limited += len(addrs)
                        continue
                    stats.rate_limited += max(0, len(addrs) - left)
                    addrs = addrs[:left]
                    left -= len(addrs)
                if not addrs:
                    continue
                status = task.move_pages(addrs, [action.node] * len(addrs),
                                         MoveFlag.MOVE_ALL, pid=action.pid)
                moved = sum(1 for s in status if s == action.node)
                stats.pages_moved += moved
                stats.pages_failed += len(addrs) - moved
                log.info("balance: task %d: %d pages to node %d (%d moved)", action.pid,
                         len(addrs), action.node, moved)
            elif isinstance(action, Migrate):
                left_over = task.migrate_pages(action.pid, action.from_nodes, action.to_nodes)
                stats.migrations += 1
                stats.pages_failed += left_over
                log.info("balance: task %d: nodes %s -> %s (%d pages not moved)", action.pid,
                         list(action.from_nodes), list(action.to_nodes), left_over)
            else:
                log.warning("balance: ignoring %r (not a Move or a Migrate)", action)
        except NumaError as exc:  # the task exited, a node is full: the daemon goes on
            log.info("balance: %r failed: %s", action, exc)
            stats.pages_failed += len(getattr(action, "addrs", ()))
