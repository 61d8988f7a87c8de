"""``numaemu bench placement``: one misplaced workload under each placement policy.

The workload, in two client processes on a 2-node machine: task A on node 0's CPUs and
task B on node 1's, each reading its own pages at random, and every page starts on the
*other* node.  Halfway, task A is moved to node 1's CPUs with ``sched_setaffinity`` (the
seed's batch scheduler), so its memory is remote again.  The same workload runs under:

* ``none``: nothing moves anything;
* ``kernel``: ``kernel.numa_balancing = 1`` (hinting faults; misplaced pages and tasks move);
* each built-in user-space policy of ``numaemu balance`` (``follow-accesses``,
  ``hot-local``, ``follow-task``), as a daemon in its own client process;
* ``all-local``: the pages start where their task runs (the target to come close to).

Reported per policy: the share of local accesses over time (and a PNG plot of it, one
line per policy), the mean virtual ns per access over the last quarter of the run (after
convergence), pages migrated, and how long each phase took to reach 90 % local accesses.
The figures are the latency model's (virtual time), so they do not depend on how busy
the machine is; wall-clock time only sets how many accesses fit in a run.
"""

from __future__ import annotations

import random
import time

import numpy as np

from .cluster import Cluster
from .topology import Topology

POLICIES = ("none", "kernel", "follow-accesses", "hot-local", "follow-task", "all-local")
#: A lab's scanner: at once, every 100-400 ms, 1 MiB a scan (Linux's defaults, 1 s to 60 s
#: and 256 MiB, are for hours-long jobs: a well-placed workload would hardly be scanned
#: again within a run, so a phase change would go unseen).
SCAN = {"kernel.numa_balancing_scan_delay_ms": 0,
        "kernel.numa_balancing_scan_period_min_ms": 100,
        "kernel.numa_balancing_scan_period_max_ms": 400,
        "kernel.numa_balancing_scan_size_mb": 1}
SAMPLE = 0.1  # seconds between samples of a task's counters
CONVERGED = 0.9


def _workload(task, pages: int, node: int, seconds: float, move_to: list[int] | None):
    """Read random pages of a mapping placed on ``node``; halfway move to ``move_to`` CPUs.
    Returns samples (t, local accesses, all accesses, access ns) at SAMPLE intervals."""
    from numaemu import MPOL_BIND

    m = task.mmap(pages * task.page_size)
    task.mbind(m.addr, m.length, MPOL_BIND, [node])
    task.write(m.addr, b"w" * m.length)
    task.mbind(m.addr, m.length, 0, [])  # placed; the policy goes
    rng = random.Random(task.pid)
    order = [m.page(rng.randrange(pages)) for _ in range(4096)]
    read = task.read
    samples = []
    start = time.monotonic()
    last = task.stats()
    next_sample, moved = start + SAMPLE, move_to is None
    while True:
        for addr in order[:256]:
            read(addr, 8)
        rng.shuffle(order)
        now = time.monotonic()
        if now >= next_sample:
            s = task.stats()
            local = s["local_accesses"] - last["local_accesses"]
            total = local + s["remote_accesses"] - last["remote_accesses"]
            samples.append((now - start, local, total, s["access_ns"] - last["access_ns"]))
            last, next_sample = s, now + SAMPLE
            if not moved and now - start >= seconds / 2:
                task.sched_setaffinity(move_to)
                moved = True
            if now - start >= seconds:
                return samples


def _daemon(task, policy: str, seconds: float):
    from . import balance

    stats = balance.run(task, policy, interval_ms=200, duration=seconds)
    return stats.pages_moved


