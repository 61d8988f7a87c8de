"""Reverse mapping: who maps a page, and turning those mappings into migration entries.

For an anonymous page the owner task and virtual page number are in its
``struct page`` (``owner``, ``index``); for a page-cache page the object and
page index are, and every VMA that maps the object at that index maps it
(``filemap.mappers``).

``try_to_migrate`` is seed step 5: every present PTE of the pages becomes a
migration entry (which keeps the write permission) and the pages' mapcount
drops to zero.  ``remove_migration_entries`` is step 16 (or the back-out of a
failed migration): each entry that is still there becomes a real PTE again,
to the new page or back to the old one.  Entries are found again by
(task, vpn), so a VMA split or munmap in between is harmless: an entry that
is gone is simply not restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from numaemu import arrayops

from .filemap import mappers
from .pages import PTE_MIGRATION, PTE_NUMA, PTE_PRESENT, PTE_WRITE, make_ptes


@dataclass
class MigrationEntries:
    """What step 5 replaced: per task, the vpns, the batch index of their page, write bits."""

    node: int
    pfns: np.ndarray
    by_task: list[tuple[object, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def tasks(self) -> dict:
        """{task: [vpns]} of every mapping replaced, for the TLB shootdown."""
        out: dict = {}
        for task, vpns, _, _ in self.by_task:
            out.setdefault(task, []).append(vpns)
        return out


def rmap_walk(kernel, node: int, pfns: np.ndarray):
    """Yield (task, vpns, batch indices) of every place that may map the pages."""
    table = kernel.tables[node]
    mapping, index, owner = table.mapping[pfns], table.index[pfns], table.owner[pfns]
    anon = mapping == 0
    for pid in arrayops.values(owner[anon]):
        task = kernel.tasks.get(pid)
        if task is not None:
            sel = np.flatnonzero(anon & (owner == pid))
            yield task, table.anon_vpns(pfns[sel]), sel
    for oid in arrayops.values(mapping[~anon]):
        obj = kernel.objects.get(oid)
        if obj is None:
            continue
        sel = np.flatnonzero(mapping == oid)
        for task, vma in mappers(kernel, obj):
            offs = index[sel].astype(np.int64) - vma.pgoff
            inside = (offs >= 0) & (offs < vma.end - vma.start)
            if inside.any():
                yield task, offs[inside] + vma.start, sel[inside]


def _ptes_at(task, vpns: np.ndarray):
    """(vma, offset) groups for ``vpns`` that are mapped in ``task``."""
    where = task.locate(vpns)
    vmas = task.vmas
    for vi in arrayops.values(where[where >= 0]):
        sel = np.flatnonzero(where == vi)
        vma = vmas[vi]
        yield vma, vpns[sel] - vma.start, sel


def try_to_migrate(kernel, node: int, pfns: np.ndarray) -> tuple[MigrationEntries, np.ndarray]:
    """Step 5: replace every PTE of the pages with a migration entry; return the entries and
    how many mappings of each page were replaced (mapcount and refcount drop by that)."""
    record = MigrationEntries(node, pfns)
    unmapped = np.zeros(len(pfns), dtype=np.int64)
    want = make_ptes(node, pfns, False)  # present, read-only form of each page's PTE
    for task, vpns, idx in rmap_walk(kernel, node, pfns):
        for vma, offs, sel in _ptes_at(task, vpns):
            ptes = vma.pte[offs]
            mine = (ptes & ~(PTE_WRITE | PTE_NUMA)) == want[idx[sel]]  # hinting PTEs too
            if not mine.any():
                continue
            offs, pages = offs[mine], idx[sel][mine]
            write = ptes[mine] & PTE_WRITE
            vma.pte[offs] = (want[pages] & ~PTE_PRESENT) | PTE_MIGRATION | write
            arrayops.add_at(unmapped, pages, 1)
            record.by_task.append((task, offs + vma.start, pages, write))
    table = kernel.tables[node]
    arrayops.subtract_at(table.mapcount, pfns, unmapped)
    arrayops.subtract_at(table.refcount, pfns, unmapped)
    return record, unmapped


def remove_migration_entries(kernel, record: MigrationEntries, which: np.ndarray,
                             new_node: int, new_pfns: np.ndarray) -> None:
    """Step 16 (or back-out): entries of the pages selected by ``which`` (a mask over the
    batch) become PTEs of ``new_pfns`` on ``new_node``; mapcount and refcount follow."""
    entry_of = (make_ptes(record.node, record.pfns, False) & ~PTE_PRESENT) | PTE_MIGRATION
    table = kernel.tables[new_node]
    for task, vpns, pages, write in record.by_task:
        if task.exiting:
            continue
        keep = which[pages]
        vpns, pages, write = vpns[keep], pages[keep], write[keep]
        for vma, offs, sel in _ptes_at(task, vpns):
            still = (vma.pte[offs] & ~PTE_WRITE) == entry_of[pages[sel]]
            offs, got = offs[still], pages[sel][still]
            if len(offs) == 0:
                continue
            vma.pte[offs] = make_ptes(new_node, new_pfns[got], write[sel][still] != 0)
            arrayops.add_at(table.mapcount, new_pfns[got], 1)
            arrayops.add_at(table.refcount, new_pfns[got], 1)
