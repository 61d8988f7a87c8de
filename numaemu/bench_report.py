"""How ``numaemu bench`` prints what it measured.

Text: one table per benchmark, every figure beside its baseline (measured in the same
run) and their ratio, emulated / baseline: a slowdown for times, a fraction for
throughputs.  Where a benchmark measured the ratio per repetition, the table shows the
median of those ratios rather than the ratio of the medians.  A figure with a target says
whether it met it.

JSON (``--json``): JSON lines, one object per benchmark, each with a ``"bench"`` key
naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A figure's goal: ``op`` ("<=" or ">=") ``bound``, on its value or its ratio."""

    op: str
    bound: float
    on: str = "value"  # or "ratio"
    unit: str = ""

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or not math.isfinite(x):
            return None
        return x <= self.bound if self.op == "<=" else x >= self.bound

    def __str__(self) -> str:
        unit = "x" if self.on == "ratio" else f" {self.unit}" if self.unit else ""
        return f"{self.op} {self.bound:g}{unit}"


@dataclass(frozen=True)
class Line:
    """One row: ``label``, the figure ``key``, its baseline's key, and the key of a
    per-repetition ratio (else the ratio is figure / baseline)."""

    label: str
    key: str
    base: str | None
    ratio: str | None = None
    target: Target | None = None


def table(title: str, figures: dict, lines: list[Line]) -> str:
    """``title``, then one row per line whose figure was measured."""
    out = [title, f"  {'':<30} {'emulated':>12} {'baseline':>12} {'ratio':>9}   target"]
    for line in lines:
        if line.key not in figures:
            continue
        value = figures[line.key]
        base = figures.get(line.base) if line.base else None
        if line.ratio and line.ratio in figures:
            ratio = figures[line.ratio]
        elif base:
            ratio = value / base
        else:
            ratio = None
        note = ""
        if line.target is not None:
            met = line.target.met(value, ratio)
            note = f"{line.target} ({'met' if met else 'missed'})" if met is not None else ""
        out.append(f"  {line.label:<30} {_num(value):>12} {_num(base):>12} "
                   f"{'-' if ratio is None else f'{ratio:.3g}x':>9}   {note}".rstrip())
    return "\n".join(out) + "\n"


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.0f}"


def startup_text(f: dict) -> str:
    return table(f"[startup] a {f['nodes']}-node cluster, {f['frames_per_node']} frames a node; "
                 "baseline: one Python process importing numpy, zmq, msgpack", f, [
                     Line("start (s)", "start_s", "python_start_s"),
                     Line("stop (s)", "stop_s", "python_stop_s")])


#: Issue 9's targets for first-touch faults, by batch size (us per page).
FAULT_TARGETS = {256: Target("<=", 2.0, unit="us"), 4096: Target("<=", 1.5, unit="us")}


def fault_text(f: dict) -> str:
    lines = [Line("1 page (us)", "single_page_us", "single_page_raw_us")]
    for key in f:
        m = re.fullmatch(r"batch_(\d+)_us_per_page", key)
        if m:
            b = int(m.group(1))
            lines.append(Line(f"batch of {b} (us/page)", key, f"batch_{b}_raw_us_per_page",
                              target=FAULT_TARGETS.get(b)))
    return table("[fault] first-touch faults; baseline: the same first write into fresh "
                 "anonymous memory of this process", f, lines)


def access_text(f: dict) -> str:
    return table("[access] TLB hits through task.read/write; baseline: numpy on the same "
                 "frames", f, [
                     Line("read 8 B (ns)", "read8_ns", "read8_numpy_ns", "read8_slowdown",
                          Target("<=", 2.5, "ratio")),
                     Line("write 8 B (ns)", "write8_ns", "write8_numpy_ns", "write8_slowdown",
                          Target("<=", 2.5, "ratio")),
                     # 0.8 and 0.75 of a raw copy's speed: at most 1.25x and 1.33x its time.
                     Line("read 1 MiB (us)", "read1m_us", "read1m_numpy_us", "read1m_slowdown",
                          Target("<=", 1.25, "ratio")),
                     Line("write 1 MiB (us)", "write1m_us", "write1m_numpy_us",
                          "write1m_slowdown", Target("<=", 1.33, "ratio"))])


def migrate_text(f: dict) -> str:
    return table(f"[migrate] {f['pages']} pages node 0 -> 1, one mbind(MPOL_MF_MOVE), batch "
                 f"{f.get('batch', '?')}; baselines: numpy copy between the node segments, a "
                 "bare zmq round trip", f, [
                     Line("throughput (GB/s)", "gb_per_s", "memcpy_gb_per_s", "ratio",
                          Target(">=", 0.4, "ratio")),
                     Line("time (s)", "seconds", "memcpy_seconds"),
                     Line("one page, move_pages (ms)", "single_page_move_ms",
                          "zmq_round_trip_ms", target=Target("<=", 0.7, unit="ms"))])


def array_text(f: dict) -> str:
    where = "a view of the same frames" if f.get("contiguous") else \
        "the same frames through a page map"
    labels = {"gather": "gather a[idx] (ms)", "scatter": "scatter a[idx] = v (ms)",
              "update": "a[idx] += 1 (ms)", "asarray": "np.asarray(a) (ms)",
              "sum": "a.sum() (ms)"}
    return table(f"[array] {f['elements']} int64 in {f['pages']} pages, {f['indices']} random "
                 f"indices; baseline: numpy on {where}", f, [
                     Line(label, f"{op}_ms", f"{op}_numpy_ms", f"{op}_slowdown",
                          Target("<=", 4.0, "ratio") if op == "gather" else None)
                     for op, label in labels.items()])


def ping_text(f: dict) -> str:
    return table(f"[ping] request round trips, median of {f['count']} x {f['repeat']}; "
                 "baseline: bare zmq DEALER/ROUTER echo over ipc://", f, [
                     Line("ping (ms)", "ping_ms", "zmq_ms", "ping_slowdown",
                          Target("<=", 0.15, unit="ms")),
                     Line("ping, 99th percentile (ms)", "ping_p99_ms", "zmq_p99_ms"),
                     Line("task.get_mempolicy() (ms)", "syscall_ms", "zmq_ms",
                          "syscall_slowdown")])


def json_line(bench: str, figures: dict) -> str:
    """One benchmark's JSON line: ``{"bench": bench, ...figures}``."""
    return json.dumps({"bench": bench, **figures})


#: bench name -> its text renderer, for the benches whose module does not bring its own.
TEXT: dict[str, Callable[[dict], str]] = {
    "startup": startup_text, "fault": fault_text, "access": access_text,
    "migrate": migrate_text, "array": array_text, "ping": ping_text}