def run_policy(policy: str, seconds: float, pages: int) -> dict:
    """One run of the workload under ``policy`` on a fresh machine."""
    topo = Topology.symmetric(nodes=2, frames_per_node=max(4096, 4 * pages), cpus_per_node=2)
    with Cluster(topo) as cluster:
        for name, value in SCAN.items():
            cluster.sysctl(name, value)
        if policy == "kernel":
            cluster.sysctl("kernel.numa_balancing", 1)
        wrong = policy != "all-local"
        a = cluster.spawn(_workload, pages, 1 if wrong else 0, seconds,
                          [2, 3] if policy != "all-local" else None, cpu=0)
        b = cluster.spawn(_workload, pages, 0 if wrong else 1, seconds, None, cpu=2)
        daemon = None
        if policy not in ("none", "kernel", "all-local"):
            daemon = cluster.spawn(_daemon, policy, seconds + 0.5, privileged=True)
        series = [a.join(seconds * 4 + 30), b.join(seconds * 4 + 30)]
        if daemon is not None:
            daemon.join(60)
        migrated = cluster.vmstat()["pgmigrate_success"]
    return summarize(policy, series, seconds, migrated)


def summarize(policy: str, series: list, seconds: float, migrated: int) -> dict:
    """Local share over time (SAMPLE bins), convergence times, late latency.

    Each task's counters are accumulated and interpolated onto one time grid (its samples
    fall at other moments than the other task's), and the tasks count equally: a task
    that the machine happens to run faster must not hide a misplaced one."""
    bins = int(seconds / SAMPLE) + 1
    edges = np.arange(bins + 1) * SAMPLE
    times = edges[1:]
    late = times > seconds * 0.75
    shares, late_share, late_ns = [], [], []
    for samples in series:
        t = np.array([0.0] + [s[0] for s in samples])
        local, total, ns = (np.diff(np.interp(edges, t, np.concatenate(
            ([0.0], np.cumsum([s[c] for s in samples]))))) for c in (1, 2, 3))
        shares.append(np.divide(local, total, out=np.zeros(bins), where=total > 0))
        late_share.append(local[late].sum() / max(1.0, total[late].sum()))
        late_ns.append(ns[late].sum() / max(1.0, total[late].sum()))
    share = np.mean(shares, axis=0)
    half = seconds / 2

    def converge(lo: float, hi: float) -> float | None:
        """Seconds from ``lo`` until the share is back at CONVERGED after its dip (0.0: it
        never dipped; None: it never got there)."""
        phase = (times > lo) & (times <= hi)
        dip = np.flatnonzero(phase & (share < CONVERGED))
        if len(dip) == 0:
            return 0.0
        sel = np.flatnonzero(phase & (times > times[dip[0]]) & (share >= CONVERGED))
        return None if len(sel) == 0 else round(float(times[sel[0]] - lo), 2)

    return {"policy": policy, "times": times.round(2).tolist(),
            "local_share": share.round(4).tolist(),
            "late_local_share": float(np.mean(late_share)),
            "late_ns_per_access": float(np.mean(late_ns)),
            "converge_phase1_s": converge(0, half), "converge_phase2_s": converge(half, seconds),
            "pages_migrated": migrated}


def bench_placement(seconds: float = 6.0, pages: int = 256, policies=POLICIES) -> dict:
    results = {p: run_policy(p, seconds, pages) for p in policies}
    base = results.get("all-local", {}).get("late_ns_per_access")
    for r in results.values():
        r["vs_all_local"] = round(r["late_ns_per_access"] / base, 3) if base else None
    return results


def placement_text(results: dict) -> str:
    lines = [f"{'policy':<16} {'late local':>10} {'ns/access':>10} {'x all-local':>11} "
             f"{'conv. 1 (s)':>11} {'conv. 2 (s)':>11} {'migrated':>9}"]
    for r in results.values():
        conv = [("-" if r[k] is None else f"{r[k]:.1f}") for k in ("converge_phase1_s",
                                                                   "converge_phase2_s")]
        lines.append(f"{r['policy']:<16} {100 * r['late_local_share']:>9.1f}% "
                     f"{r['late_ns_per_access']:>10.1f} {r['vs_all_local'] or 0:>11.3f} "
                     f"{conv[0]:>11} {conv[1]:>11} {r['pages_migrated']:>9}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results.values():
        ax.plot(r["times"], [100 * s for s in r["local_share"]], label=r["policy"])
    half = max(r["times"][-1] for r in results.values()) / 2
    ax.axvline(half, color="grey", linestyle="--", linewidth=1)
    ax.text(half, 3, " task A moved to node 1", color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("local accesses (%)")
    ax.set_ylim(0, 105)
    ax.set_title("A misplaced workload under each placement policy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

