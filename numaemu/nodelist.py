"""Node and CPU lists in numactl's syntax (``"0-2,4"``, ``"all"``, ``"!1"``).

The same grammar names nodes (``--membind``, ``migratepages``) and CPUs
(``--physcpubind``), and :func:`format_nodes` prints a set back the way the
kernel prints a bitmap list (``0-3,5,7-8``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from numbers import Integral

from .constants import MAX_NUMNODES

__all__ = ["format_nodes", "parse_cpus", "parse_nodes"]

# One comma-separated item: a number or an inclusive ascending range.
_ITEM = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")
# Highest id + 1 a text list may name, so that "0-999999999" cannot build a huge set.
_LIMITS = {"node": MAX_NUMNODES, "cpu": 8192}


def parse_nodes(
    spec: str | int | Iterable[int], nodes: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Parse a node list into sorted unique node ids.

    ``spec`` is numactl syntax (``"0"``, ``"0-2,4"``, ``"all"``, ``"!1"``;
    whitespace is ignored), a single int, or an iterable of ints. ``nodes`` is
    the set of valid ids: when given, every id must be in it; ``"all"`` and
    ``"!..."`` need it. Raises ``ValueError`` naming the bad spec.
    """
    return _parse(spec, nodes, "node")


def parse_cpus(
    spec: str | int | Iterable[int], cpus: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Parse a CPU list (same grammar as :func:`parse_nodes`); ``cpus`` are the valid ids."""
    return _parse(spec, cpus, "cpu")


def format_nodes(nodes: Iterable[int]) -> str:
    """Print ids as a compressed range list, e.g. ``0-3,5,7-8``; empty gives ``""``."""
    ids = sorted(set(int(n) for n in nodes))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _parse(spec: object, valid: Sequence[int] | None, what: str) -> tuple[int, ...]:
    valid_set = None if valid is None else {int(v) for v in valid}
    if isinstance(spec, str):
        ids = _parse_text(spec, valid_set, what)
    elif isinstance(spec, Integral) and not isinstance(spec, bool):
        ids = {int(spec)}
    else:
        ids = set()
        try:
            items = list(spec)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(f"{spec!r} is invalid: not a {what} list") from None
        for item in items:
            if isinstance(item, bool) or not isinstance(item, Integral):
                raise ValueError(f"{spec!r} is invalid: {item!r} is not a {what} number")
            ids.add(int(item))
    for n in ids:
        if n < 0:
            raise ValueError(f"{spec} is invalid: {what} {n} is negative")
        if valid_set is not None and n not in valid_set:
            raise ValueError(f"{spec} is invalid: {what} {n} does not exist")
    return tuple(sorted(ids))


def _parse_text(spec: str, valid: set[int] | None, what: str) -> set[int]:
    limit = _LIMITS[what]
    text = spec.strip()
    invert = text.startswith("!")
    if invert:
        text = text[1:].strip()
    if text == "all":
        if valid is None:
            raise ValueError(f"{spec} is invalid: 'all' needs the set of existing {what}s")
        ids = set(valid)
    else:
        ids = set()
        if not text:
            raise ValueError(f"{spec!r} is invalid: empty {what} list")
        for item in text.split(","):
            item = item.strip()
            m = _ITEM.fullmatch(item)
            if m is None:
                raise ValueError(f"{spec} is invalid: cannot parse {item!r}")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else int(m.group(2))
            if hi < lo:
                raise ValueError(f"{spec} is invalid: range {item} runs backwards")
            if hi >= limit:
                raise ValueError(f"{spec} is invalid: {what} {hi} is out of range")
            if valid is not None:
                bad = [n for n in range(lo, hi + 1) if n not in valid]
                if bad:
                    raise ValueError(f"{spec} is invalid: {what} {bad[0]} does not exist")
            ids.update(range(lo, hi + 1))
    if invert:
        if valid is None:
            raise ValueError(f"{spec} is invalid: '!' needs the set of existing {what}s")
        ids = valid - ids
    return ids
