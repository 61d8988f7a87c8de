"""Text in the shapes Linux tools print: ``numactl --hardware``, ``numastat``,
``numastat -p`` and ``/proc/<pid>/numa_maps``.

Formatting only: callers pass in the numbers (from the coordinator, or parsed
from another view), and get back the text a script written for the real tools
can parse. Every function returns whole lines ending in ``\\n`` except
:func:`numa_maps_line`, which returns one line without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from .nodelist import format_nodes
from .topology import Topology

__all__ = [
    "NUMASTAT_COUNTERS",
    "PROCESS_CATEGORIES",
    "escape_path",
    "hardware_text",
    "numa_maps_line",
    "numastat_from_numa_maps",
    "numastat_process_text",
    "numastat_text",
]

#: The per-node counters, in the order ``/sys/devices/system/node/nodeN/numastat`` lists them.
NUMASTAT_COUNTERS = (
    "numa_hit",
    "numa_miss",
    "numa_foreign",
    "interleave_hit",
    "local_node",
    "other_node",
)

#: ``numastat -p`` row categories (keys of :func:`numastat_from_numa_maps`), in row order.
PROCESS_CATEGORIES = ("huge", "heap", "stack", "private")

_MIB = 1 << 20
_COL = 16  # numastat's data column width (and its minimum label width)
_NO_PAGES: Mapping[int, int] = MappingProxyType({})
# Characters the kernel escapes in numa_maps' file= path (seq_file_path's escape set).
_PATH_ESCAPES = "\n\t= "
_NODE_COUNT = re.compile(r"N([0-9]+)=([0-9]+)")


def hardware_text(topology: Topology, free_frames: Sequence[int],
                  offline: Sequence[int] = ()) -> str:
    """``numactl --hardware`` for ``topology`` with ``free_frames[n]`` free frames on node n.

    Nodes in ``offline`` (they failed) show no memory, as after a memory hot-remove, and are
    named on a last line of their own."""
    nodes = topology.nodes
    if len(free_frames) != len(nodes):
        raise ValueError(f"free_frames has {len(free_frames)} entries for {len(nodes)} nodes")
    page_size = topology.page_size
    lines = [f"available: {len(nodes)} nodes ({format_nodes(nodes)})"]
    for node in nodes:
        cpus = "".join(f" {cpu}" for cpu in topology.cpus_of(node))
        lines.append(f"node {node} cpus:{cpus}")
        size = 0 if node in offline else topology.frames_per_node[node] * page_size
        lines.append(f"node {node} size: {size >> 20} MB")
        lines.append(f"node {node} free: {(int(free_frames[node]) * page_size) >> 20} MB")
    # numactl >= 2.0.19: 4-wide columns, a 6-wide row label, and a space after every entry.
    lines.append("node distances:")
    lines.append("node  " + "".join(f"{n:4d} " for n in nodes))
    for a in nodes:
        row = "".join(f"{d:4d} " for d in topology.distances[a])
        lines.append(f"{a:4d}: {row}")
    if offline:
        lines.append(f"offline (failed) nodes: {format_nodes(sorted(offline))}")
    return "\n".join(lines) + "\n"


def numastat_text(stats: Mapping[int, Mapping[str, int]]) -> str:
    """``numastat`` with no arguments: raw counters per node, one ``nodeN`` column each.

    A counter missing from a node's mapping prints as 0.
    """
    if not stats:
        raise ValueError("numastat needs at least one node")
    nodes = sorted(stats)
    lines = [" " * _COL + "".join(f"node{n}".rjust(_COL) for n in nodes)]
    for name in NUMASTAT_COUNTERS:
        cells = "".join(str(int(stats[n].get(name, 0))).rjust(_COL) for n in nodes)
        lines.append(name.ljust(_COL) + cells)
    return "\n".join(lines) + "\n"


def numastat_process_text(
    pid: int,
    command: str,
    pages_by_category: Mapping[str, Mapping[int, int]],
    nodes: Sequence[int],
    page_size: int,
    *,
    huge_page_size: int = 2 * _MIB,
) -> str:
    """``numastat -p PID``: MB per category (Huge, Heap, Stack, Private) and node, with totals.

    ``pages_by_category`` maps a category (case-insensitive, as returned by
    :func:`numastat_from_numa_maps`) to pages per node; Huge counts are in
    pages of ``huge_page_size``, the rest in pages of ``page_size``.
    """
    nodes = sorted(nodes)
    node_set = set(nodes)
    # Bytes per (category, node); exact integers until the final division.
    table = {c: dict.fromkeys(nodes, 0) for c in PROCESS_CATEGORIES}
    for category, per_node in pages_by_category.items():
        key = category.lower()
        if key not in table:
            raise ValueError(
                f"unknown numastat category {category!r} (known: {', '.join(PROCESS_CATEGORIES)})"
            )
        unit = huge_page_size if key == "huge" else page_size
        for node, pages in per_node.items():
            if node not in node_set:
                raise ValueError(f"pages counted on node {node}, which is not among {nodes}")
            table[key][node] += int(pages) * unit

    labels = [c.capitalize() for c in PROCESS_CATEGORIES] + ["Total"]
    # numastat widens its label column to fit the labels, plus a one-space gutter.
    label_w = min(max(_COL, *map(len, labels)) + 1, 24)
    headers = [f"Node {n}" for n in nodes] + ["Total"]
    rule = (" " + "-" * (_COL - 1)) * len(headers)

    def row(label: str, values: list[int]) -> str:
        cells = [*values, sum(values)]
        return label.ljust(label_w) + "".join(f"{b / _MIB:.2f}".rjust(_COL) for b in cells)

    lines = [
        "",
        f"Per-node process memory usage (in MBs) for PID {pid} ({command})",
        " " * label_w + "".join(h.rjust(_COL) for h in headers),
        " " * label_w + rule,
    ]
    for category in PROCESS_CATEGORIES:
        lines.append(row(category.capitalize(), [table[category][n] for n in nodes]))
    lines.append(("-" * (label_w - 1)).ljust(label_w) + rule)
    lines.append(row("Total", [sum(table[c][n] for c in PROCESS_CATEGORIES) for n in nodes]))
    return "\n".join(lines) + "\n"


def numa_maps_line(
    start: int,
    policy_text: str,
    *,
    kind: str | None = None,
    file: str | None = None,
    huge: bool = False,
    anon: int = 0,
    dirty: int = 0,
    pages: int = 0,
    mapmax: int = 0,
    swapcache: int = 0,
    active: int | None = None,
    writeback: int = 0,
    per_node: Mapping[int, int] = _NO_PAGES,
    page_size: int = 4096,
) -> str:
    """One ``/proc/<pid>/numa_maps`` line (no trailing newline), with the kernel's omissions.

    ``kind`` is ``"heap"`` or ``"stack"``; ``file`` (which wins over ``kind``)
    is escaped as the kernel does. ``pages`` is the number of pages counted;
    when it is 0 the line stops after the policy and file part. ``huge`` marks
    a hugetlb mapping (counts in huge pages, no ``active=``); ``page_size`` is
    the mapping's page size.
    """
    parts = [f"{start:08x}", policy_text]
    if file is not None:
        parts.append("file=" + escape_path(file))
    elif kind is not None:
        if kind not in ("heap", "stack"):
            raise ValueError(f"kind must be 'heap' or 'stack', not {kind!r}")
        parts.append(kind)
    if huge:
        parts.append("huge")
    if pages:
        if anon:
            parts.append(f"anon={anon}")
        if dirty:
            parts.append(f"dirty={dirty}")
        if pages != anon and pages != dirty:
            parts.append(f"mapped={pages}")
        if mapmax > 1:
            parts.append(f"mapmax={mapmax}")
        if swapcache:
            parts.append(f"swapcache={swapcache}")
        if active is not None and active < pages and not huge:
            parts.append(f"active={active}")
        if writeback:
            parts.append(f"writeback={writeback}")
        parts.extend(f"N{n}={c}" for n, c in sorted(per_node.items()) if c)
        parts.append(f"kernelpagesize_kB={page_size // 1024}")
    return " ".join(parts)


def escape_path(path: str) -> str:
    """Escape a path as numa_maps prints it: space, tab, newline and ``=`` as ``\\ooo``."""
    return "".join(f"\\{ord(ch):03o}" if ch in _PATH_ESCAPES else ch for ch in path)


def numastat_from_numa_maps(text: str) -> dict[str, dict[int, int]]:
    """Pages per node for each ``numastat -p`` category, read from numa_maps text.

    As numastat does: a line is ``huge``, ``heap`` or ``stack`` if one of its
    words starts with that keyword, otherwise ``private``; its ``N<node>=<pages>``
    words are added to that category. Keys are :data:`PROCESS_CATEGORIES`.
    """
    result: dict[str, dict[int, int]] = {c: {} for c in PROCESS_CATEGORIES}
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        category = "private"
        counts: list[tuple[int, int]] = []
        for word in words[1:]:  # words[0] is the start address
            if category == "private":
                for keyword in PROCESS_CATEGORIES[:3]:
                    if word.startswith(keyword):
                        category = keyword
                        break
            if word.startswith("N"):
                m = _NODE_COUNT.fullmatch(word)
                if m is None:
                    raise ValueError(f"numa_maps line {lineno}: cannot parse {word!r}")
                counts.append((int(m.group(1)), int(m.group(2))))
        per_node = result[category]
        for node, pages in counts:
            per_node[node] = per_node.get(node, 0) + pages
    return result
