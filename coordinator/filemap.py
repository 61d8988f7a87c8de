"""Shared objects and their page caches (the kernel's address_space / radix tree).

Two kinds: ``shm`` (a named shared-memory object, like a file in /dev/shm:
zero-filled pages, kept until ``shm_unlink`` and the last unmap) and ``file``
(a real file: pages are read from it on a fault and dirty pages are written
back to it on ``msync``, on the last unmap, and at cluster stop).

``cache`` maps page index -> page, encoded like a present PTE (node and pfn).
A page being filled is in the cache *locked* and not uptodate; whoever faults
on it waits on the page lock and retries (the kernel's lock_page in
filemap_fault).  ``tree_lock`` serialises changes of the cache slots that span
an await (page-cache migration in the next step takes it; seed steps 6-11).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from numaemu import arrayops
from numaemu import protocol as P
from numaemu.errors import NumaError

from .memory_failure import poisoned
from .mempolicy import MemPolicy
from .pages import PG_DIRTY, PG_WRITEBACK, PTE_PRESENT, PTE_WRITE, make_ptes, pte_node, pte_pfn

log = logging.getLogger("numaemu.coordinator")


@dataclass(eq=False)
class SharedObject:
    """A page cache: named shared memory or a real file."""

    oid: int
    kind: str  # "shm" or "file"
    name: str  # shm name, or the file's absolute path
    npages: int
    size: int  # bytes (file size for files)
    cache: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Shared policy (mbind on a shm mapping) as sorted, disjoint (first index, end index,
    # policy) ranges: the kernel keeps it per page range of the object (struct shared_policy),
    # so an mbind of part of a mapping must not change the policy of the rest.
    policies: list = field(default_factory=list)
    unlinked: bool = False
    maps: int = 0  # number of VMAs mapping it
    uid: int = 0  # the owner: the uid of the task that created it
    tree_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def grow(self, npages: int) -> None:
        if npages > len(self.cache):
            self.cache = np.concatenate((self.cache,
                                         np.zeros(npages - len(self.cache), dtype=np.int64)))
        self.npages = max(self.npages, npages)

    def set_policy(self, start: int, end: int, policy: MemPolicy | None) -> None:
        """mpol_set_shared_policy: page indices ``[start, end)`` get ``policy`` (None clears)."""
        kept = []
        for s, e, p in self.policies:
            if s < start:
                kept.append((s, min(e, start), p))
            if e > end:
                kept.append((max(s, end), e, p))
        if policy is not None:
            kept.append((start, end, policy))
        self.policies = sorted(kept, key=lambda r: r[0])

    def policy_at(self, index: int) -> MemPolicy | None:
        """The shared policy of page ``index`` (mpol_shared_policy_lookup), or None."""
        for s, e, p in self.policies:
            if s <= index < e:
                return p
        return None

    def policy_groups(self, idx: np.ndarray) -> list:
        """``(mask over idx, policy or None)`` for each shared policy the pages ``idx`` use."""
        rest = np.ones(len(idx), dtype=bool)
        groups = []
        for s, e, p in self.policies:
            sel = (idx >= s) & (idx < e)
            if sel.any():
                groups.append((sel, p))
                rest &= ~sel
        if rest.any():
            groups.append((rest, None))
        return groups

    @property
    def path_text(self) -> str:
        """What numa_maps prints after ``file=``."""
        return f"/dev/shm/{self.name}" if self.kind == "shm" else self.name


def open_object(kernel, *, shared: str | None, file: str | None, npages: int,
                uid: int = 0) -> SharedObject:
    """Find or create the object a shared mapping of ``npages`` pages maps."""
    if file is not None:
        path = os.path.abspath(file)
        obj = kernel.files.get(path)
        if obj is None:
            try:
                st = os.stat(path)
                # Only regular files have pages to map (mmap(2): ENODEV); opening a FIFO
                # would also block the coordinator until a writer came.
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb+"):
                        pass
            except FileNotFoundError:
                raise NumaError(errno.ENOENT, f"no such file: {path}") from None
            except PermissionError:
                raise NumaError(errno.EACCES, f"cannot open {path} for writing") from None
            except (OSError, ValueError) as exc:  # ENOTDIR, ENAMETOOLONG, ELOOP, NUL, ...
                err = getattr(exc, "errno", None) or errno.EINVAL
                raise NumaError(err, f"cannot open {path}: {exc}") from None
            if not stat.S_ISREG(st.st_mode):
                raise NumaError(errno.ENODEV, f"{path} is not a regular file")
            size = st.st_size
            file_pages = -(-size // kernel.page_size)
            # The page cache is sized by what is mapped, not by the file: a huge sparse file
            # mapped in part costs what the mapping does (8 bytes a page).
            obj = SharedObject(kernel.new_object_id(), "file", path, file_pages, size,
                               uid=uid)
            kernel.files[path] = obj
            kernel.objects[obj.oid] = obj
        obj.grow(npages)  # pages past EOF are in the VMA but fault with SIGBUS
        return obj
    obj = kernel.shm_names.get(shared)
    if obj is None:
        obj = SharedObject(kernel.new_object_id(), "shm", shared, npages,
                           npages * kernel.page_size, uid=uid)
        obj.grow(npages)
        kernel.shm_names[shared] = obj
        kernel.objects[obj.oid] = obj
    obj.grow(npages)
    obj.size = max(obj.size, npages * kernel.page_size) if obj.kind == "shm" else obj.size
    return obj


async def fill_from_file(kernel, obj: SharedObject, idx: np.ndarray, nodes: np.ndarray,
                         pfns: np.ndarray) -> None:
    """Read file pages ``idx`` into fresh frames (the readpage of a file fault)."""
    ps = kernel.page_size
    # File I/O never runs in the event loop (a slow disk must not stall the coordinator).
    data = await asyncio.to_thread(_read_file_pages, obj.name, idx.tolist(), ps)
    view = memoryview(data)
    for n in arrayops.values(nodes):
        for sel in _chunks(np.flatnonzero(nodes == n), ps):
            chunk = b"".join(view[i * ps : (i + 1) * ps] for i in sel.tolist())
            await kernel.node(n).peer.call(P.WriteFrames(pfns=pfns[sel].astype(P.PFN),
                                                         data=chunk))


def _chunks(sel: np.ndarray, page_size: int) -> list[np.ndarray]:
    """``sel`` in pieces of one message's worth of frames (``P.MAX_FRAME_DATA``)."""
    step = P.frames_per_message(page_size)
    return [sel[i : i + step] for i in range(0, len(sel), step)]


def _read_file_pages(path: str, indices: list[int], ps: int) -> bytearray:
    """Read pages ``indices`` of a file (zeros past its end); runs in a worker thread."""
    data = bytearray(len(indices) * ps)
    try:
        with open(path, "rb") as f:
            for i, index in enumerate(indices):
                chunk = os.pread(f.fileno(), ps, index * ps)
                data[i * ps : i * ps + len(chunk)] = chunk
    except OSError as exc:
        raise NumaError(errno.EIO, f"reading {path}: {exc}") from None
    return data


def _write_file_pages(path: str, pages: list[tuple[int, bytes]]) -> None:
    """pwrite each (offset, bytes) of a file, then fsync it; runs in a worker thread."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise NumaError(errno.EIO, f"writing back {path}: {exc}") from None
    try:
        for offset, chunk in pages:
            os.pwrite(fd, chunk, offset)
        os.fsync(fd)
    except OSError as exc:
        raise NumaError(errno.EIO, f"writing back {path}: {exc}") from None
    finally:
        os.close(fd)


def mappers(kernel, obj: SharedObject):
    """Every (task, vma) mapping ``obj`` (the rmap walk of an address_space)."""
    for task in list(kernel.tasks.values()):
        for vma in task.vmas:
            if vma.obj is obj:
                yield task, vma


async def writeback(kernel, obj: SharedObject, indices: np.ndarray | None = None) -> int:
    """Write dirty pages of a file object back to the file; return how many were written.

    Order as in the kernel's write_cache_pages: lock the page, write-protect it in
    every mapping and flush those TLBs (clear_page_dirty_for_io: a store after this
    faults and re-dirties the page), set writeback, unlock, do the I/O, end writeback.
    """
    if obj.kind != "file":
        return 0
    if indices is None:
        indices = np.flatnonzero(obj.cache[: obj.npages])
    all_indices = indices
    written = 0
    while len(indices):
        indices = indices[indices < min(obj.npages, -(-obj.size // kernel.page_size))]
        entries = obj.cache[indices]
        keep = entries != 0
        indices, entries = indices[keep], entries[keep]
        nodes, pfns = pte_node(entries), pte_pfn(entries)
        live = ~poisoned(kernel, nodes)  # a dead node's pages are lost: nothing to write
        indices, entries, nodes, pfns = indices[live], entries[live], nodes[live], pfns[live]
        dirty = np.zeros(len(indices), dtype=bool)
        for n in arrayops.values(nodes):
            sel = nodes == n
            dirty[sel] = (kernel.tables[n].flags[pfns[sel]] & PG_DIRTY) != 0
        indices, entries, nodes, pfns = indices[dirty], entries[dirty], nodes[dirty], pfns[dirty]
        if len(indices) == 0:
            break
        # trylock the pages, write back those we got, and only then sleep on a busy one:
        # holding locks while sleeping on another (held, say, by a migration that itself
        # sleeps on one of ours) would deadlock.
        got = trylock_pages(kernel, nodes, pfns)
        written += await _writeback_locked(kernel, obj, indices[got], nodes[got], pfns[got])
        busy = np.flatnonzero(~got)
        if len(busy) == 0:
            break
        await kernel.locks.wait_on_page_locked(int(nodes[busy[0]]), int(pfns[busy[0]]),
                                               timeout=30)
        indices = indices[busy]  # looked up again: the page may have moved meanwhile
    await wait_writeback(kernel, obj, all_indices)
    return written


async def wait_writeback(kernel, obj: SharedObject, indices: np.ndarray) -> None:
    """Wait until no page of ``indices`` is under writeback (by the flusher, say): after
    msync(MS_SYNC) returns, the file holds what the pages held."""
    while True:
        entries = obj.cache[indices[indices < len(obj.cache)]]
        entries = entries[entries != 0]
        nodes, pfns = pte_node(entries), pte_pfn(entries)
        for n in arrayops.values(nodes):
            mine = pfns[nodes == n]
            busy = mine[(kernel.tables[n].flags[mine] & PG_WRITEBACK) != 0]
            if len(busy):
                await kernel.locks.wait_on_page_writeback(n, int(busy[0]), timeout=30)
                break  # look again: pages may have moved meanwhile
        else:
            return


async def _writeback_locked(kernel, obj: SharedObject, indices, nodes, pfns) -> int:
    """Write back locked dirty pages: write-protect, flag writeback, unlock, write, end."""
    from .shootdown import flush_tlb

    if len(indices) == 0:
        return 0
    try:
        # clear_page_dirty_for_io: write-protect every mapping, then flush their TLBs.
        targets: dict = {}
        for task, vma in mappers(kernel, obj):
            offs = indices - vma.pgoff
            inside = (offs >= 0) & (offs < vma.end - vma.start)
            offs = offs[inside]
            ptes = vma.pte[offs]
            writable = ((ptes & PTE_WRITE) != 0) & ((ptes & PTE_PRESENT) != 0)
            offs = offs[writable]
            if len(offs):
                vma.pte[offs] &= ~PTE_WRITE
                targets.setdefault(task, []).append(offs + vma.start)
        await flush_tlb(kernel, targets, write_only=True)
        for n in arrayops.values(nodes):
            table = kernel.tables[n]
            sel = pfns[nodes == n]
            table.flags[sel] = (table.flags[sel] & ~int(PG_DIRTY)) | PG_WRITEBACK
    finally:
        for n in arrayops.values(nodes):
            kernel.locks.unlock(n, pfns[nodes == n])
    try:
        await _write_pages(kernel, obj, indices, nodes, pfns)
    finally:
        for n in arrayops.values(nodes):
            kernel.locks.end_writeback(n, pfns[nodes == n])
    return len(indices)


async def _write_pages(kernel, obj, indices, nodes, pfns) -> None:
    ps = kernel.page_size
    contents: dict[int, bytes] = {}
    for n in arrayops.values(nodes):
        for sel in _chunks(np.flatnonzero(nodes == n), ps):
            reply = await kernel.node(n).peer.call(P.ReadFrames(pfns=pfns[sel].astype(P.PFN)))
            data = reply["data"]
            for j, i in enumerate(sel.tolist()):
                contents[i] = data[j * ps : (j + 1) * ps]
    pages = []
    for i, index in enumerate(indices.tolist()):
        offset = index * ps
        size = min(ps, obj.size - offset)  # never extend the file
        if size > 0:
            pages.append((offset, contents[i][:size]))
    await asyncio.to_thread(_write_file_pages, obj.name, pages)


def trylock_pages(kernel, nodes: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """trylock_page on every page; the mask of those taken."""
    got = np.zeros(len(pfns), dtype=bool)
    for n in arrayops.values(nodes):
        sel = np.flatnonzero(nodes == n)
        got[sel] = kernel.locks.trylock(n, pfns[sel])
    return got


def cache_entry(node: int, pfn: np.ndarray) -> np.ndarray:
    """Page-cache slot value for a page (same encoding as a read-only PTE)."""
    return make_ptes(node, pfn, False)


async def release_object(kernel, obj: SharedObject) -> None:
    """Drop the page cache of an object nobody maps any more (and that is unlinked, or a file)."""
    if obj.maps > 0 or (obj.kind == "shm" and not obj.unlinked):
        return
    if obj.kind == "file":
        try:
            await writeback(kernel, obj)
        except Exception as exc:  # the mapping is gone already: release anyway
            log.warning("writeback of %s on release failed: %s", obj.name, exc)
        if obj.maps > 0:
            return  # mapped again while we wrote back: it lives on, one page cache per file
        kernel.files.pop(obj.name, None)
    else:
        if kernel.shm_names.get(obj.name) is obj:
            kernel.shm_names.pop(obj.name, None)
    kernel.objects.pop(obj.oid, None)
    present = np.flatnonzero(obj.cache & PTE_PRESENT)
    entries = obj.cache[present]
    obj.cache[present] = 0
    await kernel.put_pages(pte_node(entries), pte_pfn(entries))
